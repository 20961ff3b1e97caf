"""The one exception type of the data layer.

`DataError` subclasses `ValueError`, so callers that validate inputs generically
(`except ValueError`) catch it, while its messages always name the dataset, split, file or key at
fault, and the fix.
"""


class DataError(ValueError):
  """A dataset is unknown, not prepared, corrupt, mismatched, or yields an invalid batch."""

"""Task names and their headline metrics, readable without JAX (the run lister and the reports
use them on run directories)."""

# name -> the scalar metrics of its evaluation (metrics.jsonl, summary.json).
METRICS = {
    'classification': ('loss', 'accuracy'),
    'segmentation': ('loss', 'pixel_accuracy', 'miou'),
    'localization': ('loss', 'accuracy', 'box_iou', 'localized'),
    'reconstruction': ('loss', 'mse', 'psnr'),
    # no 'loss': a detector evaluated gives detections, not losses (cnnlab.tasks.detection)
    'detection': ('AP', 'AP50', 'AP75', 'AR100'),
}
# name -> (headline metric, 'max' | 'min'): what sums a run of that task up.
HEADLINES = {
    'classification': ('accuracy', 'max'),
    'segmentation': ('miou', 'max'),
    'localization': ('localized', 'max'),
    'reconstruction': ('psnr', 'max'),
    'detection': ('AP50', 'max'),
}
TASK_NAMES = tuple(HEADLINES)
# Metrics that improve downwards (a best_metric named without best_mode is ranked by this).
LOWER_IS_BETTER = ('loss', 'mse')


# Metrics shown as percentages (fractions of examples or pixels, COCO's average precisions and
# recalls); the others as they are.
PERCENT = ('accuracy', 'pixel_accuracy', 'miou', 'localized', 'box_iou', 'AP', 'AP50', 'AP75',
           'AR100')
UNITS = {'psnr': 'dB'}


def display(metric: str) -> tuple[str, float, int]:
  """(column label, scale, decimals) of a metric in tables: 'accuracy (%)', x100, 2."""
  if metric in PERCENT:
    return f'{metric} (%)', 100.0, 2
  if metric in UNITS:
    return f'{metric} ({UNITS[metric]})', 1.0, 2
  return metric, 1.0, 4


def task_name(config) -> str:
  """The task of a config; a run directory written before tasks existed classified."""
  task = config.get('task') if hasattr(config, 'get') else None
  return task['name'] if task else 'classification'


def headline(config) -> tuple[str, str]:
  """(metric, mode) that ranks checkpoints: `checkpoint.best_metric` where set, else the task's
  headline; `checkpoint.best_mode` where set, else 'min' for LOWER_IS_BETTER metrics, else 'max'."""
  metric, mode = HEADLINES.get(task_name(config), ('loss', 'min'))
  checkpoint = config.get('checkpoint') or {}
  if checkpoint.get('best_metric') is not None:  # '' = no best checkpoint
    metric = checkpoint['best_metric']
    mode = 'min' if metric in LOWER_IS_BETTER else 'max'
  return metric, checkpoint.get('best_mode') or mode


__all__ = ['METRICS', 'HEADLINES', 'LOWER_IS_BETTER', 'PERCENT', 'display', 'TASK_NAMES',
           'task_name', 'headline']

"""Tasks: how a model's output is trained, scored and returned, chosen by `config.task.name`.

  classification  (B, K) logits against 'label'                       headline 'accuracy'
  segmentation    (B, H, W, K) logits against 'mask' (0 = background)  headline 'miou'
  localization    {'logits', 'box'} against 'label' and 'bbox'         headline 'localized'
  reconstruction  (B, H, W, C) pixel logits against the image          headline 'psnr'
  detection       {'rpn_*', 'roi_*'} in training, {'boxes', 'scores',  headline 'AP50'
                  'labels', 'num_detections'} after, against 'labels' and 'boxes' (B, N, 4)

`cnnlab.tasks.base.Task` says what a task gives the trainer; one module per task.
"""

from __future__ import annotations

from cnnlab.tasks.base import Task, TaskError
from cnnlab.tasks.classification import Classification
from cnnlab.tasks.config import default_config
from cnnlab.tasks.detection import Detection
from cnnlab.tasks.localization import Localization
from cnnlab.tasks.names import HEADLINES, TASK_NAMES, headline, task_name
from cnnlab.tasks.reconstruction import Reconstruction
from cnnlab.tasks.segmentation import Segmentation

TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, Segmentation, Localization,
                                                     Reconstruction, Detection)}


def get(name: str) -> type[Task]:
  """The task class called `name`; ValueError listing the tasks otherwise."""
  if name not in TASKS:
    raise ValueError(f'task.name={name!r}: unknown task; expected one of {TASK_NAMES}')
  return TASKS[name]


def dataset_keys(info) -> tuple[str, ...]:
  """The keys every example of a dataset has (cnnlab.data.DatasetInfo.example_keys)."""
  return info.example_keys()


def check_config(config, info) -> list[str]:
  """Problems with `config.task` for the dataset described by `info`, each naming its key."""
  name = config.task.name
  if name not in TASKS:
    return [f'task.name={name!r}: expected one of {TASK_NAMES}']
  task = TASKS[name]
  problems = task.check_dataset(config, info)
  unfit = bool(problems)
  augment = config.data.augment
  if not task.mixing:
    for key in ('mixup_alpha', 'cutmix_alpha'):
      if augment[key]:
        problems.append(f'data.augment.{key}={augment[key]!r}: mixing blends labels, which '
                        f'task.name={name!r} does not train on; set it to 0')
  if not unfit:
    problems += task.check_config(config.task, info)
  return problems


def create(config, num_classes: int | None, class_names=None) -> Task:
  """The task of `config` (classification for a run directory written before tasks existed),
  for a model of `num_classes` outputs (`Task.model_classes`)."""
  return get(task_name(config)).from_config(config, num_classes, class_names)


__all__ = ['Task', 'TaskError', 'TASKS', 'TASK_NAMES', 'HEADLINES', 'get', 'create',
           'check_config', 'dataset_keys', 'default_config', 'headline', 'task_name',
           'Classification', 'Segmentation', 'Localization', 'Reconstruction', 'Detection']

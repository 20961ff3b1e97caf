"""Jittable operations on boxes (static shapes): IoU, GIoU."""

from cnnlab.ops.boxes import area, box_iou, generalized_box_iou, paired_giou, paired_iou

__all__ = ['area', 'box_iou', 'generalized_box_iou', 'paired_giou', 'paired_iou']

"""Jittable operations on boxes (static shapes): IoU, GIoU, box coding, anchors, NMS, RoIAlign."""

from cnnlab.ops.anchors import (base_anchors, generate_anchors, grid_anchors,
                                num_anchors_per_location)
from cnnlab.ops.boxes import area, box_iou, generalized_box_iou, paired_giou, paired_iou
from cnnlab.ops.coding import clip_boxes, decode, encode, min_size_mask
from cnnlab.ops.nms import batched_nms, nms
from cnnlab.ops.roi_align import roi_align

__all__ = ['area', 'box_iou', 'generalized_box_iou', 'paired_giou', 'paired_iou',
           'encode', 'decode', 'clip_boxes', 'min_size_mask',
           'base_anchors', 'grid_anchors', 'generate_anchors', 'num_anchors_per_location',
           'nms', 'batched_nms', 'roi_align']

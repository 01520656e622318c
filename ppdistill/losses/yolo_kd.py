"""YOLOv3 output distillation: the raw per-level outputs of ppdet's ``YOLOv3Head``, in four modes.

The seed's YOLOv3 variants as one loss: KD on all outputs, class-only KD, KD where the teacher sees an
object, and the objectness-scaled form of ppdet 2.6's ``DistillYOLOv3Loss``
(``ppdet/slim/distill_loss.py``), which reads the head's internals through ``yolo_head.loss.distill_pairs``;
here the same terms come from taps on the ``yolo_output.*`` convs, so any YOLOv3-style head works
without architecture code. (The fifth variant, neck-feature MSE, is a feature loss on the ``fpn`` role:
:class:`~ppdistill.losses.mse.FeatureMSELoss`.)
"""
from typing import Optional

import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from ..errors import PPDistillError
from .base import DistillLoss
from .outputs import same_output_channels, split_anchors

__all__ = ['YOLOv3OutputLoss', 'YOLO_MODES']

YOLO_MODES = ('all', 'cls', 'obj_thresh', 'obj_scaled')


def _soft_bce(logit: paddle.Tensor, target_logit: paddle.Tensor) -> paddle.Tensor:
    """Elementwise BCE of ``logit`` towards the soft target ``sigmoid(target_logit)``."""
    return F.binary_cross_entropy_with_logits(logit, F.sigmoid(target_logit), reduction='none')


@register
class YOLOv3OutputLoss(DistillLoss):
    """KD on YOLOv3 head outputs ``[N, A*(5+C), H, W]`` (per anchor: x, y, w, h, objectness, C classes).

    With ``s``/``t`` the student/teacher values of one level, ``BCE(a, b) = BCE-with-logits(a, sigmoid(b))``
    (soft target), ``o = sigmoid(t_obj)`` and ``mean`` over the level's ``N*A*H*W`` positions (times ``C``
    for the class term), as in ppdet's ``DistillYOLOv3Loss``::

        box = mean(w * (BCE(s_x, t_x) + BCE(s_y, t_y) + |s_w - t_w| + |s_h - t_h|))
        cls = mean(w * BCE(s_cls, t_cls))
        obj = mean(w_obj * BCE-with-logits(s_obj, target_obj))
        loss = loss_weight * (box + cls + obj)

    ``mode``:

    * ``all`` — every output: ``w = w_obj = 1``, ``target_obj = sigmoid(t_obj)``;
    * ``cls`` — class outputs only: ``cls`` with ``w = 1`` (no box, no objectness term);
    * ``obj_thresh`` — only where the teacher sees an object: ``w = w_obj = [o > obj_thresh]``,
      ``target_obj = o``;
    * ``obj_scaled`` — ppdet's ``DistillYOLOv3Loss``: ``w = o``, ``w_obj = 1``,
      ``target_obj = [t_obj > 0]`` (the teacher's objectness thresholded at 0.5).

    ``x, y`` are sigmoid-activated offsets (hence BCE towards the teacher's sigmoid), ``w, h`` log-scales
    (hence L1), as in ppdet. ``loss_weight`` defaults to ppdet's 1000 (the means over all positions are
    small). The number of anchors per cell ``A`` is ``num_anchors``, or ``C_out / (5 + num_classes)``
    (``/ (6 + num_classes)`` IoU-aware) when ``num_classes`` is given.

    IoU-aware heads (PP-YOLO, PP-YOLOv2: ``YOLOv3Head.iou_aware: true``) output ``[N, A*(6+C), H, W]``:
    ``A`` IoU-prediction logits first, then the ``A*(5+C)`` values above (ppdet's ``YOLOv3Head``). The
    IoU logits are distilled like ``x, y`` and added to the box term, ``iou = mean(w * BCE(s_iou, t_iou))``.
    The channel count alone cannot tell the layouts apart (258 = 3 x 86 is 81 classes, or 80 classes
    IoU-aware), so ``iou_aware`` comes from the models' ``YOLOv3Head`` config: :mod:`ppdistill.build`
    fills it from the student's and the teacher's config (``model_settings``) and rejects a mismatch.

    Args:
        student_channels, teacher_channels: ``A*(5+C)`` of the level; must be equal (no align conv).
        mode: one of ``all``, ``cls``, ``obj_thresh``, ``obj_scaled``.
        obj_thresh: teacher objectness probability threshold of ``obj_thresh`` mode (default 0.5).
        num_anchors: anchors per cell, used when ``num_classes`` is not given; default: the level's
            ``anchor_masks`` entry, else 3 (YOLOv3).
        num_classes: foreground classes ``C`` (optional; checks the layout).
        loss_weight: overall weight.
        iou_aware: the outputs start with ``A`` IoU logits (filled from ``YOLOv3Head.iou_aware``).
        anchor_masks: the head's anchor indices per level (filled from ``YOLOv3Head.anchor_masks``).
        level, num_levels: this level's index among the tapped levels and their number (from the distiller).
    """

    equal_channels = True  # outputs are compared anchor by anchor: no align conv
    # Model settings student and teacher must share, {name: (ppdet module, key)}; those that are arguments
    # here are passed from the configs (ppdistill.build.fill_model_settings). Outputs are compared anchor by
    # anchor, so the anchors must be the same too.
    model_settings = {'iou_aware': ('YOLOv3Head', 'iou_aware'), 'anchor_masks': ('YOLOv3Head', 'anchor_masks'),
                      'anchors': ('YOLOv3Head', 'anchors')}

    def __init__(self, student_channels: int, teacher_channels: int, mode: str = 'obj_scaled',
                 obj_thresh: float = 0.5, num_anchors: Optional[int] = None, num_classes: Optional[int] = None,
                 loss_weight: float = 1000.0, iou_aware: bool = False, anchor_masks: Optional[list] = None,
                 level: int = 0, num_levels: Optional[int] = None):
        super().__init__()
        if mode not in YOLO_MODES:
            raise PPDistillError(f'YOLOv3OutputLoss: unknown mode {mode!r}; use one of {", ".join(YOLO_MODES)}')
        channels = same_output_channels('YOLOv3OutputLoss', student_channels, teacher_channels)
        self.iou_aware = bool(iou_aware)
        per_anchor = 6 if self.iou_aware else 5  # values per anchor besides the classes
        if anchor_masks is not None:
            if num_levels is not None and len(anchor_masks) != num_levels or not 0 <= level < len(anchor_masks):
                raise PPDistillError(f'YOLOv3OutputLoss: anchor_masks {anchor_masks} has no entry for level {level} '
                                     f'of {num_levels}; tap the head outputs in the order of anchor_masks')
            if num_anchors is not None and int(num_anchors) != len(anchor_masks[level]):
                raise PPDistillError(f'YOLOv3OutputLoss: num_anchors={num_anchors} but the head has '
                                     f'{len(anchor_masks[level])} anchors at level {level} (anchor_masks '
                                     f'{anchor_masks}); remove num_anchors')
            num_anchors = len(anchor_masks[level])
        num_anchors = 3 if num_anchors is None else num_anchors
        if num_classes is not None:
            per = per_anchor + int(num_classes)
            num_anchors = channels // per if channels % per == 0 else 0
        num_anchors = int(num_anchors)
        if num_anchors <= 0 or channels % num_anchors or channels // num_anchors < per_anchor + 1:
            raise PPDistillError(f'YOLOv3OutputLoss: {channels} output channels are not num_anchors x '
                                 f'({per_anchor} + num_classes) (num_anchors={num_anchors}, num_classes='
                                 f'{num_classes}, iou_aware={self.iou_aware})')
        self.mode = mode
        self.obj_thresh = float(obj_thresh)
        if not 0.0 < self.obj_thresh < 1.0:  # a probability: at >= 1 obj_thresh mode distils nothing
            raise PPDistillError(f'YOLOv3OutputLoss: obj_thresh must satisfy 0 < obj_thresh < 1 (a teacher '
                                 f'objectness probability), got {obj_thresh}')
        self.num_anchors = num_anchors
        self.loss_weight = float(loss_weight)

    def _weights(self, t_obj: paddle.Tensor):
        """Per-position weights ``(w, w_obj)`` and the objectness target for this mode."""
        o = F.sigmoid(t_obj)
        if self.mode == 'obj_scaled':
            return o, 1.0, paddle.cast(t_obj > 0, t_obj.dtype)
        if self.mode == 'obj_thresh':
            keep = paddle.cast(o > self.obj_thresh, t_obj.dtype)
            return keep, keep, o
        return 1.0, 1.0, o

    def forward(self, student: paddle.Tensor, teacher: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        """``student``/``teacher``: ``[N, A*(5+C), H, W]`` (IoU-aware: ``[N, A*(6+C), H, W]``) raw outputs
        of one level; returns a scalar."""
        teacher = teacher.detach()
        a = self.num_anchors
        if self.iou_aware:  # [N, A, H, W] IoU logits first, as ppdet's YOLOv3Head
            s_iou, t_iou = student[:, :a].unsqueeze(2), teacher[:, :a].unsqueeze(2)  # [N, A, 1, H, W]
            student, teacher = student[:, a:], teacher[:, a:]
        s = split_anchors(student, a)  # [N, A, 5+C, H, W]
        t = split_anchors(teacher, a)
        w, w_obj, target_obj = self._weights(t[:, :, 4:5])
        cls = (w * _soft_bce(s[:, :, 5:], t[:, :, 5:])).mean()
        if self.mode == 'cls':
            return self.loss_weight * cls
        box = (_soft_bce(s[:, :, 0:1], t[:, :, 0:1]) + _soft_bce(s[:, :, 1:2], t[:, :, 1:2])
               + (s[:, :, 2:3] - t[:, :, 2:3]).abs() + (s[:, :, 3:4] - t[:, :, 3:4]).abs())
        box = (w * box).mean()
        if self.iou_aware:
            box = box + (w * _soft_bce(s_iou, t_iou)).mean()
        obj = (w_obj * F.binary_cross_entropy_with_logits(s[:, :, 4:5], target_obj, reduction='none')).mean()
        return self.loss_weight * (box + cls + obj)

"""Fine-grained feature imitation (FGFI).

Wang, Yuan, Zhang, Feng, "Distilling Object Detectors with Fine-grained Feature Imitation", CVPR 2019
(arXiv:1906.03609). Reference code: ``twangnh/Distilling-Object-Detectors`` — the mask in
``lib/model/rpn/anchor_target_layer.py``, the adaptation layer in ``lib/model/faster_rcnn/vgg11.py`` and
its init and the loss in ``trainval_net_sup.py``.

The student imitates the teacher only near objects: at the cells whose anchors overlap a GT box with an
IoU above ``psi`` times that box's best anchor IoU (:func:`ppdistill.masks.fgfi_masks`).
"""
import inspect
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from ppdet.core.workspace import register

from .base import FeatureLoss
from ..errors import PPDistillError
from ..masks import fgfi_masks, level_stride, retina_anchor_wh

__all__ = ['FGFILoss', 'LevelAnchors']

# ppdet's RetinaAnchorGenerator defaults.
RETINA_DEFAULTS = {'octave_base_scale': 4.0, 'scales_per_octave': 3, 'aspect_ratios': [0.5, 1.0, 2.0]}
_SHAPE_KEYS = {'retina': tuple(RETINA_DEFAULTS), 'wh': ('wh',), 'virtual': ('virtual_anchor_scale',)}
_COMMON_KEYS = ('strides', 'offset')


class LevelAnchors:
    """The anchors of one feature level, from a distill config's ``anchors`` mapping.

    One of three forms (``strides`` and ``offset`` are optional in each):

    * RetinaNet style (the default; ppdet ``RetinaAnchorGenerator``): ``octave_base_scale`` (4),
      ``scales_per_octave`` (3), ``aspect_ratios`` ([0.5, 1, 2]); sizes scale with the level's stride.
    * explicit: ``wh``, one list of ``[w, h]`` pixel sizes per student level (YOLO style), in the order
      of the tapped levels.
    * virtual (anchor-free student): ``virtual_anchor_scale``: one square anchor of
      ``virtual_anchor_scale * stride`` per cell.

    ``strides``: one per student level (pixels); default: measured from the tensors
    (:func:`ppdistill.masks.level_stride`). ``offset``: anchor centres at ``(cell + offset) * stride``
    (default 0, as ppdet's anchor generators; anchor-free heads use 0.5). Per-level lists must have one
    entry per student level (``num_levels``), else :class:`PPDistillError`.

    Args:
        anchors: the mapping (``None``: RetinaNet defaults).
        level: index of this level among the student's levels.
        num_levels: number of student levels (``None``: not checked).
    """

    def __init__(self, anchors: Optional[dict] = None, level: int = 0, num_levels: Optional[int] = None):
        if anchors is not None and not isinstance(anchors, dict):
            raise PPDistillError(f'FGFILoss anchors must be a mapping (e.g. {{virtual_anchor_scale: 5.0}}), '
                                 f'got {anchors!r}')
        anchors = dict(anchors or {})
        known = sum(_SHAPE_KEYS.values(), ()) + _COMMON_KEYS
        unknown = sorted(set(anchors) - set(known))
        if unknown:
            raise PPDistillError(f'FGFILoss anchors: unknown key(s) {unknown}; known: {list(known)}')
        kinds = [k for k, keys in _SHAPE_KEYS.items() if any(key in anchors for key in keys)]
        if len(kinds) > 1:
            raise PPDistillError(f'FGFILoss anchors: give one of RetinaNet-style keys {list(RETINA_DEFAULTS)}, '
                                 f"'wh' or 'virtual_anchor_scale', not {sorted(set(anchors) - set(_COMMON_KEYS))}")
        self.kind = kinds[0] if kinds else 'retina'
        self.level = int(level)
        self.offset = float(anchors.get('offset', 0.0))
        self.stride = self._per_level(anchors, 'strides', num_levels)
        if self.stride is not None:
            self.stride = float(self.stride)
            if self.stride <= 0:
                raise PPDistillError(f'FGFILoss anchors: strides must be positive, got {anchors["strides"]}')
        self.retina = {k: anchors.get(k, v) for k, v in RETINA_DEFAULTS.items()}
        self.virtual_scale = anchors.get('virtual_anchor_scale', 0.0)
        self.wh = self._per_level(anchors, 'wh', num_levels) if self.kind == 'wh' else None
        try:  # one check for every form: the sizes at some stride must be positive [w, h] pairs
            self.wh = None if self.wh is None else np.asarray(self.wh, dtype='float64')
            sizes = self.anchor_wh(8.0, 8.0)
            ok = sizes.ndim == 2 and sizes.shape[0] > 0 and sizes.shape[1] == 2 and bool((sizes > 0).all())
        except (TypeError, ValueError):
            ok = False
        if not ok:
            given = {k: anchors[k][self.level] if k == 'wh' else anchors[k]
                     for k in _SHAPE_KEYS[self.kind] if k in anchors}
            raise PPDistillError(f'FGFILoss anchors: {given} (level {self.level}) do not give a list of positive '
                                 '[w, h] anchor sizes')

    def _per_level(self, anchors: dict, key: str, num_levels: Optional[int]):
        if key not in anchors:
            return None
        values = anchors[key]
        if not isinstance(values, (list, tuple)):
            raise PPDistillError(f'FGFILoss anchors: {key} must be a list with one entry per student level, '
                                 f'got {values!r}')
        if num_levels is not None and len(values) != num_levels:
            raise PPDistillError(f'FGFILoss anchors: {key} has {len(values)} entries but the student has '
                                 f'{num_levels} levels; give one per level')
        if not 0 <= self.level < len(values):
            raise PPDistillError(f'FGFILoss anchors: {key} has no entry for student level {self.level}')
        return values[self.level]

    def strides(self, image_hw: Sequence[int], feature_hw: Sequence[int]) -> Tuple[float, float]:
        """``(stride_h, stride_w)``: the configured stride, else measured from the padded input size.

        A configured stride that cannot give this feature size (``ceil`` or ``floor`` of input / stride)
        is an error: the anchors would sit at another level's positions and sizes."""
        if self.stride is None:
            return (level_stride(image_hw[0], feature_hw[0]), level_stride(image_hw[1], feature_hw[1]))
        for image, feature in zip(image_hw, feature_hw):
            if feature not in (math.ceil(image / self.stride), math.floor(image / self.stride)):
                raise PPDistillError(
                    f'FGFILoss anchors: strides[{self.level}] = {self.stride:g} but student level {self.level} '
                    f'has {feature} cells for {image} input pixels (stride {level_stride(image, feature):g}); '
                    'fix strides (one per tapped student level, in tap order) or drop it to measure them')
        return self.stride, self.stride

    def anchor_wh(self, stride_h: float, stride_w: float) -> np.ndarray:
        """``[A, 2]`` anchor widths/heights of this level (sizes from the mean stride when they differ)."""
        stride = 0.5 * (stride_h + stride_w)
        if self.kind == 'wh':
            return self.wh
        if self.kind == 'virtual':
            return np.full([1, 2], float(self.virtual_scale) * stride)
        return retina_anchor_wh(stride, float(self.retina['octave_base_scale']),
                                int(self.retina['scales_per_octave']),
                                [float(a) for a in self.retina['aspect_ratios']])


def _truncated_normal(std: float) -> nn.initializer.Initializer:
    """Normal(0, std) truncated at 2 std (PyTorch's ``trunc_normal_``-style init of the reference).

    Paddle 2.6's ``TruncatedNormal`` always cuts at 2 std; paddle 3 takes absolute bounds ``a``/``b``
    (default +-2.0, i.e. no truncation at a small std), so they are passed where supported.
    """
    if 'a' in inspect.signature(nn.initializer.TruncatedNormal).parameters:
        return nn.initializer.TruncatedNormal(0.0, std, a=-2.0 * std, b=2.0 * std)
    return nn.initializer.TruncatedNormal(0.0, std)


def _adaptation(student_channels: int, teacher_channels: int, relu: bool) -> nn.Sequential:
    """3x3 conv (+ ReLU) from the student's to the teacher's channels, as the reference's
    ``stu_feature_adap``, weight truncated normal (std 1e-4, cut at 2 std) as its
    ``normal_init(..., truncated=True)``.

    The bias starts at 0, where the reference keeps PyTorch's default ``U(-1/sqrt(fan_in), ...)``: with
    1e-4 weights a channel with a negative bias starts as a dead ReLU unless the features are as large as
    VGG's conv5_3, and a dead channel never gets a gradient. With a zero bias every channel is active
    wherever its (tiny) response is positive, so every weight learns.
    """
    zero = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))
    conv = nn.Conv2D(student_channels, teacher_channels, kernel_size=3, padding=1,
                     weight_attr=paddle.ParamAttr(initializer=_truncated_normal(1e-4)),
                     bias_attr=zero)
    layers: List[nn.Layer] = [conv] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers)


@register
class FGFILoss(FeatureLoss):
    """Fine-grained feature imitation loss (Wang et al., CVPR 2019).

    ``loss = loss_weight * sum(mask * (T - adapt(S)) ** 2) / (2 * sum(mask))`` over the batch, channels and
    cells, with the 0/1 mask ``[N, 1, H, W]`` of :func:`ppdistill.masks.fgfi_masks` (exactly the reference's
    ``sup_loss``: ``norms = mask_batch.sum() * 2``). A batch without any imitated cell gives 0, with the
    adaptation layer still in the graph (zero gradient), so data-parallel ranks stay in step.

    Args:
        student_channels (int): student channels ``Cs``.
        teacher_channels (int): teacher channels ``Ct``; the adaptation layer maps ``Cs -> Ct`` (it replaces
            the 1x1 align conv of other losses, and exists even when ``Cs == Ct``, as in the reference).
        psi (float): IoU threshold factor, ``0 < psi < 1`` (the threshold is strict, so at 1 no anchor
            would pass and the mask would be empty on every image). Default 0.5 (the paper).
        anchors (dict): the student level's anchors (see :class:`LevelAnchors`); default ppdet's
            ``RetinaAnchorGenerator`` settings.
        loss_weight (float): imitation weight. Default 0.01 (the reference's ``--ilw`` default for its
            VGG16 -> VGG11 Faster R-CNN).
        adapt_relu (bool): ReLU after the adaptation conv, as the reference (whose teacher feature, VGG
            conv5_3 after ReLU, is non-negative). Default True; FPN outputs are signed, so ``False`` lets
            the student match negative teacher values.
        level (int), num_levels (int): this level's index among the student's levels and their number;
            the distiller fills them in (they select and check per-level anchor lists).
    """

    per_level = True  # per-level anchor lists: the distiller passes level and num_levels
    # What the runtime watch (ppdistill.watch) suggests when the loss is 0 on every early step.
    silent_hint = ('No cell passed the anchor test on any image: check FGFI anchors (sizes, strides) against '
                   "the student's anchor generator, and psi.")

    def __init__(self,
                 student_channels: int,
                 teacher_channels: int,
                 psi: float = 0.5,
                 anchors: Optional[dict] = None,
                 loss_weight: float = 0.01,
                 adapt_relu: bool = True,
                 level: int = 0,
                 num_levels: Optional[int] = None):
        # The adaptation layer maps the channels, so the base class must not add its own 1x1 align conv.
        super().__init__(teacher_channels, teacher_channels)
        if int(student_channels) <= 0:
            raise PPDistillError(f'channel counts must be positive, got student={student_channels}')
        self.student_channels = int(student_channels)
        self.psi = float(psi)
        if not 0.0 < self.psi < 1.0:
            raise PPDistillError(f'FGFILoss psi must satisfy 0 < psi < 1, got {psi} (cells pass where an anchor\'s '
                                 'IoU > psi x the box\'s best anchor IoU: at 1 none does and nothing is imitated)')
        self.loss_weight = float(loss_weight)
        self.anchors = LevelAnchors(anchors, level, num_levels)
        self.adaptation = _adaptation(self.student_channels, self.teacher_channels, bool(adapt_relu))

    def mask(self, inputs: dict, height: int, width: int) -> paddle.Tensor:
        """Imitation mask ``[N, H, W]`` for a level of size ``height x width`` (see :func:`fgfi_masks`)."""
        if 'gt_bbox' not in inputs or 'image' not in inputs:
            raise ValueError("FGFILoss needs inputs with 'gt_bbox' and 'image'")
        image_hw = [int(v) for v in inputs['image'].shape[2:]]
        stride_h, stride_w = self.anchors.strides(image_hw, (height, width))
        return fgfi_masks(inputs['gt_bbox'], self.anchors.anchor_wh(stride_h, stride_w), height, width,
                          stride_h, stride_w, self.psi, self.anchors.offset, inputs.get('pad_gt_mask'))

    def masked_loss(self, student_feat: paddle.Tensor, teacher_feat: paddle.Tensor,
                    mask: paddle.Tensor) -> paddle.Tensor:
        """``loss_weight * sum(mask * (T - adapt(S))**2) / max(2 * sum(mask), 1)`` for a mask ``[N, H, W]``."""
        self.check_shapes(student_feat, teacher_feat)
        mask = paddle.cast(mask, teacher_feat.dtype).unsqueeze(1)  # [N, 1, H, W]
        sq_err = paddle.square(teacher_feat.detach() - self.adaptation(student_feat))  # [N, Ct, H, W]
        # sum(mask) is a whole number: >= 1 whenever anything is imitated, so the clip only guards 0 / 0.
        norm = paddle.clip(2.0 * paddle.sum(mask), min=1.0)
        return self.loss_weight * paddle.sum(sq_err * mask) / norm

    def forward(self,
                student_feat: paddle.Tensor,
                teacher_feat: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        """FGFI loss of one level.

        Args:
            student_feat: ``[N, Cs, H, W]``.
            teacher_feat: ``[N, Ct, H, W]`` (constant).
            inputs: ppdet batch dict with ``'image'`` (``[N, 3, H_in, W_in]``, padded), ``'gt_bbox'`` (list
                of ``[n_i, 4]`` or padded ``[N, M, 4]``, pixels of the padded input) and optionally
                ``'pad_gt_mask'``.

        Returns:
            scalar Tensor.
        """
        if inputs is None:
            raise ValueError("FGFILoss needs inputs with 'gt_bbox' and 'image'")
        mask = self.mask(inputs, int(teacher_feat.shape[2]), int(teacher_feat.shape[3]))
        return self.masked_loss(student_feat, teacher_feat, mask)

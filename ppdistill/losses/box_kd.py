"""IoU-based localization KD of a dense head: BCKD's localization term.

Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object Detection",
ICCV 2023. Student and teacher boxes are decoded at every location of the level and compared with GIoU,
weighted by the location's largest class-probability disagreement::

    u_i = max_c |sigmoid(t_ic) - sigmoid(s_ic)|                       (detached)
    L   = loss_weight * sum_i u_i * (1 - GIoU(b^s_i, b^t_i)) / normaliser

BCKD: ``loss_weight=4.0``, normaliser ``N_pos``. Boxes come from

* ``box_coder='dfl'`` (GFL, PicoDet, PP-YOLOE): the expectation of each edge's distribution,
  ``d_e = sum_k k softmax(z_e)_k``, box ``(-d_l, -d_t, d_r, d_b)`` around the cell centre;
* ``box_coder='ltrb'`` (anchor-free distance heads, FCOS: ``[N, 4, H, W]`` raw (l, t, r, b) outputs of the
  level's scale layer): the distances after the head's own transform, ``ltrb_transform`` ``'relu'`` (FCOS
  with ``norm_reg_targets``, distances in strides), ``'exp'`` (FCOS without it) or ``'none'``; box
  ``(-l, -t, r, b)`` around the location;
* ``box_coder='delta'`` (RetinaNet-style anchor heads, ``[N, A*4, H, W]`` deltas, ``[N, A*C, H, W]``
  logits): ppdet's ``delta2bbox`` on anchors of width/height ``anchor_wh`` (in strides, the same at every
  level for RetinaNet), one term per anchor.

Both boxes of a location share its cell centre (and anchor), and GIoU is invariant to a common
translation and scale, so the loss needs neither the stride nor the image size. Deviation from the
official code: BCKD computes the term only when the level has positives; this loss always computes it.
"""
import math
from typing import Dict, Optional, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from ..errors import PPDistillError
from ..masks import retina_anchor_wh
from .base import DistillLoss
from .dense_head import (Maps, as_maps, check_normalize, dfl_channels, dfl_distances, distance_boxes, flatten,
                         giou, normalizer, normalizer_keys, split_dfl)

__all__ = ['BoxKDLoss']

_CODERS = ('dfl', 'ltrb', 'delta')
# how a distance head turns its raw output into (l, t, r, b) distances (ppdet FCOSHead: relu with
# norm_reg_targets, else exp)
_LTRB_TRANSFORMS = {'relu': F.relu, 'exp': paddle.exp, 'none': lambda x: x}
_DELTA_CLIP = math.log(1000.0 / 16)  # ppdet delta2bbox's bound on dw, dh before exp


@register
class BoxKDLoss(DistillLoss):
    """BCKD localization KD (see the module docstring).

    Inputs per level, ``student``/``teacher``: ``{'cls': [N, A*C, H, W] logits, 'reg': box outputs}``
    (``reg`` = ``[N, 4*(n+1), H, W]`` DFL logits, ``A = 1``, ``n`` per side; ``[N, 4, H, W]`` distances; or
    ``[N, A*4, H, W]`` deltas); with ``normalize='positives'`` (``'assigned_scores'``) the student mapping also
    carries ``num_pos`` (``assigned_scores_sum``) (:mod:`ppdistill.losses.dense_head`).

    Args:
        student_channels, teacher_channels: ``{'cls': C, 'reg': R}``; equal ``C`` (and equal ``R`` for deltas).
        box_coder: ``'dfl'`` (default), ``'ltrb'`` or ``'delta'``.
        ltrb_transform: ``'ltrb'`` only: ``'relu'`` (default), ``'exp'`` or ``'none'``, the head's own map from
            its raw output to distances.
        reg_max: ``n`` of a DFL head; default read from each side's channels (checked against both when
            given). Student and teacher may have different ``n``: the boxes are compared, not the bins.
        anchor_wh: ``'delta'`` only: ``[[w, h], ...]`` of the A anchors per cell in strides; default
            ppdet's ``RetinaAnchorGenerator`` (octave base 4, 3 scales, ratios 0.5/1/2).
        delta_weights: ``'delta'`` only: ppdet's ``(wx, wy, ww, wh)``. Default ``(1, 1, 1, 1)``.
        normalize: ``'positives'`` (default, ``/ N_pos``), ``'assigned_scores'``, ``'locations'``, ``'weights'``
            (``/ sum u_i``) or ``'sum'`` (:data:`~ppdistill.losses.dense_head.NORMALIZERS`).
        loss_weight: weight (BCKD 4.0).
    """

    tensor_names = ('cls', 'reg')
    assignment_keys = ('num_pos', 'assigned_scores_sum')

    def __init__(self, student_channels: Dict[str, int], teacher_channels: Dict[str, int],
                 box_coder: str = 'dfl', reg_max: Optional[int] = None, ltrb_transform: str = 'relu',
                 anchor_wh: Optional[Sequence[Sequence[float]]] = None,
                 delta_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), normalize: str = 'positives',
                 loss_weight: float = 4.0):
        super().__init__()
        for side, ch in (('student', student_channels), ('teacher', teacher_channels)):
            if not isinstance(ch, dict) or not {'cls', 'reg'} <= set(ch):
                raise PPDistillError(f'BoxKDLoss needs {side}: {{cls: <class logits tap>, reg: <box output '
                                     f'tap>}}, got channels {ch!r}')
        if box_coder not in _CODERS:
            raise PPDistillError(f'BoxKDLoss: box_coder must be one of {list(_CODERS)}, got {box_coder!r}')
        # DFL boxes are in strides whatever the bins, so reg_max may differ; anchors and classes may not
        names = ('cls',) if box_coder == 'dfl' else ('cls', 'reg')
        if ltrb_transform not in _LTRB_TRANSFORMS:
            raise PPDistillError(f'BoxKDLoss: ltrb_transform must be one of {list(_LTRB_TRANSFORMS)}, got '
                                 f'{ltrb_transform!r}')
        self.ltrb_transform = ltrb_transform
        differ = [k for k in names if int(student_channels[k]) != int(teacher_channels[k])]
        if differ:
            raise PPDistillError('BoxKDLoss: ' + '; '.join(
                f'{k}: student {student_channels[k]} vs teacher {teacher_channels[k]} channels' for k in differ)
                + ' — class scores and anchor boxes are compared one to one (same classes and anchors)')
        self.box_coder = box_coder
        reg, cls = int(teacher_channels['reg']), int(teacher_channels['cls'])
        if box_coder == 'dfl':
            self.reg_max = (dfl_channels(int(student_channels['reg']), reg_max, 'BoxKDLoss (student)'),
                            dfl_channels(reg, reg_max, 'BoxKDLoss (teacher)'))
            self.num_anchors = 1
            self.anchor_wh = None
        elif box_coder == 'ltrb':
            if reg != 4:
                raise PPDistillError(f"BoxKDLoss: box_coder 'ltrb' takes (l, t, r, b) per location, 4 channels; "
                                     f'the box output has {reg}')
            self.num_anchors = 1
            self.anchor_wh = None
        else:
            wh = np.asarray(retina_anchor_wh(1.0) if anchor_wh is None else anchor_wh, dtype='float32')
            if wh.ndim != 2 or wh.shape[1] != 2 or (wh <= 0).any():
                raise PPDistillError(f'BoxKDLoss: anchor_wh must be [[w, h], ...] > 0, got {anchor_wh!r}')
            self.num_anchors = int(wh.shape[0])
            if reg != 4 * self.num_anchors or cls % self.num_anchors:
                raise PPDistillError(f'BoxKDLoss: {self.num_anchors} anchors per cell (anchor_wh) need reg = '
                                     f'{4 * self.num_anchors} channels and cls = A*C, got reg {reg}, cls {cls}')
            self.anchor_wh = wh
            self.delta_weights = [float(v) for v in delta_weights]
        self.num_classes = cls // self.num_anchors
        self.normalize = check_normalize(normalize, 'BoxKDLoss')
        self.loss_weight = float(loss_weight)
        self.assignment_keys = normalizer_keys(normalize)

    def boxes(self, reg: paddle.Tensor) -> paddle.Tensor:
        """Box output of one side -> ``[N, H*W*A, 4]`` boxes around the cell centre."""
        n = int(reg.shape[0])
        if self.box_coder == 'dfl':
            return distance_boxes(dfl_distances(split_dfl(reg))).reshape([n, -1, 4])
        if self.box_coder == 'ltrb':
            return distance_boxes(flatten(_LTRB_TRANSFORMS[self.ltrb_transform](reg)))
        d = flatten(reg).reshape([n, -1, self.num_anchors, 4])  # ppdet: channel a*4 + (dx, dy, dw, dh)
        d = d / paddle.to_tensor(self.delta_weights, dtype=d.dtype)
        wh = paddle.to_tensor(self.anchor_wh, dtype=d.dtype)  # [A, 2]
        ctr = d[..., :2] * wh
        size = paddle.exp(d[..., 2:].clip(max=_DELTA_CLIP)) * wh
        return paddle.concat([ctr - 0.5 * size, ctr + 0.5 * size], axis=-1).reshape([n, -1, 4])

    def forward(self, student: Maps, teacher: Maps, inputs: Optional[dict] = None) -> paddle.Tensor:
        """``student``/``teacher``: ``{'cls', 'reg'[, 'num_pos']}`` of one level; returns a scalar."""
        student, teacher = as_maps(student, 'BoxKDLoss', ['cls', 'reg']), as_maps(teacher, 'BoxKDLoss', ['cls', 'reg'])
        n = int(student['cls'].shape[0])
        gap = (F.sigmoid(flatten(teacher['cls'].detach())) - F.sigmoid(flatten(student['cls'].detach()))).abs()
        u = gap.reshape([n, -1, self.num_classes]).max(axis=-1)  # [N, H*W*A], one weight per anchor
        per_box = u * (1.0 - giou(self.boxes(student['reg']), self.boxes(teacher['reg'].detach())))
        return self.loss_weight * per_box.sum() / normalizer(self.normalize, student, n * int(u.shape[1]), u, 'BoxKDLoss')

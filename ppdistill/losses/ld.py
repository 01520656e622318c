"""Localization Distillation: KD on each box edge's DFL distribution (LD).

Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022 (TPAMI 2023). Per level,
with ``KL_T(a, b) = T**2 * mean_k q_k (log q_k - log p_k)``, ``q = softmax(b/T)``, ``p = softmax(a/T)``
over the ``n+1`` bins of one edge (ppdet/mmdet ``KnowledgeDistillationKLDivLoss``)::

    ld  = ld_weight  * sum_{i in Main} w_i   * sum_e KL_T(z^s_ie, z^t_ie) / 4      w_i = max_c sigmoid(s_ic)
    vlr = vlr_weight * sum_{i in VLR}  vlr_i * sum_e KL_T(z^s_ie, z^t_ie) / 16
    kd  = kd_weight  * sum_{i in Main} KL_{T_kd}(s_i, t_i) / |Main|               (softmax over classes)

``normalize='reference'`` is the above (the reference's sums with the constants 4 and 16, tuned at 2
images per GPU: the magnitude grows with the positives of the batch). ``normalize='mean'`` divides the
``ld`` and ``vlr`` sums by ``sum w_i`` and ``sum vlr_i`` instead of 4 and 16 (a weighted mean of the
edge-averaged KL per location, the same at any batch size); ``kd`` is a mean already.

* **Main region**: the student head's positives (``pos`` of the assignment contract,
  :mod:`ppdistill.losses.dense_head`).
* **Valuable localization region** (:func:`vlr_weights`): computed from the ground truth on the grid
  of every head level (``strides``), vectorised.

``kd`` is the reference's softmax KD on sigmoid class logits (BCKD's "cross-task protocol
inconsistency"), off by default (``kd_weight=0``); prefer :class:`~ppdistill.losses.BinaryKDLoss`.
Deviations: an image without boxes gives a zero VLR (the reference crashes), and a level without
positives gives 0.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from ..errors import PPDistillError
from ..masks import level_stride, pad_boxes
from .base import DistillLoss
from .dense_head import Maps, as_maps, dfl_channels, flatten, positive_mask, split_dfl

__all__ = ['LDLoss', 'kl_mean', 'vlr_weights', 'grid_anchors']

_NORMALIZE = ('reference', 'mean')


def kl_mean(student: paddle.Tensor, teacher: paddle.Tensor, temperature: float) -> paddle.Tensor:
    """``T**2 * mean_k q_k (log q_k - log p_k)`` over the last axis (``q``: the teacher's softmax)."""
    log_q = F.log_softmax(teacher / temperature, axis=-1)
    log_p = F.log_softmax(student / temperature, axis=-1)
    return (log_q.exp() * (log_q - log_p)).mean(axis=-1) * temperature ** 2


def grid_anchors(height: int, width: int, stride: float, scale: float, offset: float) -> paddle.Tensor:
    """Square anchors of side ``scale*stride`` centred at ``(x + offset, y + offset) * stride`` of an
    ``height x width`` grid, row-major, in input pixels: ``[H*W, 4]`` ``(x1, y1, x2, y2)``."""
    ys, xs = paddle.meshgrid(paddle.arange(height, dtype='float32'), paddle.arange(width, dtype='float32'))
    cx, cy = (xs.flatten() + offset) * stride, (ys.flatten() + offset) * stride
    half = 0.5 * scale * stride
    return paddle.stack([cx - half, cy - half, cx + half, cy + half], axis=-1)


def _iou_diou(anchors: paddle.Tensor, boxes: paddle.Tensor,
              band_overlap: str = 'iou') -> Tuple[paddle.Tensor, paddle.Tensor]:
    """IoU and DIoU of anchors ``[..., A, 4]`` with boxes ``[..., G, 4]``, both ``[..., G, A]``; with
    ``band_overlap='iof'`` the DIoU's overlap term is intersection / anchor area (ppdet 2.6.0's
    ``bbox_overlaps(mode='diou')``)."""
    a, b = anchors.unsqueeze(-3), boxes.unsqueeze(-2)  # [..., 1, A, 4], [..., G, 1, 4]
    lt, rb = paddle.maximum(a[..., :2], b[..., :2]), paddle.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clip(min=0).prod(axis=-1)
    area_a = (a[..., 2:] - a[..., :2]).prod(axis=-1)
    area_b = (b[..., 2:] - b[..., :2]).clip(min=0).prod(axis=-1)
    iou = inter / (area_a + area_b - inter).clip(min=1e-9)
    overlap = iou if band_overlap == 'iou' else inter / area_a.clip(min=1e-9)
    centre = ((a[..., :2] + a[..., 2:]) - (b[..., :2] + b[..., 2:])) / 2
    hull = paddle.maximum(a[..., 2:], b[..., 2:]) - paddle.minimum(a[..., :2], b[..., :2])
    diou = overlap - (centre ** 2).sum(axis=-1) / (hull ** 2).sum(axis=-1).clip(min=1e-9)
    return iou, diou


def vlr_weights(boxes: paddle.Tensor, valid: paddle.Tensor, grids: Sequence[Tuple[int, int, float]],
                level: int, scale: float = 8.0, topk: int = 9, offset: float = 0.0,
                band_overlap: str = 'iou') -> paddle.Tensor:
    """LD's valuable localization region on one level: ``[N, H*W]`` float, the IoU with the chosen GT
    inside the band, else 0.

    For each GT g: on every level take the ``topk`` anchors whose centres are closest to g's centre, pool
    them, ``gamma_g = mean + std`` (Bessel) of their IoUs with g (the ATSS threshold). Anchor a of
    ``level`` is in g's band iff ``0.25*gamma_g <= DIoU(a, g) < gamma_g``; ``vlr[a]`` is the highest IoU
    among the GTs whose band holds a. No centre-in-box test, so VLR may overlap the positives.

    Args:
        boxes: ``[N, G, 4]`` GT boxes in input pixels; ``valid``: ``[N, G]`` bool (padding is False).
        grids: ``(H, W, stride)`` of every head level (the candidates pool over all of them).
        level: index into ``grids`` of the level to return.
        scale: anchor side in strides (GFL/LD 8; PicoDet/PP-YOLOE ATSS 5); ``topk``: ATSS candidates.
        offset: anchor centre in cells (ppdet ``Gt2GFLTarget``/mmdet 0; PicoDet/PP-YOLOE ATSS 0.5).
        band_overlap: ``'iou'`` (the DIoU of the paper) or ``'iof'`` (ppdet 2.6.0's variant).
    """
    n, g = int(boxes.shape[0]), int(boxes.shape[1])
    h, w, stride = grids[level]
    if g == 0:
        return paddle.zeros([n, h * w], dtype='float32')
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [N, G, 2]
    candidate_ious = []
    for gh, gw, gs in grids:  # a handful of levels; everything inside is batched over images and GTs
        anchors = grid_anchors(gh, gw, gs, scale, offset)
        iou, _ = _iou_diou(anchors, boxes)  # [N, G, A]
        a_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        dist = ((centres.unsqueeze(2) - a_centres) ** 2).sum(axis=-1)  # [N, G, A]
        k = min(int(topk), gh * gw)
        nearest = paddle.topk(dist, k, axis=-1, largest=False)[1]
        candidate_ious.append(paddle.take_along_axis(iou, nearest, axis=-1))
    cand = paddle.concat(candidate_ious, axis=-1)  # [N, G, K]
    count = int(cand.shape[-1])
    mean = cand.mean(axis=-1, keepdim=True)
    std = ((cand - mean) ** 2).sum(axis=-1, keepdim=True) / max(count - 1, 1)
    gamma = mean + std.sqrt()  # [N, G, 1]
    iou, diou = _iou_diou(grid_anchors(h, w, stride, scale, offset), boxes, band_overlap)  # [N, G, HW]
    band = paddle.logical_and(diou >= 0.25 * gamma, diou < gamma)
    band = paddle.logical_and(band, valid.unsqueeze(-1))
    return (iou * paddle.cast(band, iou.dtype)).max(axis=1)


def _level_grids(image_hw: Sequence[int], feat_hw: Sequence[int], strides: Sequence[float]
                 ) -> Tuple[List[Tuple[int, int, float]], int]:
    """``(H, W, stride)`` of every head level for this input (``ceil(image / stride)``, ppdet's stride-2
    convs), and the index of the level of size ``feat_hw``."""
    stride = level_stride(image_hw[0], feat_hw[0])
    grids = [(-(-int(image_hw[0]) // int(s)), -(-int(image_hw[1]) // int(s)), float(s)) for s in strides]
    match = [i for i, s in enumerate(strides) if float(s) == stride]
    if not match:
        raise PPDistillError(f'LDLoss: a level of {list(feat_hw)} cells on a {list(image_hw)} input has stride '
                             f'{stride}, not one of strides={list(strides)}; set strides to the head\'s')
    grids[match[0]] = (int(feat_hw[0]), int(feat_hw[1]), stride)
    return grids, match[0]


@register
class LDLoss(DistillLoss):
    """LD on one level (see the module docstring); returns ``{'ld', 'vlr', 'kd'}`` (the non-zero-weighted
    ones), logged as sub-terms.

    Inputs per level, ``student``/``teacher``: ``{'cls': [N, C, H, W] logits, 'reg': [N, 4*(n+1), H, W] DFL
    logits}``; the student mapping also carries ``pos`` (``[N, 1, H, W]``, the head's positives on this
    level) when ``ld_weight`` or ``kd_weight`` is non-zero. ``inputs``: ppdet's batch (``image``,
    ``gt_bbox``, optional ``pad_gt_mask``) for the VLR.

    Args:
        student_channels, teacher_channels: ``{'cls': C, 'reg': 4*(n+1)}``, equal per name.
        reg_max: ``n``; default from the channels (checked when given). Unequal reg_max is an error.
        temperature: LD's ``T`` (reference 10). ``kd_temperature``: the class KD's (reference 2).
        ld_weight, vlr_weight, kd_weight: reference 0.25, 0.25, 10 (here ``kd_weight`` defaults to 0).
        normalize: ``'reference'`` (default) or ``'mean'``.
        strides: strides of every level of the head (GFL ``[8, 16, 32, 64, 128]``; any order); required
            when ``vlr_weight > 0``.
        grid_cell_scale: VLR anchor side in strides (GFL 8; PicoDet/PP-YOLOE 5). ``topk``: 9.
        cell_offset: VLR anchor centre in cells (GFL 0, as ppdet's ``Gt2GFLTarget``; PicoDet/PP-YOLOE 0.5).
        band_overlap: ``'iou'`` (default, the paper's DIoU band) or ``'iof'`` (ppdet 2.6.0's
            ``get_vlr_region``, whose DIoU divides the overlap by the anchor's area).
    """

    tensor_names = ('cls', 'reg')
    assignment_keys = ('pos',)

    def __init__(self, student_channels: Dict[str, int], teacher_channels: Dict[str, int],
                 reg_max: Optional[int] = None, temperature: float = 10.0, ld_weight: float = 0.25,
                 vlr_weight: float = 0.25, kd_weight: float = 0.0, kd_temperature: float = 2.0,
                 normalize: str = 'reference', strides: Optional[Sequence[float]] = None,
                 grid_cell_scale: float = 8.0, cell_offset: float = 0.0, topk: int = 9,
                 band_overlap: str = 'iou'):
        super().__init__()
        for side, ch in (('student', student_channels), ('teacher', teacher_channels)):
            if not isinstance(ch, dict) or not {'cls', 'reg'} <= set(ch):
                raise PPDistillError(f'LDLoss needs {side}: {{cls: <class logits tap>, reg: <DFL logits tap>}}, '
                                     f'got channels {ch!r}')
        if int(student_channels['cls']) != int(teacher_channels['cls']):
            raise PPDistillError(f"LDLoss: student {student_channels['cls']} and teacher "
                                 f"{teacher_channels['cls']} classes differ")
        s_max = dfl_channels(int(student_channels['reg']), reg_max, 'LDLoss')
        t_max = dfl_channels(int(teacher_channels['reg']), reg_max, 'LDLoss')
        if s_max != t_max:
            raise PPDistillError(f'LDLoss: student reg_max {s_max} and teacher reg_max {t_max} differ; LD compares '
                                 'edge distributions bin by bin (no re-projection of bins is implemented)')
        if normalize not in _NORMALIZE:
            raise PPDistillError(f'LDLoss: normalize must be one of {list(_NORMALIZE)}, got {normalize!r}')
        if float(temperature) <= 0 or float(kd_temperature) <= 0:
            raise PPDistillError(f'LDLoss: temperatures must be > 0, got {temperature}, {kd_temperature}')
        if float(vlr_weight) and not strides:
            raise PPDistillError('LDLoss: vlr_weight > 0 needs strides: the strides of every head level '
                                 '(e.g. [8, 16, 32, 64, 128] for GFL); or set vlr_weight: 0')
        if not (float(ld_weight) or float(vlr_weight) or float(kd_weight)):
            raise PPDistillError('LDLoss: ld_weight, vlr_weight and kd_weight are all 0; set one of them')
        self.reg_max = s_max
        self.temperature, self.kd_temperature = float(temperature), float(kd_temperature)
        self.weights = {'ld': float(ld_weight), 'vlr': float(vlr_weight), 'kd': float(kd_weight)}
        self.normalize = normalize
        self.strides = [float(s) for s in strides] if strides else []
        if band_overlap not in ('iou', 'iof'):
            raise PPDistillError(f"LDLoss: band_overlap must be 'iou' or 'iof', got {band_overlap!r}")
        self.grid_cell_scale, self.cell_offset, self.topk = float(grid_cell_scale), float(cell_offset), int(topk)
        self.band_overlap = band_overlap
        self.assignment_keys = ('pos',) if self.weights['ld'] or self.weights['kd'] else ()

    def vlr(self, inputs: dict, height: int, width: int) -> paddle.Tensor:
        """``[N, H*W]`` VLR weights of this level from ``inputs``' GT boxes, or from the batch's
        ``vlr_regions`` (``[N, sum H*W]``, levels in ascending stride) where ppdet's ``Gt2GFLTarget``
        (``compute_vlr_region: True``) computed them and removed ``gt_bbox``."""
        if not inputs or 'image' not in inputs or not ('gt_bbox' in inputs or 'vlr_regions' in inputs):
            raise PPDistillError("LDLoss: the VLR needs the batch's 'image' and 'gt_bbox' (or the reader's "
                                 "'vlr_regions'); set vlr_weight: 0 to distill the main region only")
        grids, level = _level_grids(inputs['image'].shape[2:], (height, width), self.strides)
        if 'gt_bbox' not in inputs:
            order = sorted(range(len(grids)), key=lambda i: grids[i][2])
            sizes = [grids[i][0] * grids[i][1] for i in order]
            regions = inputs['vlr_regions']
            if int(regions.shape[-1]) != sum(sizes):
                raise PPDistillError(f"LDLoss: the batch's vlr_regions has {int(regions.shape[-1])} locations per "
                                     f'image but strides={list(self.strides)} give {sum(sizes)}; set strides to '
                                     "the reader's Gt2GFLTarget downsample_ratios")
            start = sum(sizes[:order.index(level)])
            return paddle.cast(regions.reshape([regions.shape[0], -1])[:, start:start + height * width], 'float32')
        boxes, valid = pad_boxes(inputs['gt_bbox'], inputs.get('pad_gt_mask'))
        return vlr_weights(boxes, valid, grids, level, self.grid_cell_scale, self.topk, self.cell_offset,
                           self.band_overlap)

    def forward(self, student: Maps, teacher: Maps, inputs: Optional[dict] = None) -> Dict[str, paddle.Tensor]:
        """``student``/``teacher``: ``{'cls', 'reg'[, 'pos']}`` of one level -> ``{sub-term: scalar}``."""
        student, teacher = as_maps(student, 'LDLoss', ['cls', 'reg']), as_maps(teacher, 'LDLoss', ['cls', 'reg'])
        n, _, h, w = [int(v) for v in student['reg'].shape]
        # [N, HW]: the edge-averaged KL of each location, sum_e KL_e / 4
        edge_kl = kl_mean(split_dfl(student['reg']), split_dfl(teacher['reg'].detach()),
                          self.temperature).mean(axis=-1)
        terms = {}
        if self.weights['ld'] or self.weights['kd']:
            pos = positive_mask(student, 'LDLoss')
        if self.weights['ld']:
            score = F.sigmoid(flatten(student['cls'].detach())).max(axis=-1) * pos  # w_i on Main
            div = score.sum().clip(min=1e-12) if self.normalize == 'mean' else 1.0
            terms['ld'] = self.weights['ld'] * (score * edge_kl).sum() / div
        if self.weights['vlr']:
            region = self.vlr(inputs, h, w)
            # the reference's /16 is /4 on top of the edge mean
            div = region.sum().clip(min=1e-12) if self.normalize == 'mean' else 4.0
            terms['vlr'] = self.weights['vlr'] * (region * edge_kl).sum() / div
        if self.weights['kd']:
            cls_kl = kl_mean(flatten(student['cls']), flatten(teacher['cls'].detach()), self.kd_temperature)
            terms['kd'] = self.weights['kd'] * (cls_kl * pos).sum() / pos.sum().clip(min=1.0)
        return terms

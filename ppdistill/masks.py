"""Ground-truth boxes -> feature-grid masks, vectorised with tensor ops.

ppdet hands ground truth to a model either as a list of per-image ``[n_i, 4]`` tensors or, after the
``PadGT`` batch transform, as one zero-padded ``[N, M, 4]`` tensor plus ``pad_gt_mask`` ``[N, M, 1]``.
:func:`pad_boxes` turns both into a padded tensor and a validity mask; everything else here works on that
padded form with broadcasting only (no Python loop over images or boxes), so the cost is one
``[N, M, H, W]`` boolean/float tensor per call.

All grid arithmetic is done in float32 (``floor``/``ceil`` of float32 values are exact integers), so no op
ever mixes integer and float tensors (paddle 3.x is strict about that).

Boxes are ``(x1, y1, x2, y2)`` in pixels of the network input. A feature map covers the whole *padded*
batch image ``inputs['image']`` ``[N, C, Hp, Wp]`` (ppdet's ``PadBatch`` pads every image to the batch
maximum, so one batch mixes portrait and landscape images), not the unpadded ``im_shape``: boxes are
scaled to the grid by ``(Hp, Wp)``, the same for every image of the batch. The FGD reference divides by
mmdet's unpadded ``img_shape`` instead, which stretches boxes whenever an image is padded; we keep its
formula and its order of operations (``x / Wp * W`` in float32, see :func:`scale_boxes_to_grid`).
"""
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from .errors import PPDistillError

__all__ = ['check_pixel_boxes', 'pad_boxes', 'scale_boxes_to_grid', 'box_cells', 'boxes_cover_grid', 'fgd_masks',
           'level_stride', 'retina_anchor_wh', 'fgfi_masks']

BoxesLike = Union[paddle.Tensor, np.ndarray, Sequence[Union[paddle.Tensor, np.ndarray]]]


def _as_float_tensor(x) -> paddle.Tensor:
    if isinstance(x, paddle.Tensor):
        return x if x.dtype == paddle.float32 else paddle.cast(x, 'float32')
    return paddle.to_tensor(np.asarray(x, dtype='float32'))


def pad_boxes(gt_bbox: BoxesLike,
              pad_gt_mask: Optional[paddle.Tensor] = None) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Return ground-truth boxes in padded form.

    Args:
        gt_bbox: a list of per-image boxes ``[n_i, 4]`` (``n_i`` may be 0; tensors or arrays), or an
            already padded ``[N, M, 4]`` tensor/array.
        pad_gt_mask: optional ``[N, M, 1]`` (or ``[N, M]``) mask as produced by ppdet's ``PadGT``;
            non-zero marks a real box. It is AND-ed into the validity mask.

    Returns:
        ``(boxes, valid)``: ``boxes`` float32 ``[N, M, 4]`` (padded rows are zero) and ``valid`` bool
        ``[N, M]``. A row is valid only if ``x2 > x1`` and ``y2 > y1`` (so zero padding is never valid).
        ``M`` may be 0.
    """
    if isinstance(gt_bbox, (list, tuple)):
        per_image = [paddle.reshape(_as_float_tensor(b), [-1, 4]) for b in gt_bbox]
        num = len(per_image)
        max_boxes = max([int(b.shape[0]) for b in per_image] + [0])
        if num == 0:
            boxes = paddle.zeros([0, 0, 4], dtype='float32')
        elif max_boxes == 0:
            boxes = paddle.zeros([num, 0, 4], dtype='float32')
        else:
            # Stacking a Python list needs one pad per image; the mask maths below is loop-free.
            padded = []
            for b in per_image:
                missing = max_boxes - int(b.shape[0])
                if missing > 0:
                    b = paddle.concat([b, paddle.zeros([missing, 4], dtype='float32')], axis=0)
                padded.append(b)
            boxes = paddle.stack(padded, axis=0)
    else:
        boxes = _as_float_tensor(gt_bbox)
        if boxes.ndim != 3 or int(boxes.shape[-1]) != 4:
            raise ValueError(f'padded gt_bbox must have shape [N, M, 4], got {list(boxes.shape)}')
    boxes = boxes.detach()
    if int(boxes.shape[1]) == 0:
        return boxes, paddle.zeros(boxes.shape[:2], dtype='bool')
    valid = paddle.logical_and(boxes[:, :, 2] > boxes[:, :, 0], boxes[:, :, 3] > boxes[:, :, 1])
    if pad_gt_mask is not None:
        gt_mask = _as_float_tensor(pad_gt_mask)
        gt_mask = paddle.reshape(gt_mask, [int(gt_mask.shape[0]), -1])
        if list(gt_mask.shape) != list(valid.shape):
            raise ValueError(f'pad_gt_mask shape {list(gt_mask.shape)} does not match boxes '
                             f'{list(boxes.shape)}')
        valid = paddle.logical_and(valid, gt_mask > 0.0)
    return boxes, valid


_PIXEL_BOXES_SEEN = False  # set by the first batch whose boxes pass check_pixel_boxes


def check_pixel_boxes(boxes: paddle.Tensor, valid: paddle.Tensor, input_size: Sequence[float]) -> None:
    """Stop when the boxes are normalised to ``[0, 1]`` instead of input pixels.

    ppdet's YOLOv3 and SSD readers normalise ``gt_bbox`` (``NormalizeBox``, YOLO also to ``cx, cy, w, h``)
    for their own losses; read as pixels, every box shrinks into the first cell and the masks are silently
    wrong. A batch whose valid boxes all lie within ``[0, 1]`` on an input of at least 8 pixels is taken
    as normalised. Checked until the first batch with boxes passes (one host read each), then never again
    in the process, so training pays no per-step synchronisation.
    """
    global _PIXEL_BOXES_SEEN
    if _PIXEL_BOXES_SEEN or int(boxes.shape[1]) == 0 or min(float(v) for v in input_size) < 8:
        return
    valid_boxes = boxes * paddle.cast(valid, boxes.dtype).unsqueeze(-1)
    if not bool(paddle.any(valid)):
        return
    if float(paddle.max(valid_boxes)) <= 1.0:
        raise PPDistillError(
            'gt_bbox is normalised to [0, 1] (the reader\'s NormalizeBox, as in ppdet\'s YOLOv3 and SSD readers) '
            'but GT-box masks (FGD, FGFI) need x1, y1, x2, y2 in input pixels; use a reader without '
            'NormalizeBox/BboxXYXY2XYWH or a method without GT masks (MGD, CWD, PKD, output KD)')
    _PIXEL_BOXES_SEEN = True


def scale_boxes_to_grid(boxes: paddle.Tensor, input_size: Sequence[int], height: int,
                        width: int) -> paddle.Tensor:
    """Scale padded boxes ``[N, M, 4]`` from input pixels to feature-grid units.

    ``input_size = (Hp, Wp)`` is the padded input size (``inputs['image'].shape[2:]``). Computes
    ``x / Wp * W`` and ``y / Hp * H`` elementwise in float32, in the reference's order: the reordered
    ``x * (W / Wp)`` rounds to ``W + eps`` at the right edge and ``ceil`` then adds a cell.
    Returns float32 ``[N, M, 4]``.
    """
    pad_h, pad_w = (float(v) for v in input_size)
    size = paddle.to_tensor([pad_w, pad_h, pad_w, pad_h], dtype='float32')
    grid = paddle.to_tensor([float(width), float(height)] * 2, dtype='float32')
    return boxes / size * grid


def box_cells(grid_boxes: paddle.Tensor) -> paddle.Tensor:
    """Inclusive cell range of grid-unit boxes, FGD style.

    Returns float32 ``[N, M, 4]`` = ``(wmin, hmin, wmax, hmax)`` with ``wmin = floor(x1)``,
    ``hmin = floor(y1)``, ``wmax = ceil(x2)``, ``hmax = ceil(y2)`` (not clipped to the map). A box covers
    cells ``hmin..hmax`` x ``wmin..wmax`` inclusive, as in the FGD reference
    (``Mask[hmin:hmax+1, wmin:wmax+1]``).
    """
    return paddle.concat([paddle.floor(grid_boxes[..., 0:2]), paddle.ceil(grid_boxes[..., 2:4])],
                         axis=-1)


def boxes_cover_grid(cells: paddle.Tensor, valid: paddle.Tensor, height: int,
                     width: int) -> paddle.Tensor:
    """Which grid cells each box covers.

    Args:
        cells: ``[N, M, 4]`` inclusive cell ranges ``(wmin, hmin, wmax, hmax)`` (see :func:`box_cells`).
        valid: bool ``[N, M]``; invalid boxes cover nothing.
        height, width: grid size.

    Returns:
        bool ``[N, M, H, W]``. Cells outside the map simply do not exist, which is the same as clipping
        the ranges to the map.
    """
    ys = paddle.arange(height, dtype='float32').reshape([1, 1, height, 1])
    xs = paddle.arange(width, dtype='float32').reshape([1, 1, 1, width])
    c = cells.unsqueeze(-1).unsqueeze(-1)  # [N, M, 4, 1, 1]
    rows = paddle.logical_and(ys >= c[:, :, 1], ys <= c[:, :, 3])  # [N, M, H, 1]
    cols = paddle.logical_and(xs >= c[:, :, 0], xs <= c[:, :, 2])  # [N, M, 1, W]
    cover = paddle.logical_and(rows, cols)  # [N, M, H, W]
    return paddle.logical_and(cover, valid.unsqueeze(-1).unsqueeze(-1))


def fgd_masks(gt_bbox: BoxesLike, input_size: Sequence[int], height: int, width: int,
              pad_gt_mask: Optional[paddle.Tensor] = None) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Foreground/background masks of FGD (Yang et al., "Focal and Global Knowledge Distillation for
    Detectors", CVPR 2022; reference ``yzd-v/FGD mmdet/distillation/losses/fgd.py``).

    For image ``i`` each valid box is scaled to the ``height x width`` grid (by the padded input size,
    :func:`scale_boxes_to_grid`), covers the cells
    ``floor(y1)..ceil(y2)`` x ``floor(x1)..ceil(x2)`` (inclusive, clipped to the map) and carries the value
    ``1 / ((hmax - hmin + 1) * (wmax - wmin + 1))`` computed from the unclipped range;
    ``mask_fg`` is the per-cell maximum of those values (0 where no box). ``mask_bg`` is 1 where
    ``mask_fg == 0`` and 0 elsewhere, divided by its per-image sum when that sum is positive.
    Degenerate boxes (``x2 <= x1`` or ``y2 <= y1``, or non-finite) cover nothing; boxes partly or wholly
    outside the image are clipped to the map; the masks are always finite.

    Args:
        gt_bbox: list of ``[n_i, 4]`` or padded ``[N, M, 4]`` boxes in image pixels (see :func:`pad_boxes`).
        input_size: ``(Hp, Wp)``, the padded input size of the batch (``inputs['image'].shape[2:]``).
        height, width: feature-map size ``H, W``.
        pad_gt_mask: optional ``[N, M, 1]`` validity mask (ppdet ``PadGT``).

    Returns:
        ``(mask_fg, mask_bg)``, both float32 ``[N, H, W]`` with ``stop_gradient=True``.
    """
    height, width = int(height), int(width)
    boxes, valid = pad_boxes(gt_bbox, pad_gt_mask)
    num = int(boxes.shape[0])
    if len(input_size) != 2:
        raise ValueError(f'input_size must be (Hp, Wp), got {input_size}')
    check_pixel_boxes(boxes, valid, input_size)
    if int(boxes.shape[1]) == 0:
        mask_fg = paddle.zeros([num, height, width], dtype='float32')
    else:
        cells = box_cells(scale_boxes_to_grid(boxes, input_size, height, width))  # [N, M, 4]
        # For a valid box hmax >= hmin and wmax >= wmin, so both factors are >= 1; the clip keeps
        # invalid (padding, degenerate) rows finite and the where drops NaN rows (NaN * 0 is NaN).
        box_h = paddle.clip(cells[:, :, 3] - cells[:, :, 1] + 1.0, min=1.0)
        box_w = paddle.clip(cells[:, :, 2] - cells[:, :, 0] + 1.0, min=1.0)
        area_recip = paddle.where(valid, 1.0 / (box_h * box_w), paddle.zeros_like(box_h))  # [N, M]
        cover = paddle.cast(boxes_cover_grid(cells, valid, height, width), 'float32')  # [N, M, H, W]
        mask_fg = paddle.max(cover * area_recip.unsqueeze(-1).unsqueeze(-1), axis=1)  # [N, H, W]
    mask_bg = paddle.cast(mask_fg <= 0.0, 'float32')
    bg_count = paddle.sum(mask_bg, axis=[1, 2], keepdim=True)
    # The count is an integer, so "divide when > 0" equals dividing by max(count, 1).
    mask_bg = mask_bg / paddle.clip(bg_count, min=1.0)
    mask_fg.stop_gradient = True
    mask_bg.stop_gradient = True
    return mask_fg, mask_bg


# ------------------------------------------------------------------------------------------------------
# Fine-grained feature imitation (FGFI) masks: anchors of one level, IoU with every GT box.


def level_stride(image_size: int, feature_size: int) -> float:
    """Stride of a feature level along one axis, from the padded input size and the feature size.

    ppdet's backbones and necks halve the map with stride-2 convs (``ceil``; a 96-pixel input gives a
    2-cell stride-64 level), a few with pooling (``floor``). The stride is the power of two ``s`` with
    ``ceil(image / s) == feature``, else the one with ``floor(image / s) == feature``, else
    ``image / feature`` itself.
    """
    image_size, feature_size = int(image_size), int(feature_size)
    if image_size <= 0 or feature_size <= 0:
        raise ValueError(f'sizes must be positive, got image {image_size} and feature {feature_size}')
    ratio = image_size / feature_size
    up, down = 2.0 ** math.ceil(math.log2(ratio)), 2.0 ** math.floor(math.log2(ratio))
    if math.ceil(image_size / up) == feature_size:  # the only power of two ceil can map to feature_size
        return up
    if math.floor(image_size / down) == feature_size:
        return down
    return ratio


def retina_anchor_wh(stride: float, octave_base_scale: float = 4, scales_per_octave: int = 3,
                     aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> np.ndarray:
    """Anchor widths/heights of one level as ppdet's ``RetinaAnchorGenerator`` makes them.

    Sizes ``stride * octave_base_scale * 2 ** (i / scales_per_octave)`` for ``i < scales_per_octave``;
    for each size and ratio ``r`` (``r = h / w``): ``w = sqrt(size**2 / r)``, ``h = r * w`` (size-major
    order, as ppdet). Returns float64 ``[scales_per_octave * len(aspect_ratios), 2]``.
    """
    sizes = [float(stride) * octave_base_scale * 2.0 ** (i / scales_per_octave)
             for i in range(int(scales_per_octave))]
    ratios = np.asarray(aspect_ratios, dtype='float64').reshape(1, -1)
    w = np.sqrt(np.square(np.asarray(sizes, dtype='float64')).reshape(-1, 1) / ratios)
    return np.stack([w, w * ratios], axis=-1).reshape(-1, 2)


def fgfi_masks(gt_bbox: BoxesLike, anchor_wh, height: int, width: int, stride_h: float, stride_w: float,
               psi: float = 0.5, offset: float = 0.0,
               pad_gt_mask: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """Imitation mask of fine-grained feature imitation (Wang, Yuan, Zhang, Feng, "Distilling Object
    Detectors with Fine-grained Feature Imitation", CVPR 2019; reference
    ``twangnh/Distilling-Object-Detectors lib/model/rpn/anchor_target_layer.py``).

    The level has ``A`` anchors per cell; anchor ``a`` of cell ``(i, j)`` is ``anchor_wh[a]`` centred at
    ``((j + offset) * stride_w, (i + offset) * stride_h)`` (ppdet's anchor generators use ``offset = 0``).
    For image ``n`` and every valid GT box ``g``: the IoU of ``g`` with every anchor of the level, ``m_g``
    = its maximum, and the anchors with ``IoU > psi * m_g`` (strict). A cell is imitated (1) when any of its
    anchors passes for any GT, else 0. A box that overlaps no anchor (``m_g = 0``) marks nothing;
    padded/degenerate boxes are ignored. IoU uses continuous coordinates (area ``(x2 - x1) * (y2 - y1)``,
    as ppdet), not the reference's legacy ``+1`` pixels.

    Axis-aligned anchors on a grid make the intersection separable, ``I = iw(column) * ih(row)``, and with
    ``S = area_g + area_a`` the IoU ``I / (S - I)`` grows with ``I``; so the best IoU of each anchor shape
    comes from ``max iw * max ih``, and ``IoU > t`` is ``I > t * S / (1 + t)``. The only full-size tensors
    are one ``[N, M, A, H, W]`` product and its comparison.

    Args:
        gt_bbox: list of ``[n_i, 4]`` or padded ``[N, M, 4]`` boxes in pixels of the padded input image.
        anchor_wh: ``[A, 2]`` positive anchor widths/heights of this level (e.g. :func:`retina_anchor_wh`).
        height, width: feature-map size ``H, W``.
        stride_h, stride_w: the level's stride in pixels (:func:`level_stride`).
        psi: threshold factor (0.5 in the paper).
        offset: anchor-centre offset in cells.
        pad_gt_mask: optional ``[N, M, 1]`` validity mask (ppdet ``PadGT``).

    Returns:
        float32 ``[N, H, W]`` of 0/1 with ``stop_gradient=True``.
    """
    height, width = int(height), int(width)
    boxes, valid = pad_boxes(gt_bbox, pad_gt_mask)
    num, max_boxes = int(boxes.shape[0]), int(boxes.shape[1])
    check_pixel_boxes(boxes, valid, (height * float(stride_h), width * float(stride_w)))
    if max_boxes == 0:
        mask = paddle.zeros([num, height, width], dtype='float32')
        mask.stop_gradient = True
        return mask
    # Invalid rows become [0, 0, 0, 0]: no overlap, IoU 0, so every quotient below stays finite.
    boxes = boxes * paddle.cast(valid, 'float32').unsqueeze(-1)
    wh = _as_float_tensor(anchor_wh).reshape([-1, 2])  # [A, 2]
    cx = (paddle.arange(width, dtype='float32') + offset) * float(stride_w)  # [W]
    cy = (paddle.arange(height, dtype='float32') + offset) * float(stride_h)  # [H]

    def overlap(lo, hi, centre, size):  # 1-D overlap of boxes [N, M] with anchors -> [N, M, A, L]
        half = (size / 2.0).reshape([1, 1, -1, 1])
        a_lo, a_hi = centre.reshape([1, 1, 1, -1]) - half, centre.reshape([1, 1, 1, -1]) + half
        return paddle.clip(paddle.minimum(hi.reshape([num, max_boxes, 1, 1]), a_hi) -
                           paddle.maximum(lo.reshape([num, max_boxes, 1, 1]), a_lo), min=0.0)

    iw = overlap(boxes[:, :, 0], boxes[:, :, 2], cx, wh[:, 0])  # [N, M, A, W]
    ih = overlap(boxes[:, :, 1], boxes[:, :, 3], cy, wh[:, 1])  # [N, M, A, H]
    area_g = (boxes[:, :, 2] - boxes[:, :, 0]) * (boxes[:, :, 3] - boxes[:, :, 1])  # [N, M]
    total = area_g.unsqueeze(-1) + (wh[:, 0] * wh[:, 1]).reshape([1, 1, -1])  # S: [N, M, A]
    inter_max = paddle.max(iw, axis=-1) * paddle.max(ih, axis=-1)  # [N, M, A]
    # Every union S - I is positive: valid boxes have area > 0, anchors too.
    best = paddle.max(inter_max / (total - inter_max), axis=-1, keepdim=True)  # m_g: [N, M, 1]
    thresh = float(psi) * best
    need = thresh * total / (1.0 + thresh)  # IoU > thresh  <=>  I > need: [N, M, A]
    inter = ih.unsqueeze(-1) * iw.unsqueeze(-2)  # [N, M, A, H, W]
    passed = inter > need.unsqueeze(-1).unsqueeze(-1)  # invalid rows: need = 0 and inter = 0
    mask = paddle.cast(paddle.any(passed.reshape([num, -1, height, width]), axis=1), 'float32')  # [N, H, W]
    mask.stop_gradient = True
    return mask

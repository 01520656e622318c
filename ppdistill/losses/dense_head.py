"""Shared pieces of the dense-head distillation losses (BCKD, LD): flattening, DFL decoding, GIoU,
the label-assignment contract and the normalisers.

Notation (``docs/methods.md``, head KD): per level a dense head gives class logits ``[N, C, H, W]`` and,
on a DFL head, distribution logits ``[N, 4*(n+1), H, W]`` with channel ``side*(n+1) + bin``, sides
ordered (l, t, r, b) and ``n = reg_max`` (ppdet GFLHead, PicoHeadV2, PPYOLOEHead). Positions are
flattened row-major, ``P = H*W``.

**Assignment contract** (:attr:`~ppdistill.losses.base.DistillLoss.assignment_keys`). The paper
normalisers and LD's main region come from the student head's own label assignment, which the distiller
adds to the ``student`` mapping:

* ``pos``: ``[N, 1, H, W]`` (or ``[N, H, W]``) float, this level's slice of the assignment, non-zero at
  positive locations (the value is not used as a weight);
* ``num_pos``: scalar tensor, the batch's positives over *all* levels, clipped to ``>= 1`` here;
* ``assigned_scores_sum``: scalar tensor, the sum over the batch of the assigner's soft scores (PP-YOLOE's
  and PicoDet's ``assigned_scores_sum``, the divisor of their own class loss), clipped to ``>= 1`` here.

Each loss instance lists the keys its arguments need in ``assignment_keys`` (empty when it needs none), so
the distiller can refuse the config at build time; a missing key at run time raises
:class:`~ppdistill.errors.PPDistillError` naming it rather than guessing.
"""
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import paddle
import paddle.nn.functional as F

from ..errors import PPDistillError

__all__ = ['Maps', 'NORMALIZERS', 'as_maps', 'flatten', 'split_dfl', 'dfl_distances', 'dfl_channels',
           'distance_boxes', 'giou', 'positive_mask', 'normalizer', 'check_normalize', 'normalizer_keys']

Maps = Union[paddle.Tensor, Mapping[str, paddle.Tensor]]

# 'positives': / N_pos of the assignment (the papers); 'assigned_scores': / the sum of the assigner's soft
# scores (what PP-YOLOE's head divides its class loss by); 'locations': / the level's N*H*W (no assignment
# needed); 'weights': / the sum of the loss's own per-location weights; 'sum': no division.
NORMALIZERS = ('positives', 'assigned_scores', 'locations', 'weights', 'sum')
# the assignment key each normaliser reads (DistillLoss.assignment_keys)
_NORMALIZER_KEYS = {'positives': 'num_pos', 'assigned_scores': 'assigned_scores_sum'}


def as_maps(x: Maps, loss: str, names: Sequence[str]) -> Dict[str, paddle.Tensor]:
    """A loss side as ``{name: tensor}``; a bare tensor stands for the first name (``cls``)."""
    if isinstance(x, paddle.Tensor):
        x = {names[0]: x}
    missing = [n for n in names if n not in x]
    if missing:
        raise PPDistillError(f'{loss} needs the tensors {list(names)} per side (student: {{'
                             + ', '.join(f'{n}: <tap>' for n in names) + f'}}), missing {missing}')
    return dict(x)


def flatten(x: paddle.Tensor) -> paddle.Tensor:
    """``[N, K, H, W]`` -> ``[N, H*W, K]`` (positions row-major, as ppdet's heads flatten them)."""
    n, k = int(x.shape[0]), int(x.shape[1])
    return x.reshape([n, k, -1]).transpose([0, 2, 1])


def dfl_channels(channels: int, reg_max: Optional[int], loss: str) -> int:
    """``reg_max`` of a ``4*(n+1)``-channel DFL output (checked against the configured one if given)."""
    if channels % 4 or channels < 8:
        raise PPDistillError(f'{loss}: a DFL output has 4*(reg_max+1) channels, got {channels}')
    found = channels // 4 - 1
    if reg_max is not None and int(reg_max) != found:
        raise PPDistillError(f'{loss}: reg_max={reg_max} but the DFL output has {channels} = 4*({found}+1) '
                             'channels; set reg_max to the head\'s (or omit it)')
    return found


def split_dfl(reg: paddle.Tensor) -> paddle.Tensor:
    """``[N, 4*(n+1), H, W]`` -> ``[N, H*W, 4, n+1]`` edge-distribution logits."""
    n = int(reg.shape[0])
    return flatten(reg).reshape([n, -1, 4, int(reg.shape[1]) // 4])


def dfl_distances(dist_logits: paddle.Tensor) -> paddle.Tensor:
    """Expected edge distances ``sum_k k * softmax(z)_k`` in strides: ``[..., 4, n+1]`` -> ``[..., 4]``."""
    bins = paddle.arange(int(dist_logits.shape[-1]), dtype=dist_logits.dtype)
    return (F.softmax(dist_logits, axis=-1) * bins).sum(axis=-1)


def distance_boxes(dist: paddle.Tensor) -> paddle.Tensor:
    """(l, t, r, b) distances -> ``(-l, -t, r, b)`` boxes around the cell centre taken as origin.

    Student and teacher boxes of one location share that centre, and GIoU is translation invariant, so
    the centre's coordinates never matter to the losses."""
    return paddle.concat([-dist[..., :2], dist[..., 2:]], axis=-1)


def giou(a: paddle.Tensor, b: paddle.Tensor, eps: float = 1e-9) -> paddle.Tensor:
    """Generalised IoU of aligned ``(x1, y1, x2, y2)`` boxes ``[..., 4]`` -> ``[...]`` (Rezatofighi et al.
    2019); ``eps`` guards degenerate boxes."""
    area_a = (a[..., 2] - a[..., 0]).clip(min=0) * (a[..., 3] - a[..., 1]).clip(min=0)
    area_b = (b[..., 2] - b[..., 0]).clip(min=0) * (b[..., 3] - b[..., 1]).clip(min=0)
    lt, rb = paddle.maximum(a[..., :2], b[..., :2]), paddle.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clip(min=0).prod(axis=-1)
    union = area_a + area_b - inter + eps
    hull = (paddle.maximum(a[..., 2:], b[..., 2:]) - paddle.minimum(a[..., :2], b[..., :2])).clip(min=0)
    hull_area = hull.prod(axis=-1) + eps
    return inter / union - (hull_area - union) / hull_area


def positive_mask(student: Mapping[str, paddle.Tensor], loss: str) -> paddle.Tensor:
    """This level's positives from the assignment contract: float ``[N, H*W]`` (1 positive, 0 not)."""
    if 'pos' not in student:
        raise PPDistillError(f"{loss} needs the student head's label assignment ('pos': this level's "
                             "positives [N, 1, H, W]); the distiller did not pass it")
    pos = student['pos'].detach()
    return paddle.cast(pos.reshape([int(pos.shape[0]), -1]) != 0, 'float32')


def check_normalize(normalize: str, loss: str, allowed: Sequence[str] = NORMALIZERS) -> str:
    if normalize not in allowed:
        raise PPDistillError(f'{loss}: normalize must be one of {list(allowed)}, got {normalize!r}')
    return normalize


def normalizer_keys(normalize: str) -> Tuple[str, ...]:
    """The assignment keys a normaliser reads: ``('num_pos',)``, ``('assigned_scores_sum',)`` or ``()``."""
    return (_NORMALIZER_KEYS[normalize],) if normalize in _NORMALIZER_KEYS else ()


def normalizer(normalize: str, student: Mapping[str, paddle.Tensor], locations: int,
               weights: Optional[paddle.Tensor], loss: str) -> paddle.Tensor:
    """The divisor of a summed per-location loss (see :data:`NORMALIZERS`), a float32 scalar ``>= 1``
    except ``'weights'``, which is clipped at a tiny value so an all-zero weight gives 0, not NaN."""
    if normalize in _NORMALIZER_KEYS:
        key = _NORMALIZER_KEYS[normalize]
        if key not in student:
            raise PPDistillError(f"{loss}: normalize='{normalize}' needs '{key}' from the student head's label "
                                 "assignment (over all levels of the batch); the distiller did not pass it — use "
                                 "normalize: locations, or feed the assignment")
        return paddle.clip(paddle.cast(student[key], 'float32').detach().reshape([]), min=1.0)
    if normalize == 'locations':
        return paddle.full([], max(locations, 1), dtype='float32')  # a shape-derived count: no host read
    if normalize == 'weights':
        return paddle.clip(weights.detach().sum(), min=1e-12)
    return paddle.to_tensor(1.0, dtype='float32')

"""Loss weights from measured gradients: ``weight: auto``.

A distill term helps when, at the start of training, its gradient on the student's parameters is about
0.1-0.2x the detection loss's (the shipped recipes were set so with ``tools/benchmark.py gradients``;
docs/results.md). A loss entry with ``weight: auto`` gets its weight from that rule instead of by hand:
before the first optimizer update, over the first ``batches`` training batches, the distiller measures

    r = mean over batches of ||d entry / d student params|| / ||d det / d student params||

with the entry at weight 1 (the sum of its terms over its levels, sub-terms included), and sets the entry's
weight to ``f = target / r``: one scalar per entry, so the method's own ratios (FGD's alpha:beta:gamma:
lambda, the levels' sums) are kept. The mean (not the median) counts a batch where the term is zero (an
FGFI mask empty on every image of the batch) as a zero pull: the measured weight then gives the target
share on average over batches. With several processes each measures its own batches and the sums are
all-reduced, so every rank sets the same weights; they are saved with the distill state
(``.pddistill``), and ``-r`` resumes them without measuring again.

Settings, in the distiller's section of the distill config (``auto_weight: {target, batches}``, both
optional): ``target`` the gradient share (default :data:`DEFAULT_TARGET`), ``batches`` how many batches
per process (default :data:`DEFAULT_BATCHES`).
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
from ppdet.utils.logger import setup_logger

from .errors import PPDistillError
from .gradients import gradient_norm

logger = setup_logger(__name__)

__all__ = ['AutoWeights', 'AutoWeightError', 'auto_weight_settings', 'measure_ratios', 'mean_over_ranks', 'weights_from_ratios',
           'DEFAULT_TARGET', 'DEFAULT_BATCHES', 'AUTO']

AUTO = 'auto'            # the value of a loss entry's `weight` that asks for a measured weight
DEFAULT_TARGET = 0.15    # the middle of the 0.1-0.2x rule the shipped recipes were set by
DEFAULT_BATCHES = 4


class AutoWeightError(PPDistillError):
    """``weight: auto`` cannot measure a weight; the message says which entry and why."""


def auto_weight_settings(value: Optional[dict]) -> Tuple[float, int]:
    """``(target, batches)`` from the distiller's ``auto_weight`` option (None: the defaults); a bad value
    is a one-line :class:`AutoWeightError`."""
    value = {} if value is None else value
    if not isinstance(value, dict) or set(value) - {'target', 'batches'}:
        raise AutoWeightError(f'auto_weight must be {{target: <gradient share, default {DEFAULT_TARGET}>, batches: '
                              f'<batches per process, default {DEFAULT_BATCHES}>}}, got {value!r}')
    target, batches = value.get('target', DEFAULT_TARGET), value.get('batches', DEFAULT_BATCHES)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (math.isfinite(target) and target > 0):
        raise AutoWeightError(f'auto_weight: target must be a number > 0 (the distill gradient on the student '
                              f"relative to the detection loss's, default {DEFAULT_TARGET}), got {target!r}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise AutoWeightError(f'auto_weight: batches must be an integer >= 1 (default {DEFAULT_BATCHES}), '
                              f'got {batches!r}')
    return float(target), int(batches)


class AutoWeights(nn.Layer):
    """The measured weight of every ``weight: auto`` loss entry, kept as distill state.

    Buffer ``factors`` ``[E]`` float32, one per auto entry in config order, NaN until measured
    (:meth:`Distiller.calibrate <ppdistill.distiller.Distiller.calibrate>`).

    Args:
        entries: the auto entries' names.
        target: the gradient share each entry is scaled to.
        batches: how many batches each process measures.
    """

    def __init__(self, entries: Sequence[str], target: float = DEFAULT_TARGET, batches: int = DEFAULT_BATCHES):
        super().__init__()
        self.entries = list(entries)
        self.target, self.batches = float(target), int(batches)
        self.register_buffer('factors', paddle.full([len(self.entries)], float('nan'), 'float32'),
                             persistable=True)
        self._measured = False

    def measured(self) -> bool:
        """Whether every factor is set (measured, or loaded from a checkpoint). Reads the buffer on the host
        until it is, never after."""
        if not self._measured:
            self._measured = bool(np.isfinite(self.factors.numpy()).all())
        return self._measured

    def reset(self) -> None:
        """Forget the factors (every auto entry back at weight 1 until measured)."""
        self.factors.set_value(paddle.full([len(self.entries)], float('nan'), 'float32'))
        self._measured = False

    def set(self, factors: Sequence[float]) -> None:
        self.factors.set_value(paddle.to_tensor(np.asarray(factors, 'float32')))
        self._measured = True

    def values(self) -> Dict[str, float]:
        """``{entry: factor}`` on the host."""
        return dict(zip(self.entries, (float(v) for v in self.factors.numpy())))


def measure_ratios(inspect: Callable[[dict], object], groups: Sequence[Sequence[str]], batches: Sequence[dict],
                   params: List[paddle.Tensor]) -> np.ndarray:
    """Per-process sums for :func:`mean_over_ranks`: ``[E + 2]`` float64, the ratio
    ``||d entry / d params|| / ||d det / d params||`` of every group summed over the batches, then the
    number of batches and the number of batches whose detection-loss gradient was zero or not finite.

    ``inspect(batch)`` returns a :class:`~ppdistill.distiller.Inspection` (terms at weight 1); an entry is
    the sum of its ``groups[e]`` terms. A batch whose detection gradient is unusable adds 0 to the ratios
    and 1 to the last count (raising here would leave the other ranks waiting in the all-reduce)."""
    sums = np.zeros(len(groups) + 2, 'float64')
    for batch in batches:
        seen = inspect(batch)
        if seen.det_loss is None:
            raise AutoWeightError("weight: auto: the student returned no 'loss' in train mode, so there is no "
                                  'detection loss to measure the distill gradients against; set the weights by hand')
        det = gradient_norm(seen.det_loss, params)
        sums[-2] += 1
        if not (math.isfinite(det) and det > 0):
            sums[-1] += 1
            continue
        for e, keys in enumerate(groups):
            sums[e] += gradient_norm(paddle.add_n([seen.terms[k] for k in keys]), params) / det
    return sums


def mean_over_ranks(sums: np.ndarray, world_size: Optional[int] = None,
                    all_reduce: Optional[Callable[[paddle.Tensor], None]] = None) -> np.ndarray:
    """The sums of :func:`measure_ratios` added over every process (``all_reduce``, default
    ``paddle.distributed.all_reduce``, in place; no collective on one process), so every rank gets the same
    ``[E + 2]`` totals."""
    world = dist.get_world_size() if world_size is None else world_size
    if world < 2:
        return sums
    total = paddle.to_tensor(np.asarray(sums, 'float64'))
    (all_reduce or dist.all_reduce)(total)
    return total.numpy()


def weights_from_ratios(totals: np.ndarray, entries: Sequence[str], target: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(weights [E], mean ratios [E])`` from the all-reduced totals of :func:`mean_over_ranks`: weight =
    ``target / mean ratio``. A one-line :class:`AutoWeightError` when the detection loss had no usable
    gradient, or an entry's gradient was zero (or not finite) on every measured batch."""
    batches, bad = int(totals[-2]), int(totals[-1])
    if bad:
        raise AutoWeightError(f'weight: auto: the detection loss has no gradient on the student (zero or not finite '
                              f'on {bad} of {batches} measured batches), so there is nothing to measure the distill '
                              'gradients against; check the student and its loss, or set the weights by hand')
    ratios = totals[:-2] / batches
    for name, r in zip(entries, ratios):
        if not math.isfinite(r):
            raise AutoWeightError(f"weight: auto: the gradient of loss '{name}' on the student is not finite on the "
                                  'measured batches; check the teacher and the loss arguments')
        if r == 0:
            raise AutoWeightError(f"weight: auto: loss '{name}' has no gradient on the student in any of the {batches} "
                                  'measured batches, and auto cannot scale a term with no gradient (is it zero at the '
                                  'start, e.g. an empty mask?); give it a numeric weight')
    return target / ratios, ratios

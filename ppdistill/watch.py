"""Runtime check of the first training steps: a distill term that trains nothing says so.

Some configurations build, run and learn nothing: a masked loss whose mask is empty on every image (FGFI
anchors that never match the boxes), a zero or negative weight, a term far below the detection loss. None
of these is visible in the shapes at build time. :class:`TermWatch` keeps, over the first ``steps``
training steps, per distill term the largest ``|value|``, the smallest value and the largest
``value / detection loss``, as device tensors (no host synchronisation per step: ppdet already fetches
every logged output, the distiller its one ``isfinite``); after step ``steps`` it reads them once and logs
one ``logger.warning`` per finding:

* ``zero``: exactly 0 on every step — the term trains nothing (empty mask on every image, weight 0);
* ``negative``: below 0 on some step — every distill loss is >= 0 by construction, so a weight is
  negative and the student is pushed *away* from the teacher;
* ``low``: below :data:`~ppdistill.balance.LOW_RATIO` of the detection loss on every step, in value. The
  value says little about the pull (the gradient share does, ``tools/benchmark.py gradients``), so the
  warning says so, and a term whose gradient share was measured and set (``weight: auto``) gets none.

A loss class may carry ``silent_hint`` (a sentence saying what to check when it is zero), used in the
``zero`` warning.
"""
from typing import Dict, Optional, Sequence

import numpy as np
import paddle
import paddle.distributed as dist
from ppdet.utils.logger import setup_logger

from .balance import LOW_RATIO

logger = setup_logger(__name__)

__all__ = ['TermWatch', 'WATCH_STEPS']

WATCH_STEPS = 20


class TermWatch:
    """Accumulates distill terms over the first ``steps`` training steps and warns once after them.

    Args:
        names: the term keys, in the order :meth:`update` receives their values.
        hints: per term, a sentence on what to check when it is identically zero (optional).
        steps: how many steps to watch.
        low: the ``value / detection loss`` bound below which a term counts as negligible.
        calibrated: terms whose gradient share was set by ``weight: auto``: never ``low``.
    """

    def __init__(self, names: Sequence[str], hints: Optional[Dict[str, str]] = None,
                 steps: int = WATCH_STEPS, low: float = LOW_RATIO, calibrated: Sequence[str] = ()):
        self.names = list(names)
        self.hints = dict(hints or {})
        self.calibrated = set(calibrated)
        self.steps = int(steps)
        self.low = float(low)
        self.step = 0
        self.findings: Dict[str, str] = {}  # term -> kind, after the report
        self._abs_max = self._min = self._ratio_max = None

    @classmethod
    def from_losses(cls, names: Sequence[str], losses: Sequence[object], **kwargs) -> 'TermWatch':
        """A watch over ``names``, one loss module per name, with each loss class's ``silent_hint``."""
        return cls(names, {n: getattr(loss, 'silent_hint', None) for n, loss in zip(names, losses)}, **kwargs)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def update(self, det_loss: paddle.Tensor, terms: Sequence[paddle.Tensor]) -> None:
        """One training step: ``det_loss`` the student's own loss (scalar), ``terms`` one scalar per name."""
        if self.done:
            return
        with paddle.no_grad():
            values = paddle.stack([paddle.reshape(t.detach(), []) for t in terms]).astype('float32')  # [T]
            # A non-finite step (nonfinite: skip) is neither zero nor negligible nor negative.
            values = paddle.where(paddle.isfinite(values), values, paddle.full_like(values, np.inf))
            det = paddle.reshape(det_loss.detach(), []).astype('float32')
            ratio = paddle.where(det > 0, values / paddle.clip(det, min=1e-30), paddle.full_like(values, np.inf))
            if self._abs_max is None:
                self._abs_max, self._min, self._ratio_max = paddle.abs(values), values, ratio
            else:
                self._abs_max = paddle.maximum(self._abs_max, paddle.abs(values))
                self._min = paddle.minimum(self._min, values)
                self._ratio_max = paddle.maximum(self._ratio_max, ratio)
        self.step += 1
        if self.done:
            self._report()

    def _report(self) -> None:
        abs_max, low_value, ratio_max = (t.numpy() for t in (self._abs_max, self._min, self._ratio_max))
        self._abs_max = self._min = self._ratio_max = None
        n = self.steps
        for name, peak, smallest, ratio in zip(self.names, abs_max, low_value, ratio_max):
            if peak == 0:
                kind, what = 'zero', (f'was exactly 0 in each of the first {n} training steps: it trains '
                                      f"nothing. {self.hints.get(name) or 'Check its weight and arguments.'}")
            elif smallest < 0:
                kind, what = 'negative', (f'was negative ({smallest:.4g}) within the first {n} training steps: a '
                                          'negative weight pushes the student away from the teacher; make the '
                                          'weights positive')
            elif ratio < self.low and name not in self.calibrated:
                kind, what = 'low', (f'stayed below {self.low:.0%} of the detection loss in value (at most {ratio:.2%}) '
                                     f'in each of the first {n} training steps: it may hardly train anything. Its '
                                     'gradient share decides: measure it with tools/benchmark.py gradients and raise '
                                     'its weight, or set weight: auto')
            else:
                continue
            self.findings[name] = kind
            if dist.get_world_size() < 2 or dist.get_rank() == 0:
                logger.warning(f'ppdistill watch: distill term {name} {what}')

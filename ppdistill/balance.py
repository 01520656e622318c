"""Loss-balance report: every distill term relative to the detection loss, during training.

A distill weight that is too small silently switches a method off; one that is too large drowns the
detection task (FGD at its reference weights on a 160 px PicoDet pair: distill 0.8x -> 1.7x the detection
loss within the first epoch). :class:`LossBalance` is fed each training step's losses (the records of
``train_log.jsonl``, see :class:`ppdistill.trainer.TrainLog`) and, every ``log_iter`` steps, gives each
``distill_*`` term (terms per level and their sub-terms, e.g. ``distill_fgd_l0_fg``) divided by the
detection loss, both as means over the last ``log_iter`` steps, plus the warnings of
:func:`balance_warnings` not given before. The detection loss is the student's own loss (``det_loss``),
never ``loss - distill_loss``: in float32 that difference is 0 once distill is ~10^7 times larger.
:func:`balance_summary` reads a run's points back from its records (the benchmark's per-run summary).

The ratios are of values, and a term's value says little about how hard it pulls the student (a term 14x
the detection loss in value was 0.17x in gradient, docs/results.md): the low/high warnings say so and point
to the gradient share (``tools/benchmark.py gradients``, ``weight: auto``). A term whose gradient share was
measured and set at the start (a ``weight: auto`` entry's terms and sub-terms) gets no low/high warning;
the ``growing`` one still applies.
"""
from collections import deque
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ['balance_warnings', 'LossBalance', 'balance_summary', 'LOW_RATIO', 'HIGH_RATIO', 'TREND']

LOW_RATIO = 0.01   # a term below 1% of the detection loss barely trains anything
HIGH_RATIO = 1.0   # a term above the detection loss dominates the gradient
TREND = 0.1        # "growing"/"falling": the last third's mean moved by more than 10% from the first third's
GRADIENT_HINT = ('a value ratio, and the gradient share is what decides: measure it with tools/benchmark.py '
                 'gradients and set the weight, or set weight: auto')


def _thirds(series: Sequence[float]) -> Tuple[float, float]:
    w = max(1, len(series) // 3)
    return float(np.mean(series[:w])), float(np.mean(series[-w:]))


def _calibrated(name: str, calibrated: Sequence[str]) -> bool:
    """Whether logged key ``name`` is a calibrated term or one of its sub-terms (``<term>_<sub>``)."""
    return any(name == k or name.startswith(k + '_') for k in calibrated)


def balance_warnings(det: Sequence[float], terms: Dict[str, Sequence[float]], low: float = LOW_RATIO,
                     high: float = HIGH_RATIO, trend: float = TREND,
                     calibrated: Sequence[str] = ()) -> List[Tuple[str, str, str]]:
    """Which distill terms are out of balance with the detection loss, judged on the series so far.

    Args:
        det: detection loss at each log point, oldest first.
        terms: per distill term, its value at the same log points.
        low, high: bounds on the latest ``term / det`` ratio.
        trend: relative change that counts as growing/falling.
        calibrated: terms whose gradient share was set by ``weight: auto`` (their sub-terms too): no
            low/high finding.

    Returns:
        ``(term, kind, message)`` for each finding: ``low`` (latest ratio < ``low``), ``high`` (latest
        ratio > ``high``), ``growing`` (with >= 3 points: the mean of the term's last third exceeds its
        first third's by more than ``trend`` while the detection loss's last third is more than ``trend``
        below its first third).
    """
    found = []
    if not len(det) or det[-1] <= 0:
        return found
    det_first, det_last = _thirds(det)
    det_falls = len(det) >= 3 and det_last < det_first * (1 - trend)
    for name, series in terms.items():
        ratio = series[-1] / det[-1]
        if ratio < low and not _calibrated(name, calibrated):
            found.append((name, 'low', f'{ratio:.2%} of the detection loss in value (< {low:.0%}): the term may '
                                       f'hardly train anything; {GRADIENT_HINT}'))
        elif ratio > high and not _calibrated(name, calibrated):
            found.append((name, 'high', f'{ratio:.2f}x the detection loss in value (> {high:g}x): it may dominate '
                                        f'the gradient; {GRADIENT_HINT}'))
        if det_falls and len(series) >= 3:
            first, last = _thirds(series)
            if last > first * (1 + trend):
                found.append((name, 'growing', f'grew {first:.4g} -> {last:.4g} while the detection loss '
                                               f'fell {det_first:.4g} -> {det_last:.4g}'))
    return found


class LossBalance:
    """Distill terms against the detection loss, fed one training step at a time.

    ``update(record)`` takes one step's ``{'step', 'det_loss', 'distill_*': value, ...}`` (host floats).
    At every step with ``step % every == 0`` (ppdet's log points) it returns ``{'det_loss', 'ratios':
    {term: term / det}, 'warnings': [{'term', 'kind', 'message'}]}``: means over the last ``every`` steps
    (ppdet's log window), and only the warnings not returned before (one per term and kind).
    ``calibrated``: as :func:`balance_warnings`.
    """

    def __init__(self, every: int, calibrated: Sequence[str] = ()):
        self.every = max(1, int(every))
        self.calibrated = list(calibrated)
        self.window: deque = deque(maxlen=self.every)
        self.det: List[float] = []
        self.terms: Dict[str, List[float]] = {}
        self.warned = set()

    def update(self, record: dict) -> Optional[dict]:
        self.window.append(record)
        if record['step'] % self.every:
            return None
        names = [k for k in record if k.startswith('distill_')]
        det = float(np.mean([r['det_loss'] for r in self.window]))
        means = {k: float(np.mean([r[k] for r in self.window if k in r])) for k in names}
        self.det.append(det)
        for k in names:
            self.terms.setdefault(k, []).append(means[k])
        new = []
        for term, kind, message in balance_warnings(self.det, self.terms, calibrated=self.calibrated):
            if (term, kind) not in self.warned:
                self.warned.add((term, kind))
                new.append({'term': term, 'kind': kind, 'message': message})
        ratios = {k: (means[k] / det if det > 0 else float('nan')) for k in names}
        return {'det_loss': det, 'ratios': ratios, 'warnings': new}


def balance_summary(records: Iterable[dict]) -> dict:
    """Per term its ratio to the detection loss at the first and the last log point, plus the warnings,
    from a run's step records (those carrying the ``balance`` point :class:`LossBalance` gave)."""
    points = [r['balance'] for r in records if r.get('balance')]
    warnings = [w for p in points for w in p['warnings']]
    if not points or not points[0]['ratios']:
        return {'terms': {}, 'warnings': warnings}
    first, last = points[0]['ratios'], points[-1]['ratios']
    return {'terms': {k: {'start': first[k], 'end': last.get(k)} for k in first},
            'det_loss': {'start': points[0]['det_loss'], 'end': points[-1]['det_loss']},
            'warnings': warnings}

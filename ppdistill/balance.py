"""Loss-balance report: every distill term relative to the detection loss, during training.

A distill weight that is too small silently switches a method off; one that is too large drowns the
detection task (FGD at its reference weights on a 160 px PicoDet pair: distill 0.8x -> 1.7x the detection
loss within the first epoch). :class:`LossBalanceMonitor` logs, every ``log_iter`` steps, each
``distill_*`` entry of the model's outputs (terms per level and their sub-terms, e.g.
``distill_fgd_l0_fg``) divided by the detection loss ``loss - distill_loss``, and warns once per term
and kind when :func:`balance_warnings` flags it. :func:`parse_balance_log` reads those lines back (the
benchmark's per-run summary).
"""
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np
import paddle.distributed as dist
from ppdet.engine.callbacks import Callback
from ppdet.utils.logger import setup_logger

logger = setup_logger(__name__)

__all__ = ['balance_warnings', 'LossBalanceMonitor', 'parse_balance_log', 'balance_summary',
           'LOW_RATIO', 'HIGH_RATIO', 'TREND']

LOW_RATIO = 0.01   # a term below 1% of the detection loss barely trains anything
HIGH_RATIO = 1.0   # a term above the detection loss dominates the gradient
TREND = 0.1        # "growing"/"falling": the last third's mean moved by more than 10% from the first third's

_LINE = 'ppdistill balance:'
_WARN = 'ppdistill balance warning:'
_LINE_RE = re.compile(re.escape(_LINE) + r' epoch (\d+) step (\d+) det_loss (\S+) \|(.*)$', re.M)
_WARN_RE = re.compile(re.escape(_WARN) + r' (\S+) (low|high|growing): (.*)$', re.M)
_PAIR_RE = re.compile(r'(\S+) (\S+)')


def _thirds(series: Sequence[float]) -> Tuple[float, float]:
    w = max(1, len(series) // 3)
    return float(np.mean(series[:w])), float(np.mean(series[-w:]))


def balance_warnings(det: Sequence[float], terms: Dict[str, Sequence[float]], low: float = LOW_RATIO,
                     high: float = HIGH_RATIO, trend: float = TREND) -> List[Tuple[str, str, str]]:
    """Which distill terms are out of balance with the detection loss, judged on the series so far.

    Args:
        det: detection loss (total minus distill) at each log point, oldest first.
        terms: per distill term, its value at the same log points.
        low, high: bounds on the latest ``term / det`` ratio.
        trend: relative change that counts as growing/falling.

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
        if ratio < low:
            found.append((name, 'low', f'{ratio:.2%} of the detection loss (< {low:.0%}): the term '
                                       'hardly trains anything; raise its weight'))
        elif ratio > high:
            found.append((name, 'high', f'{ratio:.2f}x the detection loss (> {high:g}x): it dominates '
                                        'the gradient; lower its weight'))
        if det_falls and len(series) >= 3:
            first, last = _thirds(series)
            if last > first * (1 + trend):
                found.append((name, 'growing', f'grew {first:.4g} -> {last:.4g} while the detection loss '
                                               f'fell {det_first:.4g} -> {det_last:.4g}'))
    return found


class LossBalanceMonitor(Callback):
    """Log distill terms relative to the detection loss every ``log_iter`` steps; warn once per finding.

    Reads ppdet's own training statistics (host values already fetched for logging), so it adds no
    device synchronisation. Uses window means, so ``mean(loss) - mean(distill_loss)`` is exactly the mean
    detection loss of the window. Does nothing for a model without ``distill_loss`` in its outputs.
    """

    def __init__(self, trainer):
        super().__init__(trainer)
        self.det: List[float] = []
        self.terms: Dict[str, List[float]] = {}
        self.warned = set()

    def on_step_end(self, status):
        if status.get('mode') != 'train' or (dist.get_world_size() > 1 and dist.get_rank() != 0):
            return
        meters = getattr(status.get('training_staus'), 'meters', None)
        if not meters or 'distill_loss' not in meters or 'loss' not in meters:
            return
        if status['step_id'] % self.model.cfg.log_iter != 0:
            return
        values = {k: float(m.avg) for k, m in meters.items()}
        det = values['loss'] - values['distill_loss']
        self.det.append(det)
        names = [k for k in meters if k.startswith('distill_')]
        for name in names:
            self.terms.setdefault(name, []).append(values[name])
        ratios = ' '.join(f'{k} {values[k] / det:.4g}' if det > 0 else f'{k} nan' for k in names)
        logger.info(f"{_LINE} epoch {status['epoch_id']} step {status['step_id']} det_loss {det:.4g} |"
                    f" {ratios}")
        for name, kind, message in balance_warnings(self.det, self.terms):
            if (name, kind) not in self.warned:
                self.warned.add((name, kind))
                logger.warning(f'{_WARN} {name} {kind}: {message}')


def parse_balance_log(text: str) -> Tuple[List[dict], List[dict]]:
    """The monitor's lines from a training log: ``(points, warnings)``.

    ``points``: ``{'epoch', 'step', 'det_loss', 'ratios': {term: term / det}}`` per log point;
    ``warnings``: ``{'term', 'kind', 'message'}``.
    """
    points = []
    for m in _LINE_RE.finditer(text):
        ratios = {k: float(v) for k, v in _PAIR_RE.findall(m.group(4))}
        points.append({'epoch': int(m.group(1)), 'step': int(m.group(2)), 'det_loss': float(m.group(3)),
                       'ratios': ratios})
    warnings = [{'term': m.group(1), 'kind': m.group(2), 'message': m.group(3).strip()}
                for m in _WARN_RE.finditer(text)]
    return points, warnings


def balance_summary(text: str) -> dict:
    """Per term its ratio to the detection loss at the first and the last log point, plus the warnings."""
    points, warnings = parse_balance_log(text)
    if not points:
        return {'terms': {}, 'warnings': warnings}
    first, last = points[0]['ratios'], points[-1]['ratios']
    return {'terms': {k: {'start': first[k], 'end': last.get(k)} for k in first},
            'det_loss': {'start': points[0]['det_loss'], 'end': points[-1]['det_loss']},
            'warnings': warnings}

"""Accuracy over seeds: mean ± std per row, gap closed, and whether a difference exceeds the seed noise.

Noise criterion (documented in the tables): a row differs from the plain student *beyond seed noise* when
a two-sided t-test on the per-seed AP values gives ``p < 0.05``:

- **paired** (the default when it holds): a seed fixes the student's initialisation and the data order, so
  the plain and the distilled run of one seed start from the same weights on the same batches (the
  benchmark checks this from their first logged detection losses). Much of the seed-to-seed spread is then
  shared by both runs, and the test is on the per-seed differences ``AP_method - AP_student``
  (``t = mean / (std / sqrt(n))``, ``n - 1`` degrees of freedom, ``ddof=1``).
- **Welch** otherwise (unequal variances, sample standard deviations, Welch–Satterthwaite degrees of
  freedom): with 3 seeds per row a difference must be about 2.8 standard errors to count.

Both need at least 2 seeds per row (else the verdict is ``None``, "n/a").
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ppdistill.optional import require

__all__ = ['COCO_FIELDS', 'coco_row', 'mean_std', 'gap_closed', 'welch_t_test', 'paired_t_test',
           'beyond_noise', 'aggregate', 'markdown_table', 'format_p', 'format_delta', 'ALPHA']

# Positions in the 12 numbers of pycocotools' COCOeval.stats (ppdet's bbox metric list).
COCO_FIELDS = {'AP': 0, 'AP50': 1, 'APs': 3, 'APm': 4, 'APl': 5}
ALPHA = 0.05


def coco_row(bbox: Sequence[float]) -> Dict[str, float]:
    """The benchmark's metrics from a COCO ``bbox`` stats list."""
    return {name: float(bbox[i]) for name, i in COCO_FIELDS.items()}


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for a single value)."""
    arr = np.asarray(values, dtype='float64')
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def gap_closed(ap_method: float, ap_student: float, ap_teacher: float) -> Optional[float]:
    """``(AP_method - AP_student) / (AP_teacher - AP_student)``; ``None`` if teacher and student tie."""
    gap = ap_teacher - ap_student
    return None if gap == 0 else (ap_method - ap_student) / gap


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """Welch's unequal-variance t-test: ``(t, degrees of freedom, two-sided p)`` for ``mean(a) - mean(b)``.

    Both samples need >= 2 values. Zero variance in both: ``t = ±inf, p = 0`` if the means differ, else
    ``t = 0, p = 1``.
    """
    stats = require('scipy.stats', 'the seed statistics (t-tests)')
    a, b = np.asarray(a, 'float64'), np.asarray(b, 'float64')
    if a.size < 2 or b.size < 2:
        raise ValueError('Welch t-test needs at least 2 values per sample')
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = a.mean() - b.mean()
    if va + vb == 0:
        return (math.copysign(math.inf, diff) if diff else 0.0), float(a.size + b.size - 2), \
            (0.0 if diff else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(t), float(df), float(2 * stats.t.sf(abs(t), df))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """Paired t-test on ``a[i] - b[i]``: ``(t, degrees of freedom, two-sided p)``.

    Needs >= 2 pairs of equal length. Identical differences: ``t = ±inf, p = 0`` if they are not zero,
    else ``t = 0, p = 1``.
    """
    stats = require('scipy.stats', 'the seed statistics (t-tests)')
    a, b = np.asarray(a, 'float64'), np.asarray(b, 'float64')
    if a.size != b.size or a.size < 2:
        raise ValueError('paired t-test needs two samples of equal length >= 2')
    d = a - b
    sd = d.std(ddof=1)
    if sd == 0:
        mean = d.mean()
        return (math.copysign(math.inf, mean) if mean else 0.0), float(d.size - 1), (0.0 if mean else 1.0)
    t = d.mean() / (sd / math.sqrt(d.size))
    return float(t), float(d.size - 1), float(2 * stats.t.sf(abs(t), d.size - 1))


def beyond_noise(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA,
                 paired: bool = False) -> Optional[bool]:
    """True if ``a`` and ``b`` differ beyond seed noise (paired or Welch two-sided ``p < alpha``); None
    if either has fewer than 2 seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    return (paired_t_test(a, b) if paired else welch_t_test(a, b))[2] < alpha


def aggregate(runs: Dict[str, List[Dict[str, float]]], baseline: str = 'student',
              teacher: str = 'teacher', paired: Optional[Dict[str, bool]] = None) -> List[dict]:
    """One summary per row from per-seed metrics.

    Args:
        runs: row name -> list over seeds of ``{metric: value}`` (:data:`COCO_FIELDS` names), in row order.
        baseline, teacher: the plain student's and the teacher's row names.
        paired: row -> True when its runs pair seed by seed with the baseline's (same seeds in the same
            order, same initialisation and data order); those rows get the paired test.

    Returns:
        per row ``{'row', 'n', 'values': {metric: [...]}, 'mean': {...}, 'std': {...}}`` plus, for rows
        other than the teacher and the baseline, ``gap_closed`` (on mean AP), ``delta_ap``
        (mean AP minus the baseline's), ``test`` (``'paired'`` or ``'welch'``), ``p``, ``beyond_noise``
        on AP and, for paired rows, ``delta_ap_std`` (std of the per-seed differences). ``welch_p`` is
        always given.
    """
    out = []
    base_ap = [r['AP'] for r in runs.get(baseline, [])]
    teacher_ap = [r['AP'] for r in runs.get(teacher, [])]
    for row, seeds in runs.items():
        values = {m: [s[m] for s in seeds] for m in COCO_FIELDS}
        stats = {m: mean_std(v) for m, v in values.items()}
        entry = {'row': row, 'n': len(seeds), 'values': values,
                 'mean': {m: s[0] for m, s in stats.items()}, 'std': {m: s[1] for m, s in stats.items()}}
        if row not in (baseline, teacher) and base_ap:
            ap = values['AP']
            entry['delta_ap'] = float(np.mean(ap) - np.mean(base_ap))
            entry['gap_closed'] = (gap_closed(float(np.mean(ap)), float(np.mean(base_ap)),
                                              float(np.mean(teacher_ap))) if teacher_ap else None)
            enough = len(ap) > 1 and len(base_ap) > 1
            is_paired = bool((paired or {}).get(row)) and len(ap) == len(base_ap)
            entry['welch_p'] = welch_t_test(ap, base_ap)[2] if enough else None
            entry['test'] = 'paired' if is_paired else 'welch'
            entry['p'] = (paired_t_test(ap, base_ap)[2] if is_paired else entry['welch_p']) if enough else None
            entry['beyond_noise'] = beyond_noise(ap, base_ap, paired=is_paired)
            if is_paired:
                entry['delta_ap_std'] = mean_std(np.subtract(ap, base_ap))[1]
        out.append(entry)
    return out


def _pm(mean: float, std: Optional[float]) -> str:
    if mean == -1:
        return 'n/a'  # COCO's -1: no ground truth in this size range
    return f'{mean:.3f}' if std is None else f'{mean:.3f} ± {std:.3f}'


def format_p(p: float) -> str:
    return 'p < 0.001' if p < 1e-3 else f'p = {p:.3f}'


def format_delta(entry: dict) -> str:
    """A method row's ΔAP vs the plain student, ``± std`` of the per-seed differences when paired."""
    delta = f"{entry['delta_ap']:+.3f}"
    if entry.get('delta_ap_std') is not None:
        delta += f" ± {entry['delta_ap_std']:.3f}"
    return delta


def markdown_table(summary: List[dict]) -> str:
    """The accuracy table (mean ± std over seeds; gap closed; verdict against the plain student)."""
    head = ('| row | seeds | ' + ' | '.join(COCO_FIELDS) + ' | ΔAP vs student | gap closed | '
            f'beyond seed noise (p < {ALPHA}) |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for e in summary:
        cells = [e['row'], str(e['n'])] + [_pm(e['mean'][m], e['std'][m]) for m in COCO_FIELDS]
        if 'delta_ap' in e:
            gap = e['gap_closed']
            test = 'paired t' if e.get('test') == 'paired' else 'Welch'
            if e['beyond_noise'] is None:
                verdict = 'n/a (< 2 seeds)'
            else:
                verdict = f"{'yes' if e['beyond_noise'] else 'no'} ({test} {format_p(e['p'])})"
            cells += [format_delta(e), '—' if gap is None else f'{gap:+.0%}', verdict]
        else:
            cells += ['', '', '']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)

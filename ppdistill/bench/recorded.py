"""Recorded results: the accuracy tables committed under ``docs/experiments/`` and their runs.

``tools/benchmark.py accuracy --out docs/experiments/<name>`` records every run of a table in its results
file ``accuracy_<arch>.json`` (:mod:`ppdistill.bench.results`). The demo trains one seed; after its own
table it compares each of its runs with the recorded run of the same configs and seed (printing both APs
and the recorded run's commit), then prints these tables over seeds (one seed is not a result).
"""
import glob
import os
import shlex
from typing import Dict, List, Optional, Tuple

from ppdistill.bench.results import conflicts, load_results, recorded_run, recorded_table, table_summary
from ppdistill.bench.stats import format_delta, format_p

__all__ = ['load_reports', 'find_recorded_run', 'ap_by_seed', 'seeds_ahead', 'summary_lines', 'reproduction_lines',
           'strongest_effect', 'student_config_of']


def load_reports(experiments_dir: str, arch: str) -> List[dict]:
    """Every ``<experiments_dir>/<name>/accuracy_<arch>.json`` (sorted by name) as its table:
    ``{'command', 'date', 'rows'}`` (rows: :func:`ppdistill.bench.results.table_summary`), with
    ``'results'`` (the file) and ``'dir'``. Unreadable files are skipped: recorded tables are context,
    never a reason to fail."""
    reports = []
    for path in sorted(glob.glob(os.path.join(experiments_dir, '*', f'accuracy_{arch}.json'))):
        results = load_results(path)
        table = recorded_table(results)
        if not table:
            continue
        rows = table_summary(results, table['rows'], table['seeds'])
        reports.append({'command': table['command'], 'date': table['date'], 'rows': rows, 'results': results,
                        'path': path, 'dir': os.path.dirname(path)})
    return reports


def find_recorded_run(experiments_dir: str, arch: str, row: str, seed: int, inputs: dict
                      ) -> Optional[Tuple[str, dict]]:
    """``(results file, run)`` of a recorded run of ``row`` and ``seed`` made with exactly these inputs
    (:func:`ppdistill.runs.run_inputs`), or ``None``."""
    for path in sorted(glob.glob(os.path.join(experiments_dir, '*', f'accuracy_{arch}.json'))):
        results = load_results(path)
        run = recorded_run(results, row, seed)
        if run is not None and not conflicts(results, row, inputs):
            return path, run
    return None


def ap_by_seed(report: dict, row_name: str) -> Dict[int, float]:
    """``{seed: AP}`` of one row of a recorded table (from its runs)."""
    row = next(r for r in report['rows'] if r['row'] == row_name)
    return {r['seed']: r['AP'] for r in row.get('runs', [])}


def seeds_ahead(report: dict, row_name: str, baseline: str = 'student') -> Tuple[int, int]:
    """``(k, n)``: the row's AP is above the baseline's on k of the n seeds both rows ran."""
    ours, base = ap_by_seed(report, row_name), ap_by_seed(report, baseline)
    common = sorted(set(ours) & set(base))
    return sum(ours[s] > base[s] for s in common), len(common)


def summary_lines(report: dict) -> List[str]:
    """A recorded table in a few lines: its command, the teacher and student AP, and per method ΔAP vs the
    plain student (± std of the per-seed differences), seeds ahead, p and the verdict.

    e.g. ``mgd   +0.068 ± 0.038 AP, ahead on 6/6 seeds, p = 0.007: beyond the seed noise``
    """
    rows = {r['row']: r for r in report['rows']}
    lines = [f"{report.get('command', '?')}   ({report.get('date', 'undated')})"]
    context = []
    for name in ('teacher', 'student'):
        if name in rows:
            std = rows[name]['std']['AP']
            spread = '' if std is None else f' ± {std:.3f}'
            context.append(f"{name} AP {rows[name]['mean']['AP']:.3f}{spread} ({rows[name]['n']} "
                           f"seed{'s' if rows[name]['n'] != 1 else ''})")
    lines.append('  ' + ', '.join(context))
    width = max((len(r['row']) for r in report['rows'] if 'delta_ap' in r), default=0)
    for row in report['rows']:
        if 'delta_ap' not in row:
            continue
        k, n = seeds_ahead(report, row['row'])
        if row.get('beyond_noise') is None:
            verdict = 'n/a (< 2 seeds)'
        else:
            verdict = (f"{format_p(row['p'])}: "
                       f"{'beyond' if row['beyond_noise'] else 'within'} the seed noise")
        lines.append(f"  {row['row']:<{width}}  {format_delta(row)} AP, ahead on {k}/{n} seeds, {verdict}")
    return lines


def reproduction_lines(experiments_dir: str, arch: str, seed: int, runs: List[Tuple[str, str, dict, float]],
                       root: str = '.') -> List[str]:
    """Did this machine reproduce the recorded runs? ``runs``: ``(label, row, inputs, AP)`` of the runs
    just made (row ``student`` or a method name, as in the benchmark). Per run: its AP and the recorded
    run's AP with that run's commit (identical, or different: another CPU or paddle build, or code
    changed since that commit), or that no run of the same configs and seed is recorded. Paths are
    shown relative to ``root``."""
    lines = []
    for label, row, inputs, ap in runs:
        found = find_recorded_run(experiments_dir, arch, row, seed, inputs)
        if found is None:
            lines.append(f'{label}: AP {ap:.4f}; no recorded run of these configs and seed {seed}')
            continue
        path, run = found
        recorded, commit = run['bbox'][0], run.get('commit', 'unknown')[:12]
        where = f'{os.path.relpath(path, root)}, commit {commit}'
        if abs(recorded - ap) < 1e-9:
            lines.append(f'{label}: AP {ap:.4f} here, {recorded:.4f} recorded ({where}): identical')
        else:
            lines.append(f'{label}: AP {ap:.4f} here, {recorded:.4f} recorded ({where}; same configs and '
                         'seed): another CPU or paddle build, or code changed since that commit, so read the '
                         'difference against the seed spread below')
    return lines


def strongest_effect(reports: List[dict]) -> Optional[Tuple[dict, dict]]:
    """``(report, row)`` of the method row with the largest mean ΔAP among those beyond the seed noise
    (and above the student), or ``None`` when no recorded method beats the student."""
    found = [(row['delta_ap'], i, report, row) for i, report in enumerate(reports) for row in report['rows']
             if row.get('beyond_noise') and row.get('delta_ap', 0) > 0]
    if not found:
        return None
    _, _, report, row = max(found, key=lambda f: (f[0], -f[1]))
    return report, row


def student_config_of(report: dict) -> Optional[str]:
    """The ``--student_config`` a recorded table was made with, as typed (repository-relative), from its
    command; ``None`` for the default ``<arch>_student.yml``."""
    words = shlex.split(report.get('command', ''))
    for i, word in enumerate(words):
        if word == '--student_config' and i + 1 < len(words):
            return words[i + 1]
        if word.startswith('--student_config='):
            return word.split('=', 1)[1]
    return None

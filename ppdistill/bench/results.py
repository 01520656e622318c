"""One results file per accuracy table: ``<out>/accuracy_<arch>.json``, the record a table is printed from.

Written by ``tools/benchmark.py accuracy`` (like mmrazor's ``metafile.yml``)::

    arch, teacher_config, student_config, methods {name: config}   (repository-relative paths)
    configs  {path: text}    every config of the table with its _BASE_ files, as they were run
    settings {overrides, teacher_overrides, teacher_seed}
    table    {command, date, rows, seeds}   the table last printed from it
    runs     {row: {seed: {bbox (the 12 COCO numbers), params, seconds, train_seconds, eval_seconds,
                           shipped, commit, paddle, ppdet, date, finished,
                           losses: {first_step: {detection term: value at step 0}, balance: {...}}}}}

A run is reused while its inputs (:func:`ppdistill.runs.run_inputs`) equal the recorded ones; the code is
not compared (``commit`` says which code made a run; re-running after a code change is the user's call).
"""
import os
from typing import Any, Callable, Dict, List, Optional

from ppdistill.runs import changed_inputs, locked, read_json, write_json_atomic

__all__ = ['results_path', 'load_results', 'recorded_inputs', 'conflicts', 'recorded_run', 'recorded_table',
           'set_table', 'update_results', 'record_run', 'first_step', 'same_start', 'table_summary', 'SETTINGS']

SETTINGS = ('overrides', 'teacher_overrides', 'teacher_seed')
_NOT_DETECTION = ('epoch', 'step', 'iter', 'lr', 'loss', 'det_loss', 'balance')


def results_path(out: str, arch: str) -> str:
    return os.path.join(out, f'accuracy_{arch}.json')


def load_results(path: str) -> Optional[dict]:
    """The results file, or ``None`` when missing or not one (e.g. unreadable)."""
    results = read_json(path)
    return results if isinstance(results, dict) and isinstance(results.get('runs'), dict) else None


def recorded_inputs(results: dict) -> Dict[str, Any]:
    return {**results.get('configs', {}), **results.get('settings', {})}


def conflicts(results: Optional[dict], row: str, inputs: Dict[str, Any]) -> List[str]:
    """Inputs of ``row`` that differ from those its recorded runs were made with (none recorded: [])."""
    if not results or not results['runs'].get(row):
        return []
    return changed_inputs(recorded_inputs(results), inputs)


def recorded_run(results: Optional[dict], row: str, seed: int) -> Optional[dict]:
    return ((results or {}).get('runs', {}).get(row) or {}).get(str(seed))


def update_results(path: str, header: Dict[str, Any], change: Callable[[dict], None]) -> dict:
    """Apply ``change`` to the results file and return it: read, changed and written under a lock, so
    two benchmark calls on one ``--out`` keep each other's runs. ``header``: the table's ``arch`` and
    config paths (a new file starts from it)."""
    with locked(path):
        results = load_results(path) or {'format': 1, 'configs': {}, 'settings': {}, 'runs': {}}
        results.update({k: v for k, v in header.items() if k != 'methods'})
        results['methods'] = {**results.get('methods', {}), **header.get('methods', {})}
        change(results)
        write_json_atomic(path, results)
    return results


def recorded_table(results: Optional[dict], name: str = '') -> Optional[dict]:
    """The recorded table (``command``, ``date``, ``rows``, ``seeds``) called ``name`` (``''``: the main
    one, key ``table``; named ones under ``tables``), or ``None``."""
    if not results:
        return None
    return results.get('tables', {}).get(name) if name else results.get('table')


def set_table(results: dict, name: str, table: dict) -> None:
    """Record ``table`` as the table called ``name`` (a change for :func:`update_results`)."""
    if name:
        results.setdefault('tables', {})[name] = table
    else:
        results['table'] = table


def record_run(results: dict, inputs: Dict[str, Any], row: str, seed: int, run: dict) -> None:
    """Put one run and its inputs into ``results`` (a change for :func:`update_results`)."""
    for key, value in inputs.items():
        results['settings' if key in SETTINGS else 'configs'][key] = value
    runs = results['runs'].setdefault(row, {})
    runs[str(seed)] = run
    results['runs'][row] = dict(sorted(runs.items(), key=lambda kv: int(kv[0])))


def first_step(records: List[dict]) -> Dict[str, float]:
    """The detector's own loss terms at the first step (iteration 0) of a run's ``train_log.jsonl``."""
    if not records or records[0].get('iter') != 0:
        return {}
    return {k: v for k, v in records[0].items() if k not in _NOT_DETECTION and not k.startswith('distill')}


SAME_START_RTOL = 1e-5


def same_start(student: Optional[dict], method: Optional[dict]) -> bool:
    """True when two runs' first steps have the same detection-loss terms: the same initial weights on
    the same first batch, i.e. the seed paired them. Compared within a relative 1e-5: runs recorded from
    ppdet's log text carry 6 decimals, ``train_log.jsonl`` every float32 digit, and two runs of one seed
    differ by a few float32 ulps (summation order: 1.0095353 and 1.0095357 for the same seed's ``loss_vfl``
    in two distill runs, where rounding both to 6 decimals split them); another seed differs by ~1e-3."""
    keys = [k for k in (student or {}) if k in (method or {})]
    return bool(keys) and all(abs(student[k] - method[k]) <= SAME_START_RTOL * max(1.0, abs(student[k]))
                              for k in keys)


def table_summary(results: dict, rows: List[str], seeds: List[int]) -> List[dict]:
    """The table's rows (:func:`ppdistill.bench.stats.aggregate`, paired by seed where every seed's plain
    and distilled run started alike), each with its ``runs``: per seed the COCO metrics, params, seconds
    and loss balance. The teacher row is its one run at ``settings.teacher_seed``."""
    from ppdistill.bench.stats import aggregate, coco_row
    teacher_seed = results['settings'].get('teacher_seed', 0)
    wanted = {row: [teacher_seed] if row == 'teacher' else seeds for row in rows}
    runs = {row: [(s, recorded_run(results, row, s)) for s in wanted[row]] for row in rows}
    per_row = {row: [coco_row(r['bbox']) for _, r in found] for row, found in runs.items()}

    def first(row, seed):
        return ((recorded_run(results, row, seed) or {}).get('losses') or {}).get('first_step')
    paired = {row: all(same_start(first('student', s), first(row, s)) for s in seeds)
              for row in rows if row not in ('teacher', 'student')}
    summary = aggregate(per_row, paired=paired)
    for entry in summary:
        entry['runs'] = [{'seed': s, **coco_row(r['bbox']), 'params': r['params'],
                          'seconds': round(r['seconds'], 1), 'commit': r.get('commit', 'unknown'),
                          **({'balance': r['losses']['balance']}
                             if (r.get('losses') or {}).get('balance') is not None else {})}
                         for s, r in runs[entry['row']]]
    return summary

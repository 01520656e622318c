"""Does distillation pay, and what does it cost? Accuracy over seeds and step cost against its limit.

    python tools/benchmark.py accuracy [--arch picodet] [--methods mgd,fgd] [--seeds 3] [-o epoch=...]
    python tools/benchmark.py speed [--arch picodet] [--methods mgd,fgd] [--steps 8]
    python tools/benchmark.py teacher [--arch picodet] [--ship]
    python tools/benchmark.py gradients [--arch picodet] [--methods mgd,fgd] [--student_weights <ckpt>]

``teacher`` trains (or reuses) the teacher run alone and evaluates it; ``--ship`` copies it to
``configs/demo/weights/<arch>_teacher.pdparams`` with a record (its inputs: configs' contents, seed and
overrides; command, date, metrics), which the demo and ``accuracy`` then use instead of training a teacher
while those inputs are unchanged (``--retrain_teacher`` ignores it).

``accuracy`` trains (or reuses) the teacher once, then for every seed the plain student and the student
distilled with each method (same config, schedule and data; ``tools/train.py``), evaluates every run with
``tools/eval.py`` (COCO), records every run in the table's results file ``<out>/accuracy_<arch>.json``
(:mod:`ppdistill.bench.results`: the configs' contents, settings, and per run its COCO metrics, loss
summary, git commit and paddle/ppdet versions) and prints the table from it into
``<out>/accuracy_<arch>.{md,png}`` (and ``losses_<arch>.png`` from the runs' ``train_log.jsonl``): AP,
AP50, APs/m/l as mean ± std over seeds, the teacher row, the gap closed
``(AP_method - AP_student) / (AP_teacher - AP_student)`` and whether the difference to the plain student
exceeds the seed noise (a two-sided t-test on the per-seed APs, p < 0.05: paired by seed when both runs
of every seed started from the same weights on the same batches, else Welch's; see
:mod:`ppdistill.bench.stats`), plus each run's loss balance (distill terms relative to the detection loss
at the first and last log point, and the warnings). A recorded run is reused while the configs (with
their ``_BASE_`` files), overrides and seeds that decide it are unchanged, so the command reprints its
table without training and more seeds train only those. The code is not compared: after a code change,
``--rerun`` retrains (each run records its commit). A table never mixes configs: when a requested row's
recorded runs were made with other configs or overrides the tool stops, and with ``--rerun`` drops them
and retrains. Dataset files are not compared: after changing the data, use a new ``--out``.
``--dataset shapes`` runs everything on the second demo dataset (:mod:`ppdistill.demo.shapes`) through
``-o <Section>.dataset_dir=dataset/shapes`` overrides of teacher and student runs alike, recorded with
the runs (so a table never mixes datasets), by default under ``output/benchmark_shapes``.

Methods: every ``<distill_dir>/<method>_<arch>_teacher_to_student.yml`` (so new methods appear by adding
their config); ``--config_dir`` holds ``<arch>_teacher.yml`` and ``<arch>_student.yml``;
``--student_config`` swaps in another student recipe (e.g. a longer schedule) against the same teacher.

``speed`` measures in one process on the same batches (see :mod:`ppdistill.bench.speed`).

``gradients`` reports, per distill term and sub-term, its gradient on the student's parameters against the
detection loss's: norm ratio and cosine (see :mod:`ppdistill.bench.gradients`). A term's value can say
little about its pull: on the PicoDet demo pair, at the reference weights, FGD's level 2 is 0.14x the
detection loss in value but 0.40x in gradient at the start of training
(docs/experiments/picodet_recipes/reference/gradients_picodet.md).
"""
import _path  # noqa: F401  (repo root on sys.path)

import argparse
import json
import os
import re
import shlex
import sys
import time
from typing import Dict, List, Optional, Tuple

from ppdistill._env import apply_cpu_defaults
from ppdistill.errors import PPDistillError
from ppdistill.bench.results import (conflicts, first_step, load_results, record_run, recorded_run,
                                     recorded_table, results_path, set_table, table_summary,
                                     update_results)
from ppdistill.runs import (WEIGHTS_DIR, RunFailed, discover_methods, format_duration, locked, now_utc, run_inputs,
                            run_tool, ship_teacher, shipped_teacher)

ROOT = _path.ROOT
TOOLS = os.path.join(ROOT, 'tools')


def _resolve(path: str) -> str:
    """A path as given if it exists from the CWD, else relative to the repository root."""
    return os.path.abspath(path if os.path.exists(path) else os.path.join(ROOT, path))


def select_methods(requested: Optional[str], available: Dict[str, str], arch: str,
                   distill_dir: str) -> Dict[str, str]:
    if requested == 'none':  # teacher and plain student only (e.g. to measure the seed noise)
        return {}
    if not requested:
        if not available:
            raise PPDistillError(f'no distill configs *_{arch}_teacher_to_student.yml in {distill_dir}')
        return available
    names = [m.strip() for m in requested.split(',') if m.strip()]
    missing = [m for m in names if m not in available]
    if missing:
        raise PPDistillError(f'no distill config for {missing} with --arch {arch} in {distill_dir} '
                             f'(expected <method>_{arch}_teacher_to_student.yml); available: '
                             f"{', '.join(available) or 'none'}")
    return {m: available[m] for m in names}


def parse_seeds(text: str) -> List[int]:
    """``'3'`` -> seeds 0, 1, 2; ``'0,4,7'`` -> those seeds."""
    try:
        if ',' in text:
            seeds = [int(s) for s in text.split(',') if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise PPDistillError(f'--seeds {text!r}: give a count (3) or a comma list (0,1,2)') from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise PPDistillError(f'--seeds {text!r}: need at least one seed, no repeats')
    return seeds


def describe_seeds(text: str, seeds: List[int]) -> str:
    """The seeds for the progress line; a bare count is spelled out, since ``--seeds 2`` reads like
    "seed 2" and means seeds 0 and 1."""
    if ',' in text:
        return f'seeds {seeds}'
    return f'seeds {seeds} (--seeds {text.strip()} is a count; seed {text.strip()} alone is --seeds {text.strip()},)'


def resolve_pair(args) -> Tuple[str, str, Dict[str, str]]:
    """``(teacher config, student config, {method: distill config})`` from the command line."""
    teacher_cfg = _resolve(os.path.join(args.config_dir, f'{args.arch}_teacher.yml'))
    student_cfg = _resolve(args.student_config or os.path.join(args.config_dir, f'{args.arch}_student.yml'))
    for cfg in (teacher_cfg, student_cfg):
        if not os.path.isfile(cfg):
            raise PPDistillError(f'config not found: {cfg} (--config_dir holds <arch>_teacher.yml and '
                                 '<arch>_student.yml; --student_config replaces the latter)')
    distill_dir = _resolve(args.distill_dir)
    methods = select_methods(args.methods, discover_methods(distill_dir, args.arch), args.arch, distill_dir)
    return teacher_cfg, student_cfg, methods


class Plan:
    """The runs of an accuracy benchmark, where each lives (``<out>/runs/<arch>/<row>/seed<k>``), what
    decides each (:func:`ppdistill.runs.run_inputs`) and the results file they are recorded in."""

    def __init__(self, args):
        self.arch = args.arch
        self.out = os.path.abspath(args.out)
        self.teacher_cfg, self.student_cfg, self.methods = resolve_pair(args)
        self.seeds = parse_seeds(args.seeds)
        self.opt = list(args.opt or [])
        self.teacher_opt = list(args.teacher_opt or [])
        self.teacher_seed = args.teacher_seed
        self.rerun = getattr(args, 'rerun', False)
        self.retrain_teacher = args.retrain_teacher
        self.shipped = None if args.retrain_teacher else _shipped(self.arch, self.inputs('teacher'))
        self.rows = ['teacher', 'student'] + list(self.methods)
        self.results = results_path(self.out, self.arch)
        self.started = time.time()

    def run_dir(self, row: str, seed: int) -> str:
        return os.path.join(self.out, 'runs', self.arch, row, f'seed{seed}')

    def runs(self) -> List[tuple]:
        """``(row, seed)`` in execution order: the teacher, then all rows seed by seed."""
        return [('teacher', self.teacher_seed)] + [(row, s) for s in self.seeds for row in self.rows[1:]]

    def inputs(self, row: str) -> dict:
        return run_inputs(row, ROOT, self.teacher_cfg, self.student_cfg, self.methods.get(row), self.opt,
                          self.teacher_opt, self.teacher_seed)

    def header(self) -> dict:
        return {'arch': self.arch, 'teacher_config': _show(self.teacher_cfg),
                'student_config': _show(self.student_cfg),
                'methods': {m: _show(p) for m, p in self.methods.items()}}

    def reusable(self, results: Optional[dict], row: str, seed: int) -> Optional[dict]:
        """The recorded run to reuse: recorded with these inputs (checked for the whole table before any
        run), and not to be re-run, unless a call side by side recorded it after this one started."""
        run = recorded_run(results, row, seed)
        redo = self.rerun or (row == 'teacher' and self.retrain_teacher)
        if run is None or (redo and run.get('finished', 0) < self.started):
            return None
        return run

    def weights(self, row: str, seed: int, results: Optional[dict] = None) -> str:
        """A run's weights (no suffix); the teacher's are the shipped ones when its recorded run (or, with
        none recorded, this plan) uses them."""
        if row == 'teacher':
            run = recorded_run(results, 'teacher', seed)
            if (run['shipped'] if run else self.shipped) and self.shipped:
                return self.shipped
        name = os.path.splitext(os.path.basename(
            self.methods[row] if row in self.methods else (self.teacher_cfg if row == 'teacher'
                                                           else self.student_cfg)))[0]
        return os.path.join(self.run_dir(row, seed), name, 'model_final')

    def train_args(self, row: str, seed: int, results: Optional[dict] = None) -> List[str]:
        cfg = self.teacher_cfg if row == 'teacher' else self.student_cfg
        args = [os.path.join(TOOLS, 'train.py'), '-c', cfg, '--seed', str(seed)]
        opt = self.teacher_opt if row == 'teacher' else self.opt
        if row in self.methods:
            args += ['--slim_config', self.methods[row]]
            opt = [f'teacher_config={self.teacher_cfg}',
                   f'teacher_weights={self.weights("teacher", self.teacher_seed, results)}'] + opt
        return args + ['-o', f'save_dir={self.run_dir(row, seed)}'] + opt

    def eval_args(self, row: str, seed: int) -> List[str]:
        cfg = self.teacher_cfg if row == 'teacher' else self.student_cfg
        opt = self.teacher_opt if row == 'teacher' else self.opt
        # ppdet's COCO eval writes <output_eval>/bbox.json: one per run, or evaluations running side by
        # side (two benchmark calls with disjoint --seeds) overwrite each other's detections.
        return [os.path.join(TOOLS, 'eval.py'), '-c', cfg, '--save_metrics',
                os.path.join(self.run_dir(row, seed), 'metrics.json'),
                '-o', f'weights={self.weights(row, seed)}'] + opt + [f'output_eval={self.run_dir(row, seed)}']


def _expected(results: Optional[dict], row: str, key: str = 'seconds') -> Optional[float]:
    """Expected seconds (``key``: the whole run, ``train_seconds`` or ``eval_seconds``): the mean of
    recorded runs of the same row, else of any student row."""
    runs = [(name, r) for name, seeds in (results or {}).get('runs', {}).items() for r in seeds.values()]
    same = [r[key] for name, r in runs if name == row and key in r]
    other = [r[key] for name, r in runs if name != 'teacher' and key in r]
    pool = same or other
    return sum(pool) / len(pool) if pool else None


def _run_one(plan: 'Plan', row: str, seed: int, results: Optional[dict], prefix: str) -> dict:
    """Train (a shipped teacher: skip) and evaluate one run; return its record for the results file."""
    from ppdistill.balance import balance_summary
    from ppdistill.runs import param_count, provenance
    from ppdistill.trainer import TRAIN_LOG, read_train_log
    run_dir = plan.run_dir(row, seed)
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    origin = provenance()  # the code that trains is the code at the start (a checkout may move meanwhile)
    shipped = bool(row == 'teacher' and plan.shipped)
    try:
        train_s = 0.0
        if not shipped:
            train_s = run_tool('train', plan.train_args(row, seed, results), os.path.join(run_dir, 'train.log'),
                               os.getcwd(), prefix, _expected(results, row, 'train_seconds'))
        eval_s = run_tool('eval', plan.eval_args(row, seed), os.path.join(run_dir, 'eval.log'),
                          os.getcwd(), prefix, _expected(results, row, 'eval_seconds'))
    except RunFailed as err:
        sys.stdout.write(err.log_tail)
        sys.exit(f'[bench] {row} seed {seed}: {err}')
    with open(os.path.join(run_dir, 'metrics.json')) as f:
        bbox = json.load(f)['bbox']
    weights = plan.weights(row, seed)
    steps = [] if shipped else read_train_log(os.path.join(os.path.dirname(weights), TRAIN_LOG))
    losses = {'first_step': first_step(steps)}
    if row in plan.methods:
        losses['balance'] = balance_summary(steps)
    return {'bbox': bbox, 'params': param_count(weights), 'seconds': time.time() - start,
            'train_seconds': train_s, 'eval_seconds': eval_s, 'shipped': shipped, **origin,
            'date': now_utc(), 'finished': time.time(), 'losses': losses}


def _finished_or_run(plan: 'Plan', row: str, seed: int, prefix: str) -> dict:
    """The run's record: reused when recorded (maybe by a call side by side that held the run's lock
    meanwhile), else run now and recorded. Returns the results file."""
    with locked(plan.run_dir(row, seed), f'{prefix}: waiting for another benchmark call that runs it'):
        results = load_results(plan.results)
        if plan.reusable(results, row, seed) is not None:
            print(f'{prefix}: reusing the run another benchmark call finished', flush=True)
            return results
        run = _run_one(plan, row, seed, results, prefix)
        return update_results(plan.results, plan.header(),
                              lambda r: record_run(r, plan.inputs(row), row, seed, run))


def _check_inputs(plan: 'Plan', rows: List[str]) -> None:
    """A table never mixes runs of different configs: when the recorded runs of a requested row were made
    with other inputs, stop (one line), or with ``--rerun`` drop the recorded runs and start afresh."""
    results = load_results(plan.results)
    changed = {row: conflicts(results, row, plan.inputs(row)) for row in rows}
    changed = {row: names for row, names in changed.items() if names}
    if not changed:
        return
    names = sorted({n for found in changed.values() for n in found})
    what = ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')
    where = os.path.relpath(plan.results)
    if not plan.rerun:
        raise PPDistillError(f'{where} records runs of {", ".join(changed)} made with other configs or settings '
                             f'({what}): --rerun retrains this table (its recorded runs are dropped), '
                             'or use another --out')
    count = sum(len(seeds) for seeds in results['runs'].values())
    os.remove(plan.results)
    print(f'[bench] --rerun: {what} changed, so the {count} runs recorded in {where} are dropped', flush=True)


DATASETS = ('digits', 'shapes')  # tools/make_demo_data.py --kind; the demo configs read dataset/digits
_DATASET_SECTIONS = ('TrainDataset', 'EvalDataset', 'TestDataset')


def dataset_overrides(dataset: str) -> List[str]:
    """The ``-o`` overrides that point every run (teacher, student, methods) at ``dataset/<dataset>``;
    none for the digits the configs read. They are recorded with each run's inputs, so a results file
    never mixes datasets (another dataset conflicts like other overrides do)."""
    if dataset == 'digits':
        return []
    return [f'{section}.dataset_dir=dataset/{dataset}' for section in _DATASET_SECTIONS]


def apply_dataset(args) -> None:
    """``--dataset``: prepend its overrides to ``-o`` and ``--teacher_opt``; ``--out`` defaults to
    ``output/benchmark`` for the digits and ``output/benchmark_<dataset>`` otherwise."""
    extra = dataset_overrides(args.dataset)
    args.opt = extra + list(args.opt or [])
    args.teacher_opt = extra + list(args.teacher_opt or [])
    if args.out is None:
        args.out = 'output/benchmark' + ('' if args.dataset == 'digits' else f'_{args.dataset}')


def _demo_data(args) -> None:
    """Make ``dataset/<--dataset>`` (relative to the CWD) if missing (idempotent): the digits when the
    demo configs read them, another dataset always (its overrides point every run at it)."""
    demo = os.path.abspath(_resolve(args.config_dir)) == os.path.join(ROOT, 'configs', 'demo')
    if demo or args.dataset != 'digits':
        data = os.path.join(os.getcwd(), 'dataset', args.dataset)
        try:  # two calls side by side on a fresh machine: one writes the dataset, the other waits for it
            with locked(data, '[bench] data: waiting for another benchmark call that writes it'):
                run_tool('data', [os.path.join(TOOLS, 'make_demo_data.py'), '--kind', args.dataset, '--out', data],
                         os.path.join(os.path.abspath(args.out), 'make_demo_data.log'), os.getcwd(), '[bench]')
        except RunFailed as err:
            sys.stdout.write(err.log_tail)
            sys.exit(f'[bench] {err}')


def run_teacher(args) -> dict:
    """Train (or reuse) and evaluate the teacher alone; ``--ship`` copies it to the shipped weights."""
    args.methods, args.seeds = 'none', '1'  # no student rows; one seed keeps the plan valid
    plan = Plan(args)
    _check_inputs(plan, ['teacher'])
    _demo_data(args)
    seed = plan.teacher_seed
    results = _finished_or_run(plan, 'teacher', seed, f'[bench] teacher seed {seed}')
    record = recorded_run(results, 'teacher', seed)
    print(f"[bench] teacher {plan.arch}: AP {record['bbox'][0]:.3f}, AP50 {record['bbox'][1]:.3f}", flush=True)
    if args.ship and not record.get('shipped'):
        shipped = ship_teacher(plan.weights('teacher', seed, results), os.path.join(ROOT, WEIGHTS_DIR),
                               plan.arch, {
                                   'inputs': plan.inputs('teacher'), 'arch': plan.arch,
                                   'config': _show(plan.teacher_cfg), 'seed': seed, 'overrides': plan.teacher_opt,
                                   'trained_by': 'python ' + ' '.join(shlex.quote(_show(a) if os.path.isabs(a) else a)
                                                                     for a in plan.train_args('teacher', seed)),
                                   'regenerate': f'python tools/benchmark.py teacher --arch {plan.arch} --ship',
                                   'date': now_utc(), 'commit': record.get('commit'), 'bbox': record['bbox'],
                                   'params': record['params']})
        print(f'[bench] shipped {os.path.relpath(shipped)}.pdparams (+ .json)', flush=True)
    return record


def run_accuracy(args) -> dict:
    plan = Plan(args)
    _check_inputs(plan, plan.rows)
    runs = plan.runs()
    print(f"[bench] accuracy {plan.arch}: rows {', '.join(plan.rows)}; {describe_seeds(args.seeds, plan.seeds)}; "
          f'{len(runs)} runs under {os.path.relpath(plan.out)}', flush=True)
    results = load_results(plan.results)
    todo = [(row, seed) for row, seed in runs if plan.reusable(results, row, seed) is None]
    if len(runs) > len(todo):
        print(f'[bench] reusing {len(runs) - len(todo)} recorded runs (same configs, overrides and seeds; '
              f'--rerun retrains them, e.g. after a code change)', flush=True)
    if plan.shipped and ('teacher', plan.teacher_seed) in todo:
        print(f'[bench] teacher: shipped {os.path.relpath(plan.shipped)}.pdparams (its configs are unchanged; '
              '--retrain_teacher trains it)', flush=True)
    teacher_weights = plan.weights('teacher', plan.teacher_seed, results) + '.pdparams'
    if ('teacher', plan.teacher_seed) not in todo and any(r in plan.methods for r, _ in todo) \
            and not os.path.isfile(teacher_weights):
        raise PPDistillError(f'the recorded teacher run has no weights here ({os.path.relpath(teacher_weights)}; '
                             'records keep none) and new distilled runs need them: put them there, or pass '
                             '--retrain_teacher to train the teacher again')
    if todo:
        _demo_data(args)
    for i, (row, seed) in enumerate(todo, 1):
        left = sum(_expected(results, r) or 0.0 for r, _ in todo[i - 1:])
        total = f', all ~{format_duration(left)}' if left else ''
        results = _finished_or_run(plan, row, seed, f'[bench] ({i}/{len(todo)}{total}) {row} seed {seed}')

    table = {'command': _command_line(), 'date': now_utc(), 'rows': plan.rows, 'seeds': plan.seeds}

    def keep_or_set_table(r):
        old = recorded_table(r, args.table) or {}
        if todo or (old.get('rows'), old.get('seeds')) != (plan.rows, plan.seeds):
            if old and not args.table and not todo:
                print(f"[bench] this table (rows {', '.join(plan.rows)}; seeds {plan.seeds}) replaces the one "
                      f"recorded in {_show(plan.results)} (rows {', '.join(old.get('rows', []))}; seeds "
                      f"{old.get('seeds')}); --table NAME writes accuracy_{plan.arch}_NAME.md beside it instead",
                      flush=True)
            set_table(r, args.table, table)  # the recorded command and date stay while the table is the same
    results = update_results(plan.results, plan.header(), keep_or_set_table)
    summary = table_summary(results, plan.rows, plan.seeds)
    return write_accuracy_report(plan, results, summary, args.table)


def _table_name(value: str) -> str:
    if value and not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_-]*', value):  # '': the main table
        raise argparse.ArgumentTypeError(f'{value!r}: letters, digits, _ and - only (it names a file)')
    return value


def _command_line() -> str:
    """This invocation as a user would type it, for the reports."""
    return 'python tools/benchmark.py ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])


def _shipped(arch: str, inputs: dict) -> Optional[str]:
    """The repository's shipped teacher weights (no suffix) if shipped for exactly these inputs."""
    return shipped_teacher(os.path.join(ROOT, WEIGHTS_DIR), arch, inputs)


def _balance_lines(summary: List[dict]) -> List[str]:
    """Per distilled row and term: mean ratio to the detection loss at the start and the end, with its
    sub-terms (e.g. FGD's fg/bg/mask/rela) in brackets."""
    import numpy as np
    lines = []
    for entry in summary:
        runs = [r['balance'] for r in entry['runs'] if r.get('balance', {}).get('terms')]
        if not runs:
            continue

        def ratio(term):
            start = np.mean([r['terms'][term]['start'] for r in runs if term in r['terms']])
            ends = [r['terms'][term]['end'] for r in runs if r['terms'].get(term, {}).get('end') is not None]
            return f'{start:.3g} → {np.mean(ends):.3g}' if ends else f'{start:.3g} → ?'

        names = list(runs[0]['terms'])
        cells = []
        for term in names:
            if any(term != other and term.startswith(other + '_') for other in names):
                continue  # a sub-term: shown with its term
            subs = [n for n in names if n.startswith(term + '_')]
            inner = ', '.join(f'{n[len(term) + 1:]} {ratio(n)}' for n in subs)
            cells.append(f'`{term}` {ratio(term)}' + (f' ({inner})' if inner else ''))
        warned = sorted({f"{w['term']} {w['kind']}" for r in runs for w in r['warnings']})
        lines.append(f"- **{entry['row']}**: " + '; '.join(cells)
                     + (f". Warnings: {', '.join(warned)}" if warned else ''))
    return lines


def _show(path: str) -> str:
    """A path relative to the repository if inside it, else absolute."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith('..') else rel


def _curves(plan: Plan, results: dict) -> Dict[str, dict]:
    """row -> seed -> the step records of each run's ``train_log.jsonl`` found under ``--out``."""
    from ppdistill.trainer import TRAIN_LOG, read_train_log
    curves: Dict[str, dict] = {row: {} for row in plan.rows}
    for row, seed in plan.runs():
        steps = read_train_log(os.path.join(os.path.dirname(plan.weights(row, seed)), TRAIN_LOG))
        if steps:
            curves[row][seed] = steps
    return curves


def write_accuracy_report(plan: Plan, results: dict, summary: List[dict], name: str = '') -> dict:
    """``<out>/accuracy_<arch>[_<name>].md`` and the AP picture from the results file, and the loss curves
    (``losses_<arch>[_<name>].png``) from the runs' step logs where ``--out`` has them (records committed
    without them keep their picture). ``name``: the ``--table`` (none: the file's main table)."""
    from ppdistill.bench.plots import plot_accuracy, plot_losses
    from ppdistill.bench.stats import ALPHA, markdown_table
    os.makedirs(plan.out, exist_ok=True)
    table = recorded_table(results, name)
    suffix = f'_{name}' if name else ''
    header = [f'# Accuracy benchmark: {plan.arch}' + (f' ({name})' if name else ''), '',
              f"- date: {table['date']}", f"- command: `{table['command']}`", f'- seeds: {plan.seeds} '
              f'(teacher: one run, seed {plan.teacher_seed})',
              f"- student config: `{results['student_config']}`; teacher: `{results['teacher_config']}`; methods: "
              + ', '.join(f"{m} (`{results['methods'][m]}`)" for m in plan.methods), '', '']
    notes = ['', f'Mean ± sample std (ddof=1) over seeds. Gap closed = (AP_method − AP_student) / '
             '(AP_teacher − AP_student) on mean AP. "Beyond seed noise": a two-sided t-test of the row\'s '
             f'per-seed AP against the plain student\'s, p < {ALPHA} (needs ≥ 2 seeds per row): paired by seed '
             '(ΔAP ± the std of the per-seed differences) when the plain and the distilled run of every seed '
             'logged the same detection losses at step 0 (same initial weights, same first batch), else '
             'Welch\'s unequal-variance test.', '',
             '## Loss balance (distill term / detection loss, first → last log point, mean over seeds)', '']
    md = '\n'.join(header) + markdown_table(summary) + '\n' + '\n'.join(notes) + '\n' + \
        ('\n'.join(_balance_lines(summary)) or '(no balance lines in the logs)') + '\n'
    base = os.path.join(plan.out, f'accuracy_{plan.arch}{suffix}')
    with open(base + '.md', 'w') as f:
        f.write(md)
    plot_accuracy(summary, base + '.png', f'{plan.arch}, seeds {plan.seeds}')
    curves = _curves(plan, results)
    wrote = f'{base}.md/.png'
    if any(curves.values()):
        plot_losses(curves, os.path.join(plan.out, f'losses_{plan.arch}{suffix}.png'))
        wrote += f' and losses_{plan.arch}{suffix}.png'
    print('\n' + md, flush=True)
    print(f'[bench] wrote {wrote} (the table from {plan.results})', flush=True)
    return {'results': results, 'rows': summary}


def run_speed(args) -> dict:
    from ppdistill.bench.speed import speed_benchmark
    if args.steps < 1 or args.warmup < 0:
        raise PPDistillError('--steps must be >= 1 (>= 8 for a measurement) and --warmup >= 0')
    teacher_cfg, student_cfg, methods = resolve_pair(args)
    _demo_data(args)
    return speed_benchmark(args, args.arch, methods, teacher_cfg, student_cfg, os.path.abspath(args.out),
                           _command_line())


def run_gradients(args) -> dict:
    from ppdistill.bench.gradients import gradient_report
    if args.steps < 1:
        raise PPDistillError('--steps must be >= 1')
    teacher_cfg, student_cfg, methods = resolve_pair(args)
    _demo_data(args)
    if not args.teacher_weights:
        teacher = run_inputs('teacher', ROOT, teacher_cfg, teacher_opt=args.teacher_opt, teacher_seed=args.teacher_seed)
        args.teacher_weights = _shipped(args.arch, teacher)
        if not args.teacher_weights:
            raise PPDistillError(f'no shipped {args.arch} teacher for these configs: pass --teacher_weights '
                                 '(e.g. output/benchmark/runs/<arch>/teacher/seed0/...)')
    command = _command_line()
    return gradient_report(args, args.arch, methods, teacher_cfg, student_cfg, os.path.abspath(args.out),
                           command, now_utc())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    helps = {'accuracy': 'accuracy benchmark', 'speed': 'speed benchmark', 'teacher': 'train/ship the teacher',
             'gradients': "each distill term's gradient on the student against the detection loss's"}
    for name, help_text in helps.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument('--arch', default='picodet', help='pair: <config_dir>/<arch>_{teacher,student}.yml')
        p.add_argument('--methods', default=None,
                       help='comma list (default: every <method>_<arch>_teacher_to_student.yml; none: '
                            'teacher and student only)')
        p.add_argument('--config_dir', default='configs/demo', help='holds <arch>_teacher/student.yml')
        p.add_argument('--student_config', default=None,
                       help='another student config (e.g. a longer schedule) instead of '
                            '<config_dir>/<arch>_student.yml; the teacher stays')
        p.add_argument('--distill_dir', default='configs/slim/distill', help='the distill configs')
        p.add_argument('--out', default=None, help='reports (and, for accuracy, runs); default: '
                                                   'output/benchmark, output/benchmark_<dataset> for another --dataset')
        p.add_argument('--dataset', choices=DATASETS, default='digits',
                       help='the demo dataset every run reads (made if missing; tools/make_demo_data.py --kind): '
                            'digits, as the configs say, or shapes through -o <Section>.dataset_dir overrides')
        p.add_argument('-o', '--opt', nargs='*', default=[], help='overrides for the student runs (k=v)')
        p.add_argument('--teacher_opt', nargs='*', default=[], help='overrides for the teacher (k=v)')
        p.add_argument('--teacher_seed', type=int, default=0)
        if name in ('accuracy', 'teacher'):
            p.add_argument('--retrain_teacher', action='store_true',
                           help='train the teacher even when shipped weights match its configs or its run is '
                                'recorded in --out')
            p.add_argument('--rerun', action='store_true',
                           help='train every requested run again instead of reusing recorded ones (e.g. after '
                                'a code change); recorded runs made with other configs are dropped')
        if name == 'teacher':
            p.add_argument('--ship', action='store_true', help=f'copy it to {WEIGHTS_DIR}/<arch>_teacher.*')
        elif name == 'accuracy':
            p.add_argument('--table', default='', type=_table_name,
                           help='name this table: it is recorded under that name in the results file and '
                                'printed to accuracy_<arch>_NAME.md/.png, leaving the main table '
                                '(accuracy_<arch>.md) as it is; the runs are shared')
            p.add_argument('--seeds', default='3', help='a count N (seeds 0..N-1) or a comma list (one seed k: '
                                                        '"k,")')
        elif name == 'gradients':
            p.add_argument('--steps', type=int, default=16, help='batches')
            p.add_argument('--seed', type=int, default=0, help='batches and fresh student')
            p.add_argument('--student_weights', default=None,
                           help='student checkpoint (default: the fresh initialisation, i.e. step 0)')
            p.add_argument('--groups', default='',
                           help='comma list of student sublayer prefixes (e.g. neck,head.conv_feat,'
                                'head.head_reg_list): also report each term\'s norm ratio and cosine within each')
            p.add_argument('--against', default='',
                           help="comma list of the student's own loss terms (e.g. loss_vfl,loss_bbox,loss_dfl): "
                                "also report each term's cosine with each of them")
            p.add_argument('--teacher_weights', default=None, help='default: the shipped teacher')
        else:
            p.add_argument('--steps', type=int, default=8, help='timed steps after warm-up (>= 8)')
            p.add_argument('--warmup', type=int, default=2, help='untimed steps first')
            p.add_argument('--teacher_weights', default=None,
                           help='teacher checkpoint (default: random teacher; timing does not need weights)')
            p.add_argument('--no_memory', action='store_true', help='skip the peak-memory subprocesses')
            p.add_argument('--memory_role', default=None, help=argparse.SUPPRESS)  # internal: one role
    args = parser.parse_args(argv)
    apply_dataset(args)
    return args


def main():
    args = parse_args()
    apply_cpu_defaults()
    {'accuracy': run_accuracy, 'speed': run_speed, 'teacher': run_teacher,
     'gradients': run_gradients}[args.command](args)


if __name__ == '__main__':
    from ppdistill.cli import run_main  # noqa: E402 (imports ppdet)
    run_main(main)

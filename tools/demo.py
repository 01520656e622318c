"""End-to-end demo on the embedded digits dataset: teacher, plain student, distilled student.

    python tools/demo.py                   # PicoDet, MGD
    python tools/demo.py --method fgd      # any <method>_<arch>_teacher_to_student.yml in configs/slim/distill
    python tools/demo.py --arch retinanet  # any <arch>_{teacher,student}.yml pair in configs/demo
    python tools/demo.py --student_config configs/demo/picodet_student_6e.yml --method fgd   # 6 epochs

Steps, each the command a user would type (logs in output/demo_logs/):
1. ``tools/make_demo_data.py`` writes the dataset (skipped when it already exists);
2. the teacher: the shipped ``configs/demo/weights/<arch>_teacher.pdparams`` while its configs are
   unchanged, else a cached ``output/<arch>_teacher`` run, else ``tools/train.py`` trains it (seed 0;
   ``--retrain_teacher`` forces training);
3. ``tools/train.py`` trains the plain student and 4. ``tools/train.py --slim_config`` distills it (same
   schedule and seed), side by side, one thread each (two single-thread runs use 2 cores better than two
   2-thread runs in a row);
5. ``tools/eval.py`` scores both students (side by side) and a teacher trained here with the COCO metric
   (a shipped teacher's metrics come from its record); a table is printed and saved;
6. one seed is not a result: the demo prints each of its two runs' AP next to the recorded run of the same
   configs and seed (``docs/experiments/*/accuracy_<arch>.json``) with that run's commit, then the
   recorded tables over seeds for this architecture (``tools/benchmark.py accuracy``;
   :mod:`ppdistill.bench.recorded`).

This is a smoke-scale run on a CPU: minutes of training on a toy dataset. Its numbers show that the
pipeline works end to end; they are not a reproduction of the papers' COCO results. At the default
3-epoch schedule no method beats the plain student beyond the seed noise; at 6 epochs
(``--student_config configs/demo/picodet_student_6e.yml``, ~twice the time) MGD and FGD do (docs/results.md).
"""
import _path  # noqa: F401  (repo root on sys.path)

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

# Read before ppdistill is imported: importing it applies its CPU defaults (OMP_NUM_THREADS = all cores),
# which the tools the demo runs inherit.
USER_SET_THREADS = 'OMP_NUM_THREADS' in os.environ

from ppdistill.bench.recorded import (ap_by_seed, load_reports, reproduction_lines, seeds_ahead,  # noqa: E402
                                      strongest_effect, student_config_of, summary_lines)
from ppdistill.bench.stats import format_delta  # noqa: E402
from ppdistill.runs import (WEIGHTS_DIR, RunFailed, changed_inputs, discover_archs, discover_methods,  # noqa: E402
                            param_count, read_json, run_inputs, run_tool, shipped_teacher, write_json_atomic)

ROOT = _path.ROOT
EXPERIMENTS = os.path.join(ROOT, 'docs', 'experiments')


def _run(name: str, args: list, log_dir: str, env: Optional[dict] = None) -> float:
    """Run one tool (one progress line with the ETA from its log); on failure print the log tail and exit."""
    try:
        return run_tool(name, args, os.path.join(log_dir, f'{name}.log'), cwd=ROOT, prefix='[demo]', env=env)
    except RunFailed as err:
        sys.stdout.write(err.log_tail)
        sys.exit(f'[demo] {err}')


def _side_by_side(jobs: List[tuple], log_dir: str, split_cores: bool) -> None:
    """Run ``(name, args)`` jobs at once, the cores split between them when ``split_cores`` (i.e. the user
    did not set OMP_NUM_THREADS); the first failure stops the demo."""
    threads = str(max(1, (os.cpu_count() or 1) // len(jobs)))
    env = {'OMP_NUM_THREADS': threads} if split_cores else None
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(_run, name, args, log_dir, env) for name, args in jobs]:
            future.result()


TEACHER_SEED = 0  # one teacher for every student seed (the shipped one is seed 0)


def _teacher(arch: str, teacher_cfg: str, retrain: bool, logs: str) -> Tuple[str, Optional[list]]:
    """The teacher's weights (no suffix): shipped, cached from an earlier demo, or trained now; and, for the
    shipped one, the COCO metrics recorded next to it (measured on this val split when it was made).
    Shipped and cached teachers are used while their configs (contents), seed and overrides are unchanged."""
    want = run_inputs('teacher', ROOT, os.path.join(ROOT, teacher_cfg), teacher_seed=TEACHER_SEED)
    shipped = None if retrain else shipped_teacher(os.path.join(ROOT, WEIGHTS_DIR), arch, want)
    if shipped:
        print(f'[demo] teacher: shipped {os.path.relpath(shipped, ROOT)}.pdparams (--retrain_teacher to '
              'train it)', flush=True)
        return shipped, read_json(shipped + '.json').get('bbox')
    weights = f'output/{arch}_teacher/model_final'
    inputs_file = os.path.join(ROOT, f'output/{arch}_teacher/demo_inputs.json')
    cached = read_json(inputs_file)
    if (not retrain and os.path.isfile(os.path.join(ROOT, weights + '.pdparams')) and isinstance(cached, dict)
            and not changed_inputs(cached, want)):
        print(f'[demo] teacher: reusing {weights}.pdparams (configs unchanged; --retrain_teacher to redo)')
    else:
        _run('train_teacher', ['tools/train.py', '-c', teacher_cfg, '--seed', str(TEACHER_SEED)], logs)
        write_json_atomic(inputs_file, want)
    return weights, None


def _table_student(report: dict, arch: str) -> str:
    """The student config a recorded table was made with (repository-relative, normalised)."""
    return os.path.normpath(student_config_of(report) or f'configs/demo/{arch}_student.yml')


def _recorded(args, student_cfg: str, distill_cfg: str, rows: List[dict]) -> None:
    """Step 6: did these runs reproduce the recorded ones, and what do the tables over seeds say."""
    teacher_cfg, cfg = (os.path.join(ROOT, c) for c in (f'configs/demo/{args.arch}_teacher.yml', student_cfg))
    distill = os.path.join(ROOT, distill_cfg)
    runs = [(rows[1]['model'], 'student', run_inputs('student', ROOT, teacher_cfg, cfg, teacher_seed=TEACHER_SEED),
             rows[1]['AP']),
            (rows[2]['model'], args.method,
             run_inputs(args.method, ROOT, teacher_cfg, cfg, distill, teacher_seed=TEACHER_SEED), rows[2]['AP'])]
    print(f'[demo] against the recorded runs (docs/experiments), seed {args.seed}:')
    for line in reproduction_lines(EXPERIMENTS, args.arch, args.seed, runs, ROOT):
        print('  ' + line)
    reports = load_reports(EXPERIMENTS, args.arch)
    if not reports:
        print(f'[demo] no recorded tables for {args.arch}: make one with python tools/benchmark.py accuracy '
              f'--arch {args.arch} --seeds 4 --out docs/experiments/<name>')
        return
    print(f'[demo] recorded tables over seeds ({args.arch}; each command reprints its table from the committed '
          'runs without training; docs/results.md):')
    for report in reports:
        mine = _table_student(report, args.arch) == os.path.normpath(student_cfg)
        lines = summary_lines(report)
        mark = "   <- this demo's student" if mine else ''
        print(f'  {lines[0]}{mark}')
        for line in lines[1:]:
            print('  ' + line)
    _suggest(args, student_cfg, reports)


def _suggest(args, student_cfg: str, reports: List[dict]) -> None:
    """Point at the recorded configuration where a method pays most, as a demo command, with the recorded
    AP of this seed (the demo's default schedule is set by its time budget, not by where methods pay)."""
    best = strongest_effect(reports)
    if best is None:
        print(f'[demo] no recorded method beats the plain {args.arch} student beyond the seed noise yet')
        return
    report, row = best
    config = student_config_of(report)
    if _table_student(report, args.arch) == os.path.normpath(student_cfg) and row['row'] == args.method:
        return  # this run is that configuration
    cmd = f"python tools/demo.py --arch {args.arch} --method {row['row']}"
    cmd += f' --student_config {config}' if config else ''
    k, n = seeds_ahead(report, row['row'])
    student, method = ap_by_seed(report, 'student'), ap_by_seed(report, row['row'])
    this_seed = ''
    if args.seed in student and args.seed in method:
        this_seed = f'; seed {args.seed}: {student[args.seed]:.3f} -> {method[args.seed]:.3f}'
    print(f"[demo] where a method pays most on this data: {cmd}  (recorded {row['row']} "
          f"{format_delta(row)} AP, ahead on {k}/{n} seeds{this_seed}; about twice the default demo's time)")


def main():
    archs = discover_archs(os.path.join(ROOT, 'configs', 'demo'))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', choices=archs, default='picodet')
    parser.add_argument('--method', default='mgd',
                        help='a distill config <method>_<arch>_teacher_to_student.yml in configs/slim/distill')
    parser.add_argument('--retrain_teacher', action='store_true', help='ignore a shipped or cached teacher')
    parser.add_argument('--student_config', default=None,
                        help='another student recipe against the same teacher (default: configs/demo/'
                             '<arch>_student.yml), e.g. configs/demo/picodet_student_6e.yml')
    parser.add_argument('--seed', type=int, default=0, help='the students\' seed')
    args = parser.parse_args()
    methods = discover_methods(os.path.join(ROOT, 'configs', 'slim', 'distill'), args.arch)
    if args.method not in methods:
        parser.error(f"no distill config for --method {args.method} with --arch {args.arch}; "
                     f"available: {', '.join(methods)}")
    split_cores = not USER_SET_THREADS  # never override the user's choice
    logs = os.path.join(ROOT, 'output', 'demo_logs')
    teacher_cfg = f'configs/demo/{args.arch}_teacher.yml'
    student_cfg = args.student_config or f'configs/demo/{args.arch}_student.yml'
    if not os.path.isfile(os.path.join(ROOT, student_cfg)):
        parser.error(f'--student_config {student_cfg}: no such file (paths are relative to the repository root)')
    student_cfg = os.path.relpath(os.path.join(ROOT, student_cfg), ROOT)
    distill_name = f'{args.method}_{args.arch}_teacher_to_student'
    distill_cfg = os.path.relpath(methods[args.method], ROOT)
    seed = ['--seed', str(args.seed)]
    total = time.time()

    _run('data', ['tools/make_demo_data.py', '--out', 'dataset/digits'], logs)
    teacher_w, recorded = _teacher(args.arch, teacher_cfg, args.retrain_teacher, logs)

    _side_by_side([('train_student', ['tools/train.py', '-c', student_cfg] + seed),
                   (f'train_{args.method}', ['tools/train.py', '-c', student_cfg, '--slim_config', distill_cfg,
                                             '-o', f'teacher_weights={teacher_w}'] + seed)], logs, split_cores)

    models = [('teacher', teacher_cfg, teacher_w),
              ('student', student_cfg, f'output/{os.path.splitext(os.path.basename(student_cfg))[0]}/model_final'),
              (f'student + {args.method.upper()}', student_cfg, f'output/{distill_name}/model_final')]
    tag = {label: label.replace(' ', '').replace('+', '_') for label, _, _ in models}
    metrics = {label: os.path.join(logs, f'metrics_{tag[label]}.json') for label, _, _ in models}
    # each eval writes its own bbox.json (ppdet's output_eval), or the side-by-side evals overwrite it
    _side_by_side([(f'eval_{tag[label]}', ['tools/eval.py', '-c', cfg, '--save_metrics', metrics[label],
                                           '-o', f'weights={weights}', f'output_eval={logs}/{tag[label]}'])
                   for label, cfg, weights in models if not (label == 'teacher' and recorded)], logs, split_cores)
    rows = []
    for label, cfg, weights in models:
        if label == 'teacher' and recorded:
            bbox = recorded
        else:
            with open(metrics[label]) as f:
                bbox = json.load(f)['bbox']
        rows.append({'model': label, 'params': param_count(os.path.join(ROOT, weights)),
                     'AP': bbox[0], 'AP50': bbox[1], 'APs': bbox[3], 'APm': bbox[4], 'APl': bbox[5]})

    lines = [f"{'model':<18} {'params':>9} {'AP':>6} {'AP50':>6} {'APs':>6} {'APm':>6} {'APl':>6}"]
    for r in rows:
        lines.append(f"{r['model']:<18} {r['params']:>9,} {r['AP']:>6.3f} {r['AP50']:>6.3f} "
                     f"{r['APs']:>6.3f} {r['APm']:>6.3f} {r['APl']:>6.3f}")
    table = '\n'.join(lines)
    print(f'\n[demo] COCO bbox metrics on the digits val split ({args.arch}, {args.method.upper()}; '
          f'{(time.time() - total) / 60:.1f} min in all)\n' + table)
    print('[demo] smoke-scale CPU run on a toy dataset: it shows the pipeline works end to end, not the '
          'papers\' COCO numbers; one seed is not evidence that a method helps (the seed-to-seed spread is as '
          'large as the effects)')
    with open(os.path.join(logs, f'demo_{args.arch}_{args.method}.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    _recorded(args, student_cfg, distill_cfg, rows)


if __name__ == '__main__':
    main()

"""End-to-end demo on the embedded digits dataset: teacher, plain student, distilled student.

    python tools/demo.py                 # PicoDet, MGD
    python tools/demo.py --method fgd    # FGD instead
    python tools/demo.py --arch retinanet

Steps, each the command a user would type (logs in output/demo_logs/):
1. ``tools/make_demo_data.py`` writes the dataset (skipped when it already exists);
2. ``tools/train.py`` trains the teacher (reused when its checkpoint matches the current configs);
3. ``tools/train.py`` trains the plain student; 4. ``tools/train.py --slim_config`` distills it, same
   schedule and seed;
5. ``tools/eval.py`` scores all three with the COCO metric; a table is printed and saved.

This is a smoke-scale run on a CPU: minutes of training on a toy dataset. Its numbers show that the
pipeline works end to end; they are not a reproduction of the papers' COCO results.
"""
import _path  # noqa: F401  (repo root on sys.path)

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

from ppdistill._env import apply_cpu_defaults

ROOT = _path.ROOT
PY = sys.executable


def _run(name: str, args: list, log_dir: str) -> float:
    """Run one tool, logging to ``log_dir/name.log``; on failure print the log tail and exit."""
    os.makedirs(log_dir, exist_ok=True)
    log = os.path.join(log_dir, f'{name}.log')
    print(f'[demo] {name}: {" ".join(args)}', flush=True)
    start = time.time()
    with open(log, 'w') as f:
        code = subprocess.call([PY] + args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    took = time.time() - start
    if code != 0:
        with open(log) as f:
            tail = f.readlines()[-40:]
        sys.stdout.write(''.join(tail))
        sys.exit(f'[demo] {name} failed (exit {code}); full log: {log}')
    print(f'[demo] {name}: done in {took / 60:.1f} min', flush=True)
    return took


def _stamp(paths: list) -> str:
    """Hash of the files that decide a teacher checkpoint (configs and dataset meta)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(os.path.join(ROOT, path), 'rb') as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _config_files(config: str) -> list:
    """A config and its _BASE_ files, recursively (paths relative to ROOT)."""
    import yaml
    files, todo = [], [config]
    while todo:
        path = todo.pop()
        files.append(path)
        with open(os.path.join(ROOT, path)) as f:
            text = yaml.load(f, Loader=yaml.BaseLoader) or {}
        for base in text.get('_BASE_', []) if isinstance(text, dict) else []:
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), base)))
    return sorted(files)


def _param_count(weights: str) -> int:
    import numpy as np
    import paddle
    state = paddle.load(weights + '.pdparams')
    return int(sum(np.prod(v.shape) for k, v in state.items() if not k.endswith(('_mean', '_variance'))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', choices=['picodet', 'retinanet'], default='picodet')
    parser.add_argument('--method', choices=['mgd', 'fgd'], default='mgd')
    parser.add_argument('--retrain_teacher', action='store_true', help='ignore a cached teacher')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    apply_cpu_defaults()
    logs = os.path.join(ROOT, 'output', 'demo_logs')
    teacher_cfg = f'configs/demo/{args.arch}_teacher.yml'
    student_cfg = f'configs/demo/{args.arch}_student.yml'
    distill_name = f'{args.method}_{args.arch}_teacher_to_student'
    distill_cfg = f'configs/slim/distill/{distill_name}.yml'
    seed = ['--seed', str(args.seed)]
    total = time.time()

    _run('data', ['tools/make_demo_data.py', '--out', 'dataset/digits'], logs)

    teacher_w = f'output/{args.arch}_teacher/model_final'
    stamp_file = os.path.join(ROOT, f'output/{args.arch}_teacher/demo_stamp.txt')
    stamp = _stamp(_config_files(teacher_cfg) + ['dataset/digits/meta.json'])
    cached = (not args.retrain_teacher and os.path.isfile(os.path.join(ROOT, teacher_w + '.pdparams'))
              and os.path.isfile(stamp_file) and open(stamp_file).read().strip() == stamp)
    if cached:
        print(f'[demo] teacher: reusing {teacher_w}.pdparams (configs unchanged; --retrain_teacher to redo)')
    else:
        _run('train_teacher', ['tools/train.py', '-c', teacher_cfg] + seed, logs)
        with open(stamp_file, 'w') as f:
            f.write(stamp + '\n')

    _run('train_student', ['tools/train.py', '-c', student_cfg] + seed, logs)
    _run(f'train_{args.method}', ['tools/train.py', '-c', student_cfg, '--slim_config', distill_cfg,
                                  '-o', f'teacher_weights={teacher_w}'] + seed, logs)

    rows = []
    for label, cfg, weights in [('teacher', teacher_cfg, teacher_w),
                                ('student', student_cfg, f'output/{args.arch}_student/model_final'),
                                (f'student + {args.method.upper()}', student_cfg,
                                 f'output/{distill_name}/model_final')]:
        metrics = os.path.join(ROOT, 'output', 'demo_logs', f'metrics_{label.replace(" ", "").replace("+", "_")}.json')
        _run(f'eval_{label.replace(" ", "").replace("+", "_")}',
             ['tools/eval.py', '-c', cfg, '-o', f'weights={weights}', '--save_metrics', metrics], logs)
        with open(metrics) as f:
            bbox = json.load(f)['bbox']
        rows.append({'model': label, 'params': _param_count(os.path.join(ROOT, weights)),
                     'AP': bbox[0], 'AP50': bbox[1], 'APs': bbox[3], 'APm': bbox[4], 'APl': bbox[5]})

    lines = [f"{'model':<18} {'params':>9} {'AP':>6} {'AP50':>6} {'APs':>6} {'APm':>6} {'APl':>6}"]
    for r in rows:
        lines.append(f"{r['model']:<18} {r['params']:>9,} {r['AP']:>6.3f} {r['AP50']:>6.3f} "
                     f"{r['APs']:>6.3f} {r['APm']:>6.3f} {r['APl']:>6.3f}")
    table = '\n'.join(lines)
    print(f'\n[demo] COCO bbox metrics on the digits val split ({args.arch}, {args.method.upper()}; '
          f'{(time.time() - total) / 60:.1f} min in all)\n' + table)
    print('[demo] smoke-scale CPU run on a toy dataset: it shows the pipeline works end to end, '
          'not the papers\' COCO numbers')
    with open(os.path.join(logs, f'demo_{args.arch}_{args.method}.json'), 'w') as f:
        json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()

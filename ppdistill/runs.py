"""Running the tools as subprocesses, with progress, and reading what they log.

Shared by ``tools/demo.py`` and ``tools/benchmark.py``: one run = one tool invocation whose output goes
to a log file; while it runs, the ETA that ppdet's training log prints (``eta: 0:01:23``) is echoed on one
progress line; a failing run prints its log tail and stops the caller. Also: a stamp (hash) of the files
and settings that decide a run's result, so finished runs can be reused, and a parser for ppdet's
training log lines.
"""
import ast
import datetime
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

__all__ = ['RunFailed', 'run_tool', 'stamp', 'config_files', 'param_count', 'last_eta',
           'parse_train_log', 'format_duration', 'teacher_stamp', 'shipped_teacher', 'ship_teacher',
           'WEIGHTS_DIR', 'discover_methods', 'discover_archs', 'training_source_files', 'run_stamp',
           'read_json', 'load_record']

PY = sys.executable

# ppdet's LogPrinter: "Epoch: [0] [ 20/125] learning_rate: 0.04 loss: 1.23 ... eta: 0:01:23 batch_cost: ..."
_TRAIN_LINE = re.compile(r'Epoch: \[(\d+)\]\s*\[\s*(\d+)/\s*(\d+)\]\s*learning_rate: (\S+)\s+(.*?)\s*eta: ')
_METER = re.compile(r'(\w+): (-?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))')
_ETA = re.compile(r'eta: ((?:\d+ days?, )?\d+:\d\d:\d\d)')


class RunFailed(RuntimeError):
    """A tool run exited non-zero; ``log_tail`` holds the end of its log."""

    def __init__(self, name: str, code: int, log: str, log_tail: str):
        super().__init__(f'{name} failed (exit {code}); full log: {log}')
        self.log_tail = log_tail


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return '?'
    seconds = int(round(max(0.0, seconds)))
    return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def _parse_eta(text: str) -> float:
    days = 0
    if 'day' in text:
        head, text = text.split(',', 1)
        days = int(head.split()[0])
    h, m, s = (int(v) for v in text.strip().split(':'))
    return days * 86400 + h * 3600 + m * 60 + s


def last_eta(log: str, tail_bytes: int = 16384) -> Optional[float]:
    """Seconds left according to the last ``eta:`` in a (growing) training log, or None."""
    try:
        with open(log, 'rb') as f:
            f.seek(max(0, os.path.getsize(log) - tail_bytes))
            text = f.read().decode('utf-8', 'replace')
    except OSError:
        return None
    found = _ETA.findall(text)
    return _parse_eta(found[-1]) if found else None


def run_tool(name: str, args: Sequence[str], log: str, cwd: str, prefix: str = '[run]',
             expected: Optional[float] = None, poll: float = 2.0, env: Optional[dict] = None) -> float:
    """Run ``python <args>`` in ``cwd`` with its output in ``log``; return the seconds it took.

    Prints one progress line for the run: its start with ``expected`` seconds (e.g. from earlier runs),
    refreshed in place on a terminal with the ETA the training log reports (on a pipe: when the first ETA
    appears, then at most every 2 minutes), then its duration. Raises :class:`RunFailed` (with the log
    tail) on a non-zero exit.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log)) or '.', exist_ok=True)
    tty = sys.stdout.isatty()
    head = f'{prefix} {name}'
    print(f'{head}: started{", ETA " + format_duration(expected) if expected else ""} '
          f'(log: {os.path.relpath(log, cwd)})', end='' if tty else '\n', flush=True)
    start = time.time()
    last_print = None
    with open(log, 'w') as f:
        proc = subprocess.Popen([PY] + list(args), cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **(env or {})))
        while proc.poll() is None:
            time.sleep(poll)
            eta = last_eta(log)
            now = time.time()
            if eta is not None and (tty or last_print is None or now - last_print >= 120):
                msg = f'{head}: running {format_duration(now - start)}, ETA {format_duration(eta)}'
                print(('\r' + msg.ljust(78)) if tty else msg, end='' if tty else '\n', flush=True)
                last_print = now
    took = time.time() - start
    if tty:
        print('\r', end='')
    if proc.returncode != 0:
        with open(log, errors='replace') as f:
            tail = ''.join(f.readlines()[-40:])
        print(f'{head}: FAILED after {format_duration(took)}'.ljust(78), flush=True)
        raise RunFailed(name, proc.returncode, log, tail)
    print(f'{head}: done in {format_duration(took)}'.ljust(78 if tty else 0), flush=True)
    return took


def _decisive_bytes(path: str) -> bytes:
    """What of a file decides a run: a Python file's code (its AST without docstrings, so comments and
    docstrings do not matter), any other file's bytes."""
    with open(path, 'rb') as f:
        data = f.read()
    if not path.endswith('.py'):
        return data
    tree = ast.parse(data, filename=path)
    for node in ast.walk(tree):
        body = getattr(node, 'body', None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def stamp(paths: Iterable[str], extra: Iterable[str] = ()) -> str:
    """Hash of the files (e.g. configs, dataset meta, code) and settings (overrides, seed) that decide a
    run. Python files count by their code only (see :func:`_decisive_bytes`)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(_decisive_bytes(path))
    for item in extra:
        digest.update(b'\0' + str(item).encode())
    return digest.hexdigest()[:16]


# Bookkeeping of the tools, never imported by a training run: editing it must not retrain anything.
_NOT_IN_TRAINING = ('runs.py',)


def training_source_files() -> List[str]:
    """ppdistill's code that decides a distilled run (losses, distiller, build, the train tool), for the
    stamp; by its code only (:func:`_decisive_bytes`), so editing a docstring or comment keeps finished runs."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    files = glob.glob(os.path.join(pkg, '*.py')) + glob.glob(os.path.join(pkg, 'losses', '*.py'))
    return sorted([f for f in files if os.path.basename(f) not in _NOT_IN_TRAINING]
                  + [os.path.join(pkg, 'tools', 'train.py')])


def run_stamp(student_cfg: str, row: str, seed: int, opt: Sequence[str] = (), method_cfg: Optional[str] = None,
              teacher: Optional[str] = None) -> str:
    """Stamp of a student run: the plain student (``row='student'``), or the student distilled with
    ``method_cfg`` from the teacher whose stamp is ``teacher`` (ppdistill's training code counts too).
    The benchmark keys its runs by it and the demo finds the recorded run of the same configs and seed."""
    files = config_files(student_cfg)
    extra = [row, seed] + list(opt)
    if method_cfg is not None:
        files += [method_cfg] + training_source_files()
        extra += [teacher]
    return stamp(files, extra)


def config_files(config: str) -> List[str]:
    """A ppdet config and its ``_BASE_`` files, recursively (paths as given, joined with the bases)."""
    import yaml
    files, todo = [], [config]
    while todo:
        path = todo.pop()
        files.append(path)
        with open(path) as f:
            text = yaml.load(f, Loader=yaml.BaseLoader) or {}
        for base in text.get('_BASE_', []) if isinstance(text, dict) else []:
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), base)))
    return sorted(files)


def param_count(weights: str) -> int:
    """Parameters in a checkpoint (``<weights>.pdparams``), BatchNorm running statistics excluded."""
    import numpy as np
    import paddle
    state = paddle.load(weights + '.pdparams')
    return int(sum(np.prod(v.shape) for k, v in state.items() if not k.endswith(('_mean', '_variance'))))


def parse_train_log(text: str) -> List[Dict[str, float]]:
    """Every ppdet training log line as ``{'epoch', 'step', 'steps_per_epoch', 'iter', 'lr', <meters>}``.

    ``iter`` is the global step ``epoch * steps_per_epoch + step``; meters are ppdet's logged values
    (medians over the last ``log_iter`` steps): ``loss``, the detector's terms, ``distill_*`` terms.
    """
    rows = []
    for m in _TRAIN_LINE.finditer(text):
        epoch, step, per_epoch = int(m.group(1)), int(m.group(2)), int(m.group(3))
        row = {'epoch': epoch, 'step': step, 'steps_per_epoch': per_epoch,
               'iter': epoch * per_epoch + step, 'lr': float(m.group(4))}
        row.update({k: float(v) for k, v in _METER.findall(m.group(5))})
        rows.append(row)
    return rows


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


# -- shipped demo teachers ----------------------------------------------------------------------------
# A demo teacher is trained once and shipped as ``configs/demo/weights/<arch>_teacher.pdparams`` (a plain
# ppdet checkpoint) with ``<arch>_teacher.json``: the stamp of the run that made it, the command, date and
# its COCO metrics. The demo and the benchmark use it while the stamp still matches the teacher's configs.
WEIGHTS_DIR = os.path.join('configs', 'demo', 'weights')


def teacher_stamp(teacher_cfg: str, seed: int, opt: Sequence[str] = ()) -> str:
    """Stamp of a teacher run: its config chain (contents), its seed and overrides."""
    return stamp(config_files(teacher_cfg), ['teacher', seed] + list(opt))


def shipped_teacher(weights_dir: str, arch: str, want_stamp: str) -> Optional[str]:
    """``<weights_dir>/<arch>_teacher`` (no suffix) if shipped for exactly this stamp, else ``None``."""
    base = os.path.join(weights_dir, f'{arch}_teacher')
    found = load_record(base + '.json', want_stamp) is not None
    return base if found and os.path.isfile(base + '.pdparams') else None


def ship_teacher(weights: str, weights_dir: str, arch: str, record: dict) -> str:
    """Copy ``<weights>.pdparams`` to ``<weights_dir>/<arch>_teacher.pdparams`` and write its record."""
    import shutil
    os.makedirs(weights_dir, exist_ok=True)
    base = os.path.join(weights_dir, f'{arch}_teacher')
    shutil.copyfile(weights + '.pdparams', base + '.pdparams.tmp')
    os.replace(base + '.pdparams.tmp', base + '.pdparams')
    write_json_atomic(base + '.json', record)
    return base


def read_json(path: str) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_record(path: str, want_stamp: str) -> Optional[dict]:
    """A run's record (a benchmark ``run.json``, a shipped teacher's ``.json``) if it exists and was made
    for exactly ``want_stamp``, else ``None``."""
    record = read_json(path)
    return record if isinstance(record, dict) and record.get('stamp') == want_stamp else None


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: a reader (or a crash)
    sees the old file or the new one, never a torn one."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
            f.write('\n')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def discover_methods(distill_dir: str, arch: str) -> Dict[str, str]:
    """``{method: config}`` for every ``<method>_<arch>_teacher_to_student.yml`` in ``distill_dir``."""
    suffix = f'_{arch}_teacher_to_student.yml'
    found = sorted(glob.glob(os.path.join(distill_dir, '*' + suffix)))
    return {os.path.basename(p)[:-len(suffix)]: p for p in found}


def discover_archs(config_dir: str) -> List[str]:
    """Every ``<arch>`` with both ``<arch>_teacher.yml`` and ``<arch>_student.yml`` in ``config_dir``."""
    teachers = glob.glob(os.path.join(config_dir, '*_teacher.yml'))
    archs = [os.path.basename(p)[:-len('_teacher.yml')] for p in teachers]
    return sorted(a for a in archs if os.path.isfile(os.path.join(config_dir, f'{a}_student.yml')))

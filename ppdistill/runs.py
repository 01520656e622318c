"""Running the tools as subprocesses, with progress; what decides a run, and where it came from.

Shared by ``tools/demo.py`` and ``tools/benchmark.py``: one run = one tool invocation whose output goes
to a log file; while it runs, the ETA that ppdet's training log prints (``eta: 0:01:23``) is echoed on one
progress line; a failing run prints its log tail and stops the caller. Also: the inputs that decide a
run (its configs' contents with their ``_BASE_`` files, and settings such as overrides and seeds), so a
recorded run is reused only while they are unchanged; the provenance of a run (git commit, paddle and
ppdet versions); and a file lock for two tool calls that share an output folder.
"""
import contextlib
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

__all__ = ['RunFailed', 'run_tool', 'config_files', 'config_contents', 'changed_inputs', 'run_inputs', 'provenance',
           'locked', 'param_count', 'last_eta', 'format_duration', 'now_utc', 'shipped_teacher',
           'ship_teacher', 'WEIGHTS_DIR', 'discover_methods', 'discover_archs', 'read_json',
           'write_json_atomic']

PY = sys.executable
_ETA = re.compile(r'eta: ((?:\d+ days?, )?\d+:\d\d:\d\d)')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def config_contents(configs: Iterable[str], root: str) -> Dict[str, str]:
    """``{path: text}`` of the configs and all their ``_BASE_`` files; paths relative to ``root`` when
    inside it (so records made in one checkout match in another), else absolute."""
    out = {}
    for config in configs:
        for path in config_files(config):
            rel = os.path.relpath(os.path.abspath(path), root)
            with open(path) as f:
                out[os.path.abspath(path) if rel.startswith('..') else rel] = f.read()
    return out


def _without_comment_lines(text: str) -> List[str]:
    """A config's lines without its blank and whole-line ``#`` comment lines (trailing comments stay: a
    ``#`` inside a value is not told apart here)."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith('#')]


def _same_input(recorded: Any, current: Any) -> bool:
    """Equal settings; configs equal but for blank and whole-line comment lines (a header edit does not
    change what trains)."""
    if isinstance(recorded, str) and isinstance(current, str):
        return _without_comment_lines(recorded) == _without_comment_lines(current)
    return recorded == current


def changed_inputs(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """The names (config paths, settings) in ``current`` whose recorded value differs or is missing; a
    config whose only change is in blank or whole-line comment lines is the same config."""
    return sorted(k for k, v in current.items() if k not in recorded or not _same_input(recorded[k], v))


def run_inputs(row: str, root: str, teacher_cfg: str, student_cfg: Optional[str] = None,
               method_cfg: Optional[str] = None, opt: Sequence[str] = (), teacher_opt: Sequence[str] = (),
               teacher_seed: int = 0) -> Dict[str, Any]:
    """What decides a run besides the code, the data and the student's seed: the teacher
    (``row='teacher'``: its configs, seed and overrides), the plain student (its configs and overrides),
    or a distilled student (both, and ``method_cfg``)."""
    teacher = {**config_contents([teacher_cfg], root), 'teacher_seed': teacher_seed,
               'teacher_overrides': list(teacher_opt)}
    if row == 'teacher':
        return teacher
    student = {**config_contents([student_cfg], root), 'overrides': list(opt)}
    return student if method_cfg is None else {**student, **teacher, **config_contents([method_cfg], root)}


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> Dict[str, str]:
    """Where a run comes from: ppdistill's git commit (``<sha>-dirty`` when its Python code has
    uncommitted changes; ``unknown`` outside a checkout) and the paddle and ppdet versions."""
    from importlib.metadata import PackageNotFoundError, version
    commit = _git('rev-parse', 'HEAD') or 'unknown'
    if commit != 'unknown' and _git('status', '--porcelain', '--untracked-files=no', '--', 'ppdistill', 'tools'):
        commit += '-dirty'
    found = {}
    for name, dists in (('paddle', ('paddlepaddle', 'paddlepaddle-gpu')), ('ppdet', ('paddledet',))):
        for dist in dists:
            try:
                found[name] = version(dist)
                break
            except PackageNotFoundError:
                found[name] = 'unknown'
    return {'commit': commit, **found}


@contextlib.contextmanager
def locked(path: str, on_wait: Optional[str] = None):
    """Hold ``<path>.lock`` exclusively (two tool calls on one output folder: one runs a shared run or
    rewrites a shared file while the other waits); print ``on_wait`` when it has to wait. No-op where
    ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.lock', 'w') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait:
                print(on_wait, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def param_count(weights: str) -> int:
    """Parameters in a checkpoint (``<weights>.pdparams``), BatchNorm running statistics excluded."""
    import numpy as np
    import paddle
    state = paddle.load(weights + '.pdparams')
    return int(sum(np.prod(v.shape) for k, v in state.items() if not k.endswith(('_mean', '_variance'))))


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


# -- shipped demo teachers ----------------------------------------------------------------------------
# A demo teacher is trained once and shipped as ``configs/demo/weights/<arch>_teacher.pdparams`` (a plain
# ppdet checkpoint) with ``<arch>_teacher.json``: the inputs of the run that made it (its configs'
# contents, seed, overrides), the command, date and its COCO metrics. The demo and the benchmark use it
# while those inputs are unchanged.
WEIGHTS_DIR = os.path.join('configs', 'demo', 'weights')


def shipped_teacher(weights_dir: str, arch: str, inputs: Dict[str, Any]) -> Optional[str]:
    """``<weights_dir>/<arch>_teacher`` (no suffix) if shipped for exactly these inputs, else ``None``."""
    base = os.path.join(weights_dir, f'{arch}_teacher')
    record = read_json(base + '.json')
    found = isinstance(record, dict) and not changed_inputs(record.get('inputs', {}), inputs)
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

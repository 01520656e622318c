"""Shared fixtures: ``work``, a working directory with the tiny demo dataset and trained tiny teachers, and
``run``, which runs a tool as a subprocess the way a user types it (datasets and outputs are relative to
the CWD, as in ppdet).

``PPDISTILL_PPDET_SRC=/path/to/PaddleDetection`` tests a PaddleDetection source checkout instead of the
installed ppdet: it goes first on ``sys.path`` and on the ``PYTHONPATH`` every subprocess inherits.
"""
import os
import subprocess
import sys
from typing import Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'demo', 'tiny')
PPDET_SRC_ENV = 'PPDISTILL_PPDET_SRC'


def use_ppdet_checkout(environ=os.environ, path: Optional[list] = None) -> Optional[str]:
    """Put the PaddleDetection checkout named by ``$PPDISTILL_PPDET_SRC`` first on the import path.

    ``path`` (default ``sys.path``) gets it in-process; ``environ['PYTHONPATH']`` gets it for every
    subprocess a test starts (the tools, ``python -c`` probes). Returns the checkout, or None when unset.
    """
    src = environ.get(PPDET_SRC_ENV)
    if not src:
        return None
    src = os.path.realpath(src)
    if not os.path.isfile(os.path.join(src, 'ppdet', '__init__.py')):
        raise pytest.UsageError(f'{PPDET_SRC_ENV}={src} is not a PaddleDetection checkout '
                                '(no ppdet/__init__.py there): point it at the directory holding ppdet/')
    path = sys.path if path is None else path
    if src not in path:
        path.insert(0, src)
    rest = [p for p in environ.get('PYTHONPATH', '').split(os.pathsep) if p and os.path.realpath(p) != src]
    environ['PYTHONPATH'] = os.pathsep.join([src] + rest)
    return src


def check_ppdet_from(src: Optional[str], ppdet_file: str) -> None:
    """Fail loudly when ``ppdet`` was imported from somewhere else than the requested checkout."""
    if src is not None and not os.path.realpath(ppdet_file).startswith(src + os.sep):
        raise pytest.UsageError(f'{PPDET_SRC_ENV}={src}, but ppdet was imported from {ppdet_file}: '
                                'something imported ppdet before tests/conftest.py')


PPDET_SRC = use_ppdet_checkout()  # before anything imports ppdet

import ppdistill  # noqa: E402,F401  (imports ppdet before paddle: import order matters)
import ppdet  # noqa: E402
import ppdet.modeling  # noqa: E402,F401  (registers the models in global_config)
from ppdet.core.workspace import global_config  # noqa: E402

check_ppdet_from(PPDET_SRC, ppdet.__file__)


def _ppdet26_wheel_on_paddle3() -> bool:
    import paddle
    from ppdistill.stack import _major_minor
    return not PPDET_SRC and _major_minor(getattr(ppdet, '__version__', None)) == (2, 6) and \
        (_major_minor(paddle.__version__) or (0, 0)) >= (3, 0)


# ppdet 2.6.0's own assigners (ATSS, task-aligned), LDGFLHead and DINO transformer fail on paddle 3 (int64 +
# int32, float32 + bool, float32 + int64 type promotion), fixed in PaddleDetection develop: tests that run
# them need another stack (docs/compat.md).
needs_ppdet_heads_on_this_paddle = pytest.mark.skipif(
    _ppdet26_wheel_on_paddle3(), reason="ppdet 2.6.0's assigners/LDGFLHead/DINO fail on paddle 3 (upstream; "
                                        'fixed in PaddleDetection develop, see docs/compat.md)')


# RT-DETR (DETR with an RTDETRTransformer) is registered by PaddleDetection develop, not by the 2.6.0 wheel.
needs_rtdetr = pytest.mark.skipif(
    'RTDETRTransformer' not in global_config,
    reason='RT-DETR (RTDETRTransformer) is not in this ppdet (the 2.6.0 wheel has none): run the tests against a '
           f'PaddleDetection develop checkout, {PPDET_SRC_ENV}=/path/to/PaddleDetection (docs/compat.md)')


def pytest_report_header(config):
    import paddle
    where = f'checkout {PPDET_SRC}' if PPDET_SRC else 'installed'
    version = getattr(ppdet, '__version__', '(source)')
    return f'paddle {paddle.__version__}, ppdet {version} ({where}: {ppdet.__file__})'


def run(args, cwd, env=None, ok=True, module=False):
    tool = [sys.executable, '-m'] if module else [sys.executable, os.path.join(ROOT, 'tools', args.pop(0))]
    cmd = tool + list(args)
    proc = subprocess.run(cmd, cwd=str(cwd), env=dict(os.environ, **(env or {})), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900)
    if ok and proc.returncode != 0:
        pytest.fail(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return proc


def train_shipped_config(work, name: str, teacher_config: str, teacher_weights, student_config: str,
                         tmp_path) -> tuple:
    """``tools/train.py -c student_config --slim_config`` the shipped ``configs/slim/distill/<name>.yml`` with its
    teacher replaced (a tiny config and weights trained by a fixture, or ``teacher_weights=None``: a random
    teacher), one log line per step: ``(the distill config as loaded, ppdet's per-step log lines, the run's
    output directory)``."""
    import yaml
    raw = yaml.safe_load(open(os.path.join(ROOT, 'configs', 'slim', 'distill', f'{name}.yml')))
    raw['teacher_config'], raw['teacher_weights'] = teacher_config, teacher_weights
    if teacher_weights is None:
        raw['allow_random_teacher'] = True
    slim = tmp_path / f'{name}.yml'
    slim.write_text(yaml.safe_dump(raw))
    proc = run(['train.py', '-c', student_config, '--slim_config', str(slim), '--seed', '0', '-o', 'log_iter=1'], work)
    steps = [line for line in (proc.stdout + proc.stderr).splitlines() if 'Epoch: [' in line]
    return raw, steps, work / 'output' / name


def provide_offline_font(cwd) -> None:
    """Put a TrueType font where PaddleDetection develop's visualizer looks for ``simfang.ttf``.

    develop's ``draw_bbox`` loads ``~/.cache/paddle/simfang.ttf`` without expanding ``~`` (so relative to
    the CWD) and downloads it when missing; offline, any TrueType font there will do. ppdet 2.6.0 ignores it.
    """
    import matplotlib
    font = os.path.join(str(cwd), '~', '.cache', 'paddle', 'simfang.ttf')
    if not os.path.isfile(font):
        os.makedirs(os.path.dirname(font), exist_ok=True)
        os.symlink(os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', 'DejaVuSans.ttf'), font)


def tree_digest(root: str) -> dict:
    """``{path relative to root: sha256}`` of every file below ``root``."""
    import hashlib
    digests = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), 'rb') as f:
                digests[os.path.relpath(os.path.join(dirpath, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def tool_module(name: str):
    """``tools/<name>.py`` imported as a module (its helpers are tested in-process)."""
    import importlib
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope='session')
def work(tmp_path_factory):
    """A working directory with the tiny dataset and trained tiny teachers (plain tools/train.py runs).

    One per session: every integration module reuses the teachers; tests write their own output names.
    """
    wd = tmp_path_factory.mktemp('work')
    provide_offline_font(wd)
    run(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '8', '--num_val', '4'], wd)
    for arch in ('picodet', 'retinanet'):
        proc = run(['train.py', '-c', os.path.join(TINY, f'{arch}_teacher.yml'), '--seed', '0'], wd)
        assert os.path.isfile(wd / 'output' / f'{arch}_teacher' / 'model_final.pdparams'), proc.stderr[-2000:]
    return wd

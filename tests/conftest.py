"""Shared fixtures: ``work``, a working directory with the tiny demo dataset and trained tiny teachers, and
``run``, which runs a tool as a subprocess the way a user types it (datasets and outputs are relative to
the CWD, as in ppdet).
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'demo', 'tiny')


def run(args, cwd, env=None, ok=True, module=False):
    tool = [sys.executable, '-m'] if module else [sys.executable, os.path.join(ROOT, 'tools', args.pop(0))]
    cmd = tool + list(args)
    proc = subprocess.run(cmd, cwd=str(cwd), env=dict(os.environ, **(env or {})), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900)
    if ok and proc.returncode != 0:
        pytest.fail(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return proc


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
    run(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '8', '--num_val', '4'], wd)
    for arch in ('picodet', 'retinanet'):
        proc = run(['train.py', '-c', os.path.join(TINY, f'{arch}_teacher.yml'), '--seed', '0'], wd)
        assert os.path.isfile(wd / 'output' / f'{arch}_teacher' / 'model_final.pdparams'), proc.stderr[-2000:]
    return wd

"""Integration: ppdistill installed from a wheel (no checkout on the path) distills from another project's
root, the way a user with a PaddleDetection clone does: ``python -m ppdistill.tools.train`` and the
``ppdistill-*`` commands, with that project's configs and data relative to its root.

The venv sees the already installed stack (``--system-site-packages``: paddle, ppdet) so the test installs
only the wheel; its own site-packages come first, so ``import ppdistill`` must resolve to the wheel.
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile

import paddle
import ppdet
import pytest
import yaml

from conftest import PPDET_SRC, ROOT

pytestmark = pytest.mark.integration


def _check(cmd, cwd, env=None):
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, f'{" ".join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}'
    return proc.stdout


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp('wheel')
    _check([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', str(tmp / 'dist'), ROOT], tmp)
    wheels = glob.glob(str(tmp / 'dist' / 'ppdistill-*.whl'))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope='module')
def wheel_venv(wheel, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('venv')
    _check([sys.executable, '-m', 'venv', '--system-site-packages', str(tmp / 'venv')], tmp)
    bin_dir = tmp / 'venv' / 'bin'
    if sys.prefix != sys.base_prefix:  # the suite runs in a venv (e.g. paddle 3 over the base stack): see it too
        site_dir, = glob.glob(str(tmp / 'venv' / 'lib' / 'python*' / 'site-packages'))
        with open(os.path.join(site_dir, 'outer_venv.pth'), 'w') as f:
            f.write('\n'.join(site.getsitepackages()) + '\n')
    _check([str(bin_dir / 'python'), '-m', 'pip', 'install', '--no-deps', '-q', wheel], tmp)
    return bin_dir


def test_the_wheel_requires_paddle_and_ppdet_only_through_the_cpu_extra(wheel):
    # Paddle's CPU and GPU builds are different packages: a plain install must not pull either.
    with zipfile.ZipFile(wheel) as whl:
        meta = whl.read(next(n for n in whl.namelist() if n.endswith('.dist-info/METADATA'))).decode()
    requires = re.findall(r'^Requires-Dist: (.+)$', meta, re.M)
    plain = [r for r in requires if 'extra ==' not in r]
    cpu = [r for r in requires if re.search(r'extra == "cpu"', r)]
    assert plain and not [r for r in plain if re.match(r'paddle', r, re.I)], plain
    assert any(r.startswith('paddlepaddle==2.6.2') for r in cpu) and any(r.startswith('paddledet==2.6.0') for r in cpu), cpu


def test_installed_tools_distill_from_another_projects_root(wheel_venv, work, tmp_path):
    # A "PaddleDetection checkout": its own configs and dataset, no ppdistill sources anywhere near.
    project = tmp_path / 'PaddleDetection'
    shutil.copytree(os.path.join(ROOT, 'configs', 'demo'), project / 'configs' / 'demo',
                    ignore=shutil.ignore_patterns('weights'))
    (project / 'dataset').mkdir()
    os.symlink(work / 'dataset' / 'digits_tiny', project / 'dataset' / 'digits_tiny')
    (project / 'my_mgd.yml').write_text(yaml.safe_dump({
        'slim': 'MGDDistillModel', 'teacher_config': 'configs/demo/tiny/picodet_teacher.yml',
        'teacher_weights': str(work / 'output' / 'picodet_teacher' / 'model_final')}))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    if PPDET_SRC:  # the PaddleDetection checkout under test, and nothing else
        env['PYTHONPATH'] = PPDET_SRC
    python = str(wheel_venv / 'python')

    where = _check([python, '-c', 'import ppdistill, ppdistill.tools.train as t; print(t.__file__)'],
                   project, env)
    assert str(wheel_venv.parent) in where.strip().splitlines()[-1], where  # the wheel, not the checkout
    stack = _check([python, '-c', 'import ppdistill, paddle, ppdet; print(paddle.__version__, ppdet.__file__)'],
                   project, env)
    assert stack.strip().splitlines()[-1] == f'{paddle.__version__} {ppdet.__file__}', stack  # the stack under test

    student = 'configs/demo/tiny/picodet_student.yml'
    _check([python, '-m', 'ppdistill.tools.train', '-c', student, '--slim_config', 'my_mgd.yml'], project, env)
    final = project / 'output' / 'my_mgd' / 'model_final.pdparams'
    assert final.is_file()
    out = _check([str(wheel_venv / 'ppdistill-eval'), '-c', student,
                  '-o', f'weights={final.with_suffix("")}'], project, env)
    assert 'Average Precision' in out

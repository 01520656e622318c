"""Installing ppdistill respects the user's stack, and importing it without a usable Paddle/ppdet says
what to install in one line.

The install tests ask pip itself what it would install (``pip install --dry-run --report``) into a venv
that sees this environment's packages (``--system-site-packages``) plus an installed ``paddlepaddle 3.3.1``
(its metadata only: pip resolves on metadata, and the wheel is 100+ MB). ``.ci/run`` does the same with
a real ``paddlepaddle==3.3.1`` install.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from ppdistill.stack import StackError, check_paddle_version, check_ppdet_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP = ['-m', 'pip', 'install', '--disable-pip-version-check', '--quiet']


@pytest.fixture(scope='module')
def paddle3_venv(tmp_path_factory) -> str:
    """A venv over this environment's packages in which paddlepaddle 3.3.1 is installed; its python."""
    tmp_path, name, version = tmp_path_factory.mktemp('paddle3'), 'paddlepaddle', '3.3.1'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(tmp_path / 'venv')], check=True)
    python = str(tmp_path / 'venv' / 'bin' / 'python')
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          check=True, text=True, stdout=subprocess.PIPE).stdout.strip()
    info = os.path.join(site, f'{name}-{version}.dist-info')
    os.makedirs(info)
    with open(os.path.join(info, 'METADATA'), 'w') as f:
        f.write(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    open(os.path.join(info, 'RECORD'), 'w').close()
    listed = subprocess.run([python, '-m', 'pip', 'list', '--disable-pip-version-check'], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    assert re.search(rf'^{name}\s+{re.escape(version)}$', listed, re.M), listed  # pip sees it installed
    return python


def _would_install(python: str, requirement: str, tmp_path) -> dict:
    """``{name: version}`` that ``pip install <requirement>`` would install into ``python``'s venv."""
    report = tmp_path / 'report.json'
    proc = subprocess.run([python] + PIP + ['--dry-run', '--report', str(report), requirement], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    with open(report) as f:
        return {i['metadata']['name'].lower(): i['metadata']['version'] for i in json.load(f)['install']}


@pytest.mark.parametrize('extras', ['', '[test]'])
def test_installing_ppdistill_keeps_the_installed_paddle_and_ppdet(paddle3_venv, tmp_path, extras):
    planned = _would_install(paddle3_venv, ROOT + extras, tmp_path)
    assert 'ppdistill' in planned
    assert not [n for n in planned if n.startswith('paddle')], planned  # paddlepaddle*, paddledet


def test_the_cpu_extra_installs_the_tested_paddle(paddle3_venv, tmp_path):
    # The other side of the test above: the tested stack is one extra away (and replaces paddle 3).
    assert _would_install(paddle3_venv, ROOT + '[cpu]', tmp_path).get('paddlepaddle') == '2.6.2'


# -- import without a usable Paddle / ppdet ----------------------------------------------------------

_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == {name!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
try:
    import ppdistill
except ImportError as err:
    from ppdistill.errors import PPDistillError
    print(type(err).__name__, isinstance(err, PPDistillError), sys.modules.get({name!r}) is None, sep=',')
    print(err)
"""


@pytest.mark.parametrize('missing', ['paddle', 'ppdet'])
def test_import_without_paddle_or_ppdet_is_one_line_saying_what_to_install(missing):
    proc = subprocess.run([sys.executable, '-c', _BLOCK.format(name=missing)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    kind, message = proc.stdout.split('\n', 1)
    assert kind == 'StackError,True,True', proc.stdout + proc.stderr  # an ImportError and a PPDistillError
    assert message.count('\n') == 1 and message.startswith(f'ppdistill needs {missing}, not installed: ')
    assert 'pip install paddlepaddle' in message and 'pip install paddledet==2.6.0' in message
    assert 'ppdistill[cpu]' in message


@pytest.mark.parametrize('version', ['2.6.2', '2.6.0', '3.0.0', '3.3.1', '0.0.0', '3.0.0.dev20250101', None])
def test_supported_paddle_versions_pass(version):
    check_paddle_version(version)


@pytest.mark.parametrize('version', ['2.5.2', '2.4.0', '1.8.5'])
def test_older_paddle_is_one_line_naming_the_version(version):
    with pytest.raises(StackError, match=rf'^ppdistill needs Paddle 2\.6 or 3\.x, found paddle {version}: '
                                         r'pip install -U paddlepaddle'):
        check_paddle_version(version)


def test_newer_paddle_major_warns_and_runs():
    with pytest.warns(UserWarning, match='tested on Paddle 2.6 and 3.x, found paddle 4.0.0'):
        check_paddle_version('4.0.0')


# ppdet 2.6.0 from PyPI; an installed release/2.7+ tree; a source checkout: no __version__ (None),
# '0.0.0' or a development string.
@pytest.mark.parametrize('version', ['2.6.0', '2.7.0', '2.8.1', '0.0.0', 'develop', '', None])
def test_ppdet_releases_and_checkouts_pass(version):
    check_ppdet_version(version)


@pytest.mark.parametrize('version', ['2.5.0', '2.4.1'])
def test_older_ppdet_is_one_line_naming_the_version(version):
    with pytest.raises(StackError, match=rf'^ppdistill needs ppdet 2\.6 or later, found ppdet {version}: '):
        check_ppdet_version(version)


def test_import_checks_the_versions_that_paddle_and_ppdet_report():
    code = ('import ppdet, paddle\npaddle.__version__ = "2.5.2"\n'
            'try:\n    import ppdistill\nexcept ImportError as err:\n    print(err)')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=300)
    last = proc.stdout.strip().splitlines()[-1]  # after ppdet's own import-time prints
    assert last.startswith('ppdistill needs Paddle 2.6 or 3.x, found paddle 2.5.2: '), proc.stdout + proc.stderr


# -- the README's set-up commands are what CI runs ---------------------------------------------------

def _readme_setup_commands():
    with open(os.path.join(ROOT, 'README.md')) as f:
        commands = re.findall(r'^pip install (-e "\.\[[\w,]+\]") && (python .+?)\s*$', f.read(), re.M)
    assert len(commands) == 2, commands  # one for the demo, one for the tests
    return commands


def test_readme_setup_commands_are_what_ci_runs():
    with open(os.path.join(ROOT, '.ci', 'run')) as f:
        ci = f.read()
    ci_installs = re.findall(r'^python -m pip install [^\n]*?(-e "\.\[[\w,]+\]")\s*$', ci, re.M)
    (demo_install, demo), (test_install, test) = sorted(_readme_setup_commands(), key=lambda c: 'pytest' in c[1])
    assert demo == 'python tools/demo.py' and os.path.isfile(os.path.join(ROOT, 'tools', 'demo.py'))
    assert demo_install in ci_installs and test_install in ci_installs, (ci_installs, demo_install, test_install)
    assert re.search(rf'^{re.escape(test)}$', ci, re.M), f'.ci/run does not run {test!r}'


def test_readme_extras_exist_in_setup_py(monkeypatch):
    import runpy
    import setuptools
    seen = {}
    monkeypatch.setattr(setuptools, 'setup', lambda **kwargs: seen.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, 'setup.py'))
    for install, _ in _readme_setup_commands():
        named = set(re.search(r'\[([\w,]+)\]', install).group(1).split(','))
        assert named <= set(seen['extras_require']), (named, seen['extras_require'])

"""Running the suite against a PaddleDetection source checkout (``PPDISTILL_PPDET_SRC``, read by conftest.py)."""
import os
import subprocess
import sys

import pytest

from conftest import PPDET_SRC, PPDET_SRC_ENV, check_ppdet_from, use_ppdet_checkout

PROBE = 'import ppdet; print(ppdet.__file__)'


def _fake_checkout(root):
    (root / 'ppdet').mkdir(parents=True)
    (root / 'ppdet' / '__init__.py').write_text('')
    return str(root)


def test_checkout_goes_first_in_process_and_for_subprocesses(tmp_path):
    src = _fake_checkout(tmp_path / 'PaddleDetection')
    environ = {PPDET_SRC_ENV: src, 'PYTHONPATH': os.pathsep.join(['/a', src, '/b'])}
    path = ['/x', '/y']
    assert use_ppdet_checkout(environ, path) == os.path.realpath(src)
    assert use_ppdet_checkout(environ, path) == os.path.realpath(src)  # twice: nothing duplicated
    assert path == [os.path.realpath(src), '/x', '/y']
    assert environ['PYTHONPATH'] == os.pathsep.join([os.path.realpath(src), '/a', '/b'])
    # a subprocess started with that environment imports the checkout's ppdet, from any directory
    (tmp_path / 'elsewhere').mkdir()
    proc = subprocess.run([sys.executable, '-c', PROBE], cwd=str(tmp_path / 'elsewhere'), env=environ,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    assert proc.stdout.strip() == os.path.join(os.path.realpath(src), 'ppdet', '__init__.py')


def test_unset_variable_changes_nothing():
    environ = {'PYTHONPATH': '/a'}
    path = ['/x']
    assert use_ppdet_checkout(environ, path) is None
    assert environ == {'PYTHONPATH': '/a'} and path == ['/x']


def test_a_directory_without_ppdet_is_a_usage_error(tmp_path):
    with pytest.raises(pytest.UsageError, match=f'{PPDET_SRC_ENV}=.* is not a PaddleDetection checkout'):
        use_ppdet_checkout({PPDET_SRC_ENV: str(tmp_path)}, [])


def test_ppdet_imported_from_elsewhere_is_a_usage_error(tmp_path):
    src = os.path.realpath(_fake_checkout(tmp_path / 'PaddleDetection'))
    check_ppdet_from(src, os.path.join(src, 'ppdet', '__init__.py'))
    check_ppdet_from(None, '/site-packages/ppdet/__init__.py')  # no checkout asked for: anything goes
    for elsewhere in ('/site-packages/ppdet/__init__.py', src + '2/ppdet/__init__.py'):
        with pytest.raises(pytest.UsageError, match='ppdet was imported from'):
            check_ppdet_from(src, elsewhere)


@pytest.mark.skipif(PPDET_SRC is None, reason=f'{PPDET_SRC_ENV} not set: the installed ppdet is under test')
def test_this_session_and_its_tools_use_the_checkout(tmp_path):
    import ppdet
    assert os.path.realpath(ppdet.__file__).startswith(PPDET_SRC + os.sep)
    proc = subprocess.run([sys.executable, '-c', 'import ppdistill; ' + PROBE], cwd=str(tmp_path), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    assert os.path.realpath(proc.stdout.strip().splitlines()[-1]).startswith(PPDET_SRC + os.sep)

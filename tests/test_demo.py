"""tools/demo.py: how it splits the cores between the two students trained side by side."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import sys; sys.path.insert(0, 'tools'); import demo, os; "
         "print(demo.USER_SET_THREADS, os.environ['OMP_NUM_THREADS'])")


@pytest.mark.parametrize('user_threads', [None, '3'])
def test_demo_sees_the_users_thread_setting_before_ppdistill_sets_its_default(user_threads):
    # Importing ppdistill sets OMP_NUM_THREADS to every core when it is unset. The demo must decide from the
    # environment as the user gave it: it once looked after the import, always saw "set by the user", and
    # ran both students with 2 threads each on 2 cores.
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    if user_threads:
        env['OMP_NUM_THREADS'] = user_threads
    out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=env, text=True, check=True,
                         stdout=subprocess.PIPE).stdout.split()
    assert out[0] == str(user_threads is not None)
    assert out[1] == (user_threads or str(os.cpu_count()))

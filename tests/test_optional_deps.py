"""scipy and matplotlib are optional (``pip install 'ppdistill[bench]'``): only the benchmark's statistics and
pictures use them, imported when needed with a one-line message when missing; training never imports them.
(ppdet itself imports both today; this keeps ppdistill's own training path free of them.)"""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

OPTIONAL = ('scipy', 'matplotlib')
TRAINING = ('ppdistill', 'ppdistill.tools.train', 'ppdistill.tools.eval', 'ppdistill.tools.infer',
            'ppdistill.tools.export_model', 'ppdistill.trainer', 'ppdistill.build', 'ppdistill.checkpoint')


def optional_imports(path: str) -> list:
    """``import scipy...`` / ``from matplotlib... import`` anywhere in a file (module level or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ''] if isinstance(node, ast.ImportFrom) else []
        found += [f'{os.path.basename(path)}:{node.lineno} {n}' for n in names if n.split('.')[0] in OPTIONAL]
    return found


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / 'm.py'
    sample.write_text('import os\ndef f():\n    from scipy import stats\n    import matplotlib.pyplot as plt\n')
    assert [f.split(' ')[1] for f in optional_imports(str(sample))] == ['scipy', 'matplotlib.pyplot']


def test_the_training_path_imports_neither_scipy_nor_matplotlib():
    probe = ('import sys; sys.path.insert(0, sys.argv[1]); import importlib\n'
             f'for m in {TRAINING!r}: importlib.import_module(m)\n'
             "print('\\n'.join(f'{n} {m.__file__}' for n, m in list(sys.modules.items()) "
             "if n.split('.')[0] == 'ppdistill' and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, '-c', probe, ROOT], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = dict(line.split(' ', 1) for line in out.stdout.splitlines())
    assert {'ppdistill.trainer', 'ppdistill.balance', 'ppdistill.distiller'} <= set(loaded)
    assert all(f.startswith(ROOT) for f in loaded.values())          # this checkout's modules
    assert not [n for n in loaded if n.startswith('ppdistill.bench')]  # the benchmark is not loaded
    assert [hit for f in loaded.values() for hit in optional_imports(f)] == []


def test_the_optional_imports_live_only_in_the_bench_and_visualize_code():
    allowed = {os.path.join('ppdistill', 'bench'), os.path.join('ppdistill', 'tools', 'visualize.py')}
    hits = []
    for folder, _, files in os.walk(os.path.join(ROOT, 'ppdistill')):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), ROOT)
            if name.endswith('.py') and not any(rel.startswith(a) for a in allowed):
                hits += optional_imports(os.path.join(folder, name))
    assert hits == []


@pytest.mark.parametrize('missing', ['scipy.stats', 'matplotlib'])
def test_a_missing_optional_dependency_is_a_one_line_error(monkeypatch, missing):
    from ppdistill.bench.plots import plot_accuracy
    from ppdistill.bench.stats import welch_t_test
    from ppdistill.errors import PPDistillError
    monkeypatch.setitem(sys.modules, missing, None)  # what an absent package looks like to import
    call = (lambda: welch_t_test([1.0, 2.0], [3.0, 4.0])) if missing == 'scipy.stats' else \
        (lambda: plot_accuracy([], 'x.png'))
    with pytest.raises(PPDistillError) as err:
        call()
    message = str(err.value)
    assert "pip install 'ppdistill[bench]'" in message and missing.split('.')[0] in message and '\n' not in message

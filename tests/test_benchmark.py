"""Benchmark: seed statistics against hand-computed and scipy references, no host synchronisation inside
the losses (static and at run time), and ``tools/benchmark.py accuracy``/``speed`` on the tiny configs."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import ast
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from scipy import stats as sps

from ppdistill.bench.stats import (aggregate, beyond_noise, gap_closed, markdown_table, mean_std, paired_t_test,
                                   welch_t_test)

from conftest import ROOT, TINY, tool_module


# -- statistics --------------------------------------------------------------------------------------
def test_mean_and_sample_std_by_hand():
    mean, std = mean_std([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert std == pytest.approx(0.1)  # sqrt(((-0.1)^2 + 0 + 0.1^2) / (3 - 1))
    assert mean_std([0.25]) == (0.25, None)


def test_gap_closed_by_hand():
    assert gap_closed(0.25, 0.2, 0.3) == pytest.approx(0.5)
    assert gap_closed(0.15, 0.2, 0.3) == pytest.approx(-0.5)
    assert gap_closed(0.3, 0.2, 0.2) is None


def test_welch_matches_hand_computation_and_scipy():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    t, df, p = welch_t_test(a, b)
    # means 2 and 5, variances 1 and 1: se^2 = 1/3 + 1/3, t = -3 / sqrt(2/3); df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    assert t == pytest.approx(-3 / math.sqrt(2 / 3))
    assert df == pytest.approx(4.0)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert p == pytest.approx(ref.pvalue) and t == pytest.approx(ref.statistic)
    a, b = [0.11, 0.15, 0.12, 0.19], [0.10, 0.101, 0.148]
    assert welch_t_test(a, b)[2] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)


def test_noise_verdict():
    assert beyond_noise([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) is True      # p = 0.021
    assert beyond_noise([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) is False     # p = 0.57
    assert beyond_noise([0.2, 0.2], [0.3, 0.3]) is True                # no spread at all: any gap counts
    assert beyond_noise([0.2, 0.2], [0.2, 0.2]) is False
    assert beyond_noise([0.2], [0.3, 0.31]) is None                    # one seed: no noise estimate


def test_aggregate_rows():
    row = lambda ap: {'AP': ap, 'AP50': 2 * ap, 'APs': ap / 2, 'APm': ap, 'APl': -1.0}  # noqa: E731
    runs = {'teacher': [row(0.40)], 'student': [row(0.10), row(0.14), row(0.12)],
            'mgd': [row(0.20), row(0.22), row(0.24)], 'fgd': [row(0.11)]}
    summary = {e['row']: e for e in aggregate(runs)}
    assert list(summary) == ['teacher', 'student', 'mgd', 'fgd']
    assert summary['teacher']['n'] == 1 and summary['teacher']['std']['AP'] is None
    assert 'gap_closed' not in summary['teacher'] and 'gap_closed' not in summary['student']
    mgd = summary['mgd']
    assert mgd['mean']['AP'] == pytest.approx(0.22) and mgd['std']['AP'] == pytest.approx(0.02)
    assert mgd['mean']['AP50'] == pytest.approx(0.44)
    assert mgd['delta_ap'] == pytest.approx(0.10)
    assert mgd['gap_closed'] == pytest.approx(0.10 / 0.28)       # (0.22 - 0.12) / (0.40 - 0.12)
    assert mgd['welch_p'] == pytest.approx(sps.ttest_ind([0.20, 0.22, 0.24], [0.10, 0.14, 0.12],
                                                         equal_var=False).pvalue)
    assert mgd['beyond_noise'] is True
    assert summary['fgd']['beyond_noise'] is None and summary['fgd']['welch_p'] is None
    table = markdown_table(list(summary.values()))
    assert '| mgd | 3 | 0.220 ± 0.020 |' in table and 'n/a' in table
    assert f"yes (Welch p = {mgd['welch_p']:.3f})" in table and 'n/a (< 2 seeds)' in table


def test_paired_t_matches_hand_computation_and_scipy():
    a, b = [0.162, 0.105, 0.120, 0.130], [0.166, 0.097, 0.108, 0.125]
    t, df, p = paired_t_test(a, b)
    d = np.subtract(a, b)  # -0.004, 0.008, 0.012, 0.005: mean 0.00525, std 0.00685
    assert t == pytest.approx(d.mean() / (d.std(ddof=1) / 2)) and df == 3
    ref = sps.ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert paired_t_test([0.5, 0.75], [0.25, 0.5])[2] == 0.0      # identical non-zero differences
    assert paired_t_test([0.2, 0.3], [0.2, 0.3])[2] == 1.0
    with pytest.raises(ValueError):
        paired_t_test([0.1, 0.2], [0.1])


def test_paired_rows_use_the_per_seed_differences():
    # A shared seed effect (0.10 / 0.16 / 0.12) with a steady +0.01 from the method: Welch cannot see it
    # through the spread, the paired test can.
    row = lambda ap: {'AP': ap, 'AP50': ap, 'APs': ap, 'APm': ap, 'APl': ap}  # noqa: E731
    student, method = [0.10, 0.16, 0.12], [0.111, 0.169, 0.131]
    runs = {'teacher': [row(0.5)], 'student': [row(v) for v in student], 'mgd': [row(v) for v in method]}
    welch = {e['row']: e for e in aggregate(runs)}['mgd']
    paired = {e['row']: e for e in aggregate(runs, paired={'mgd': True})}['mgd']
    assert welch['test'] == 'welch' and welch['beyond_noise'] is False and welch['p'] == welch['welch_p']
    assert paired['test'] == 'paired' and paired['beyond_noise'] is True
    assert paired['p'] == pytest.approx(sps.ttest_rel(method, student).pvalue)
    assert paired['delta_ap_std'] == pytest.approx(np.std(np.subtract(method, student), ddof=1))
    table = markdown_table([{**e} for e in aggregate(runs, paired={'mgd': True})])
    assert f"+0.010 ± {paired['delta_ap_std']:.3f}" in table and f"yes (paired t p = {paired['p']:.3f})" in table
    # a p below the printed precision reads "p < 0.001", not "p = 0.000"
    steady = {**runs, 'mgd': [row(v + 0.05 + 1e-4 * i) for i, v in enumerate(student)]}
    summary = aggregate(steady, paired={'mgd': True})
    tiny = {e['row']: e for e in summary}['mgd']
    assert tiny['p'] < 1e-3 and 'yes (paired t p < 0.001)' in markdown_table(summary)


def test_runs_pair_when_their_first_detection_losses_match():
    from ppdistill.runs import parse_train_log
    same_start = _benchmark_module().same_start
    line = ('Epoch: [0] [  0/250] learning_rate: 0.004000 loss_vfl: 1.009536 loss_bbox: 1.746961 {extra}'
            'loss: {loss} eta: 0:07:15 batch_cost: 0.5808')
    student = parse_train_log(line.format(extra='', loss='2.756497'))
    same = parse_train_log(line.format(extra='distill_mgd_l0: 0.36 ', loss='3.116497'))
    other = parse_train_log(line.replace('1.009536', '1.788019').format(extra='', loss='3.53498'))
    later = parse_train_log(line.replace('[  0/250]', '[ 20/250]').format(extra='', loss='2.756497'))
    assert same_start(student, same) is True
    assert same_start(student, other) is False
    assert same_start(student, later) is False and same_start(student, []) is False


# -- no host synchronisation inside the losses ---------------------------------------------------------
LOSS_FILES = sorted(glob.glob(os.path.join(ROOT, 'ppdistill', 'losses', '*.py'))) + \
    [os.path.join(ROOT, 'ppdistill', 'masks.py')]
SYNC_METHODS = {'numpy', 'item', 'tolist'}
SCALAR_CASTS = {'float', 'int', 'bool'}


def _shape_names(func: ast.AST) -> set:
    """Names bound (directly or through arithmetic) from ``.shape``, Python constants, ``self.<attr>`` or
    parameters annotated as Python numbers (``height: int``, ``shape: Sequence[int]``)."""
    host_types = {'int', 'float', 'bool', 'str', 'Optional', 'Union', 'Sequence', 'List', 'Tuple', 'Dict',
                  'Channels'}  # Channels: ppdistill.losses.outputs' Union[int, Dict[str, int]]

    def host_annotation(annotation) -> bool:  # built only from Python number/container types
        ids = [n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)]
        return bool(ids) and set(ids) <= host_types and 'str' != ast.unparse(annotation)

    names = {a.arg for a in func.args.args + func.args.kwonlyargs
             if a.annotation is not None and host_annotation(a.annotation)}

    def is_host(node) -> bool:
        if any(isinstance(n, ast.Attribute) and n.attr == 'shape' for n in ast.walk(node)):
            return True
        return all(isinstance(n, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop,
                                  ast.Load, ast.expr_context, ast.Subscript)) or (isinstance(n, ast.Name) and n.id in names)
                   or (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == 'self')
                   or (isinstance(n, ast.Name) and n.id == 'self')
                   for n in ast.walk(node))

    def targets(node):
        return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]

    for _ in range(3):  # to a fixpoint through chains of assignments
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and is_host(node.value):
                for target in node.targets:
                    names.update(targets(target))
            elif isinstance(node, ast.comprehension) and is_host(node.iter):
                names.update(targets(node.target))
    return names, is_host


def host_sync_calls(path: str) -> list:
    """``.numpy()``/``.item()``/``.tolist()`` anywhere, and ``float/int/bool(x)`` outside ``__init__`` where
    ``x`` is not built from shapes, constants or ``self`` attributes (i.e. may be a tensor)."""
    tree = ast.parse(open(path).read())
    found = []
    for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        if func.name == '__init__':
            continue
        names, is_host = _shape_names(func)
        for node in ast.walk(func):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr in SYNC_METHODS:
                found.append(f'{os.path.basename(path)}:{node.lineno} .{node.func.attr}()')
            elif isinstance(node.func, ast.Name) and node.func.id in SCALAR_CASTS and node.args \
                    and not is_host(node.args[0]):
                found.append(f'{os.path.basename(path)}:{node.lineno} {node.func.id}({ast.unparse(node.args[0])})')
    return found


def test_static_check_flags_host_syncs_in_a_sample():
    sample = ('def f(self, x, t):\n    n = int(x.shape[0])\n    a = float(n * 2) + float(self.w)\n'
              '    b = x.numpy()\n    c = float(t.sum())\n    d = t.item()\n    if bool(t > 0):\n        pass\n')
    path = os.path.join(os.path.dirname(__file__), '_host_sync_sample.py')
    try:
        with open(path, 'w') as f:
            f.write(sample)
        found = [s.split(' ', 1)[1] for s in host_sync_calls(path)]
    finally:
        os.remove(path)
    assert sorted(found) == sorted(['.numpy()', 'float(t.sum())', '.item()', 'bool(t > 0)'])


@pytest.mark.parametrize('path', LOSS_FILES, ids=os.path.basename)
def test_no_host_sync_in_loss_code(path):
    assert host_sync_calls(path) == []


def _spy_host_conversions(monkeypatch) -> list:
    """Patch paddle.Tensor's host conversions to record their names (and still work)."""
    calls = []
    for name in ('numpy', 'item', 'tolist', '__float__', '__int__', '__bool__', '__index__'):
        original = getattr(paddle.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(paddle.Tensor, name, spy)
    return calls


def test_no_host_sync_at_run_time(monkeypatch):
    """Every distill loss, forward + backward, with the tensor→host conversions recorded."""
    from ppdistill.losses import CWDLoss, FGDLoss, FGFILoss, LogitKDLoss, MGDLoss, PKDLoss
    from ppdistill.losses.base import loss_total
    paddle.seed(0)
    s = paddle.randn([2, 6, 12, 12])
    s.stop_gradient = False
    t = paddle.randn([2, 8, 12, 12])
    inputs = {'gt_bbox': paddle.to_tensor([[[4., 4., 30., 40.], [0., 0., 0., 0.]],
                                           [[10., 2., 44., 20.], [1., 1., 9., 9.]]]),
              'pad_gt_mask': paddle.to_tensor([[[1.], [0.]], [[1.], [1.]]]),
              'im_shape': paddle.to_tensor([[48., 48.], [48., 48.]]), 'image': paddle.zeros([2, 3, 48, 48])}
    losses = [FGDLoss(6, 8), MGDLoss(6, 8), CWDLoss(6, 8), PKDLoss(6, 8),
              FGFILoss(6, 8, anchors={'virtual_anchor_scale': 5.0}, level=0, num_levels=1)]
    calls = _spy_host_conversions(monkeypatch)
    logits_s = paddle.randn([2, 8, 12, 12])
    logits_s.stop_gradient = False
    pairs = [(s, t)] * len(losses) + [(logits_s, t)] * 2
    losses += [LogitKDLoss(8, 8, normalize='all'), LogitKDLoss(8, 8, normalize='positive')]
    for loss, (x, y) in zip(losses, pairs):
        loss_total(loss(x, y, inputs)).backward()
    assert calls == []
    # the spies see a conversion when there is one
    float(t.sum())
    t.numpy()
    assert calls[0] == '__float__' and calls[-1] == 'numpy'


# -- the tool, on the tiny configs ---------------------------------------------------------------------
def run(args, cwd):
    cmd = [sys.executable, os.path.join(ROOT, 'tools', args[0])] + list(args[1:])
    proc = subprocess.run(cmd, cwd=str(cwd), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}')
    return proc.stdout


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    wd = tmp_path_factory.mktemp('bench')
    run(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '6', '--num_val', '4'], wd)
    return wd


@pytest.mark.integration
def test_accuracy_benchmark_on_tiny_configs_and_resume(work):
    args = ['benchmark.py', 'accuracy', '--config_dir', TINY, '--methods', 'fgd', '--seeds', '2',
            '-o', 'log_iter=1']
    out = run(args, work)
    assert out.count('train: done') == 5 and out.count('eval: done') == 5  # teacher + 2 x (student, fgd)
    bench = work / 'output' / 'benchmark'
    for name in ('accuracy_picodet.md', 'accuracy_picodet.json', 'accuracy_picodet.png', 'losses_picodet.png'):
        assert (bench / name).stat().st_size > 0, name
    result = json.loads((bench / 'accuracy_picodet.json').read_text())
    assert result['seeds'] == [0, 1] and 'Welch' in result['criterion']
    rows = {r['row']: r for r in result['rows']}
    assert list(rows) == ['teacher', 'student', 'fgd']
    assert rows['teacher']['n'] == 1 and rows['student']['n'] == 2 and rows['fgd']['n'] == 2
    for row in rows.values():
        for run_ in row['runs']:
            metrics = json.loads(open(os.path.join(ROOT, run_['run_dir'], 'metrics.json')).read())['bbox']
            assert run_['AP'] == pytest.approx(metrics[0]) and run_['APl'] == pytest.approx(metrics[5])
            # every evaluation writes its detections into its own run directory: two benchmark calls
            # side by side (disjoint --seeds) once overwrote each other's output/bbox.json
            assert os.path.getsize(os.path.join(ROOT, run_['run_dir'], 'bbox.json')) > 0
        assert row['mean']['AP'] == pytest.approx(np.mean([r['AP'] for r in row['runs']]))
    assert not (work / 'output' / 'bbox.json').exists()
    assert {'delta_ap', 'gap_closed', 'beyond_noise'} <= set(rows['fgd'])
    assert rows['fgd']['test'] == 'paired'  # same seed: same initial weights and first batch
    balance = rows['fgd']['runs'][0]['balance']['terms']
    assert {'distill_loss', 'distill_fgd_l0', 'distill_fgd_l0_fg', 'distill_fgd_l0_rela'} <= set(balance)
    assert balance['distill_loss']['start'] > 0 and balance['distill_loss']['end'] > 0
    md = (bench / 'accuracy_picodet.md').read_text()
    assert 'seeds: [0, 1]' in md and 'benchmark.py accuracy' in md and '| fgd | 2 |' in md
    # a second call reuses every finished run
    again = run(args, work)
    assert 'reusing 5 finished runs' in again and 'train: done' not in again


def _benchmark_module():
    return tool_module('benchmark')


def test_methods_are_discovered_by_config_name(tmp_path):
    benchmark = _benchmark_module()
    found = benchmark.discover_methods(os.path.join(ROOT, 'configs', 'slim', 'distill'), 'picodet')
    assert {'mgd', 'fgd'} <= set(found) and 'generic_example' not in found
    (tmp_path / 'newkd_picodet_teacher_to_student.yml').write_text('slim: Distiller\n')
    (tmp_path / 'newkd_retinanet_teacher_to_student.yml').write_text('slim: Distiller\n')
    assert list(benchmark.discover_methods(str(tmp_path), 'picodet')) == ['newkd']
    assert benchmark.parse_seeds('3') == [0, 1, 2] and benchmark.parse_seeds('4,7') == [4, 7]
    # "--seeds 2" ran seeds 0 and 1 when seed 2 was meant: the progress line now spells the count out
    assert benchmark.describe_seeds('2', [0, 1]) == 'seeds [0, 1] (--seeds 2 is a count; seed 2 alone is --seeds 2,)'
    assert benchmark.describe_seeds('2,', [2]) == 'seeds [2]'


def test_run_stamps_follow_what_decides_each_run():
    benchmark = _benchmark_module()

    def plan(*extra):
        return benchmark.Plan(benchmark.parse_args(['accuracy', '--config_dir', TINY, '--methods', 'fgd']
                                                   + list(extra)))
    base, other_opt, other_teacher = plan('-o', 'epoch=1'), plan('-o', 'epoch=2'), \
        plan('-o', 'epoch=1', '--teacher_opt', 'epoch=3')
    assert base.stamp('student', 0) == plan('-o', 'epoch=1').stamp('student', 0)  # deterministic
    assert base.stamp('student', 0) != base.stamp('student', 1)                   # seed
    assert base.stamp('student', 0) != base.stamp('fgd', 0)                       # row
    assert base.stamp('student', 0) != other_opt.stamp('student', 0)              # student overrides
    assert base.stamp('teacher', 0) == other_opt.stamp('teacher', 0)              # ... not the teacher's
    assert base.stamp('teacher', 0) != other_teacher.stamp('teacher', 0)          # teacher overrides
    assert base.stamp('fgd', 0) != other_teacher.stamp('fgd', 0)                  # a new teacher: new fgd
    assert base.stamp('student', 0) == other_teacher.stamp('student', 0)          # ... same plain student


def test_another_student_config_keeps_the_teacher(tmp_path):
    benchmark = _benchmark_module()
    longer = tmp_path / 'picodet_student_long.yml'
    longer.write_text(f"_BASE_: ['{os.path.join(TINY, 'picodet_student.yml')}']\nepoch: 2\n")
    args = ['accuracy', '--config_dir', TINY, '--methods', 'fgd']
    base = benchmark.Plan(benchmark.parse_args(args))
    other = benchmark.Plan(benchmark.parse_args(args + ['--student_config', str(longer)]))
    assert other.student_cfg == str(longer) and other.teacher_cfg == base.teacher_cfg
    assert other.stamp('teacher', 0) == base.stamp('teacher', 0)
    assert other.stamp('student', 0) != base.stamp('student', 0) and other.stamp('fgd', 0) != base.stamp('fgd', 0)
    with pytest.raises(benchmark.PPDistillError, match='--student_config'):
        benchmark.Plan(benchmark.parse_args(args + ['--student_config', str(tmp_path / 'missing.yml')]))


def _fake_runs(benchmark, monkeypatch) -> list:
    """Replace training + evaluation with a record written after a pause; return the list of runs made."""
    import time
    made = []

    def run_one(plan, row, seed, records, prefix):
        made.append((row, seed))
        time.sleep(0.5)  # a call side by side looks for the same run meanwhile
        os.makedirs(plan.run_dir(row, seed), exist_ok=True)
        record = {'stamp': plan.stamp(row, seed), 'row': row, 'seed': seed, 'seconds': 1.0,
                  'bbox': [0.1 + seed / 10] * 12, 'params': 1}
        with open(os.path.join(plan.run_dir(row, seed), 'run.json'), 'w') as f:
            json.dump(record, f)
        return record
    monkeypatch.setattr(benchmark, '_run_one', run_one)
    monkeypatch.setattr(benchmark, '_demo_data', lambda args: None)
    monkeypatch.setattr(benchmark, 'write_accuracy_report', lambda plan, summary, curves: summary)
    return made


def test_two_calls_side_by_side_share_the_teacher_run(tmp_path, monkeypatch):
    """Disjoint --seeds with one --out (two single-thread runs on two cores): the teacher is run once.
    Both calls once evaluated it into the same directory and one died reading a half-written bbox.json."""
    import threading
    benchmark = _benchmark_module()
    made = _fake_runs(benchmark, monkeypatch)

    def call(seeds):
        benchmark.run_accuracy(benchmark.parse_args(['accuracy', '--config_dir', TINY, '--methods', 'none',
                                                     '--seeds', seeds, '--out', str(tmp_path)]))
    calls = [threading.Thread(target=call, args=(seeds,)) for seeds in ('0,', '1,')]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    assert sorted(made) == [('student', 0), ('student', 1), ('teacher', 0)]


def test_a_json_write_that_fails_leaves_the_old_record(tmp_path, monkeypatch):
    from ppdistill import runs
    path = tmp_path / 'run.json'
    runs.write_json_atomic(str(path), {'stamp': 'old'})

    def torn(obj, f, **kwargs):  # e.g. the disk fills up half-way
        f.write('{"stamp": "ne')
        raise OSError('No space left on device')
    monkeypatch.setattr(runs.json, 'dump', torn)
    with pytest.raises(OSError):
        runs.write_json_atomic(str(path), {'stamp': 'new'})
    assert json.loads(path.read_text()) == {'stamp': 'old'} and os.listdir(tmp_path) == ['run.json']


def test_a_shipped_teacher_is_found_by_its_stamp_only(tmp_path):
    from ppdistill.runs import ship_teacher, shipped_teacher
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'model_final.pdparams').write_bytes(b'weights')
    base = ship_teacher(str(tmp_path / 'run' / 'model_final'), str(tmp_path / 'weights'), 'picodet',
                        {'stamp': 'abc', 'bbox': [0.5]})
    assert open(base + '.pdparams', 'rb').read() == b'weights'
    assert shipped_teacher(str(tmp_path / 'weights'), 'picodet', 'abc') == base
    assert shipped_teacher(str(tmp_path / 'weights'), 'picodet', 'other') is None
    assert sorted(os.listdir(tmp_path / 'weights')) == ['picodet_teacher.json', 'picodet_teacher.pdparams']


def test_a_redo_keeps_the_earlier_run_until_it_is_replaced(tmp_path, monkeypatch):
    benchmark = _benchmark_module()
    made = _fake_runs(benchmark, monkeypatch)
    base = ['accuracy', '--config_dir', TINY, '--methods', 'none', '--seeds', '0,', '--out', str(tmp_path)]
    benchmark.run_accuracy(benchmark.parse_args(base + ['-o', 'epoch=1']))
    student = tmp_path / 'runs' / 'picodet' / 'student' / 'seed0'
    first = json.loads((student / 'run.json').read_text())['stamp']
    benchmark.run_accuracy(benchmark.parse_args(base + ['-o', 'epoch=2']))  # new overrides: a new student run
    assert made.count(('student', 0)) == 2 and made.count(('teacher', 0)) == 1
    assert json.loads((student.parent / 'seed0.previous' / 'run.json').read_text())['stamp'] == first
    assert json.loads((student / 'run.json').read_text())['stamp'] != first


@pytest.mark.integration
def test_speed_benchmark_on_tiny_configs(work):
    out = run(['benchmark.py', 'speed', '--config_dir', TINY, '--methods', 'mgd,fgd', '--steps', '2',
               '--warmup', '1', '--out', 'speed_out'], work)
    assert 'smoke run' in out
    result = json.loads((work / 'speed_out' / 'speed_picodet.json').read_text())
    methods = result['timing']['methods']
    assert set(methods) == {'mgd', 'fgd'} and result['timing']['steps'] == 2
    assert result['command'] == ('python tools/benchmark.py speed --config_dir ' + TINY +
                                 ' --methods mgd,fgd --steps 2 --warmup 1 --out speed_out')
    for m, r in methods.items():
        assert r['limit_ms'] == pytest.approx(r['student_ms'] + r['teacher_ms'])
        assert r['ratio'] == pytest.approx(r['distill_ms'] / r['limit_ms'])
        assert r['overhead'] == pytest.approx(r['distill_ms'] / (r['limit_ms'] + r['loss_ms']))
    import yaml
    with open(os.path.join(ROOT, 'configs', 'slim', 'distill', 'fgd_picodet_teacher_to_student.yml')) as f:
        levels = yaml.safe_load(f)['FocalGlobalDistillModel'].get('levels') or [0, 1, 2]
    # ppdet's FGDFeatureLoss (the reference) divides a float by int32 tensors, which paddle 3 refuses
    reference = not paddle.__version__.startswith('3')
    assert [f['term'] for f in methods['fgd'].get('fgd_forward', [])] == ([f'fgd/l{i}' for i in levels]
                                                                           if reference else [])
    assert ("FGDFeatureLoss fails on paddle" in out) != reference
    assert 'fgd_forward' not in methods['mgd']
    assert set(result['memory']) == {'student', 'teacher', 'mgd', 'fgd'}
    assert all(v['above_import_mb'] > 0 for v in result['memory'].values())
    assert set(result['memory_check']) == {'mgd', 'fgd'}
    md = (work / 'speed_out' / 'speed_picodet.md').read_text()
    assert ('ppdet 2.6 FGDFeatureLoss' in md) == reference and '| mgd |' in md
    assert ('no FGD forward comparison' in md) != reference


def test_unknown_method_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'benchmark.py'), 'accuracy',
                           '--methods', 'mgd,nope'], cwd=str(tmp_path), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith('ppdistill: error:')]
    assert len(err) == 1 and "['nope']" in err[0] and 'mgd' in err[0] and 'Traceback' not in proc.stderr


# -- runs: progress and log parsing --------------------------------------------------------------------
LOG_LINE = ('[12/02 00:43:22] ppdet.engine INFO: Epoch: [1] [ 3/10] learning_rate: 0.040000 loss: 2.500000 '
            'loss_vfl: 1.000000 distill_fgd_l0: 0.250000 distill_loss: 0.500000 eta: 0:01:05 '
            'batch_cost: 0.5000 data_cost: 0.0100 ips: 8.0000 images/s')


def test_parse_train_log_and_eta():
    from ppdistill.runs import parse_train_log
    rows = parse_train_log('noise\n' + LOG_LINE + '\n' + LOG_LINE.replace('[ 3/10]', '[ 4/10]')
                           .replace('eta: 0:01:05', 'eta: 1 day, 2:00:01'))
    assert rows[0] == {'epoch': 1, 'step': 3, 'steps_per_epoch': 10, 'iter': 13, 'lr': 0.04, 'loss': 2.5,
                       'loss_vfl': 1.0, 'distill_fgd_l0': 0.25, 'distill_loss': 0.5}
    assert rows[1]['iter'] == 14


def test_run_tool_reports_eta_and_fails_with_the_log_tail(tmp_path, capsys):
    from ppdistill.runs import RunFailed, last_eta, run_tool
    script = tmp_path / 'job.py'
    script.write_text('import sys, time\n'
                      f'print({LOG_LINE!r}, flush=True)\n'
                      'time.sleep(1.5)\n'
                      'print("last words"); sys.exit(3)\n')
    with pytest.raises(RunFailed) as err:
        run_tool('job', [str(script)], str(tmp_path / 'job.log'), str(tmp_path), '[t]', poll=0.2)
    assert 'last words' in err.value.log_tail and 'exit 3' in str(err.value)
    out = capsys.readouterr().out
    assert '[t] job: running' in out and 'ETA 1m05s' in out and '[t] job: FAILED' in out
    assert last_eta(str(tmp_path / 'job.log')) == 65
    (tmp_path / 'day.log').write_text('eta: 1 day, 2:00:01 x')
    assert last_eta(str(tmp_path / 'day.log')) == 86400 + 7201


# -- gradients report ---------------------------------------------------------------------------------
def _student_grads(d, key, inputs):
    """Gradient of one loss on the student's parameters by a plain backward pass (independent of paddle.grad)."""
    for p in d.parameters():
        p.clear_gradient()
    d.train()
    d._teacher_forward(inputs)
    with d.student_taps.record():
        out = dict(d.student_model(inputs))
    terms = d.distill_terms(inputs)
    d.student_taps.clear()
    d.teacher_taps.clear()
    (out['loss'] if key == 'det' else terms[key]).backward()
    params = [p for p in d.student_model.parameters() if not p.stop_gradient]
    g = np.concatenate([(p.grad.numpy() if p.grad is not None else np.zeros(p.shape)).ravel() for p in params])
    return g.astype('float64'), float(out['loss']), float(terms.get(key, out['loss']))


@pytest.mark.parametrize('weight', [1.0, 3.0])
def test_term_gradients_match_backward_passes_and_scale_with_the_weight(weight):
    from ppdistill import Distiller
    from ppdistill.bench.gradients import term_gradients
    from toy_models import ToyDet, toy_inputs
    paddle.seed(7)
    losses = [{'type': 'MGDLoss', 'student': 'neck', 'teacher': 'neck', 'weight': weight,
               'args': {'lambda_mgd': 0.0, 'alpha_mgd': 0.01}}]
    d = Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                  teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0), losses=losses, probe_size=32)
    inputs = toy_inputs()
    got = term_gradients(d, inputs)
    assert set(got) == {'distill_mgd_l0', 'distill_mgd_l1', 'distill_loss'}
    g_det, det, _ = _student_grads(d, 'det', inputs)
    for key in ('distill_mgd_l0', 'distill_mgd_l1'):
        g, _, value = _student_grads(d, key, inputs)
        assert got[key]['ratio'] == pytest.approx(value / det, rel=1e-5)
        assert got[key]['grad_ratio'] == pytest.approx(np.linalg.norm(g) / np.linalg.norm(g_det), rel=1e-4)
        cos = g @ g_det / (np.linalg.norm(g) * np.linalg.norm(g_det))
        assert got[key]['cos'] == pytest.approx(cos, abs=1e-5)
        # the detection loss's first-order descent left by an SGD step and by AdamW's first step
        # (lr * g / (|g| + eps) per element: the sign) along the summed gradient
        assert got[key]['sgd_keep'] == pytest.approx((g_det + g) @ g_det / (g_det @ g_det), rel=1e-4)
        assert got[key]['adam_keep'] == pytest.approx(np.sign(g_det + g) @ g_det / np.abs(g_det).sum(), abs=1e-4)
    if weight == 1.0:  # the weight scales value and gradient, never the direction
        paddle.seed(7)
        d3 = Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                       teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0),
                       losses=[dict(losses[0], weight=3.0)], probe_size=32)
        got3 = term_gradients(d3, inputs)
        for key in got:
            assert got3[key]['grad_ratio'] == pytest.approx(3 * got[key]['grad_ratio'], rel=1e-4)
            assert got3[key]['cos'] == pytest.approx(got[key]['cos'], abs=1e-5)
            # a stronger term can only flip more of AdamW's per-element steps away from the task's
            assert got3[key]['adam_keep'] <= got[key]['adam_keep'] + 1e-9


def test_gradient_summary_takes_medians_and_counts_negative_cosines():
    from ppdistill.bench.gradients import summarise
    batches = [{'t': {'ratio': r, 'grad_ratio': g, 'cos': c, 'adam_keep': k}} for r, g, c, k in
               [(1.0, 0.1, -0.5, 0.9), (2.0, 0.3, 0.2, 0.5), (4.0, 0.2, -0.1, 0.7)]]
    assert summarise(batches) == {'t': {'ratio': 2.0, 'grad_ratio': 0.2, 'cos': -0.1, 'adam_keep': 0.7,
                                        'cos_negative': 2 / 3}}


@pytest.mark.integration
def test_gradients_report_on_tiny_configs(work, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'benchmark.py'), 'gradients',
                           '--config_dir', TINY, '--methods', 'mgd', '--steps', '1'], cwd=str(work), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    # no shipped teacher for the tiny pair: a one-line error saying what to pass
    assert proc.returncode != 0 and 'pass --teacher_weights' in proc.stdout and 'Traceback' not in proc.stdout
    teacher = tmp_path / 'teacher'
    subprocess.run([sys.executable, '-c', 'import ppdistill, paddle; from ppdet.core.workspace import '
                    f'load_config, create; cfg = load_config("{TINY}/picodet_teacher.yml"); '
                    f'paddle.save(create(cfg.architecture).state_dict(), "{teacher}.pdparams")'],
                   check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    run(['benchmark.py', 'gradients', '--config_dir', TINY, '--methods', 'mgd,fgd', '--steps', '2',
         '--teacher_weights', str(teacher), '--out', 'grad_out'], work)
    result = json.loads((work / 'grad_out' / 'gradients_picodet.json').read_text())
    assert result['batches'] == 2 and set(result['methods']) == {'mgd', 'fgd'}
    fgd = result['methods']['fgd']
    assert {'distill_fgd_l0', 'distill_fgd_l0_fg', 'distill_fgd_l0_rela', 'distill_loss'} <= set(fgd)
    for terms in result['methods'].values():
        for v in terms.values():
            assert -1.0 <= v['cos'] <= 1.0 and v['grad_ratio'] >= 0 and 0 <= v['cos_negative'] <= 1
    assert '| `distill_fgd_l0_fg` |' in (work / 'grad_out' / 'gradients_picodet.md').read_text()
    # a method's numbers do not depend on the methods measured before it (MGD draws random masks)
    run(['benchmark.py', 'gradients', '--config_dir', TINY, '--methods', 'fgd,mgd', '--steps', '2',
         '--teacher_weights', str(teacher), '--out', 'grad_out2'], work)
    again = json.loads((work / 'grad_out2' / 'gradients_picodet.json').read_text())
    assert again['methods']['mgd'] == result['methods']['mgd']


def test_stamps_follow_code_not_its_docstrings_or_comments(tmp_path):
    """Editing a docstring or comment in ppdistill used to change every distilled run's stamp (the files'
    bytes were hashed), so the benchmark retrained finished runs; a code edit must still change it."""
    from ppdistill import runs
    source = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    path = tmp_path / 'mod.py'
    path.write_text(source)
    before = runs.stamp([str(path)])
    path.write_text('"""Module doc."""\n# why\ndef f(x):\n    """Other doc,\n    two lines."""\n    return x + 1  # note\n')
    assert runs.stamp([str(path)]) == before
    path.write_text(source.replace('x + 1', 'x + 2'))
    assert runs.stamp([str(path)]) != before
    path.write_text('def f(x):\n    """Doc."""\n')          # a function that is only a docstring
    assert runs.stamp([str(path)]) != before
    files = [os.path.relpath(f, ROOT) for f in runs.training_source_files()]
    assert 'ppdistill/runs.py' not in files             # the tools' bookkeeping
    assert {'ppdistill/distiller.py', 'ppdistill/losses/mgd.py', 'ppdistill/tools/train.py'} <= set(files)


def test_speed_summary_reads_ratios_step_by_step():
    """The per-step quartiles of distill/limit come from each step's own variants, so a load swing that
    slows a whole step (here 3x on step 2) leaves them where the work puts them."""
    from ppdistill.bench.speed import markdown, summarise
    load = np.array([1.0, 1.0, 3.0, 1.0, 1.2])
    times = {'student[m]': list(0.5 * load), 'teacher[m]': list(0.25 * load),
             'distill[m]': list(np.array([0.80, 0.78, 0.76, 0.82, 0.79]) * load),
             'loss[m]': list(0.05 * load)}
    row = summarise(times, ['m'])['methods']['m']
    per_step = np.array([0.80, 0.78, 0.76, 0.82, 0.79]) / 0.75
    assert row['ratio_q'] == pytest.approx(list(np.percentile(per_step, [25, 50, 75])))
    assert row['overhead_q'] == pytest.approx(list(np.percentile(per_step * 0.75 / 0.80, [25, 50, 75])))
    assert row['ratio'] == pytest.approx(np.median(times['distill[m]']) / (0.75 * np.median(load)))
    result = {'arch': 'a', 'date': 'd', 'command': 'c', 'device': 'cpu', 'warmup': 0,
              'timing': summarise(times, ['m'])}
    q = row['ratio_q']
    assert f"{row['ratio']:.3f} [{q[0]:.3f}–{q[2]:.3f}]" in markdown(result)


def test_speed_summary_without_the_ppdet_fgd_reference_says_so():
    """Where ppdet's FGDFeatureLoss cannot run (paddle 3) only our FGD forward is timed: no comparison row,
    and the report says why instead of failing."""
    from ppdistill.bench.speed import markdown, summarise
    times = {'student[m]': [0.5], 'teacher[m]': [0.25], 'distill[m]': [0.8], 'loss[m]': [0.05],
             'fgd_ours[m/l0]': [0.01]}
    timing = summarise(times, ['m'])
    assert 'fgd_forward' not in timing['methods']['m']
    md = markdown({'arch': 'a', 'date': 'd', 'command': 'c', 'device': 'cpu', 'warmup': 0, 'timing': timing,
                   'raw_seconds': times})
    assert 'no FGD forward comparison' in md and 'FGDFeatureLoss |' not in md
    times['fgd_ppdet[m/l0]'] = [0.03]
    assert summarise(times, ['m'])['methods']['m']['fgd_forward'] == [
        {'term': 'm/l0', 'ours_ms': pytest.approx(10.0), 'ppdet_ms': pytest.approx(30.0),
         'speedup': pytest.approx(3.0)}]


def test_benchmark_records_under_docs_are_kept_and_weights_are_not():
    """A report made with ``--out docs/experiments/<name>`` is committed with its runs' records, so a
    later call (another machine, more seeds) reuses them; weights, detections and locks stay out."""
    if not os.path.isdir(os.path.join(ROOT, '.git')):
        pytest.skip('not a git checkout')
    run = 'docs/experiments/x/runs/picodet/mgd/seed0'
    paths = {f'{run}/run.json': False, f'{run}/train.log': False, f'{run}/eval.log': False,
             f'{run}/metrics.json': False, f'{run}/bbox.json': True, f'{run}/cfg/model_final.pdparams': True,
             f'{run}/cfg/model_final.pdopt': True, f'{run}/cfg/0.pdema': True,
             f'{run}/cfg/model_final.pddistill': True,
             'docs/experiments/x/runs/picodet/mgd/seed0.lock': True,
             'docs/experiments/x/runs/picodet/mgd/seed0.previous/run.json': True}
    out = subprocess.run(['git', 'check-ignore', '--no-index', '--stdin'], cwd=ROOT, input='\n'.join(paths),
                         capture_output=True, text=True).stdout.split()
    assert {p: p in out for p in paths} == paths


def test_teacher_subcommand_runs_the_teacher_alone(tmp_path, monkeypatch, capsys):
    """``benchmark.py teacher`` stopped before training with "--seeds '0': need at least one seed": it
    planned its (unused) student seeds as the count 0."""
    benchmark = _benchmark_module()
    made = _fake_runs(benchmark, monkeypatch)
    record = benchmark.run_teacher(benchmark.parse_args(['teacher', '--config_dir', TINY, '--out', str(tmp_path)]))
    assert made == [('teacher', 0)] and record['row'] == 'teacher'
    assert 'teacher picodet: AP 0.100' in capsys.readouterr().out
    benchmark.run_teacher(benchmark.parse_args(['teacher', '--config_dir', TINY, '--out', str(tmp_path)]))
    assert made == [('teacher', 0)]  # finished: reused

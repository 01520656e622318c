"""Benchmark: seed statistics against hand-computed and scipy references, no host synchronisation inside
the losses (static and at run time), and ``tools/benchmark.py accuracy``/``speed`` on the tiny configs."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import ast
import glob
import json
import math
import os
import subprocess
import types
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
    from ppdistill.bench.results import first_step, same_start
    step0 = {'epoch': 0, 'step': 0, 'iter': 0, 'lr': 0.004, 'loss_vfl': 1.009536, 'loss_bbox': 1.746961}
    student = first_step([dict(step0, loss=2.756497, det_loss=2.756497)])
    same = first_step([dict(step0, loss=3.116497, det_loss=2.756497, distill_mgd_l0=0.36, distill_loss=0.36)])
    other = first_step([dict(step0, loss_vfl=1.788019, loss=3.53498, det_loss=3.53498)])
    later = first_step([dict(step0, step=20, iter=20, loss=2.756497)])
    assert student == {'loss_vfl': 1.009536, 'loss_bbox': 1.746961} == same
    assert same_start(student, same) is True
    assert same_start(student, other) is False
    assert later == {} and same_start(student, later) is False and same_start(student, None) is False
    # a run recorded from ppdet's log text (6 decimals) pairs with a train_log.jsonl run of the same start
    full = first_step([dict(step0, loss_vfl=1.0095356702804565, loss_bbox=1.7469613552093506)])
    assert same_start(student, full) is True and same_start(full, student) is True
    # the same seed in two distill runs: a few float32 ulps apart, on both sides of a 6-decimal rounding
    # boundary (rounded, 1.009535 != 1.009536 split them and the table fell back to Welch)
    ulps = first_step([dict(step0, loss_vfl=1.009535312652588, loss_bbox=1.7469613552093506)])
    assert same_start(student, ulps) is True and same_start(full, ulps) is True
    # another seed's first step (seed 1 of the demo student) or a visibly different loss does not pair
    assert same_start(full, first_step([dict(step0, loss_vfl=1.011158, loss_bbox=1.748532)])) is False
    assert same_start(full, first_step([dict(step0, loss_vfl=1.0096356702804565, loss_bbox=1.7469613552093506)])) is False


# -- no host synchronisation inside the losses ---------------------------------------------------------
LOSS_FILES = sorted(glob.glob(os.path.join(ROOT, 'ppdistill', 'losses', '*.py'))) + \
    [os.path.join(ROOT, 'ppdistill', 'masks.py')]
SYNC_METHODS = {'numpy', 'item', 'tolist'}
SCALAR_CASTS = {'float', 'int', 'bool'}
# Host reads that are deliberate and bounded, by function: masks.check_pixel_boxes reads the first batch
# with boxes once per process (normalised-box guard), then returns before any read on every later step.
ONE_TIME_SYNC_FUNCTIONS = {'check_pixel_boxes'}
# Host algorithms by function: HungarianKDLoss.match solves the assignment with scipy on the detached costs
# (one read per decoder layer pair and step, as ppdet's own HungarianMatcher).
HOST_ALGORITHM_FUNCTIONS = {'match'}


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
        if func.name == '__init__' or func.name in ONE_TIME_SYNC_FUNCTIONS | HOST_ALGORITHM_FUNCTIONS:
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
    # the one-time normalised-box guard reads the first batch with boxes (then never again): done before spying
    from ppdistill.masks import check_pixel_boxes
    check_pixel_boxes(inputs['gt_bbox'], inputs['pad_gt_mask'][..., 0] > 0, [48, 48])
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


def _checkout(tmp_path):
    """A copy of the code and configs (no git, docs or weights), run as a user runs a checkout's tools."""
    import shutil
    copy = tmp_path / 'checkout'
    ignore = shutil.ignore_patterns('__pycache__', 'weights', '*.pdparams')
    for name in ('ppdistill', 'tools', 'configs'):
        shutil.copytree(os.path.join(ROOT, name), copy / name, ignore=ignore)
    return copy


@pytest.mark.integration
def test_accuracy_table_records_reprints_adds_seeds_and_refuses_config_changes(work, tmp_path):
    """One results file per table: the first call trains and records every run; the same command reprints
    the table without training, also after an unrelated code edit; more seeds train only those; a config
    change stops the tool before training."""
    from ppdistill.bench.results import load_results, table_summary
    code = _checkout(tmp_path)
    tiny = str(code / 'configs' / 'demo' / 'tiny')

    def bench(*extra, ok=True):
        cmd = [sys.executable, str(code / 'tools' / 'benchmark.py'), 'accuracy', '--config_dir', tiny,
               '--methods', 'fgd', '--out', 'tab', '-o', 'log_iter=1'] + list(extra)
        proc = subprocess.run(cmd, cwd=str(work), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=1200)
        assert (proc.returncode == 0) == ok, proc.stdout[-5000:]
        return proc.stdout
    out = bench('--seeds', '1')
    assert out.count('train: done') == 3 and out.count('eval: done') == 3  # teacher, student, fgd
    tab = work / 'tab'
    results = load_results(str(tab / 'accuracy_picodet.json'))
    assert results['table']['seeds'] == [0] and results['table']['rows'] == ['teacher', 'student', 'fgd']
    assert results['settings'] == {'overrides': ['log_iter=1'], 'teacher_overrides': [], 'teacher_seed': 0}
    student_cfg, key = os.path.join(tiny, 'picodet_student.yml'), 'configs/demo/tiny/picodet_student.yml'
    assert results['configs'][key] == open(student_cfg).read()
    assert results['runs']['fgd']['0']['paddle'] == paddle.__version__
    steps = [json.loads(line) for line in
             open(tab / 'runs' / 'picodet' / 'fgd' / 'seed0' / 'fgd_picodet_teacher_to_student' / 'train_log.jsonl')]
    balance = results['runs']['fgd']['0']['losses']['balance']
    first = steps[0]['balance']['ratios']
    assert balance['terms']['distill_fgd_l0_fg']['start'] == first['distill_fgd_l0_fg']
    assert first['distill_loss'] == pytest.approx(steps[0]['distill_loss'] / steps[0]['det_loss'])
    md = (tab / 'accuracy_picodet.md').read_text()

    # the same command reprints the table from the records, without training, to the byte
    (tab / 'accuracy_picodet.md').unlink()
    again = bench('--seeds', '1')
    assert 'reusing 3 recorded runs' in again and 'train: done' not in again and 'eval: done' not in again
    assert (tab / 'accuracy_picodet.md').read_text() == md
    # an unrelated code edit (a new loss file, a log message) keeps every recorded run
    (code / 'ppdistill' / 'losses' / 'unrelated.py').write_text('X = 1\n')
    trainer = code / 'ppdistill' / 'trainer.py'
    trainer.write_text(trainer.read_text().replace("'Cross-rank check: ", "'Cross-rank check passed: "))
    assert 'train: done' not in bench('--seeds', '1')
    # a second seed trains only its two runs
    more = bench('--seeds', '2')
    assert 'reusing 3 recorded runs' in more and more.count('train: done') == 2
    for name in ('accuracy_picodet.md', 'accuracy_picodet.json', 'accuracy_picodet.png', 'losses_picodet.png'):
        assert (tab / name).stat().st_size > 0, name
    results = load_results(str(tab / 'accuracy_picodet.json'))
    assert sorted(results['runs']['fgd']) == ['0', '1'] and results['table']['seeds'] == [0, 1]
    for row, seeds in results['runs'].items():
        for seed, rec in seeds.items():
            run_dir = tab / 'runs' / 'picodet' / row / f'seed{seed}'
            assert rec['bbox'] == json.loads((run_dir / 'metrics.json').read_text())['bbox']
            # every evaluation writes its detections into its own run directory: two benchmark calls
            # side by side (disjoint --seeds) once overwrote each other's output/bbox.json
            assert (run_dir / 'bbox.json').stat().st_size > 0
    assert not (work / 'output' / 'bbox.json').exists()
    rows = {r['row']: r for r in table_summary(results, ['teacher', 'student', 'fgd'], [0, 1])}
    assert rows['fgd']['test'] == 'paired'  # same seed: same initial weights and first batch
    assert rows['student']['mean']['AP'] == pytest.approx(np.mean([results['runs']['student'][s]['bbox'][0]
                                                                   for s in ('0', '1')]))
    md = (tab / 'accuracy_picodet.md').read_text()
    assert 'seeds: [0, 1]' in md and "--seeds 2" in md and '| fgd | 2 |' in md
    # a changed config: one line before any training, the records untouched
    with open(student_cfg, 'a') as f:
        f.write('snapshot_epoch: 1\n')
    refused = bench('--seeds', '2', ok=False)
    assert 'train: done' not in refused and 'Traceback' not in refused
    error = [ln for ln in refused.splitlines() if ln.startswith('ppdistill: error:')]
    assert len(error) == 1 and key in error[0] and '--rerun' in error[0]
    assert load_results(str(tab / 'accuracy_picodet.json')) == results


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


def test_the_head_kd_pairs_are_benchmark_archs():
    """--arch gfl / ppyoloe find their demo pair and their distill configs by name (no CrossKD for
    PP-YOLOE: its head has no valid cut)."""
    benchmark = _benchmark_module()
    from ppdistill.runs import discover_archs
    assert {'gfl', 'ppyoloe', 'picodet'} <= set(discover_archs(os.path.join(ROOT, 'configs', 'demo')))
    for arch, methods in (('gfl', ['bckd', 'crosskd', 'ld']), ('ppyoloe', ['bckd', 'fgd', 'ld'])):
        teacher, student, found = benchmark.resolve_pair(benchmark.parse_args(['speed', '--arch', arch]))
        assert (teacher, student) == tuple(os.path.join(ROOT, 'configs', 'demo', f'{arch}_{side}.yml')
                                           for side in ('teacher', 'student'))
        assert sorted(found) == methods


def test_run_inputs_follow_what_decides_each_run(tmp_path):
    benchmark = _benchmark_module()
    from ppdistill.runs import changed_inputs

    def plan(*extra):
        return benchmark.Plan(benchmark.parse_args(['accuracy', '--config_dir', TINY, '--methods', 'fgd']
                                                   + list(extra)))
    base, other_opt, other_teacher = plan('-o', 'epoch=1'), plan('-o', 'epoch=2'), \
        plan('-o', 'epoch=1', '--teacher_opt', 'epoch=3')
    assert changed_inputs(base.inputs('student'), other_opt.inputs('student')) == ['overrides']
    assert changed_inputs(base.inputs('teacher'), other_opt.inputs('teacher')) == []      # not the teacher's
    assert changed_inputs(base.inputs('teacher'), other_teacher.inputs('teacher')) == ['teacher_overrides']
    assert changed_inputs(base.inputs('fgd'), other_teacher.inputs('fgd')) == ['teacher_overrides']  # new teacher
    assert changed_inputs(base.inputs('student'), other_teacher.inputs('student')) == []  # same plain student
    fgd = base.inputs('fgd')
    key = os.path.relpath(os.path.join(TINY, 'picodet_student.yml'), ROOT)  # repository-relative
    assert fgd[key] == open(os.path.join(TINY, 'picodet_student.yml')).read()
    assert any(k.endswith('fgd_picodet_teacher_to_student.yml') for k in fgd)
    assert set(base.inputs('student')) < set(fgd) and set(base.inputs('teacher')) < set(fgd)
    # another student recipe keeps the teacher
    longer = tmp_path / 'picodet_student_long.yml'
    longer.write_text(f"_BASE_: ['{os.path.join(TINY, 'picodet_student.yml')}']\nepoch: 2\n")
    other = plan('--student_config', str(longer))
    assert other.student_cfg == str(longer) and other.teacher_cfg == base.teacher_cfg
    assert other.inputs('teacher') == plan().inputs('teacher')
    assert changed_inputs(plan().inputs('student'), other.inputs('student')) == [str(longer)]
    with pytest.raises(benchmark.PPDistillError, match='--student_config'):
        plan('--student_config', str(tmp_path / 'missing.yml'))


def test_a_config_edited_only_in_comment_lines_keeps_its_recorded_runs():
    """Rewording a config's header made every recorded run of it unusable (raw text compared); blank and
    whole-line comment lines no longer count, values and trailing text still do."""
    from ppdistill.runs import changed_inputs
    cfg = '# LD recipe\nslim: Distiller\nlosses:\n- type: LDLoss\n  weight: 0.75  # measured\n'
    recorded = {'a.yml': cfg, 'overrides': []}
    reworded = '# LD, main region only\n# (why: docs)\n\nslim: Distiller\nlosses:\n  # the loss\n' \
        '- type: LDLoss\n  weight: 0.75  # measured\n'
    assert changed_inputs(recorded, {'a.yml': reworded, 'overrides': []}) == []
    assert changed_inputs(recorded, {'a.yml': cfg.replace('0.75', '0.5'), 'overrides': []}) == ['a.yml']
    assert changed_inputs(recorded, {'a.yml': cfg.replace('# measured', '# set'), 'overrides': []}) == ['a.yml']
    assert changed_inputs(recorded, {'a.yml': cfg, 'overrides': ['epoch=2']}) == ['overrides']


def _fake_runs(benchmark, monkeypatch) -> list:
    """Replace training + evaluation with a run record made after a pause; return the list of runs made."""
    import time
    made = []

    def run_one(plan, row, seed, results, prefix):
        made.append((row, seed))
        time.sleep(0.5)  # a call side by side looks for the same run meanwhile
        return {'bbox': [0.1 + seed / 10] * 12, 'params': 1, 'seconds': 1.0, 'shipped': False, 'commit': 'c',
                'finished': time.time(), 'losses': {'first_step': {}}}
    monkeypatch.setattr(benchmark, '_run_one', run_one)
    monkeypatch.setattr(benchmark, '_demo_data', lambda args: None)
    monkeypatch.setattr(benchmark, 'write_accuracy_report', lambda plan, results, summary, name='': summary)
    return made


def test_a_named_table_leaves_the_main_table_and_its_report_as_they_are(tmp_path, monkeypatch, capsys):
    """A call with other methods on a committed --out rewrote the main accuracy_<arch>.md/.png and the
    results file's table; --table NAME records and prints its own, and without it the tool says it
    replaces the recorded table."""
    from ppdistill.bench.results import load_results
    benchmark = _benchmark_module()
    real_report = benchmark.write_accuracy_report
    _fake_runs(benchmark, monkeypatch)
    monkeypatch.setattr(benchmark, 'write_accuracy_report', real_report)

    def bench(*extra):
        words = ['accuracy', '--config_dir', TINY, '--out', str(tmp_path), '--seeds', '2'] + list(extra)
        monkeypatch.setattr(sys, 'argv', ['tools/benchmark.py'] + words)  # the recorded command
        return benchmark.run_accuracy(benchmark.parse_args(words))
    bench('--methods', 'fgd')
    weights = tmp_path / 'runs' / 'picodet' / 'teacher' / 'seed0' / 'picodet_teacher'
    weights.mkdir(parents=True)
    (weights / 'model_final.pdparams').write_bytes(b'')  # the faked teacher run's file, for the new runs
    main_md = (tmp_path / 'accuracy_picodet.md').read_text()
    main_png = (tmp_path / 'accuracy_picodet.png').read_bytes()
    main_table = load_results(str(tmp_path / 'accuracy_picodet.json'))['table']
    bench('--methods', 'mgd', '--table', 'other')
    results = load_results(str(tmp_path / 'accuracy_picodet.json'))
    assert results['table'] == main_table
    assert results['tables']['other']['rows'] == ['teacher', 'student', 'mgd']
    assert '--table other' in results['tables']['other']['command']
    assert (tmp_path / 'accuracy_picodet.md').read_text() == main_md
    assert (tmp_path / 'accuracy_picodet.png').read_bytes() == main_png
    other = (tmp_path / 'accuracy_picodet_other.md').read_text()
    assert '| mgd |' in other and '| fgd |' not in other
    assert (tmp_path / 'accuracy_picodet_other.png').stat().st_size > 0
    capsys.readouterr()
    bench('--methods', 'mgd')  # no training (recorded), but the main table changes: said so
    assert 'replaces the one recorded' in capsys.readouterr().out
    assert load_results(str(tmp_path / 'accuracy_picodet.json'))['table']['rows'] == ['teacher', 'student', 'mgd']
    with pytest.raises(SystemExit):
        benchmark.parse_args(['accuracy', '--table', '../x'])


def test_a_run_records_the_commit_it_started_with(tmp_path, monkeypatch):
    """A long run whose checkout moves on while it trains records the code it was started with."""
    import ppdistill.runs as runs
    benchmark = _benchmark_module()
    checkout = {'commit': 'started'}
    monkeypatch.setattr(runs, 'provenance', lambda: dict(checkout, paddle='p', ppdet='d'))
    monkeypatch.setattr(runs, 'param_count', lambda weights: 1)

    def fake_tool(name, args, log, cwd, prefix='[run]', expected=None, **kwargs):
        checkout['commit'] = 'moved on'  # e.g. a pull or a commit while the run trains
        with open(os.path.join(os.path.dirname(log), 'metrics.json'), 'w') as f:
            json.dump({'bbox': [0.5] * 12}, f)
        return 1.0
    monkeypatch.setattr(benchmark, 'run_tool', fake_tool)
    plan = types.SimpleNamespace(run_dir=lambda row, seed: str(tmp_path / row / str(seed)), shipped=False,
                                 train_args=lambda *a: [], eval_args=lambda *a: [], methods=[],
                                 weights=lambda row, seed: str(tmp_path / row / str(seed) / 'model_final'))
    record = benchmark._run_one(plan, 'student', 0, None, '[t]')
    assert record['commit'] == 'started' and record['bbox'] == [0.5] * 12


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


def test_two_calls_side_by_side_write_the_demo_data_one_after_the_other(tmp_path, monkeypatch):
    """On a fresh machine both calls find no dataset: writing it at once, one died on a half-made folder.
    The fake data step records when it runs; the two must not overlap."""
    import threading
    import time
    benchmark = _benchmark_module()
    spans = []

    def fake_run_tool(name, args, log, cwd, prefix='[run]', **kwargs):
        start = time.monotonic()
        time.sleep(0.3)
        spans.append((start, time.monotonic()))
        return 0.3
    monkeypatch.setattr(benchmark, 'run_tool', fake_run_tool)
    monkeypatch.chdir(tmp_path)
    args = benchmark.parse_args(['accuracy', '--out', str(tmp_path / 'out')])
    calls = [threading.Thread(target=benchmark._demo_data, args=(args,)) for _ in range(2)]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    (a0, a1), (b0, b1) = sorted(spans)
    assert len(spans) == 2 and a1 <= b0, spans


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


def test_a_shipped_teacher_is_found_by_its_inputs_only(tmp_path):
    from ppdistill.runs import ship_teacher, shipped_teacher
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'model_final.pdparams').write_bytes(b'weights')
    inputs = {'a.yml': 'epoch: 1\n', 'teacher_seed': 0}
    base = ship_teacher(str(tmp_path / 'run' / 'model_final'), str(tmp_path / 'weights'), 'picodet',
                        {'inputs': inputs, 'bbox': [0.5]})
    assert open(base + '.pdparams', 'rb').read() == b'weights'
    assert shipped_teacher(str(tmp_path / 'weights'), 'picodet', inputs) == base
    assert shipped_teacher(str(tmp_path / 'weights'), 'picodet', dict(inputs, teacher_seed=1)) is None
    assert shipped_teacher(str(tmp_path / 'weights'), 'picodet', dict(inputs, **{'a.yml': 'epoch: 2\n'})) is None
    assert sorted(os.listdir(tmp_path / 'weights')) == ['picodet_teacher.json', 'picodet_teacher.pdparams']


def test_the_shipped_demo_teacher_matches_its_configs():
    """The demo and the benchmark use the shipped PicoDet teacher only while its configs are unchanged."""
    from ppdistill.runs import WEIGHTS_DIR, run_inputs, shipped_teacher
    inputs = run_inputs('teacher', ROOT, os.path.join(ROOT, 'configs', 'demo', 'picodet_teacher.yml'))
    assert shipped_teacher(os.path.join(ROOT, WEIGHTS_DIR), 'picodet', inputs)


def test_a_config_change_is_refused_and_rerun_starts_the_table_afresh(tmp_path, monkeypatch):
    """A table never mixes runs of different configs: other overrides or another config text with recorded
    runs stop the tool before any run (one line naming what changed); ``--rerun`` drops the recorded runs
    and trains the requested ones again."""
    from ppdistill.bench.results import load_results
    benchmark = _benchmark_module()
    made = _fake_runs(benchmark, monkeypatch)
    student = tmp_path / 'student.yml'
    student.write_text(f"_BASE_: ['{os.path.join(TINY, 'picodet_student.yml')}']\nepoch: 1\n")
    base = ['accuracy', '--config_dir', TINY, '--methods', 'none', '--student_config', str(student),
            '--out', str(tmp_path / 'out')]
    benchmark.run_accuracy(benchmark.parse_args(base + ['--seeds', '2']))
    assert sorted(made) == [('student', 0), ('student', 1), ('teacher', 0)]
    results = tmp_path / 'out' / 'accuracy_picodet.json'
    recorded = load_results(str(results))
    with pytest.raises(benchmark.PPDistillError, match=r'records runs of student made with other .*\(overrides\)'):
        benchmark.run_accuracy(benchmark.parse_args(base + ['--seeds', '2', '-o', 'epoch=2']))
    student.write_text(student.read_text().replace('epoch: 1', 'epoch: 3'))
    with pytest.raises(benchmark.PPDistillError, match=f'{student}.*--rerun'):
        benchmark.run_accuracy(benchmark.parse_args(base + ['--seeds', '3']))
    assert len(made) == 3 and load_results(str(results)) == recorded   # nothing run, nothing written
    benchmark.run_accuracy(benchmark.parse_args(base + ['--seeds', '1,', '--rerun']))
    assert made[3:] == [('teacher', 0), ('student', 1)]
    now = load_results(str(results))
    assert sorted(now['runs']['student']) == ['1']          # seed 0 of the old configs is gone
    assert now['configs'][str(student)].endswith('epoch: 3\n')


def test_rerun_retrains_recorded_runs_of_unchanged_configs(tmp_path, monkeypatch):
    benchmark = _benchmark_module()
    made = _fake_runs(benchmark, monkeypatch)
    base = ['accuracy', '--config_dir', TINY, '--methods', 'none', '--seeds', '0,', '--out', str(tmp_path)]
    benchmark.run_accuracy(benchmark.parse_args(base))
    benchmark.run_accuracy(benchmark.parse_args(base))                 # reused
    benchmark.run_accuracy(benchmark.parse_args(base + ['--retrain_teacher']))
    benchmark.run_accuracy(benchmark.parse_args(base + ['--rerun']))
    assert made == [('teacher', 0), ('student', 0), ('teacher', 0), ('teacher', 0), ('student', 0)]


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
    """Gradient of one loss on the student's parameters by a plain backward pass (independent of paddle.grad
    and of Distiller.inspect): a term from the training forward's outputs, ``det`` from the student alone."""
    for p in d.parameters():
        p.clear_gradient()
    d.train()
    value = d.student_model(inputs)['loss'] if key == 'det' else d(inputs)[key]
    value.backward()
    params = [p for p in d.student_model.parameters() if not p.stop_gradient]
    g = np.concatenate([(p.grad.numpy() if p.grad is not None else np.zeros(p.shape)).ravel() for p in params])
    return g.astype('float64'), float(value)


@pytest.mark.parametrize('weight', [1.0, 3.0])
def test_term_gradients_match_backward_passes_and_scale_with_the_weight(weight):
    from ppdistill import Distiller
    from ppdistill.bench.gradients import group_masks, term_gradients
    from toy_models import ToyDet, toy_inputs
    paddle.seed(7)
    losses = [{'type': 'MGDLoss', 'student': 'neck', 'teacher': 'neck', 'weight': weight,
               'args': {'lambda_mgd': 0.0, 'alpha_mgd': 0.01}}]
    d = Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                  teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0), losses=losses, probe_size=32)
    inputs = toy_inputs()
    got = term_gradients(d, inputs)
    assert set(got) == {'distill_mgd_l0', 'distill_mgd_l1', 'distill_loss'}
    g_det, det = _student_grads(d, 'det', inputs)
    for key in ('distill_mgd_l0', 'distill_mgd_l1'):
        g, value = _student_grads(d, key, inputs)
        assert got[key]['ratio'] == pytest.approx(value / det, rel=1e-5)
        assert got[key]['grad_ratio'] == pytest.approx(np.linalg.norm(g) / np.linalg.norm(g_det), rel=1e-4)
        cos = g @ g_det / (np.linalg.norm(g) * np.linalg.norm(g_det))
        assert got[key]['cos'] == pytest.approx(cos, abs=1e-5)
        # the detection loss's first-order descent left by an SGD step and by AdamW's first step
        # (lr * g / (|g| + eps) per element: the sign) along the summed gradient
        assert got[key]['sgd_keep'] == pytest.approx((g_det + g) @ g_det / (g_det @ g_det), rel=1e-4)
        assert got[key]['adam_keep'] == pytest.approx(np.sign(g_det + g) @ g_det / np.abs(g_det).sum(), abs=1e-4)
    # --groups: the same ratio and cosine within one sublayer's parameters (the MGD neck loss reaches the
    # backbone and the neck, never the head)
    from ppdistill.errors import PPDistillError
    masks = group_masks(d, ['backbone', 'neck', 'head'])
    grouped = term_gradients(d, inputs, masks)
    names = [n for n, p in d.student_model.named_parameters() if not p.stop_gradient]
    sizes = [int(np.prod(p.shape)) for p in d.student_model.parameters() if not p.stop_gradient]
    g, _ = _student_grads(d, 'distill_mgd_l0', inputs)
    for group in ('backbone', 'neck'):
        inside = np.repeat([n.startswith(group + '.') for n in names], sizes)
        assert inside.any() and not inside.all()
        assert grouped['distill_mgd_l0'][f'grad_ratio@{group}'] == pytest.approx(
            np.linalg.norm(g[inside]) / np.linalg.norm(g_det[inside]), rel=1e-4)
        assert grouped['distill_mgd_l0'][f'cos@{group}'] == pytest.approx(
            g[inside] @ g_det[inside] / (np.linalg.norm(g[inside]) * np.linalg.norm(g_det[inside])), abs=1e-5)
    assert grouped['distill_mgd_l0']['grad_ratio@head'] == 0.0
    # --against: the cosine with one of the student's own loss terms' gradient (the toy's only term is
    # its loss, so it equals the cosine with the detection loss)
    against = term_gradients(d, inputs, against=['loss'])
    assert against['distill_mgd_l0']['cos~loss'] == pytest.approx(got['distill_mgd_l0']['cos'], abs=1e-6)
    with pytest.raises(PPDistillError, match=r"no \['loss_vfl'\]"):
        term_gradients(d, inputs, against=['loss_vfl'])
    with pytest.raises(PPDistillError, match="no student parameter under .heads."):
        group_masks(d, ['heads'])
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
    """A table made with ``--out docs/experiments/<name>`` is committed with its results file and each run's
    metrics and logs, so a later call (another machine, more seeds) reuses them; weights, detections,
    per-step loss files and locks stay out."""
    if not os.path.exists(os.path.join(ROOT, '.git')):
        pytest.skip('not a git checkout')
    run = 'docs/experiments/x/runs/picodet/mgd/seed0'
    paths = {'docs/experiments/x/accuracy_picodet.json': False, f'{run}/train.log': False, f'{run}/eval.log': False,
             f'{run}/metrics.json': False, f'{run}/bbox.json': True, f'{run}/cfg/model_final.pdparams': True,
             f'{run}/cfg/model_final.pdopt': True, f'{run}/cfg/0.pdema': True,
             f'{run}/cfg/model_final.pddistill': True, f'{run}/cfg/train_log.jsonl': True,
             'docs/experiments/x/runs/picodet/mgd/seed0.lock': True,
             'docs/experiments/x/accuracy_picodet.json.lock': True}
    out = subprocess.run(['git', 'check-ignore', '--no-index', '--stdin'], cwd=ROOT, input='\n'.join(paths),
                         capture_output=True, text=True).stdout.split()
    assert {p: p in out for p in paths} == paths


def test_committed_tables_reprint_from_their_results_files(tmp_path, capsys):
    """Every committed table: its recorded command, pointed at a copy of its results file, reprints the
    committed markdown without training."""
    import glob
    import shlex
    import shutil
    benchmark = _benchmark_module()
    found = sorted(glob.glob(os.path.join(ROOT, 'docs', 'experiments', '*', 'accuracy_*.json')))
    assert len(found) >= 3
    for i, path in enumerate(found):
        recorded = json.loads(open(path).read())
        for name, table in [('', recorded['table'])] + sorted(recorded.get('tables', {}).items()):
            out = tmp_path / f'{i}{name}'
            out.mkdir()
            shutil.copy(path, out)
            words = shlex.split(table['command'])[2:]
            words[words.index('--out') + 1] = str(out)
            benchmark.run_accuracy(benchmark.parse_args(words))
            assert 'train: ' not in capsys.readouterr().out
            md = path[:-5] + (f'_{name}' if name else '') + '.md'
            assert (out / os.path.basename(md)).read_text() == open(md).read(), md


def test_teacher_subcommand_runs_the_teacher_alone(tmp_path, monkeypatch, capsys):
    """``benchmark.py teacher`` stopped before training with "--seeds '0': need at least one seed": it
    planned its (unused) student seeds as the count 0."""
    benchmark = _benchmark_module()
    made = _fake_runs(benchmark, monkeypatch)
    record = benchmark.run_teacher(benchmark.parse_args(['teacher', '--config_dir', TINY, '--out', str(tmp_path)]))
    assert made == [('teacher', 0)] and record['bbox'][0] == pytest.approx(0.1)
    assert 'teacher picodet: AP 0.100' in capsys.readouterr().out
    benchmark.run_teacher(benchmark.parse_args(['teacher', '--config_dir', TINY, '--out', str(tmp_path)]))
    assert made == [('teacher', 0)]  # finished: reused


@pytest.mark.parametrize('command', ['speed', 'gradients'])
def test_speed_and_gradients_make_the_demo_data_before_reading_it(tmp_path, monkeypatch, command):
    """On a fresh machine `benchmark.py speed` (or `gradients`) died in ppdet's reader with a traceback
    ("Dataset .../dataset/digits is not valid"): only `accuracy` and `teacher` made the demo data."""
    benchmark = _benchmark_module()
    order = []
    monkeypatch.setattr(benchmark, '_demo_data', lambda args: order.append('data'))
    from ppdistill.bench import gradients, speed
    monkeypatch.setattr(speed, 'speed_benchmark', lambda *a, **k: order.append('measure'))
    monkeypatch.setattr(gradients, 'gradient_report', lambda *a, **k: order.append('measure'))
    args = benchmark.parse_args([command, '--methods', 'mgd', '--out', str(tmp_path / 'out'),
                                 '--teacher_weights', str(tmp_path / 'teacher')])
    {'speed': benchmark.run_speed, 'gradients': benchmark.run_gradients}[command](args)
    assert order == ['data', 'measure']


# -- --dataset: the second demo dataset --------------------------------------------------------------
def test_dataset_shapes_points_every_run_at_it_and_is_recorded(tmp_path, monkeypatch):
    """--dataset shapes: teacher, student and distilled runs train and evaluate with -o overrides of all
    three readers' dataset_dir (after the user's own -o, which still win), the default --out is its own,
    its data step makes dataset/shapes, and a results file recorded on the digits refuses it."""
    benchmark = _benchmark_module()
    want = [f'{s}.dataset_dir=dataset/shapes' for s in ('TrainDataset', 'EvalDataset', 'TestDataset')]
    plan = benchmark.Plan(benchmark.parse_args(['accuracy', '--config_dir', TINY, '--methods', 'fgd',
                                                '--dataset', 'shapes', '-o', 'epoch=1']))
    assert plan.out == os.path.abspath('output/benchmark_shapes')
    for row in ('teacher', 'student', 'fgd'):
        for argv in (plan.train_args(row, 0), plan.eval_args(row, 0)):
            opts = argv[argv.index('-o') + 1:]
            assert all(opts.count(w) == 1 for w in want), (row, argv)
            if row != 'teacher':
                assert opts.index('epoch=1') > max(opts.index(w) for w in want)
    digits = benchmark.Plan(benchmark.parse_args(['accuracy', '--config_dir', TINY, '--methods', 'fgd',
                                                  '-o', 'epoch=1']))
    assert digits.out == os.path.abspath('output/benchmark')
    assert not any('dataset_dir' in a for a in digits.train_args('fgd', 0) + digits.eval_args('teacher', 0))
    assert plan.inputs('teacher')['teacher_overrides'] == want
    assert plan.inputs('fgd')['overrides'] == want + ['epoch=1']

    called = []
    monkeypatch.setattr(benchmark, 'run_tool', lambda name, args, *a, **k: called.append(args))
    monkeypatch.chdir(tmp_path)
    benchmark._demo_data(benchmark.parse_args(['speed', '--config_dir', TINY, '--dataset', 'shapes',
                                               '--out', str(tmp_path / 'o')]))
    assert called[0][1:] == ['--kind', 'shapes', '--out', str(tmp_path / 'dataset' / 'shapes')]

    made = _fake_runs(benchmark, monkeypatch)
    base = ['accuracy', '--config_dir', TINY, '--methods', 'none', '--seeds', '1', '--out', str(tmp_path / 'out')]
    benchmark.run_accuracy(benchmark.parse_args(base))
    with pytest.raises(benchmark.PPDistillError, match=r'other configs or settings \(overrides, teacher_overrides\)'):
        benchmark.run_accuracy(benchmark.parse_args(base + ['--dataset', 'shapes']))
    assert sorted(made) == [('student', 0), ('teacher', 0)]

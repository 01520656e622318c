"""teacher_mode: fast — the teacher's taps from Paddle Inference on the truncated teacher equal the eager
path's, training through it equals training through the eager path, and anything it cannot serve keeps the
eager path with one log line saying why."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import copy
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from ppdet.core.workspace import global_config, load_config, merge_config

from ppdistill import Distiller, DistillConfigError
from ppdistill import fast_teacher as ft
from ppdistill.build import build_distiller, load_distill_config
from ppdistill.config_scope import config_scope
from conftest import ROOT, TINY, run
from toy_models import ToyDet, toy_inputs
from conftest import needs_ppdet_heads_on_this_paddle

MGD_NO_MASK = [{'type': 'MGDLoss', 'student': 'neck', 'teacher': 'neck', 'args': {'lambda_mgd': 0.0}}]


def tiny_distiller(method: str, arch: str, mode: str = 'fast'):
    """A distiller of the tiny ``arch`` pair from the shipped ``method`` config (random teacher)."""
    with config_scope():
        load_config(os.path.join(TINY, f'{arch}_student.yml'))
        load_distill_config(os.path.join(ROOT, 'configs', 'slim', 'distill',
                                         f'{method}_{arch}_teacher_to_student.yml'))
        merge_config({'teacher_config': os.path.join(TINY, f'{arch}_teacher.yml'), 'teacher_weights': None,
                      'allow_random_teacher': True, 'teacher_mode': mode})
        paddle.seed(0)
        return build_distiller(global_config)


def image_batch(n: int, h: int, w: int, seed: int) -> dict:
    paddle.seed(seed)
    return {'image': paddle.uniform([n, 3, h, w], min=-2.0, max=2.0),
            'im_shape': paddle.to_tensor([[h, w]] * n, dtype='float32'), 'scale_factor': paddle.ones([n, 2])}


def assert_taps_close(fast: dict, eager: dict) -> None:
    """The stated tolerance, checked independently of ``tap_difference``."""
    assert list(fast) == list(eager)
    for spec in eager:
        assert len(fast[spec]) == len(eager[spec]) > 0
        for f, e in zip(fast[spec], eager[spec]):
            assert f.dtype == paddle.float32 and f.stop_gradient
            e = e.numpy()
            np.testing.assert_allclose(f.numpy(), e, rtol=ft.RTOL, atol=ft.ATOL * np.abs(e).max(), err_msg=spec)


# neck taps (MGD, FGD) and head-conv pattern taps called per level (KD on logits)
@pytest.mark.parametrize('method, arch', [('mgd', 'picodet'), ('kd', 'picodet'), ('fgd', 'retinanet'),
                                          ('kd', 'retinanet'), ('kd', 'ssd'), ('yolov3kd', 'yolov3')])
def test_fast_taps_equal_eager_taps_at_several_input_sizes(method, arch):
    d = tiny_distiller(method, arch)
    assert isinstance(d.fast_teacher, ft.FastTeacher)
    shapes = [(2, 96, 96), (1, 128, 192), (3, 160, 160), (2, 96, 96)]  # non-square; a size again
    results = []
    for i, (n, h, w) in enumerate(shapes):
        batch = image_batch(n, h, w, seed=i)
        fast, eager = d.teacher_features(batch), d.eager_teacher_features(batch)
        assert_taps_close(fast, eager)
        assert ft.tap_difference(fast, eager) <= 1.0
        results.append((fast, eager))
    # earlier outputs are not buffers the next call overwrites
    for fast, eager in results:
        assert_taps_close(fast, eager)


def openmp_threads() -> dict:
    """``omp_get_max_threads()`` of every OpenMP runtime loaded in this process (Paddle's MKL kernels use
    Intel's libiomp5; others may be loaded too)."""
    import ctypes
    import re
    with open('/proc/self/maps') as maps:
        libs = sorted({line.split()[-1] for line in maps if re.search(r'/lib(i?omp\d*|gomp)[^/]*\.so', line)})
    return {os.path.basename(lib): ctypes.CDLL(lib).omp_get_max_threads() for lib in libs}


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='reads the loaded libraries from /proc')
def test_the_fast_path_leaves_the_eager_kernels_their_threads(monkeypatch):
    """A predictor run left Intel OpenMP at one thread, so every eager kernel after it (the student's
    step) ran on one thread: with 2 threads the demo RetinaNet teacher's eager forward went ~90 -> ~160 ms."""
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    ft._set_threads(2)
    before = openmp_threads()
    assert before and 2 in before.values()
    d = tiny_distiller('mgd', 'picodet')
    d.fast_teacher(image_batch(2, 96, 96, seed=0))
    assert openmp_threads() == before


def test_tap_difference_flags_a_change_beyond_the_tolerance():
    e = {'neck': [paddle.to_tensor([[1.0, -4.0], [0.5, 2.0]])]}
    within = {'neck': [e['neck'][0] + ft.ATOL * 4.0 * 0.9]}
    beyond = {'neck': [e['neck'][0] + paddle.to_tensor([[0.0, 0.0], [0.0, 2.0 * ft.RTOL + 4.0 * ft.ATOL * 1.5]])]}
    assert ft.tap_difference(within, e) <= 1.0
    assert ft.tap_difference(beyond, e) > 1.0
    assert ft.tap_difference({'neck': []}, e) == float('inf')


def test_fast_teacher_is_not_part_of_the_distiller_state_or_parameters():
    eager, fast = tiny_distiller('mgd', 'picodet', 'eager'), tiny_distiller('mgd', 'picodet', 'fast')
    assert eager.fast_teacher is None and fast.fast_teacher is not None
    assert list(fast.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert not any(n.startswith('teacher_model.') for n, _ in fast.named_parameters())
    assert list(fast.distill_state_dict()) == list(eager.distill_state_dict())


# ----------------------------------------------------------------------------- fall-back and settings
def toy(**kwargs) -> Distiller:
    paddle.seed(1)
    return Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2),
                     teacher_model=ToyDet(width=16, neck_ch=8, levels=3), losses=MGD_NO_MASK, probe_size=32,
                     **kwargs)


def logged(monkeypatch) -> list:
    lines = []
    monkeypatch.setattr(ft.logger, 'info', lines.append)
    return lines


def test_toy_teacher_takes_the_fast_path_and_says_so(monkeypatch):
    d, lines = toy(), logged(monkeypatch)
    paddle.seed(11)
    expected = paddle.rand([4]).numpy()
    paddle.seed(11)
    line = ft.attach_teacher_path(d, 'fast')
    # building and checking the fast path draws nothing from paddle's generator (seeded runs stay as they were)
    np.testing.assert_array_equal(paddle.rand([4]).numpy(), expected)
    assert lines == [line] and line.startswith('teacher path: fast (Paddle Inference')
    batch = toy_inputs(3, 64)
    assert_taps_close(d.teacher_features(batch), d.eager_teacher_features(batch))


class ReadsImShape(ToyDet):
    """A teacher whose forward before its taps reads ``im_shape``: the image-only program cannot serve it."""

    def forward(self, inputs):
        scale = inputs['im_shape'][:, :1].mean() / inputs['im_shape'][:, :1].mean()
        return super().forward(dict(inputs, image=inputs['image'] * scale))


@pytest.mark.parametrize('change, reason', [
    ('foreign_hook', r'the teacher has forward hooks other than its taps \(on \[\'backbone\'\]\)'),
    ('reads_im_shape', r"KeyError: 'im_shape'"),
    ('uses_teacher_model', r"distill term\(s\) \['distill_mgd_l0', 'distill_mgd_l1'\] run the teacher model"),
])
def test_what_the_fast_path_cannot_serve_keeps_the_eager_path_with_one_line(monkeypatch, change, reason):
    d = toy()
    if change == 'foreign_hook':  # e.g. a hook substituting a sublayer's output
        d.teacher_model.backbone.register_forward_post_hook(lambda layer, inputs, output: output * 2)
    elif change == 'reads_im_shape':
        teacher = ReadsImShape(width=16, neck_ch=8, levels=3)
        teacher.set_state_dict(d.teacher_model.state_dict())
        paddle.seed(1)
        d = Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2), teacher_model=teacher,
                      losses=MGD_NO_MASK, probe_size=32)
    else:
        for loss in d.distill_losses:
            loss.uses_teacher_model = True
    lines = logged(monkeypatch)
    line = ft.attach_teacher_path(d, 'fast')
    assert lines == [line]
    assert line.startswith('teacher path: eager (teacher_mode: fast fell back: ')
    assert __import__('re').search(reason, line), line
    assert d.fast_teacher is None
    batch = toy_inputs(2, 32)
    eager = d.eager_teacher_features(batch)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(d.teacher_features(batch)['neck'],
                                                                    eager['neck']))


def test_eager_mode_logs_one_line_and_bad_settings_are_one_line_errors(monkeypatch):
    d, lines = toy(), logged(monkeypatch)
    assert ft.attach_teacher_path(d, 'eager') == 'teacher path: eager (teacher_mode: eager)' == lines[0]
    assert d.fast_teacher is None
    with pytest.raises(DistillConfigError, match=r"teacher_mode: 'quick' is not one of \['eager', 'fast'\]"):
        ft.check_teacher_mode('quick')
    with pytest.raises(DistillConfigError, match=r"teacher_dtype: 'fp16' is not one of"):
        ft.check_teacher_mode('fast', 'fp16')
    with pytest.raises(DistillConfigError, match=r'teacher_dtype: float16 needs teacher_mode: fast on a GPU'):
        ft.check_teacher_mode('fast', 'float16')


def test_teacher_mode_is_a_distill_config_key_and_a_bad_value_stops_the_build(tmp_path):
    import yaml
    path = tmp_path / 'mgd.yml'
    path.write_text(yaml.safe_dump({'slim': 'MGDDistillModel', 'allow_random_teacher': True,
                                    'teacher_config': os.path.join(TINY, 'picodet_teacher.yml'),
                                    'teacher_mode': 'fastest'}))
    with config_scope():
        load_config(os.path.join(TINY, 'picodet_student.yml'))
        load_distill_config(str(path))  # accepted as a distill key
        with pytest.raises(DistillConfigError, match=r"teacher_mode: 'fastest' is not one of"):
            build_distiller(global_config)


# ----------------------------------------------------------------------------- training through the fast path
@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    wd = tmp_path_factory.mktemp('digits')
    run(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '6', '--num_val', '2'], wd)
    return wd


def train_losses(d: Distiller, batches: list, seed: int) -> list:
    """Per step: the logged scalars of 3 SGD steps (MGD's random masks seeded alike for both paths)."""
    paddle.seed(seed)
    opt = paddle.optimizer.SGD(learning_rate=0.01, parameters=d.parameters())
    d.train()
    out = []
    for batch in batches:
        logs = d(batch)
        logs['loss'].backward()
        opt.step()
        opt.clear_grad()
        out.append({k: float(v) for k, v in logs.items() if k.startswith(('loss', 'distill'))})
    return out


@needs_ppdet_heads_on_this_paddle
@pytest.mark.parametrize('method, arch', [('mgd', 'picodet'), ('fgd', 'retinanet')])
def test_training_through_the_fast_path_equals_the_eager_path_multi_scale(digits, monkeypatch, method, arch):
    from ppdet.core.workspace import create
    monkeypatch.chdir(digits)
    d = tiny_distiller(method, arch)
    assert d.fast_teacher is not None
    with config_scope():
        load_config(os.path.join(TINY, f'{arch}_student.yml'))
        dataset = create('TrainDataset')()
        loader = create('TrainReader')(dataset, 0)
        batches = [batch for _, batch in zip(range(3), loader)]
    # multi-scale: every batch resized to another size (boxes scaled alike)
    for batch, side in zip(batches, (96, 160, 128)):
        scale = side / batch['image'].shape[2]
        batch.update(image=F.interpolate(batch['image'], size=[side, side], mode='bilinear'),
                     gt_bbox=[b * scale for b in batch['gt_bbox']] if isinstance(batch['gt_bbox'], list)
                     else batch['gt_bbox'] * scale, im_shape=paddle.full_like(batch['im_shape'], side), epoch_id=0)
    assert len(batches) == 3
    start = copy.deepcopy({k: v.numpy() for k, v in d.state_dict().items()})
    fast = train_losses(d, batches, seed=5)
    d.set_state_dict(start)
    teacher = d.fast_teacher
    d.fast_teacher = None
    eager = train_losses(d, batches, seed=5)
    d.fast_teacher = teacher
    # At equal weights (step 0) a loss is a reduction of the taps: equal within the taps' tolerance. Later
    # steps start from weights that differ by one optimizer step on gradients that differ as little; the
    # loss values drift apart as training amplifies any float difference (measured ~1e-4 after 3 steps).
    for i, (step_fast, step_eager) in enumerate(zip(fast, eager)):
        assert step_fast.keys() == step_eager.keys()
        for key in step_eager:
            np.testing.assert_allclose(step_fast[key], step_eager[key], rtol=10 * ft.RTOL if i == 0 else 2e-3,
                                       atol=1e-7, err_msg=f'step {i}: {key}')
    assert any(abs(v) > 0 for step in eager for k, v in step.items() if k.startswith('distill'))


def test_speed_summary_puts_the_fast_path_against_todays_limit():
    """``fast_ratio`` = distill step with the fast teacher / (student step + eager teacher forward)."""
    from ppdistill.bench.speed import markdown, summarise
    load = np.array([1.0, 2.0, 1.0])
    times = {'student[m]': list(0.5 * load), 'teacher[m]': list(0.25 * load), 'distill[m]': list(0.8 * load),
             'loss[m]': list(0.05 * load), 'teacher_fast[m]': list(0.05 * load),
             'distill_fast[m]': list(np.array([0.60, 0.66, 0.63]) * load)}
    row = summarise(times, ['m'])['methods']['m']
    assert row['teacher_ms'] == pytest.approx(250.0) and row['teacher_fast_ms'] == pytest.approx(50.0)
    assert row['fast_ratio'] == pytest.approx(0.63 / 0.75)
    assert row['fast_ratio_q'] == pytest.approx(list(np.percentile(np.array([0.60, 0.66, 0.63]) / 0.75,
                                                                   [25, 50, 75])))
    md = markdown({'arch': 'a', 'date': 'd', 'command': 'c', 'device': 'cpu', 'warmup': 0,
                   'timing': summarise(times, ['m'])})
    assert '| m | 250.0 | 50.0 | 630.0 | 0.840 [' in md and md.rstrip().endswith('| yes |')
    del times['teacher_fast[m]'], times['distill_fast[m]']  # a teacher the fast path cannot serve
    assert 'fast_ratio' not in summarise(times, ['m'])['methods']['m']

import importlib

import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from ppdet.core.workspace import register

from ppdistill import Distiller, DistillConfigError
from ppdistill.distiller import NonFiniteDistillLoss
from ppdistill.losses import DistillLoss, MGDLoss
from ppdistill.pairing import probe_shapes
from ppdistill.taps import TapCountError, TapSet
from toy_models import ToyDet, ToyHead, toy_inputs

MGD_NO_MASK = [{'type': 'MGDLoss', 'student': 'neck', 'teacher': 'neck', 'args': {'lambda_mgd': 0.0}}]


def make(losses=MGD_NO_MASK, dropout=0.5, student_levels=2, teacher_levels=3, **kwargs):
    paddle.seed(1)
    student = ToyDet(width=8, neck_ch=4, levels=student_levels, dropout=dropout)
    teacher = ToyDet(width=16, neck_ch=8, levels=teacher_levels, dropout=dropout)
    return Distiller(student_model=student, teacher_model=teacher, losses=losses, probe_size=32, **kwargs)


def test_levels_pair_by_stride_and_channels_get_align_convs():
    d = make()
    # student strides 4, 8; teacher 4, 8, 16 -> two pairs, each aligning 4 -> 8 channels
    assert [t.key for t in d._terms] == ['distill_mgd_l0', 'distill_mgd_l1']
    assert [(t.pair.student_level, t.pair.teacher_level) for t in d._terms] == [(0, 0), (1, 1)]
    for loss in d.distill_losses:
        assert isinstance(loss, MGDLoss) and loss.align is not None
        assert list(loss.align.weight.shape) == [8, 4, 1, 1]


def test_parameters_are_student_plus_distill_never_teacher():
    d = make()
    ids = {id(p) for p in d.parameters()}
    student = {id(p) for p in d.student_model.parameters()}
    distill = {id(p) for p in d.distill_losses.parameters()}
    teacher = {id(p) for p in d.teacher_model.parameters()}
    assert ids == student | distill
    assert not ids & teacher
    assert {n for n, _ in d.named_parameters()} == (
        {'student_model.' + n for n, _ in d.student_model.named_parameters()}
        | {'distill_losses.' + n for n, _ in d.distill_losses.named_parameters()})
    assert all(p.stop_gradient and not p.trainable for p in d.teacher_model.parameters())


def test_training_updates_student_and_distill_modules_but_never_the_teacher():
    d = make()
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=d.parameters())
    teacher_before = {k: v.numpy().copy() for k, v in d.teacher_model.state_dict().items()}
    student_before = {k: v.numpy().copy() for k, v in d.student_model.state_dict().items()}
    distill_before = {k: v.numpy().copy() for k, v in d.distill_state_dict().items()}
    for step in range(3):
        d.train()  # what ppdet's trainer does every epoch: must not put the teacher's BN in train mode
        out = d(toy_inputs(seed=step))
        out['loss'].backward()
        opt.step()
        opt.clear_grad()
    bn = d.teacher_model.backbone[1]
    assert not bn.training and not d.teacher_model.backbone[3].training
    for k, v in d.teacher_model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), teacher_before[k], err_msg=k)  # incl. BN mean/variance
    changed = [k for k, v in d.distill_state_dict().items() if not np.array_equal(v.numpy(), distill_before[k])]
    assert sorted(changed) == sorted(distill_before)  # every distill tensor (generator, align) trained
    assert not np.array_equal(d.student_model.state_dict()['neck.lateral.0.weight'].numpy(),
                              student_before['neck.lateral.0.weight'])


def test_train_loss_is_student_loss_plus_independently_computed_distill_terms():
    d = make(dropout=0.0)
    d.train()
    inputs = toy_inputs()
    out = d(inputs)
    student_loss = d.student_model(inputs)['loss']
    t = d.teacher_model
    t.eval()
    with paddle.no_grad():
        t_feats = t.neck(t.backbone(inputs['image']))
    s_feats = d.student_model.neck(d.student_model.backbone(inputs['image']))
    terms = [float(loss(s_feats[i], t_feats[i])) for i, loss in enumerate(d.distill_losses)]
    np.testing.assert_allclose([float(out['distill_mgd_l0']), float(out['distill_mgd_l1'])], terms, rtol=1e-5)
    np.testing.assert_allclose(float(out['distill_loss']), sum(terms), rtol=1e-5)
    np.testing.assert_allclose(float(out['loss']), float(student_loss) + sum(terms), rtol=1e-5)
    np.testing.assert_allclose(float(out['loss_cls']), float(student_loss), rtol=1e-5)


def test_eval_output_is_exactly_the_students():
    d = make()
    d.eval()
    inputs = toy_inputs()
    got = d(inputs)['bbox'].numpy()
    d.student_model.eval()
    np.testing.assert_array_equal(got, d.student_model(inputs)['bbox'].numpy())


def test_weight_scales_a_term_and_custom_name_is_logged():
    losses = [dict(MGD_NO_MASK[0], weight=3.0, name='fpn_mgd', levels=[1])]
    d = make(losses, dropout=0.0)
    plain = make(dropout=0.0)
    plain.distill_losses[1].set_state_dict(d.distill_losses[0].state_dict())
    plain.student_model.set_state_dict(d.student_model.state_dict())
    plain.teacher_model.set_state_dict(d.teacher_model.state_dict())
    out, ref = d(toy_inputs()), plain(toy_inputs())
    assert [k for k in out if k.startswith('distill_')] == ['distill_fpn_mgd_l1', 'distill_loss']
    np.testing.assert_allclose(float(out['distill_fpn_mgd_l1']), 3 * float(ref['distill_mgd_l1']), rtol=1e-5)


@pytest.mark.parametrize('losses, match', [
    ([{'type': 'NoSuchLoss'}], "unknown distill loss type 'NoSuchLoss'"),
    ([{'type': 'MGDLoss', 'student': 'neck', 'args': {'alpha': 1}}], r"MGDLoss has no argument\(s\) \['alpha'\]"),
    ([{'type': 'MGDLoss', 'student': 'neck', 'levels': [3]}], 'student level 3 does not exist'),
    ([{'type': 'MGDLoss', 'student': 'neck', 'bogus': 1}], r"unknown keys \['bogus'\]"),
    ([], 'no distill losses'),
])
def test_bad_loss_entries_fail_at_build(losses, match):
    with pytest.raises(DistillConfigError, match=match):
        make(losses)


def test_level_without_teacher_stride_fails_naming_both_shapes():
    with pytest.raises(DistillConfigError) as err:
        make([{'type': 'MGDLoss', 'student': 'neck', 'levels': [1]}], teacher_levels=1)
    assert '(1, 4, 4, 4)' in str(err.value) and '(1, 8, 8, 8)' in str(err.value)


@pytest.fixture
def toy_init_preset():
    from ppdistill.presets import PRESETS
    PRESETS['ToyDet'] = {'taps': {'fpn': 'neck'}, 'init_student': ['neck', 'head']}
    yield
    del PRESETS['ToyDet']


def test_init_student_copies_every_neck_and_head_tensor_of_an_equal_student(toy_init_preset):
    paddle.seed(3)
    student = ToyDet(width=16, neck_ch=8, levels=2)  # the teacher's neck/head, fewer levels taken
    teacher = ToyDet(width=16, neck_ch=8, levels=2)
    s_before = {k: v.numpy().copy() for k, v in student.state_dict().items()}
    Distiller(student_model=student, teacher_model=teacher, losses=MGD_NO_MASK, probe_size=32,
              init_student=True)
    t = teacher.state_dict()
    for k, v in student.state_dict().items():
        expected = t[k].numpy() if k.startswith(('neck.', 'head.')) else s_before[k]
        np.testing.assert_array_equal(v.numpy(), expected, err_msg=k)
    assert any(not np.array_equal(s_before[k], t[k].numpy()) for k in t if k.startswith('neck.'))


def test_init_student_with_a_different_neck_is_an_error_and_copies_nothing(toy_init_preset):
    # Some neck/head tensors match (neck.lateral.1, head.*), one does not (neck.lateral.0 takes the
    # backbone's 8 vs 16 channels): a partial copy would mix teacher and student layers.
    paddle.seed(3)
    student = ToyDet(width=8, neck_ch=8, levels=2)
    teacher = ToyDet(width=16, neck_ch=8, levels=3)
    s_before = {k: v.numpy().copy() for k, v in student.state_dict().items()}
    with pytest.raises(DistillConfigError) as err:
        Distiller(student_model=student, teacher_model=teacher, losses=MGD_NO_MASK, probe_size=32,
                  init_student=True)
    msg = str(err.value)
    assert 'neck.lateral.0.weight' in msg and 'init_student: false' in msg and '\n' not in msg
    for k, v in student.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), s_before[k], err_msg=k)


def _one_step_updates(d, optimizer):
    """Parameter change of one optimizer step, and each parameter's gradient before it."""
    before = {id(p): p.numpy().copy() for p in d.parameters()}
    d.train()
    d(toy_inputs())['loss'].backward()
    grads = {id(p): p.grad.numpy().copy() for p in d.parameters() if p.grad is not None}
    optimizer.step()
    return {id(p): p.numpy() - before[id(p)] for p in d.parameters()}, grads


@pytest.mark.parametrize('mult', [1.0, 0.05])
def test_distill_lr_mult_scales_the_sgd_step_of_distill_modules_only(mult):
    d = make(dropout=0.0, distill_lr_mult=mult)
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=d.parameters())
    delta, grads = _one_step_updates(d, opt)
    distill = {id(p) for p in d.distill_losses.parameters()}
    assert distill and all(i in grads for i in distill)
    for p in d.parameters():
        if id(p) in grads:
            lr = 0.1 * (mult if id(p) in distill else 1.0)
            np.testing.assert_allclose(delta[id(p)], -lr * grads[id(p)], rtol=1e-4, atol=1e-7)


def test_distill_lr_mult_scales_ppdets_adamw_step():
    # ppdet's OptimizerBuilder over the distiller's parameters, as the Trainer builds it. Adam's first
    # step moves each element by lr * g / (|g| + eps) (no weight decay here).
    from ppdet.optimizer import OptimizerBuilder
    d = make(dropout=0.0, distill_lr_mult=0.025)
    opt = OptimizerBuilder(regularizer=None, optimizer={'type': 'AdamW', 'weight_decay': 0.0})(
        0.04, d)
    delta, grads = _one_step_updates(d, opt)
    distill = {id(p) for p in d.distill_losses.parameters()}
    for p in d.parameters():
        if id(p) in grads:
            g = grads[id(p)].astype('float64')
            lr = 0.04 * (0.025 if id(p) in distill else 1.0)
            np.testing.assert_allclose(delta[id(p)], -lr * g / (np.abs(g) + 1e-8), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize('bad', [0, -1.0])
def test_distill_lr_mult_must_be_positive(bad):
    with pytest.raises(DistillConfigError, match='distill_lr_mult must be > 0'):
        make(distill_lr_mult=bad)


# ----------------------------------------------------------------------------- teacher isolation
def dropblock_teacher(levels=3):
    """A ToyDet teacher with ppdet's DropBlock (keep_prob 0.5) after its backbone."""
    from ppdet.modeling.layers import DropBlock
    teacher = ToyDet(width=16, neck_ch=8, levels=levels, dropout=0.0)
    conv, bn, relu, _ = list(teacher.backbone.children())
    teacher.backbone = paddle.nn.Sequential(conv, bn, relu, DropBlock(block_size=3, keep_prob=0.5))
    return teacher


def test_teacher_with_dropblock_is_deterministic_and_uses_eval_features():
    paddle.seed(5)
    student = ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0)
    d = Distiller(student_model=student, teacher_model=dropblock_teacher(), losses=MGD_NO_MASK,
                  probe_size=32)
    inputs = toy_inputs()
    d.train()
    keys = ['distill_mgd_l0', 'distill_mgd_l1']
    runs = [[float(out[k]) for k in keys] for out in (d(dict(inputs)) for _ in range(3))]
    assert runs[0] == runs[1] == runs[2]
    assert d.teacher_model.backbone[3].training is False
    # the terms use the teacher's eval-mode (DropBlock off) features
    t = d.teacher_model
    with paddle.no_grad():
        t_feats = t.neck(t.backbone(inputs['image']))
    s_feats = student.neck(student.backbone(inputs['image']))
    want = [float(loss(s_feats[i], t_feats[i])) for i, loss in enumerate(d.distill_losses)]
    np.testing.assert_allclose(runs[0], want, rtol=1e-5)


class PadGtMaskTeacher(ToyDet):
    """A teacher whose training loss reads ``pad_gt_mask`` (as ppdet's PP-YOLOE/PicoHeadV2 assigners do)."""

    def forward(self, inputs):
        if self.training:
            assert inputs['pad_gt_mask'] is not None
        return super().forward(inputs)


def test_teacher_runs_only_up_to_its_taps_from_the_first_step():
    paddle.seed(6)
    teacher = PadGtMaskTeacher(width=16, neck_ch=8, levels=3)
    head_calls = []
    teacher.head.cls.register_forward_post_hook(lambda layer, i, o: head_calls.append(1))
    d = Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2), teacher_model=teacher,
                  losses=MGD_NO_MASK, probe_size=32)
    head_calls.clear()  # the build-time probe runs the whole teacher once
    d.train()
    inputs = toy_inputs()
    assert 'pad_gt_mask' not in inputs  # the student's reader does not produce it
    for _ in range(2):
        out = d(inputs)
        assert np.isfinite(float(out['loss']))
    assert head_calls == []  # neither the teacher's head nor its loss ever ran


def _tapped(model, names, mode, inputs, size):
    """Tap outputs of ``model`` in eval mode or in train mode with BatchNorm in eval (stop once tapped)."""
    taps = TapSet(model, names)
    probe_shapes(model, taps, size)
    model.train() if mode == 'train' else model.eval()
    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm)):
            layer.eval()
    with paddle.no_grad(), taps.record(stop_early=True):
        model(dict(inputs))
    out = {n: [t.numpy() for t in taps.levels(n)] for n in names}
    taps.remove()
    return out


@pytest.mark.parametrize('config, names', [
    ('retinanet_teacher', ['neck', 'head.retina_cls', 'head.retina_reg',
                           'head.conv_feat.fcos_head_cls_tower_conv_1']),
    ('picodet_teacher', ['neck', 'head.head_cls_list.0', 'head.head_reg_list.2', 'head.cls_align.1']),
])
def test_eval_mode_taps_equal_train_mode_with_bn_eval(config, names):
    """The teacher now runs in eval mode; for the taps we distill that changes no tensor a loss sees."""
    from ppdistill.build import build_teacher
    teacher, _ = build_teacher(f'configs/demo/tiny/{config}.yml', None, allow_random=True)
    paddle.seed(7)
    inputs = {'image': paddle.rand([2, 3, 96, 96]), 'im_shape': paddle.to_tensor([[96., 96.]] * 2),
              'scale_factor': paddle.ones([2, 2])}
    in_eval = _tapped(teacher, names, 'eval', inputs, 96)
    in_train = _tapped(teacher, names, 'train', inputs, 96)
    for name in names:
        assert len(in_eval[name]) == len(in_train[name]) > 0
        for a, b in zip(in_eval[name], in_train[name]):
            assert np.abs(a).sum() > 0
            np.testing.assert_array_equal(a, b, err_msg=name)


# ----------------------------------------------------------------------------- tap call counts
class ExtraCallInTrainingHead(ToyHead):
    """Calls the shared ``cls`` conv once more in training than in eval (e.g. an auxiliary branch)."""

    def forward(self, feats):
        outs = super().forward(feats)
        return outs + [self.cls(F.relu(self.convs[0](feats[0])))] if self.training else outs


def test_student_tap_firing_a_different_number_of_times_than_the_probe_is_an_error():
    paddle.seed(8)
    student = ToyDet(width=8, neck_ch=8, levels=2)
    student.head = ExtraCallInTrainingHead(8)
    d = Distiller(student_model=student, teacher_model=ToyDet(width=16, neck_ch=8, levels=2),
                  losses=[dict(MGD_NO_MASK[0], student='head.cls', teacher='head.cls')], probe_size=32)
    d.train()
    with pytest.raises(TapCountError, match=r"student tap 'head.cls' fired at least 3 time\(s\) in this "
                                            r"forward but 2 time\(s\) in the build-time probe"):
        d(toy_inputs())


# ----------------------------------------------------------------------------- AMP and non-finite terms
class Half(paddle.nn.Layer):
    """Casts a list of features to float16 (what autocast does to a neck's outputs), scaled by ``scale``."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, feats):
        return [paddle.cast(f * self.scale, 'float16') for f in feats]


class Float(paddle.nn.Layer):
    def forward(self, feats):
        return [paddle.cast(f, 'float32') for f in feats]


def half_neck(model, scale=1.0):
    """``model.neck`` becomes (neck, Half, Float): the tap ``neck.1`` sees float16 features."""
    model.neck = paddle.nn.Sequential(model.neck, Half(scale), Float())
    return model


@register
class SumProbeLoss(DistillLoss):
    """Test loss standing for any loss with a large reduction: ``(sum|student| + sum|teacher|) / N``."""

    def __init__(self, student_channels, teacher_channels):
        super().__init__()

    def forward(self, student, teacher, inputs=None):
        return (paddle.sum(paddle.abs(student)) + paddle.sum(paddle.abs(teacher))) / student.shape[0]


def test_float16_features_are_summed_in_float32():
    paddle.seed(9)
    student = half_neck(ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0), 1.0)
    teacher = half_neck(ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0), 2000.0)
    d = Distiller(student_model=student, teacher_model=teacher, probe_size=32,
                  losses=[{'type': 'SumProbeLoss', 'student': 'neck.1', 'teacher': 'neck.1', 'name': 'sum'}])
    inputs = toy_inputs()
    t = teacher
    t.eval()
    with paddle.no_grad():
        t16 = t.neck[1](t.neck[0](t.backbone(inputs['image'])))
    # the reduction overflows float16 (max 65504); summed by numpy in float16 to need no paddle fp16 kernels
    with np.errstate(over='ignore'):  # the overflow is the point
        total16 = np.add.reduce(np.abs(t16[0].numpy()).ravel(), dtype=np.float16)
    assert not np.isfinite(total16), 'the test needs a float16 sum that overflows'
    d.train()
    out = d(inputs)
    s_feats = student.neck[1](student.neck[0](student.backbone(inputs['image'])))
    for level in range(2):
        want = (np.abs(s_feats[level].numpy().astype('float64')).sum() +
                np.abs(t16[level].numpy().astype('float64')).sum()) / 2
        assert out[f'distill_sum_l{level}'].dtype == paddle.float32
        np.testing.assert_allclose(float(out[f'distill_sum_l{level}']), want, rtol=1e-5)


def test_mgd_on_float16_features_equals_float32_computation():
    paddle.seed(10)
    student = half_neck(ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0))
    teacher = half_neck(ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0))
    d = Distiller(student_model=student, teacher_model=teacher, probe_size=32,
                  losses=[dict(MGD_NO_MASK[0], student='neck.1', teacher='neck.1')])
    inputs = toy_inputs()
    d.train()
    out = d(inputs)
    teacher.eval()
    with paddle.no_grad():
        t_feats = teacher.neck[1](teacher.neck[0](teacher.backbone(inputs['image'])))
    s_feats = student.neck[1](student.neck[0](student.backbone(inputs['image'])))
    want = [float(loss(paddle.cast(s_feats[i], 'float32'), paddle.cast(t_feats[i], 'float32')))
            for i, loss in enumerate(d.distill_losses)]
    np.testing.assert_allclose([float(out['distill_mgd_l0']), float(out['distill_mgd_l1'])], want, rtol=1e-5)
    out['loss'].backward()
    assert all(p.grad is not None for p in d.distill_losses.parameters())


def test_distill_modules_keep_float32_weights_under_amp_o2():
    need_keep_fp32 = getattr(importlib.import_module('paddle.amp.auto_cast'), 'need_keep_fp32', None)
    if need_keep_fp32 is None:
        pytest.skip("this paddle has no paddle.amp.auto_cast.need_keep_fp32 (O2's per-layer decision)")
    d = make()
    layers = d.distill_losses.sublayers(include_self=True)
    assert layers and all(need_keep_fp32(layer, 'float16') for layer in layers)
    assert not need_keep_fp32(d.student_model.neck.lateral[0], 'float16')  # the student is still cast


def nan_teacher_level(d, level):
    bias = d.teacher_model.neck.lateral[level].bias
    bias.set_value(np.full(bias.shape, np.nan, 'float32'))


def test_non_finite_term_stops_training_naming_term_and_level():
    d = make(dropout=0.0)
    nan_teacher_level(d, 1)
    d.train()
    with pytest.raises(NonFiniteDistillLoss, match=r'distill_mgd_l1 = nan \(student level 1 <- teacher '
                                                   r'level 1\).*nonfinite: skip'):
        d(toy_inputs())


def test_nonfinite_skip_drops_the_distill_loss_with_a_warning(caplog):
    d = make(dropout=0.0, nonfinite='skip')
    nan_teacher_level(d, 0)
    d.train()
    inputs = toy_inputs()
    out = d(inputs)
    student_loss = float(d.student_model(inputs)['loss'])
    np.testing.assert_allclose(float(out['loss']), student_loss, rtol=1e-6)
    assert float(out['distill_loss']) == 0.0 and np.isnan(float(out['distill_mgd_l0']))
    out['loss'].backward()
    for p in d.distill_losses.parameters():  # every distill parameter gets a (zero) gradient
        assert p.grad is not None and float(p.grad.abs().sum()) == 0.0
    with pytest.raises(DistillConfigError, match="nonfinite: 'ignore'"):
        make(nonfinite='ignore')


def test_presets_pass_nonfinite_through():
    from ppdistill.models import FocalGlobalDistillModel, MGDDistillModel
    for cls in (MGDDistillModel, FocalGlobalDistillModel):
        paddle.seed(11)
        d = cls(ToyDet(width=8, neck_ch=8, levels=2), ToyDet(width=16, neck_ch=8, levels=2),
                feature='neck', probe_size=32, nonfinite='skip')
        assert d.nonfinite == 'skip'

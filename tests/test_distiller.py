import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest

from ppdistill import Distiller, DistillConfigError
from ppdistill.losses import MGDLoss
from toy_models import ToyDet, toy_inputs

MGD_NO_MASK = [{'type': 'MGDLoss', 'student': 'neck', 'teacher': 'neck', 'args': {'lambda_mgd': 0.0}}]


def make(losses=MGD_NO_MASK, dropout=0.5, student_levels=2, teacher_levels=3):
    paddle.seed(1)
    student = ToyDet(width=8, neck_ch=4, levels=student_levels, dropout=dropout)
    teacher = ToyDet(width=16, neck_ch=8, levels=teacher_levels, dropout=dropout)
    return Distiller(student_model=student, teacher_model=teacher, losses=losses, probe_size=32)


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


def test_init_student_copies_matching_neck_and_head_tensors_only():
    from ppdistill.presets import PRESETS
    PRESETS['ToyDet'] = {'taps': {'fpn': 'neck'}, 'init_student': ['neck', 'head']}
    try:
        paddle.seed(3)
        student = ToyDet(width=8, neck_ch=8, levels=2)   # same neck/head shapes as the teacher's first levels
        teacher = ToyDet(width=16, neck_ch=8, levels=3)  # neck lateral.0 takes 16 channels: shape differs
        s_before = {k: v.numpy().copy() for k, v in student.state_dict().items()}
        Distiller(student_model=student, teacher_model=teacher, losses=MGD_NO_MASK, probe_size=32,
                  init_student=True)
        t = teacher.state_dict()
        for k, v in student.state_dict().items():
            copied = (k.startswith(('neck.', 'head.')) and k in t and list(t[k].shape) == list(v.shape))
            np.testing.assert_array_equal(v.numpy(), t[k].numpy() if copied else s_before[k], err_msg=k)
        assert 'head.cls.weight' in t and 'neck.lateral.1.bias' in t  # some tensors were copied
        assert list(t['neck.lateral.0.weight'].shape) != list(s_before['neck.lateral.0.weight'].shape)
    finally:
        del PRESETS['ToyDet']

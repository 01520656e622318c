import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os

import numpy as np
import paddle
import pytest

from ppdistill import Distiller, PPDistillError
from ppdistill.checkpoint import resume_checkpoint, save_checkpoint
from toy_models import ToyDet, toy_inputs

LOSSES = [{'type': 'MGDLoss', 'student': 'neck', 'teacher': 'neck', 'args': {'lambda_mgd': 0.0}}]


def build(seed):
    paddle.seed(seed)
    d = Distiller(student_model=ToyDet(neck_ch=4, dropout=0.0),
                  teacher_model=ToyDet(width=16, neck_ch=8, levels=3, dropout=0.0),
                  losses=LOSSES, probe_size=32)
    opt = paddle.optimizer.Momentum(learning_rate=0.05, momentum=0.9, parameters=d.parameters())
    return d, opt


def step(d, opt, seed):
    d(toy_inputs(seed=seed))['loss'].backward()
    opt.step()
    opt.clear_grad()


def test_checkpoint_is_plain_student_plus_distill_state_and_resume_restores_everything(tmp_path):
    d, opt = build(0)
    for seed in range(2):
        step(d, opt, seed)
    save_checkpoint(d, opt, str(tmp_path), 'model_final', last_epoch=3)
    files = sorted(os.listdir(tmp_path))
    assert files == ['model_final.pddistill', 'model_final.pdopt', 'model_final.pdparams']  # no temp files

    # .pdparams is the student alone: loads into a fresh student with no prefix stripping
    saved = paddle.load(str(tmp_path / 'model_final.pdparams'))
    fresh = ToyDet(neck_ch=4)
    assert set(saved) == set(fresh.state_dict())
    fresh.set_state_dict(saved)
    for k, v in d.student_model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy())

    # resume into a differently seeded build: student, distill modules and optimizer slots all restored
    d2, opt2 = build(123)
    d2.teacher_model.set_state_dict(d.teacher_model.state_dict())  # in real use: the teacher weights file
    assert not np.array_equal(d2.distill_losses[0].generation[0].weight.numpy(),
                              d.distill_losses[0].generation[0].weight.numpy())
    epoch = resume_checkpoint(d2, opt2, str(tmp_path / 'model_final'))
    assert epoch == 3
    for mine, theirs in [(d.student_model.state_dict(), d2.student_model.state_dict()),
                         (d.distill_state_dict(), d2.distill_state_dict())]:
        for k, v in mine.items():
            np.testing.assert_array_equal(theirs[k].numpy(), v.numpy(), err_msg=k)
    assert d2.parameters()[0].name != d.parameters()[0].name  # slots must be remapped by structure
    # one more identical step on both: equal only if the momentum slots were restored too
    step(d, opt, 5)
    step(d2, opt2, 5)
    for k, v in d.state_dict().items():
        np.testing.assert_allclose(d2.state_dict()[k].numpy(), v.numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    d3, opt3 = build(7)  # control: the same step without the optimizer state lands elsewhere
    d3.teacher_model.set_state_dict(d.teacher_model.state_dict())
    d3.student_model.set_state_dict(paddle.load(str(tmp_path / 'model_final.pdparams')))
    d3.distill_losses.set_state_dict(paddle.load(str(tmp_path / 'model_final.pddistill')))
    step(d3, opt3, 5)
    w = 'distill_losses.0.generation.0.weight'
    assert not np.allclose(d3.state_dict()[w].numpy(), d.state_dict()[w].numpy(), rtol=1e-6, atol=1e-7)


# -- EMA: student only, and resume continues raw weights and the running average exactly ------------

def ema_of(d):
    from ppdistill.ema import ema_from_config
    return ema_from_config(d, {'ema_decay': 0.9, 'ema_decay_type': 'threshold'})


def snapshot(d, ema):
    """What ppdet's Trainer does at a snapshot: EMA weights into the model, raw state kept aside."""
    raw = {k: v.clone() for k, v in d.state_dict().items()}
    d.set_dict(ema.apply())
    return raw


def test_ema_averages_the_student_only_and_apply_keeps_teacher_and_distill_modules():
    d, opt = build(0)
    ema = ema_of(d)
    student = d.student_model.state_dict()
    assert set(ema.state_dict) == set(student)  # no teacher (nor distill module) tensor in the EMA
    teacher_before = {k: v.numpy().copy() for k, v in d.teacher_model.state_dict().items()}
    # NumPy reference of ppdet's 'threshold' EMA with bias correction (ppdet/optimizer/ema.py)
    acc = {k: np.zeros_like(v.numpy()) for k, v in student.items()}
    for step_id in range(3):
        step(d, opt, step_id)
        ema.update()
        decay = min(0.9, (1 + step_id) / (10 + step_id))
        acc = {k: decay * a + (1 - decay) * d.student_model.state_dict()[k].numpy() for k, a in acc.items()}
    applied = ema.apply()
    assert set(applied) == set(d.state_dict())  # a whole distiller state for the Trainer's set_dict
    for k, a in acc.items():
        np.testing.assert_allclose(applied['student_model.' + k].numpy(), a / (1 - decay ** 3),
                                   rtol=1e-5, atol=1e-6, err_msg=k)
    for k, v in teacher_before.items():
        np.testing.assert_array_equal(applied['teacher_model.' + k].numpy(), v)
    for k, v in d.distill_state_dict().items():
        np.testing.assert_array_equal(applied['distill_losses.' + k].numpy(), v.numpy())


def test_resume_with_ema_restores_raw_weights_and_the_average(tmp_path):
    def run(d, opt, ema, seeds):
        for s in seeds:
            step(d, opt, s)
            ema.update()

    d, opt = build(0)
    ema = ema_of(d)
    run(d, opt, ema, [0, 1])
    raw = snapshot(d, ema)
    save_checkpoint(d, opt, str(tmp_path), '1', last_epoch=1, raw_state=raw, ema=ema)
    d.set_dict(raw)
    assert sorted(os.listdir(tmp_path)) == ['1.pddistill', '1.pdema', '1.pdopt', '1.pdparams']
    save_checkpoint(d, opt, str(tmp_path / 'again'), '1', last_epoch=1, raw_state=raw, ema=ema)
    save_checkpoint(d, opt, str(tmp_path / 'again'), '1', last_epoch=1)  # same name, EMA off: no stale raw
    assert sorted(os.listdir(tmp_path / 'again')) == ['1.pddistill', '1.pdopt', '1.pdparams']
    # .pdparams is the averaged student (what ships), .pdema the raw one (ppdet's convention)
    averaged = paddle.load(str(tmp_path / '1.pdparams'))
    w = 'neck.lateral.0.weight'
    assert not np.allclose(averaged[w].numpy(), d.student_model.state_dict()[w].numpy())
    run(d, opt, ema, [2, 3])  # the uninterrupted run

    d2, opt2 = build(123)
    d2.teacher_model.set_state_dict(d.teacher_model.state_dict())
    ema2 = ema_of(d2)
    assert resume_checkpoint(d2, opt2, str(tmp_path / '1'), ema2) == 1
    run(d2, opt2, ema2, [2, 3])
    for k, v in d.state_dict().items():  # raw trajectory: student, distill modules (and optimizer slots)
        np.testing.assert_allclose(d2.state_dict()[k].numpy(), v.numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    mine, theirs = ema.apply(), ema2.apply()
    for k in ema.state_dict:
        np.testing.assert_allclose(theirs['student_model.' + k].numpy(), mine['student_model.' + k].numpy(),
                                   rtol=1e-6, atol=1e-7, err_msg=k)


# -- user-given state files: one-line error naming the file ---------------------------------------

def corrupt(path, how):
    data = open(path, 'rb').read()
    bad = {'truncated': data[:len(data) // 2], 'empty': b'', 'text': b'not a checkpoint\n'}[how]
    open(path, 'wb').write(bad)


@pytest.mark.parametrize('how', ['truncated', 'empty', 'text'])
@pytest.mark.parametrize('suffix', ['.pdparams', '.pdopt', '.pddistill'])
def test_corrupt_resume_file_is_an_error_naming_it(tmp_path, suffix, how):
    d, opt = build(0)
    save_checkpoint(d, opt, str(tmp_path), 'model_final', last_epoch=1)
    corrupt(tmp_path / f'model_final{suffix}', how)
    d2, opt2 = build(1)
    with pytest.raises(PPDistillError) as err:
        resume_checkpoint(d2, opt2, str(tmp_path / 'model_final'))
    assert str(tmp_path / f'model_final{suffix}') in str(err.value)
    assert '\n' not in str(err.value)


def test_corrupt_or_wrong_teacher_weights_are_an_error_naming_the_file(tmp_path):
    from ppdistill.build import load_checked_weights
    teacher = ToyDet(width=16, neck_ch=8, levels=3)
    path = str(tmp_path / 'teacher.pdparams')
    paddle.save(teacher.state_dict(), path)
    assert load_checked_weights(ToyDet(width=16, neck_ch=8, levels=3), path)[0] == len(teacher.state_dict())
    corrupt(path, 'truncated')
    with pytest.raises(PPDistillError, match='teacher weights .*teacher.pdparams cannot be read'):
        load_checked_weights(ToyDet(width=16, neck_ch=8, levels=3), path)
    paddle.save([1, 2], path)
    with pytest.raises(PPDistillError, match='not a state dict'):
        load_checked_weights(ToyDet(width=16, neck_ch=8, levels=3), path)


def test_resume_into_another_model_names_the_file(tmp_path):
    d, opt = build(0)
    save_checkpoint(d, opt, str(tmp_path), 'm', last_epoch=1)
    other = Distiller(student_model=ToyDet(neck_ch=8, dropout=0.0),
                      teacher_model=ToyDet(width=16, neck_ch=8, levels=3, dropout=0.0),
                      losses=LOSSES, probe_size=32)
    with pytest.raises(PPDistillError, match=r'm\.pdparams lacks or mis-shapes'):
        resume_checkpoint(other, paddle.optimizer.SGD(parameters=other.parameters()), str(tmp_path / 'm'))

import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os

import numpy as np
import paddle

from ppdistill import Distiller
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

"""CWDLoss vs a NumPy port of the paper's / mmrazor's ``ChannelWiseDivergence``; logit-role build checks."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest

from ppdistill import Distiller, DistillConfigError
from ppdistill.losses import CWDLoss
from ppdistill.presets import PRESETS
from toy_models import ToyDet, toy_inputs


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_cwd(student, teacher, tau, loss_weight):
    """Shu et al. 2021, eq. (3)-(4): per channel, KL of the spatial softmax maps; tau^2; / (N * C)."""
    n, c = teacher.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            p_t = np_softmax(teacher[i, j].ravel().astype(np.float64) / tau)
            p_s = np_softmax(student[i, j].ravel().astype(np.float64) / tau)
            total += np.sum(p_t * (np.log(p_t) - np.log(p_s)))
    return loss_weight * tau ** 2 * total / (n * c)


def np_conv1x1(x, weight, bias):
    return np.einsum('nchw,oc->nohw', x.astype(np.float64), weight[:, :, 0, 0]) + bias.reshape(1, -1, 1, 1)


@pytest.mark.parametrize('tau,weight', [(1.0, 1.0), (4.0, 10.0), (0.5, 5.0)])
def test_matches_numpy_reference(tau, weight):
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 5, 4)).astype('float32') * 2
    t = rng.standard_normal((2, 3, 5, 4)).astype('float32') * 2
    got = float(CWDLoss(3, 3, tau=tau, loss_weight=weight)(paddle.to_tensor(s), paddle.to_tensor(t)))
    np.testing.assert_allclose(got, np_cwd(s, t, tau, weight), rtol=1e-4)


def test_zero_when_student_matches_and_invariant_to_per_channel_shift():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((2, 4, 6, 6)).astype('float32')
    loss = CWDLoss(4, 4)
    assert abs(float(loss(paddle.to_tensor(t), paddle.to_tensor(t)))) < 1e-6
    # a spatial softmax ignores a per-(image, channel) constant
    shifted = t + rng.standard_normal((2, 4, 1, 1)).astype('float32') * 3
    assert abs(float(loss(paddle.to_tensor(shifted), paddle.to_tensor(t)))) < 1e-5


def test_channel_mismatch_aligns_student_and_trains_align_conv():
    paddle.seed(0)
    rng = np.random.default_rng(2)
    s = rng.standard_normal((2, 3, 4, 5)).astype('float32')
    t = rng.standard_normal((2, 6, 4, 5)).astype('float32')
    module = CWDLoss(3, 6, tau=2.0, loss_weight=3.0)
    assert module.align is not None
    params = {k: v.numpy().astype(np.float64) for k, v in module.named_parameters()}
    aligned = np_conv1x1(s, params['align.weight'], params['align.bias'])
    student = paddle.to_tensor(s, stop_gradient=False)
    got = module(student, paddle.to_tensor(t))
    np.testing.assert_allclose(float(got), np_cwd(aligned, t, 2.0, 3.0), rtol=1e-4)
    got.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert float(student.grad.abs().sum()) > 0


def test_bad_tau_is_rejected():
    with pytest.raises(ValueError, match='tau must be > 0'):
        CWDLoss(4, 4, tau=0.0)


def make(losses, student_neck=4, teacher_neck=8):
    paddle.seed(1)
    student = ToyDet(width=8, neck_ch=student_neck, levels=2, dropout=0.0)
    teacher = ToyDet(width=16, neck_ch=teacher_neck, levels=3, dropout=0.0)
    return Distiller(student_model=student, teacher_model=teacher, losses=losses, probe_size=32)


@pytest.fixture
def toy_logit_preset():
    """ToyDet as an architecture whose 'cls_logits' are (for the test) the neck outputs."""
    PRESETS['ToyDet'] = {'taps': {'fpn': 'neck', 'cls_logits': 'neck'}}
    yield
    del PRESETS['ToyDet']


def test_cwd_on_fpn_aligns_but_on_cls_logits_needs_equal_channels(toy_logit_preset):
    d = make([{'type': 'CWDLoss', 'student': 'fpn'}])
    assert [m.align is not None for m in d.distill_losses] == [True, True]
    out = d(toy_inputs())
    assert {'distill_cwd_l0', 'distill_cwd_l1'} <= set(out)
    with pytest.raises(DistillConfigError, match=r'differ in channels') as err:
        make([{'type': 'CWDLoss', 'student': 'cls_logits'}])
    msg = str(err.value)
    assert '\n' not in msg and '(1, 4, 8, 8)' in msg and '(1, 8, 8, 8)' in msg


def test_cwd_on_equal_channel_logits_trains_without_align(toy_logit_preset):
    d = make([{'type': 'CWDLoss', 'student': 'cls_logits', 'args': {'tau': 1.0, 'loss_weight': 5.0}}],
             student_neck=8)
    assert all(m.align is None for m in d.distill_losses)
    out = d(toy_inputs())
    assert float(out['distill_cwd_l0']) > 0 and 'distill_cwd_l1' in out


def test_bad_loss_argument_value_is_a_one_line_build_error():
    with pytest.raises(DistillConfigError, match=r"loss 'cwd' \(CWDLoss on neck -> neck\): .*tau must be > 0"):
        make([{'type': 'CWDLoss', 'student': 'neck', 'args': {'tau': -1}}])

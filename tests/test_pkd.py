"""PKDLoss vs a NumPy port of mmrazor's ``PKDLoss`` and the paper's Pearson-correlation identity."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest

from ppdistill.losses import PKDLoss


def np_norm(x):
    """mmrazor PKDLoss.norm: per channel over (N, H, W), unbiased std, (x - mean) / (std + 1e-6)."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    return (x - mean) / (std + 1e-6)


def np_pkd(student, teacher, loss_weight):
    return loss_weight * np.mean((np_norm(student) - np_norm(teacher)) ** 2) / 2


def np_pearson_form(student, teacher, loss_weight):
    """Cao et al. 2022: the loss is (M-1)/M * mean_c (1 - r_c), r_c the Pearson r of channel c over M values."""
    c = student.shape[1]
    s = student.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
    t = teacher.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
    m = s.shape[1]
    r = np.array([np.corrcoef(s[i], t[i])[0, 1] for i in range(c)])
    return loss_weight * (m - 1) / m * np.mean(1 - r)


@pytest.mark.parametrize('weight', [1.0, 6.0])
def test_matches_numpy_reference_and_pearson_identity(weight):
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 4, 5)).astype('float32')
    t = (rng.standard_normal((2, 3, 4, 5)) * 7 + 3 + s).astype('float32')
    got = float(PKDLoss(3, 3, loss_weight=weight)(paddle.to_tensor(s), paddle.to_tensor(t)))
    np.testing.assert_allclose(got, np_pkd(s, t, weight), rtol=1e-4)
    np.testing.assert_allclose(got, np_pearson_form(s, t, weight), rtol=1e-4)


def test_invariant_to_per_channel_affine_teacher():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((2, 4, 6, 6)).astype('float32')
    t = rng.standard_normal((2, 4, 6, 6)).astype('float32')
    scaled = t * np.array([0.1, 5., 30., 2.], 'float32').reshape(1, 4, 1, 1) + 11
    loss = PKDLoss(4, 4)
    a = float(loss(paddle.to_tensor(s), paddle.to_tensor(t)))
    b = float(loss(paddle.to_tensor(s), paddle.to_tensor(scaled)))
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert float(loss(paddle.to_tensor(t), paddle.to_tensor(scaled))) < 1e-6


def test_channel_mismatch_aligns_student_and_trains_align_conv():
    paddle.seed(0)
    rng = np.random.default_rng(2)
    s = rng.standard_normal((2, 3, 4, 5)).astype('float32')
    t = rng.standard_normal((2, 8, 4, 5)).astype('float32')
    module = PKDLoss(3, 8, loss_weight=10.0)
    w, b = module.align.weight.numpy().astype(np.float64), module.align.bias.numpy().astype(np.float64)
    aligned = np.einsum('nchw,oc->nohw', s.astype(np.float64), w[:, :, 0, 0]) + b.reshape(1, -1, 1, 1)
    student = paddle.to_tensor(s, stop_gradient=False)
    got = module(student, paddle.to_tensor(t))
    np.testing.assert_allclose(float(got), np_pkd(aligned, t, 10.0), rtol=1e-4)
    got.backward()
    assert float(module.align.weight.grad.abs().sum()) > 0
    # the align bias takes part in the graph, but the standardisation removes it: its gradient is ~0
    assert module.align.bias.grad is not None
    assert float(module.align.bias.grad.abs().max()) < 1e-5 * float(module.align.weight.grad.abs().max())
    assert float(student.grad.abs().sum()) > 0

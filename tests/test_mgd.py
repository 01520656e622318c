"""MGDLoss vs a NumPy port of yzd-v/MGD ``FeatureLoss.get_dis_loss``."""
import ppdet  # noqa: F401  (import before paddle)
import numpy as np
import paddle
import pytest

from ppdistill.losses import FeatureLoss, MGDLoss


def np_conv(x, weight, bias):
    """'same' conv, stride 1, odd square kernel: x [N,C,H,W], weight [O,C,k,k], bias [O]."""
    k = weight.shape[-1]
    p = k // 2
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((n, weight.shape[0], h, w), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            out += np.einsum('nchw,oc->nohw', xp[:, :, i:i + h, j:j + w], weight[:, :, i, j])
    return out + bias.reshape(1, -1, 1, 1)


def np_mgd(module, student, teacher, mask):
    params = {name: p.numpy().astype(np.float64) for name, p in module.named_parameters()}
    s = student.astype(np.float64)
    if module.align is not None:
        s = np_conv(s, params['align.weight'], params['align.bias'])
    hidden = np.maximum(np_conv(s * mask, params['generation.0.weight'], params['generation.0.bias']), 0)
    gen = np_conv(hidden, params['generation.2.weight'], params['generation.2.bias'])
    return module.alpha_mgd * ((gen - teacher) ** 2).sum() / student.shape[0]


def _feats(rng, n, cs, ct, h, w):
    return (rng.standard_normal((n, cs, h, w)).astype('float32'),
            rng.standard_normal((n, ct, h, w)).astype('float32'))


@pytest.mark.parametrize('cs,ct,mode', [(4, 4, 'spatial'), (3, 5, 'spatial'), (4, 4, 'channel')])
def test_masked_loss_matches_numpy(cs, ct, mode):
    paddle.seed(1)
    rng = np.random.default_rng(1)
    module = MGDLoss(cs, ct, alpha_mgd=0.5, lambda_mgd=0.5, mask_mode=mode)
    s, t = _feats(rng, 2, cs, ct, 5, 6)
    mask_shape = (2, 1, 5, 6) if mode == 'spatial' else (2, ct, 1, 1)
    mask = (rng.random(mask_shape) > 0.5).astype('float32')
    assert 0 < mask.sum() < mask.size
    got = module.masked_loss(paddle.to_tensor(s), paddle.to_tensor(t), paddle.to_tensor(mask))
    assert got.size == 1
    want = np_mgd(module, s, t, mask)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # the mask matters: an all-ones mask gives a different value
    unmasked = np_mgd(module, s, t, np.ones(mask_shape, 'float32'))
    assert abs(unmasked - want) > 1e-3 * abs(want)


def test_lambda_zero_forward_is_unmasked():
    paddle.seed(2)
    rng = np.random.default_rng(2)
    module = MGDLoss(4, 4, lambda_mgd=0.0)
    s, t = _feats(rng, 2, 4, 4, 4, 5)
    got = float(module(paddle.to_tensor(s), paddle.to_tensor(t)))
    np.testing.assert_allclose(got, np_mgd(module, s, t, np.ones((2, 1, 4, 5))), rtol=1e-5)
    assert float(module.sample_mask([2, 4, 64, 64]).min()) == 1.0


def test_sample_mask_fraction_and_shapes():
    paddle.seed(3)
    spatial = MGDLoss(4, 4, lambda_mgd=0.65)
    mask = spatial.sample_mask([4, 8, 128, 128])
    assert list(mask.shape) == [4, 1, 128, 128] and mask.dtype == paddle.float32
    values = np.unique(mask.numpy())
    assert set(values.tolist()) == {0.0, 1.0}
    assert abs((1.0 - float(mask.mean())) - 0.65) < 0.01

    channel = MGDLoss(4, 4, lambda_mgd=0.3, mask_mode='channel')
    cmask = channel.sample_mask([64, 256, 7, 9])
    assert list(cmask.shape) == [64, 256, 1, 1]
    assert abs((1.0 - float(cmask.mean())) - 0.3) < 0.02


def test_forward_uses_sampled_mask():
    paddle.seed(4)
    rng = np.random.default_rng(4)
    module = MGDLoss(4, 4, lambda_mgd=0.5)
    s, t = (paddle.to_tensor(a) for a in _feats(rng, 2, 4, 4, 6, 6))
    paddle.seed(123)
    got = float(module(s, t))
    paddle.seed(123)
    mask = module.sample_mask(t.shape)
    np.testing.assert_allclose(got, float(module.masked_loss(s, t, mask)), rtol=1e-6)
    assert float(mask.mean()) < 1.0


def test_align_conv_only_on_channel_mismatch():
    same = MGDLoss(6, 6)
    assert same.align is None
    diff = MGDLoss(3, 6)
    assert isinstance(diff, FeatureLoss) and isinstance(diff.align, paddle.nn.Conv2D)
    assert list(diff.align.weight.shape) == [6, 3, 1, 1]
    x = paddle.randn([1, 3, 2, 2])
    assert list(diff.align_student(x).shape) == [1, 6, 2, 2]
    assert same.align_student(x) is x


def test_gradients_reach_generator_and_align():
    paddle.seed(5)
    module = MGDLoss(3, 4, alpha_mgd=1.0, lambda_mgd=0.5)
    s = paddle.randn([2, 3, 5, 5])
    t = paddle.randn([2, 4, 5, 5])
    module(s, t).backward()
    names = [name for name, _ in module.named_parameters()]
    assert {'align.weight', 'align.bias', 'generation.0.weight', 'generation.2.weight'} <= set(names)
    for name, p in module.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize('kwargs', [{'lambda_mgd': 1.0}, {'lambda_mgd': -0.1}, {'mask_mode': 'pixel'}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        MGDLoss(4, 4, **kwargs)


def test_shape_mismatch_raises():
    module = MGDLoss(4, 4)
    with pytest.raises(ValueError):
        module(paddle.zeros([1, 4, 3, 3]), paddle.zeros([1, 4, 3, 4]))
    with pytest.raises(ValueError):
        module(paddle.zeros([1, 5, 3, 3]), paddle.zeros([1, 4, 3, 3]))


def test_registered_with_ppdet():
    from ppdet.core.workspace import global_config
    for name in ('MGDLoss', 'FGDLoss'):
        assert name in global_config
        assert global_config[name].pymodule.__name__.startswith('ppdistill.losses.')

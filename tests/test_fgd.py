"""FGDLoss vs an independent NumPy implementation of yzd-v/FGD ``FeatureLoss``."""
import ppdet  # noqa: F401  (import before paddle)
import numpy as np
import paddle
import pytest

from ppdistill.losses import FGDLoss
from ppdistill.losses.base import loss_total

IM_SHAPE = [[48, 64], [40, 64], [48, 56]]  # unpadded sizes ...
INPUT_SIZE = (48, 64)  # ... padded into one batch (PadBatch): the feature maps cover this
BOXES = [np.array([[4, 3, 30, 20], [20, 10, 60, 47], [-5, 30, 9, 52]], 'float32'),
         np.zeros((0, 4), 'float32'),  # an image without GT
         np.array([[10.5, 12.25, 11.0, 13.0]], 'float32')]  # a tiny box
H, W = 6, 8


# ----------------------------------------------------------------------------- NumPy reference
def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_masks(boxes_per_image, input_size, h, w):
    """yzd-v/FGD's mask loop (``x / img_w * W`` in float32) with img_shape = the padded input size;
    degenerate rows (x2<=x1 or y2<=y1) cover nothing."""
    n = len(boxes_per_image)
    fg, bg = np.zeros((n, h, w)), np.ones((n, h, w))
    im_h, im_w, h32, w32 = (np.float32(v) for v in (*input_size, h, w))
    for i in range(n):
        for x1, y1, x2, y2 in np.asarray(boxes_per_image[i], np.float32).reshape(-1, 4):
            if not (x2 > x1 and y2 > y1):
                continue
            wmin, wmax = int(np.floor(x1 / im_w * w32)), int(np.ceil(x2 / im_w * w32))
            hmin, hmax = int(np.floor(y1 / im_h * h32)), int(np.ceil(y2 / im_h * h32))
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            sl = (i, slice(max(hmin, 0), max(hmax + 1, 0)), slice(max(wmin, 0), max(wmax + 1, 0)))
            fg[sl] = np.maximum(fg[sl], area)
        bg[i] = np.where(fg[i] > 0, 0, 1)
        if bg[i].sum():
            bg[i] /= bg[i].sum()
    return fg, bg


def np_attention(x, temp):
    n, c, h, w = x.shape
    v = np.abs(x)
    s_att = h * w * softmax(v.mean(axis=1).reshape(n, -1) / temp, axis=1).reshape(n, h, w)
    c_att = c * softmax(v.mean(axis=(2, 3)) / temp, axis=1)
    return s_att, c_att


def conv1x1(x, weight, bias=None):
    out = np.einsum('nchw,oc->nohw', x, weight[:, :, 0, 0])
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def np_spatial_pool(x, conv_w, conv_b):
    n, c, h, w = x.shape
    weights = softmax(conv1x1(x, conv_w, conv_b).reshape(n, h * w), axis=1)
    return np.einsum('nck,nk->nc', x.reshape(n, c, h * w), weights).reshape(n, c, 1, 1)


def np_channel_add(ctx, p, prefix):
    y = conv1x1(ctx, p[prefix + '.0.weight'], p[prefix + '.0.bias'])
    mu = y.mean(axis=(1, 2, 3), keepdims=True)
    var = y.var(axis=(1, 2, 3), keepdims=True)
    y = (y - mu) / np.sqrt(var + 1e-5)
    y = y * p[prefix + '.1.weight'].reshape(1, -1, 1, 1) + p[prefix + '.1.bias'].reshape(1, -1, 1, 1)
    y = np.maximum(y, 0)
    return conv1x1(y, p[prefix + '.3.weight'], p[prefix + '.3.bias'])


def np_fgd(module, s, t, boxes, input_size=INPUT_SIZE):
    p = {name: v.numpy().astype(np.float64) for name, v in module.named_parameters()}
    s, t = s.astype(np.float64), t.astype(np.float64)
    if 'align.weight' in p:
        s = conv1x1(s, p['align.weight'], p['align.bias'])
    n = s.shape[0]
    s_t, c_t = np_attention(t, module.temp)
    s_s, c_s = np_attention(s, module.temp)
    fg, bg = np_masks(boxes, input_size, s.shape[2], s.shape[3])
    fg, bg, s_t4, c_t4 = fg[:, None], bg[:, None], s_t[:, None], c_t[:, :, None, None]
    fea_t = t * np.sqrt(s_t4) * np.sqrt(c_t4)
    fea_s = s * np.sqrt(s_t4) * np.sqrt(c_t4)
    fg_loss = ((fea_s * np.sqrt(fg) - fea_t * np.sqrt(fg)) ** 2).sum() / n
    bg_loss = ((fea_s * np.sqrt(bg) - fea_t * np.sqrt(bg)) ** 2).sum() / n
    mask_loss = np.abs(c_s - c_t).sum() / n + np.abs(s_s - s_t).sum() / n
    out_s = s + np_channel_add(np_spatial_pool(s, p['conv_mask_s.weight'], p.get('conv_mask_s.bias')),
                               p, 'channel_add_conv_s')
    out_t = t + np_channel_add(np_spatial_pool(t, p['conv_mask_t.weight'], p.get('conv_mask_t.bias')),
                               p, 'channel_add_conv_t')
    rela_loss = ((out_s - out_t) ** 2).sum() / n
    terms = {'fg': fg_loss, 'bg': bg_loss, 'mask': mask_loss, 'rela': rela_loss}
    total = (module.alpha_fgd * fg_loss + module.beta_fgd * bg_loss + module.gamma_fgd * mask_loss +
             module.lambda_fgd * rela_loss)
    return total, terms


# ----------------------------------------------------------------------------- helpers
def make_inputs(boxes=BOXES, im_shape=IM_SHAPE, padded=False):
    if padded:
        m = max(len(b) for b in boxes)
        gt = np.zeros((len(boxes), m, 4), 'float32')
        for i, b in enumerate(boxes):
            gt[i, :len(b)] = b
        gt_bbox = paddle.to_tensor(gt)
    else:
        gt_bbox = [paddle.to_tensor(b) for b in boxes]
    return {'gt_bbox': gt_bbox, 'im_shape': paddle.to_tensor(np.asarray(im_shape, 'float32')),
            'image': paddle.zeros([len(boxes), 3, *INPUT_SIZE])}


def make_feats(seed, n=3, cs=6, ct=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, cs, H, W)).astype('float32'),
            rng.standard_normal((n, ct, H, W)).astype('float32'))


def randomise_zero_init(module, seed):
    """Give the zero-initialised last convs, the LayerNorms and all biases random values."""
    rng = np.random.default_rng(seed)
    for name, p in module.named_parameters():
        if name.endswith('bias') or (name.startswith('channel_add_conv') and
                                     ('.3.' in name or '.1.' in name)):
            p.set_value(rng.uniform(0.5, 1.5, p.shape).astype('float32') if name.endswith('.1.weight')
                        else 0.3 * rng.standard_normal(p.shape).astype('float32'))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize('cs', [6, 8])
def test_full_loss_matches_numpy(cs):
    paddle.seed(0)
    module = FGDLoss(cs, 8, temp=0.5, alpha_fgd=1.0, beta_fgd=2.0, gamma_fgd=3.0, lambda_fgd=0.5)
    randomise_zero_init(module, 1)
    for name, p in module.named_parameters():
        assert float(p.abs().sum()) > 0, name  # non-zero weights in every conv
    s, t = make_feats(2, cs=cs)
    got = loss_total(module(paddle.to_tensor(s), paddle.to_tensor(t), make_inputs()))
    assert got.size == 1
    want, terms = np_fgd(module, s, t, BOXES)
    assert all(v > 0 for v in terms.values()), terms
    np.testing.assert_allclose(float(got), want, rtol=2e-5)

    fg, bg = np_masks(BOXES, INPUT_SIZE, H, W)
    got_terms = module.loss_terms(paddle.to_tensor(s), paddle.to_tensor(t),
                                  paddle.to_tensor(fg.astype('float32')),
                                  paddle.to_tensor(bg.astype('float32')))
    for key, value in terms.items():
        np.testing.assert_allclose(float(got_terms[key]), value, rtol=2e-5, err_msg=key)
    # forward returns the weighted sub-terms (logged one by one by the distiller); their sum is the loss
    subs = module(paddle.to_tensor(s), paddle.to_tensor(t), make_inputs())
    assert sorted(subs) == ['bg', 'fg', 'mask', 'rela']
    for key, weight in (('fg', 1.0), ('bg', 2.0), ('mask', 3.0), ('rela', 0.5)):
        np.testing.assert_allclose(float(subs[key]), weight * terms[key], rtol=2e-5, err_msg=key)


def test_default_init_relation_is_plain_sse():
    paddle.seed(1)
    module = FGDLoss(6, 8)
    s, t = make_feats(3)
    fg, bg = np_masks(BOXES, INPUT_SIZE, H, W)
    terms = module.loss_terms(paddle.to_tensor(s), paddle.to_tensor(t),
                              paddle.to_tensor(fg.astype('float32')),
                              paddle.to_tensor(bg.astype('float32')))
    aligned = module.align(paddle.to_tensor(s)).numpy().astype(np.float64)
    want = ((aligned - t) ** 2).sum() / 3
    np.testing.assert_allclose(float(terms['rela']), want, rtol=1e-5)
    # only the last conv of each channel_add block is zero-initialised
    for side in 's', 't':
        block = getattr(module, f'channel_add_conv_{side}')
        assert float(block[3].weight.abs().sum()) == 0 and float(block[3].bias.abs().sum()) == 0
        assert float(block[0].weight.abs().sum()) > 0
        assert float(getattr(module, f'conv_mask_{side}').weight.abs().sum()) > 0


def test_every_parameter_gets_gradient_within_two_sgd_steps():
    paddle.seed(2)
    module = FGDLoss(6, 8)  # default weights
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=module.parameters())
    s, t = (paddle.to_tensor(a) for a in make_feats(3))
    inputs = make_inputs()
    seen = {name: False for name, _ in module.named_parameters()}
    for _ in range(2):
        loss = loss_total(module(s, t, inputs))
        loss.backward()
        for name, p in module.named_parameters():
            assert p.grad is not None, name  # every parameter is in the graph at every step
            seen[name] |= bool(float(p.grad.abs().sum()) > 0)
        opt.step()
        opt.clear_grad()
    assert seen['conv_mask_s.weight'] and seen['conv_mask_t.weight']
    assert all(seen.values()), [name for name, ok in seen.items() if not ok]


def test_all_empty_batch_is_finite_and_keeps_every_parameter():
    paddle.seed(3)
    module = FGDLoss(6, 8, alpha_fgd=1.0, beta_fgd=1.0, gamma_fgd=1.0, lambda_fgd=1.0)
    randomise_zero_init(module, 3)
    s, t = make_feats(4, n=2)
    empty = [np.zeros((0, 4), 'float32')] * 2
    for padded in (False, True):
        inputs = make_inputs(empty, IM_SHAPE[:2], padded=padded)
        loss = loss_total(module(paddle.to_tensor(s), paddle.to_tensor(t), inputs))
        assert np.isfinite(float(loss))
        want, terms = np_fgd(module, s, t, empty)
        assert terms['fg'] == 0
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)
        loss.backward()
        for name, p in module.named_parameters():
            assert p.grad is not None, name
        module.clear_gradients()


def test_padded_and_list_gt_bbox_agree():
    paddle.seed(4)
    module = FGDLoss(8, 8)
    s, t = (paddle.to_tensor(a) for a in make_feats(5, cs=8))
    a = float(loss_total(module(s, t, make_inputs(padded=False))))
    b = float(loss_total(module(s, t, make_inputs(padded=True))))
    assert a == pytest.approx(b, rel=1e-6)
    # pad_gt_mask hiding a real box changes the loss
    inputs = make_inputs(padded=True)
    pad_gt_mask = np.ones(list(inputs['gt_bbox'].shape[:2]) + [1], 'float32')
    pad_gt_mask[0, 1] = 0
    inputs['pad_gt_mask'] = paddle.to_tensor(pad_gt_mask)
    assert float(loss_total(module(s, t, inputs))) != pytest.approx(a, rel=1e-6)


def test_missing_inputs_raise():
    module = FGDLoss(8, 8)
    s, t = (paddle.to_tensor(a) for a in make_feats(6, cs=8))
    with pytest.raises(ValueError):
        module(s, t)
    with pytest.raises(ValueError):
        module(s, t, {'im_shape': paddle.to_tensor(np.asarray(IM_SHAPE, 'float32'))})
    with pytest.raises(ValueError):  # the padded input size comes from the image
        module(s, t, {'gt_bbox': [paddle.zeros([0, 4])] * 3})


def test_degenerate_boxes_give_a_finite_loss_equal_to_numpy():
    paddle.seed(5)
    module = FGDLoss(6, 8, alpha_fgd=1.0, beta_fgd=1.0, gamma_fgd=1.0, lambda_fgd=1.0)
    randomise_zero_init(module, 5)
    s, t = make_feats(6)
    boxes = [np.array([[10, 10, 10, 30], [30, 10, 20, 30], [-90, -90, -10, -10], [100, 60, 140, 90],
                       [4, 3, 30, 20]], 'float32'),   # zero/negative width, outside, one real box
             np.array([[5, 5, 5, 9]], 'float32'),       # only a zero-width box
             np.array([[-1e6, -1e6, 1e6, 1e6]], 'float32')]  # a box far larger than the image
    for padded in (False, True):
        loss = loss_total(module(paddle.to_tensor(s), paddle.to_tensor(t), make_inputs(boxes, padded=padded)))
        assert np.isfinite(float(loss))
        want, _ = np_fgd(module, s, t, boxes)
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def test_padded_batch_of_landscape_and_portrait_images_scales_boxes_by_the_padded_size():
    """ppdet's PadBatch pads a 64x96 and a 96x64 image to 96x96: the 12x12 stride-8 maps cover the padded
    image, so the boxes scale by 96x96 for both, not by each image's own im_shape."""
    paddle.seed(6)
    module = FGDLoss(8, 8, alpha_fgd=1.0, beta_fgd=1.0, gamma_fgd=1.0, lambda_fgd=1.0)
    rng = np.random.default_rng(7)
    s = rng.standard_normal((2, 8, 12, 12)).astype('float32')
    t = rng.standard_normal((2, 8, 12, 12)).astype('float32')
    boxes = [np.array([[8, 16, 88, 40], [50, 30, 95, 63]], 'float32'),
             np.array([[8, 16, 24, 88], [40, 60, 63, 95]], 'float32')]
    inputs = {'gt_bbox': [paddle.to_tensor(b) for b in boxes],
              'im_shape': paddle.to_tensor([[64.0, 96.0], [96.0, 64.0]]),
              'image': paddle.zeros([2, 3, 96, 96])}
    got = float(loss_total(module(paddle.to_tensor(s), paddle.to_tensor(t), inputs)))
    want, terms = np_fgd(module, s, t, boxes, (96, 96))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # sanity: scaling the landscape image's boxes by its own 64x96 would change its masks
    assert not np.array_equal(np_masks(boxes[:1], (64, 96), 12, 12)[0],
                              np_masks(boxes[:1], (96, 96), 12, 12)[0])

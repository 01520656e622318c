"""FGFI masks and loss vs an independent NumPy reference written from the paper and
``twangnh/Distilling-Object-Detectors`` (``anchor_target_layer.py`` mask loop, ``trainval_net_sup.py`` loss).
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import math

import numpy as np
import paddle
import pytest

from ppdistill import Distiller, PPDistillError
from ppdistill.losses import FGFILoss
from ppdistill.masks import fgfi_masks, level_stride, retina_anchor_wh
from toy_models import ToyDet, toy_inputs


# ----------------------------------------------------------------------------- NumPy reference
def np_retina_wh(stride, octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1.0, 2.0)):
    """ppdet RetinaAnchorGenerator + AnchorGenerator.generate_cell_anchors, one anchor at a time."""
    out = []
    for i in range(scales_per_octave):
        size = stride * octave_base_scale * 2 ** (i / scales_per_octave)
        for r in ratios:
            w = math.sqrt(size * size / r)
            out.append((w, r * w))
    return out


def np_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def np_fgfi_mask(boxes_per_image, wh, h, w, stride_h, stride_w, psi=0.5, offset=0.0):
    """Per image: per GT, IoU with every anchor, threshold psi * max, OR over anchors and GTs."""
    mask = np.zeros((len(boxes_per_image), h, w))
    for i, boxes in enumerate(boxes_per_image):
        for box in np.asarray(boxes, np.float64).reshape(-1, 4):
            if not (box[2] > box[0] and box[3] > box[1]):
                continue  # padding / degenerate
            ious = np.zeros((h, w, len(wh)))
            for y in range(h):
                for x in range(w):
                    cx, cy = (x + offset) * stride_w, (y + offset) * stride_h
                    for a, (aw, ah) in enumerate(wh):
                        ious[y, x, a] = np_iou(box, (cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2))
            passed = ious > psi * ious.max()
            mask[i] = np.maximum(mask[i], passed.any(axis=2))
    return mask


def random_boxes(rng, n, im_h, im_w):
    xy = rng.uniform([-10, -10], [im_w - 4, im_h - 4], size=(n, 2))
    size = rng.uniform(3, max(im_h, im_w) * 0.8, size=(n, 2))
    return np.concatenate([xy, xy + size], axis=1).astype('float32')


def padded(boxes_per_image):
    m = max(len(b) for b in boxes_per_image)
    out = np.zeros((len(boxes_per_image), m, 4), 'float32')
    valid = np.zeros((len(boxes_per_image), m, 1), 'float32')
    for i, b in enumerate(boxes_per_image):
        out[i, :len(b)] = b
        valid[i, :len(b)] = 1
    return out, valid


def conv3x3(x, weight, bias):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, weight.shape[0], h, w))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum('nchw,oc->nohw', xp[:, :, dy:dy + h, dx:dx + w], weight[:, :, dy, dx])
    return out + bias.reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize('stride', [8, 16, 32, 64, 128])
def test_retina_anchor_sizes_match_ppdet_generator(stride):
    np.testing.assert_allclose(retina_anchor_wh(stride, 2, 3, [0.5, 1.0, 2.0]),
                               np_retina_wh(stride, 2, 3, (0.5, 1.0, 2.0)), rtol=1e-12)
    np.testing.assert_allclose(retina_anchor_wh(stride), np_retina_wh(stride), rtol=1e-12)


def test_level_stride_recovers_power_of_two_strides():
    for image in (96, 100, 320, 333, 608, 800, 1333):
        for stride in (4, 8, 16, 32, 64, 128):
            # stride-2 convs: every level is ceil(image / stride) cells
            assert level_stride(image, math.ceil(image / stride)) == stride, (image, stride)
    # pooling (floor) where ceil cannot explain the size; ceil wins where both could (96 px, 1 cell)
    assert level_stride(100, 12) == 8 and level_stride(333, 41) == 8 and level_stride(96, 1) == 128
    assert level_stride(12, 5) == pytest.approx(12 / 5)  # no power of two fits: the plain ratio


def check_mask(boxes_per_image, wh, h, w, stride, use_padded=False, **kw):
    expect = np_fgfi_mask(boxes_per_image, wh, h, w, stride, stride, **kw)
    if use_padded:
        gt, valid = padded(boxes_per_image)
        got = fgfi_masks(paddle.to_tensor(gt), np.asarray(wh), h, w, stride, stride,
                         pad_gt_mask=paddle.to_tensor(valid), **kw)
    else:
        got = fgfi_masks([paddle.to_tensor(b) for b in boxes_per_image], np.asarray(wh), h, w, stride,
                         stride, **kw)
    assert got.stop_gradient and list(got.shape) == [len(boxes_per_image), h, w]
    np.testing.assert_array_equal(got.numpy(), expect)
    return expect


@pytest.mark.parametrize('use_padded', [False, True])
def test_retina_anchor_masks_match_reference(use_padded):
    rng = np.random.RandomState(0)
    boxes = [random_boxes(rng, 4, 96, 128), np.zeros((0, 4), 'float32'), random_boxes(rng, 2, 96, 128)]
    for stride, (h, w) in ((8, (12, 16)), (16, (6, 8)), (32, (3, 4))):
        expect = check_mask(boxes, np_retina_wh(stride, 2), h, w, stride, use_padded)
        assert expect[0].sum() > 0 and expect[1].sum() == 0  # the case is not trivial


def test_explicit_wh_anchor_masks_match_reference():
    rng = np.random.RandomState(1)
    boxes = [random_boxes(rng, 3, 64, 64), random_boxes(rng, 5, 64, 64)]
    wh = [(10, 13), (16, 30), (33, 23)]  # YOLOv3's stride-8 anchors
    for offset in (0.0, 0.5):
        expect = check_mask(boxes, wh, 8, 8, 8, offset=offset)
        assert 0 < expect.sum() < expect.size


def test_virtual_anchor_masks_match_reference_and_psi_matters():
    rng = np.random.RandomState(2)
    boxes = [random_boxes(rng, 3, 96, 96), random_boxes(rng, 1, 96, 96)]
    for psi in (0.3, 0.5, 0.8):
        check_mask(boxes, [(5 * 16, 5 * 16)], 6, 6, 16, offset=0.5, psi=psi)
    loose = np_fgfi_mask(boxes, [(80, 80)], 6, 6, 16, 16, psi=0.3, offset=0.5)
    tight = np_fgfi_mask(boxes, [(80, 80)], 6, 6, 16, 16, psi=0.8, offset=0.5)
    assert tight.sum() < loose.sum()


def test_threshold_is_strict():
    # 24x24 anchors every 8 px; the GT equals the anchor of cell (2, 2). Its 4-neighbours overlap it by
    # 16x24 of a 768 px^2 union: IoU exactly 0.5 = psi * max IoU, which does not pass (strict >).
    box = [np.array([[4, 4, 28, 28]], 'float32')]
    only_centre = np.zeros((1, 5, 5))
    only_centre[0, 2, 2] = 1
    np.testing.assert_array_equal(fgfi_masks(box, [[24, 24]], 5, 5, 8, 8, psi=0.5).numpy(), only_centre)
    cross = only_centre.copy()
    cross[0, [1, 3, 2, 2], [2, 2, 1, 3]] = 1
    np.testing.assert_array_equal(fgfi_masks(box, [[24, 24]], 5, 5, 8, 8, psi=0.49).numpy(), cross)


def test_empty_degenerate_and_far_away_boxes_mark_nothing():
    wh = np_retina_wh(8)
    empty = [np.zeros((0, 4), 'float32')] * 2
    assert fgfi_masks(empty, np.asarray(wh), 4, 4, 8, 8).numpy().sum() == 0
    degenerate = [np.array([[5, 5, 5, 9], [5, 5, 9, 5], [9, 9, 5, 5]], 'float32'),
                  np.array([[1e4, 1e4, 1e4 + 5, 1e4 + 5]], 'float32')]  # far outside every anchor
    assert fgfi_masks(degenerate, np.asarray(wh), 4, 4, 8, 8).numpy().sum() == 0
    # a degenerate box next to a real one changes nothing
    real = np.array([[3, 4, 20, 30]], 'float32')
    mixed = [np.concatenate([degenerate[0], real]), real]
    check_mask(mixed, wh, 4, 4, 8)
    np.testing.assert_array_equal(fgfi_masks(mixed, np.asarray(wh), 4, 4, 8, 8).numpy()[0],
                                  np_fgfi_mask([real], wh, 4, 4, 8, 8)[0])


def test_pad_gt_mask_drops_masked_rows_even_with_coordinates():
    rng = np.random.RandomState(3)
    boxes = [random_boxes(rng, 3, 64, 64), random_boxes(rng, 2, 64, 64)]
    gt, valid = padded(boxes)
    gt[1, 2] = [0, 0, 60, 60]  # a padded row with real-looking coordinates, switched off by the mask
    got = fgfi_masks(paddle.to_tensor(gt), np.asarray(np_retina_wh(8)), 8, 8, 8, 8,
                     pad_gt_mask=paddle.to_tensor(valid))
    np.testing.assert_array_equal(got.numpy(), np_fgfi_mask(boxes, np_retina_wh(8), 8, 8, 8, 8))


# ----------------------------------------------------------------------------- loss
def inputs_for(boxes, n, size):
    return {'image': paddle.zeros([n, 3, size, size]), 'gt_bbox': [paddle.to_tensor(b) for b in boxes]}


def np_loss(module, s, t, mask, relu=True):
    p = {k: v.numpy().astype(np.float64) for k, v in module.named_parameters()}
    a = conv3x3(s.astype(np.float64), p['adaptation.0.weight'], p['adaptation.0.bias'])
    a = np.maximum(a, 0) if relu else a
    m = mask[:, None]
    return module.loss_weight * ((t - a) ** 2 * m).sum() / (2 * m.sum()), a


@pytest.mark.parametrize('relu', [True, False])
def test_loss_matches_numpy_with_channel_mismatch(relu):
    paddle.seed(0)
    rng = np.random.RandomState(4)
    loss = FGFILoss(3, 5, loss_weight=0.7, adapt_relu=relu,
                    anchors={'octave_base_scale': 2, 'strides': [8, 16], 'offset': 0.0},
                    level=1, num_levels=2)
    # a larger weight than the reference's 1e-4 init, so the conv term is not negligible in the check
    loss.adaptation[0].weight.set_value(rng.normal(0, 0.3, size=[5, 3, 3, 3]).astype('float32'))
    boxes = [random_boxes(rng, 3, 96, 96), np.zeros((0, 4), 'float32')]
    s = rng.normal(size=(2, 3, 6, 6)).astype('float32')
    t = rng.normal(size=(2, 5, 6, 6)).astype('float32')
    got = loss(paddle.to_tensor(s), paddle.to_tensor(t), inputs_for(boxes, 2, 96))
    mask = np_fgfi_mask(boxes, np_retina_wh(16, 2), 6, 6, 16, 16)
    assert mask.sum() > 0
    expect, adapted = np_loss(loss, s, t, mask, relu)
    np.testing.assert_allclose(float(got), expect, rtol=1e-5)
    assert relu or adapted.min() < 0  # without the ReLU the student side can go negative


def test_adaptation_gets_the_analytic_gradient():
    paddle.seed(1)
    rng = np.random.RandomState(5)
    loss = FGFILoss(4, 4, anchors={'virtual_anchor_scale': 5.0, 'offset': 0.5})
    # O(1) responses, so float32 and float64 agree on the sign of every ReLU input
    loss.adaptation[0].weight.set_value(rng.normal(0, 0.3, size=[4, 4, 3, 3]).astype('float32'))
    loss.adaptation[0].bias.set_value(rng.normal(0, 0.3, size=[4]).astype('float32'))
    boxes = [random_boxes(rng, 2, 64, 64), random_boxes(rng, 1, 64, 64)]
    s = rng.normal(size=(2, 4, 8, 8)).astype('float32')
    t = np.abs(rng.normal(size=(2, 4, 8, 8))).astype('float32')
    out = loss(paddle.to_tensor(s), paddle.to_tensor(t), inputs_for(boxes, 2, 64))
    out.backward()
    mask = np_fgfi_mask(boxes, [(40, 40)], 8, 8, 8, 8, offset=0.5)
    _, adapted = np_loss(loss, s, t, mask)
    # d/db_c of w * sum(m (t - relu(a))^2) / (2 sum m) = -w / sum(m) * sum(m (t - a) [a > 0])
    expect = -loss.loss_weight / mask.sum() * ((t - adapted) * (adapted > 0) * mask[:, None]).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(loss.adaptation[0].bias.grad.numpy(), expect, rtol=1e-4, atol=1e-9)
    assert np.abs(loss.adaptation[0].weight.grad.numpy()).sum() > 0


def test_batch_without_gt_is_zero_with_zero_gradient_present():
    loss = FGFILoss(3, 6)
    s = paddle.randn([2, 3, 4, 4])
    s.stop_gradient = False
    for boxes in ([np.zeros((0, 4), 'float32')] * 2, paddle.zeros([2, 0, 4])):
        loss.clear_gradients()
        inputs = {'image': paddle.zeros([2, 3, 32, 32]),
                  'gt_bbox': [paddle.to_tensor(b) for b in boxes] if isinstance(boxes, list) else boxes}
        out = loss(s, paddle.randn([2, 6, 4, 4]), inputs)
        assert float(out) == 0.0
        out.backward()
        for p in loss.parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) == 0.0


def test_adaptation_init_follows_the_reference_weights():
    paddle.seed(2)
    loss = FGFILoss(64, 128)
    w = loss.adaptation[0].weight.numpy()
    assert list(w.shape) == [128, 64, 3, 3] and isinstance(loss.adaptation[1], paddle.nn.ReLU)
    assert np.abs(w).max() <= 2e-4 and 0.5e-4 < w.std() < 1e-4  # truncated normal, std 1e-4, cut at 2 std
    assert loss.align is None  # no extra 1x1 align conv besides the adaptation layer


def test_every_adaptation_channel_learns_from_the_first_step():
    # unit-scale features: with the reference's uniform bias about half the channels would start as dead
    # ReLUs (bias < 0 dominates the 1e-4 weights) and never get a gradient
    paddle.seed(4)
    rng = np.random.RandomState(6)
    loss = FGFILoss(16, 32)
    boxes = [np.array([[0, 0, 60, 60]], 'float32')] * 2
    out = loss(paddle.to_tensor(rng.normal(size=(2, 16, 8, 8)).astype('float32')),
               paddle.to_tensor(rng.normal(size=(2, 32, 8, 8)).astype('float32')), inputs_for(boxes, 2, 64))
    out.backward()
    weight_grad = np.abs(loss.adaptation[0].weight.grad.numpy()).sum(axis=(1, 2, 3))
    bias_grad = np.abs(loss.adaptation[0].bias.grad.numpy())
    assert (weight_grad > 0).all() and (bias_grad > 0).all()


def test_level_selects_per_level_anchors_and_measured_stride():
    wh = [[[10, 13], [16, 30]], [[30, 61], [62, 45]]]
    loss = FGFILoss(2, 2, anchors={'wh': wh, 'offset': 0.5}, level=1, num_levels=2)
    boxes = [np.array([[10, 20, 60, 70]], 'float32')]
    got = loss.mask(inputs_for(boxes, 1, 96), 6, 6)  # 96 / 6: stride 16
    np.testing.assert_array_equal(got.numpy(), np_fgfi_mask(boxes, wh[1], 6, 6, 16, 16, offset=0.5))


@pytest.mark.parametrize('anchors, level, num_levels, match', [
    ({'strides': [8, 16, 32]}, 0, 4, 'strides has 3 entries but the student has 4 levels'),
    ({'wh': [[[10, 13]]] * 2}, 0, 3, 'wh has 2 entries but the student has 3 levels'),
    ({'wh': [[[10, 13]]]}, 1, None, 'no entry for student level 1'),
    ({'wh': [[10, 13, 5]]}, 0, 1, r"\{'wh': \[10, 13, 5\]\} \(level 0\) do not give a list of positive"),
    ({'wh': [[[10, -13]]]}, 0, 1, 'do not give a list of positive'),
    ({'scales_per_octave': 0}, 0, 1, r"\{'scales_per_octave': 0\} \(level 0\) do not give"),
    ({'aspect_ratios': [1.0, 'x']}, 0, 1, 'do not give a list of positive'),
    ({'virtual_anchor_scale': 5, 'octave_base_scale': 4}, 0, 1, 'give one of'),
    ({'octave_scale': 4}, 0, 1, r"unknown key\(s\) \['octave_scale'\]"),
    ([[10, 13]], 0, 1, 'anchors must be a mapping'),
    ({'virtual_anchor_scale': 0}, 0, 1, r"\{'virtual_anchor_scale': 0\} \(level 0\) do not give"),
])
def test_bad_anchor_config_is_a_one_line_error(anchors, level, num_levels, match):
    with pytest.raises(PPDistillError, match=match) as err:
        FGFILoss(4, 4, anchors=anchors, level=level, num_levels=num_levels)
    assert '\n' not in str(err.value)


@pytest.mark.parametrize('psi', [0.0, 1.0, 1.5])
def test_psi_out_of_range_is_an_error(psi):
    with pytest.raises(PPDistillError, match='psi must satisfy 0 < psi < 1'):
        FGFILoss(4, 4, psi=psi)


def test_every_accepted_psi_imitates_something():
    """The strict threshold IoU > psi * best: at psi = 1 no anchor passes (the range's former upper end);
    just below 1 the best anchors of every box do."""
    boxes = [np.array([[3.0, 5.0, 37.0, 29.0], [40.0, 40.0, 60.0, 70.0]], 'float32')]
    assert not np_fgfi_mask(boxes, [(16, 16), (24, 12)], 6, 6, 12, 12, psi=1.0).any()
    for psi in (0.01, 0.5, 0.999):
        mask = fgfi_masks(boxes, [[16, 16], [24, 12]], 6, 6, 12, 12, psi=psi).numpy()
        np.testing.assert_array_equal(mask, np_fgfi_mask(boxes, [(16, 16), (24, 12)], 6, 6, 12, 12, psi=psi))
        assert mask.sum() >= 2, psi


# ----------------------------------------------------------------------------- through the distiller
def make(anchors, levels=2):
    paddle.seed(3)
    return Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=levels),
                     teacher_model=ToyDet(width=16, neck_ch=8, levels=levels), probe_size=32,
                     losses=[{'type': 'FGFILoss', 'student': 'neck', 'teacher': 'neck',
                              'args': {'anchors': anchors}}])


def test_distiller_tells_each_level_its_anchors_and_checks_counts():
    d = make({'wh': [[[6, 6]], [[12, 12]]], 'strides': [4, 8]})
    assert [loss.anchors.wh.tolist() for loss in d.distill_losses] == [[[6, 6]], [[12, 12]]]
    assert [loss.anchors.stride for loss in d.distill_losses] == [4, 8]
    d.train()
    out = d(toy_inputs(n=2, size=32))
    assert float(out['distill_fgfi_l0']) > 0 and float(out['distill_fgfi_l1']) > 0
    with pytest.raises(PPDistillError, match='strides has 3 entries but the student has 2 levels'):
        make({'strides': [4, 8, 16]})


def test_strides_that_cannot_give_the_level_size_are_an_error():
    """Anchors at stride 8 on a stride-4 level would sit at another level's positions and sizes."""
    d = make({'strides': [8, 16]})
    d.train()
    with pytest.raises(PPDistillError, match=r'strides\[0\] = 8 but student level 0 has 8 cells for 32 input '
                                             r'pixels \(stride 4\)'):
        d(toy_inputs())

"""BoxKDLoss (BCKD localization KD) vs a NumPy reference written from the equation: boxes decoded per
location (DFL expectation, or ppdet's delta2bbox on anchors), GIoU, max class-probability gap weight."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import math

import numpy as np
import paddle
import pytest

from ppdistill.errors import PPDistillError
from ppdistill.losses import BoxKDLoss


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_giou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def np_dfl_box(z, cx, cy):
    """z: [4*(n+1)] logits of one location, sides l, t, r, b; box around the cell centre (cx, cy)."""
    z = z.reshape(4, -1).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = p @ np.arange(z.shape[1])
    return np.array([cx - d[0], cy - d[1], cx + d[2], cy + d[3]])


def np_delta_box(delta, anchor, weights):
    """ppdet delta2bbox for one anchor box (x1, y1, x2, y2)."""
    w, h = anchor[2] - anchor[0], anchor[3] - anchor[1]
    cx, cy = anchor[0] + 0.5 * w, anchor[1] + 0.5 * h
    dx, dy, dw, dh = np.asarray(delta, np.float64) / np.asarray(weights)
    clip = math.log(1000.0 / 16)
    pw, ph = np.exp(min(dw, clip)) * w, np.exp(min(dh, clip)) * h
    px, py = dx * w + cx, dy * h + cy
    return np.array([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2])


def np_ltrb_box(out, cx, cy, transform):
    """FCOS: raw (l, t, r, b) of one location -> distances (relu or exp, as FCOSHead) -> box around (cx, cy)."""
    d = np.maximum(out, 0.0) if transform == 'relu' else np.exp(out.astype(np.float64))
    return np.array([cx - d[0], cy - d[1], cx + d[2], cy + d[3]])


def np_box_kd_sum(s_cls, t_cls, s_reg, t_reg, coder, anchor_wh=None, weights=(1, 1, 1, 1), stride=8.0,
                  transform='relu'):
    """(sum_i u_i (1 - GIoU), sum_i u_i, number of boxes), looping over images, cells and anchors; the
    boxes are placed at their real pixel positions (the loss itself may use any common origin)."""
    n, _, h, w = s_cls.shape
    a = len(anchor_wh) if coder == 'delta' else 1
    c = s_cls.shape[1] // a
    total, wsum = 0.0, 0.0
    for b in range(n):
        for y in range(h):
            for x in range(w):
                cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
                for k in range(a):
                    ps = sigmoid(s_cls[b, k * c:(k + 1) * c, y, x].astype(np.float64))
                    pt = sigmoid(t_cls[b, k * c:(k + 1) * c, y, x].astype(np.float64))
                    u = np.max(np.abs(pt - ps))
                    if coder == 'dfl':
                        bs = np_dfl_box(s_reg[b, :, y, x], cx / stride, cy / stride) * stride
                        bt = np_dfl_box(t_reg[b, :, y, x], cx / stride, cy / stride) * stride
                    elif coder == 'ltrb':
                        bs = np_ltrb_box(s_reg[b, :, y, x], cx / stride, cy / stride, transform) * stride
                        bt = np_ltrb_box(t_reg[b, :, y, x], cx / stride, cy / stride, transform) * stride
                    else:
                        aw, ah = anchor_wh[k][0] * stride, anchor_wh[k][1] * stride
                        anchor = [cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2]
                        bs = np_delta_box(s_reg[b, 4 * k:4 * k + 4, y, x], anchor, weights)
                        bt = np_delta_box(t_reg[b, 4 * k:4 * k + 4, y, x], anchor, weights)
                    total += u * (1 - np_giou(bs, bt))
                    wsum += u
    return total, wsum, n * h * w * a


def rand(rng, shape, scale=2.0):
    return (rng.standard_normal(shape) * scale).astype('float32')


def run(loss, s_cls, t_cls, s_reg, t_reg, num_pos=None):
    student = {'cls': paddle.to_tensor(s_cls), 'reg': paddle.to_tensor(s_reg)}
    if num_pos is not None:
        student['num_pos'] = paddle.to_tensor(num_pos)
    return float(loss(student, {'cls': paddle.to_tensor(t_cls), 'reg': paddle.to_tensor(t_reg)}))


@pytest.mark.parametrize('normalize', ['positives', 'locations', 'weights', 'sum'])
def test_dfl_matches_numpy(normalize):
    rng = np.random.default_rng(0)
    reg_max = 7
    s_cls, t_cls = rand(rng, (2, 3, 3, 4)), rand(rng, (2, 3, 3, 4))
    s_reg, t_reg = rand(rng, (2, 32, 3, 4)), rand(rng, (2, 32, 3, 4))
    loss = BoxKDLoss({'cls': 3, 'reg': 32}, {'cls': 3, 'reg': 32}, reg_max=reg_max, normalize=normalize,
                     loss_weight=4.0)
    total, wsum, count = np_box_kd_sum(s_cls, t_cls, s_reg, t_reg, 'dfl')
    div = {'positives': 3.0, 'locations': count, 'weights': wsum, 'sum': 1.0}[normalize]
    np.testing.assert_allclose(run(loss, s_cls, t_cls, s_reg, t_reg, 3.0), 4.0 * total / div, rtol=1e-5)


def test_delta_anchor_head_matches_numpy():
    rng = np.random.default_rng(1)
    anchor_wh = [[4.0, 2.0], [2.8, 2.8], [2.0, 4.0]]
    s_cls, t_cls = rand(rng, (1, 3 * 2, 2, 3)), rand(rng, (1, 3 * 2, 2, 3))
    s_reg, t_reg = rand(rng, (1, 12, 2, 3), 0.5), rand(rng, (1, 12, 2, 3), 0.5)
    s_reg[0, 2, 0, 0] = 9.0  # beyond ppdet's dw clip
    weights = (1.0, 1.0, 2.0, 2.0)
    loss = BoxKDLoss({'cls': 6, 'reg': 12}, {'cls': 6, 'reg': 12}, box_coder='delta', anchor_wh=anchor_wh,
                     delta_weights=weights, normalize='sum', loss_weight=1.0)
    total, _, _ = np_box_kd_sum(s_cls, t_cls, s_reg, t_reg, 'delta', anchor_wh, weights)
    np.testing.assert_allclose(run(loss, s_cls, t_cls, s_reg, t_reg), total, rtol=1e-5)


@pytest.mark.parametrize('transform', ['relu', 'exp'])
def test_ltrb_distance_head_matches_numpy(transform):
    """FCOS's raw (l, t, r, b) per location; relu leaves some distances at 0 (degenerate boxes)."""
    rng = np.random.default_rng(5)
    s_cls, t_cls = rand(rng, (2, 4, 3, 3)), rand(rng, (2, 4, 3, 3))
    s_reg, t_reg = rand(rng, (2, 4, 3, 3), 1.0) + 1.0, rand(rng, (2, 4, 3, 3), 1.0) + 1.0
    s_reg[0, :, 0, 0] = -1.0  # all four distances 0 after relu
    loss = BoxKDLoss({'cls': 4, 'reg': 4}, {'cls': 4, 'reg': 4}, box_coder='ltrb', ltrb_transform=transform,
                     normalize='assigned_scores', loss_weight=4.0)
    assert loss.assignment_keys == ('assigned_scores_sum',)
    total, _, _ = np_box_kd_sum(s_cls, t_cls, s_reg, t_reg, 'ltrb', transform=transform)
    student = {'cls': paddle.to_tensor(s_cls), 'reg': paddle.to_tensor(s_reg),
               'assigned_scores_sum': paddle.to_tensor(2.5)}
    got = float(loss(student, {'cls': paddle.to_tensor(t_cls), 'reg': paddle.to_tensor(t_reg)}))
    np.testing.assert_allclose(got, 4.0 * total / 2.5, rtol=1e-5)


def test_zero_when_boxes_agree_and_gradient_only_through_boxes():
    rng = np.random.default_rng(2)
    s_cls, t_cls, reg = rand(rng, (1, 3, 2, 2)), rand(rng, (1, 3, 2, 2)), rand(rng, (1, 68, 2, 2))
    loss = BoxKDLoss({'cls': 3, 'reg': 68}, {'cls': 3, 'reg': 68}, normalize='locations')
    assert abs(run(loss, s_cls, t_cls, reg, reg)) < 1e-6
    s_cls_t = paddle.to_tensor(s_cls, stop_gradient=False)
    s_reg_t = paddle.to_tensor(rand(rng, (1, 68, 2, 2)), stop_gradient=False)
    t_reg_t = paddle.to_tensor(reg, stop_gradient=False)
    loss({'cls': s_cls_t, 'reg': s_reg_t}, {'cls': paddle.to_tensor(t_cls), 'reg': t_reg_t}).backward()
    assert float(s_reg_t.grad.abs().sum()) > 0
    assert s_cls_t.grad is None  # u_i is a detached weight
    assert t_reg_t.grad is None


def test_build_errors():
    with pytest.raises(PPDistillError, match='reg_max=16'):
        BoxKDLoss({'cls': 3, 'reg': 32}, {'cls': 3, 'reg': 32}, reg_max=16)
    with pytest.raises(PPDistillError, match='cls: student 3 vs teacher 4'):
        BoxKDLoss({'cls': 3, 'reg': 32}, {'cls': 4, 'reg': 32})
    with pytest.raises(PPDistillError, match='reg: student 12 vs teacher 24'):
        BoxKDLoss({'cls': 3, 'reg': 12}, {'cls': 6, 'reg': 24}, box_coder='delta', anchor_wh=[[1, 1]] * 3)
    with pytest.raises(PPDistillError, match='cls: <class logits tap>'):
        BoxKDLoss(3, 3)
    with pytest.raises(PPDistillError, match='anchors per cell'):
        BoxKDLoss({'cls': 6, 'reg': 8}, {'cls': 6, 'reg': 8}, box_coder='delta')
    with pytest.raises(PPDistillError, match="'ltrb' takes \\(l, t, r, b\\) per location, 4 channels; the box output "
                                             'has 68'):
        BoxKDLoss({'cls': 3, 'reg': 68}, {'cls': 3, 'reg': 68}, box_coder='ltrb')
    with pytest.raises(PPDistillError, match='ltrb_transform must be one of'):
        BoxKDLoss({'cls': 3, 'reg': 4}, {'cls': 3, 'reg': 4}, box_coder='ltrb', ltrb_transform='sigmoid')


def test_dfl_student_and_teacher_may_differ_in_reg_max():
    """Boxes are in strides whatever the bins: a reg_max 7 student vs a reg_max 16 teacher (PicoDet vs
    PP-YOLOE heads) compares their decoded boxes."""
    rng = np.random.default_rng(5)
    s_cls, t_cls = rand(rng, (1, 3, 2, 3)), rand(rng, (1, 3, 2, 3))
    s_reg, t_reg = rand(rng, (1, 32, 2, 3)), rand(rng, (1, 68, 2, 3))
    loss = BoxKDLoss({'cls': 3, 'reg': 32}, {'cls': 3, 'reg': 68}, normalize='sum', loss_weight=1.0)
    total, _, _ = np_box_kd_sum(s_cls, t_cls, s_reg, t_reg, 'dfl')
    np.testing.assert_allclose(run(loss, s_cls, t_cls, s_reg, t_reg), total, rtol=1e-5)

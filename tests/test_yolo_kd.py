"""YOLOv3OutputLoss vs NumPy references of each mode and vs ppdet 2.6's own ``DistillYOLOv3Loss``;
FeatureMSELoss (the neck-feature variant); the YOLOv3 preset on a real ppdet YOLOv3."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os
import types

import numpy as np
import paddle
import pytest

from ppdistill import Distiller, DistillConfigError
from ppdistill.errors import PPDistillError
from ppdistill.losses import FeatureMSELoss, YOLOv3OutputLoss

A, C = 3, 4  # anchors per cell, classes


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_bce(logit, target):
    """Binary cross-entropy with logits (numerically stable form)."""
    return np.maximum(logit, 0) - logit * target + np.log1p(np.exp(-np.abs(logit)))


def np_split(x):
    """ppdet YOLOv3Loss layout: [N, A*(5+C), H, W] -> [N, A, H, W, 5+C]."""
    n, c, h, w = x.shape
    return x.reshape(n, A, c // A, h, w).transpose(0, 1, 3, 4, 2).astype(np.float64)


def np_yolo_kd(s, t, mode, thresh=0.5, weight=1000.0):
    """The documented formula of each mode, per position (x, y, w, h, obj, classes)."""
    s, t = np_split(s), np_split(t)
    o = np_sigmoid(t[..., 4:5])
    w, w_obj, target_obj = {
        'all': (1.0, 1.0, o),
        'cls': (1.0, 0.0, o),
        'obj_thresh': ((o > thresh) * 1.0, (o > thresh) * 1.0, o),
        'obj_scaled': (o, 1.0, (t[..., 4:5] > 0) * 1.0),
    }[mode]
    cls = (w * np_bce(s[..., 5:], np_sigmoid(t[..., 5:]))).mean()
    if mode == 'cls':
        return weight * cls
    box = (np_bce(s[..., 0:1], np_sigmoid(t[..., 0:1])) + np_bce(s[..., 1:2], np_sigmoid(t[..., 1:2]))
           + np.abs(s[..., 2:3] - t[..., 2:3]) + np.abs(s[..., 3:4] - t[..., 3:4]))
    obj = (w_obj * np_bce(s[..., 4:5], target_obj)).mean()
    return weight * ((w * box).mean() + cls + obj)


def level(rng, n=2, h=4, w=5, obj_shift=0.0):
    x = rng.standard_normal((n, A, 5 + C, h, w)).astype('float32') * 2
    x[:, :, 4] += obj_shift
    return x.reshape(n, A * (5 + C), h, w)


def tensor(x, grad=False):
    t = paddle.to_tensor(x)
    t.stop_gradient = not grad
    return t


@pytest.mark.parametrize('mode', ['all', 'cls', 'obj_thresh', 'obj_scaled'])
def test_each_mode_matches_numpy(mode):
    rng = np.random.default_rng(0)
    s, t = level(rng), level(rng)
    loss = YOLOv3OutputLoss(A * (5 + C), A * (5 + C), mode=mode, obj_thresh=0.6)
    np.testing.assert_allclose(float(loss(tensor(s), tensor(t))), np_yolo_kd(s, t, mode, 0.6), rtol=1e-5)


def test_obj_scaled_equals_ppdet_distill_yolov3_loss_on_its_distill_pairs():
    """ppdet's DistillYOLOv3Loss reads [x, y, w, h, obj, cls] slices from yolo_head.loss.distill_pairs."""
    from ppdet.slim.distill_loss import DistillYOLOv3Loss
    rng = np.random.default_rng(1)
    s_levels = [level(rng, h=hw, w=hw) for hw in (2, 4, 8)]
    t_levels = [level(rng, h=hw, w=hw) for hw in (2, 4, 8)]

    def fake_model(levels):
        pairs = []
        for x in levels:
            p = paddle.to_tensor(np_split(x).astype('float32'))
            pairs.append([p[..., 0:1], p[..., 1:2], p[..., 2:3], p[..., 3:4], p[..., 4:5], p[..., 5:]])
        loss = types.SimpleNamespace(distill_pairs=pairs)
        return types.SimpleNamespace(yolo_head=types.SimpleNamespace(loss=loss))

    ref = float(DistillYOLOv3Loss(weight=1000)(fake_model(t_levels), fake_model(s_levels)))
    ours = YOLOv3OutputLoss(A * (5 + C), A * (5 + C), mode='obj_scaled', loss_weight=1000)
    got = sum(float(ours(tensor(s), tensor(t))) for s, t in zip(s_levels, t_levels))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_obj_thresh_keeps_only_positions_the_teacher_calls_objects():
    rng = np.random.default_rng(2)
    s = level(rng)
    loss = YOLOv3OutputLoss(A * (5 + C), A * (5 + C), mode='obj_thresh', obj_thresh=0.5)
    nothing = level(rng, obj_shift=-50.0)  # teacher objectness ~0 everywhere
    st = tensor(s, grad=True)
    value = loss(st, tensor(nothing))
    assert float(value) == 0.0
    value.backward()
    assert st.grad is not None and float(st.grad.abs().sum()) == 0.0
    everything = level(rng, obj_shift=50.0)  # teacher objectness ~1: same as mode 'all'
    np.testing.assert_allclose(float(loss(tensor(s), tensor(everything))), np_yolo_kd(s, everything, 'all'),
                               rtol=1e-5)


@pytest.mark.parametrize('mode, touched', [('all', range(5 + C)), ('cls', range(5, 5 + C)),
                                           ('obj_thresh', range(5 + C)), ('obj_scaled', range(5 + C))])
def test_gradient_reaches_exactly_the_distilled_student_outputs(mode, touched):
    rng = np.random.default_rng(3)
    s, t = level(rng), level(rng, obj_shift=2.0)
    st, tt = tensor(s, grad=True), tensor(t, grad=True)
    YOLOv3OutputLoss(A * (5 + C), A * (5 + C), mode=mode)(st, tt).backward()
    grad = np.abs(st.grad.numpy().reshape(2, A, 5 + C, 4, 5)).sum(axis=(0, 1, 3, 4))
    assert all(grad[i] > 0 for i in touched)
    assert all(grad[i] == 0 for i in set(range(5 + C)) - set(touched))
    assert tt.grad is None


def test_num_classes_sets_the_anchor_count():
    rng = np.random.default_rng(4)
    s, t = level(rng), level(rng)
    by_classes = YOLOv3OutputLoss(A * (5 + C), A * (5 + C), num_classes=C, num_anchors=99)
    assert by_classes.num_anchors == A
    np.testing.assert_allclose(float(by_classes(tensor(s), tensor(t))), np_yolo_kd(s, t, 'obj_scaled'),
                               rtol=1e-5)


@pytest.mark.parametrize('kw, match', [
    ({'mode': 'boxes'}, "unknown mode 'boxes'; use one of all, cls, obj_thresh, obj_scaled"),
    ({'teacher_channels': 3 * 16}, 'student 27 channels vs teacher 48'),
    ({'num_classes': 5}, r'27 output channels are not num_anchors x \(5 \+ num_classes\)'),
    ({'num_anchors': 2}, 'not num_anchors'),
    ({'obj_thresh': 1.0}, 'obj_thresh must satisfy 0 < obj_thresh < 1'),
    ({'obj_thresh': 0.0}, 'obj_thresh must satisfy'),
    ({'student_channels': {'out': 27}}, 'takes one tap per side'),
])
def test_bad_arguments_are_errors(kw, match):
    args = dict(student_channels=27, teacher_channels=27)
    args.update(kw)
    with pytest.raises(PPDistillError, match=match):
        YOLOv3OutputLoss(**args)


def test_feature_mse_matches_numpy_with_channel_alignment_and_trains_the_align_conv():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((2, 3, 4, 4)).astype('float32')
    t = rng.standard_normal((2, 5, 4, 4)).astype('float32')
    loss = FeatureMSELoss(3, 5, loss_weight=2.0)
    wgt, bias = loss.align.weight.numpy()[:, :, 0, 0], loss.align.bias.numpy()
    aligned = np.einsum('nchw,oc->nohw', s, wgt) + bias.reshape(1, -1, 1, 1)
    value = loss(tensor(s), tensor(t))
    np.testing.assert_allclose(float(value), 2.0 * ((aligned - t) ** 2).mean(), rtol=1e-5)
    value.backward()
    assert float(loss.align.weight.grad.abs().sum()) > 0 and float(loss.align.bias.grad.abs().sum()) > 0
    same = FeatureMSELoss(5, 5)
    assert same.align is None
    np.testing.assert_allclose(float(same(tensor(t * 0.5), tensor(t))), ((0.5 * t) ** 2).mean(), rtol=1e-5)


# -- the YOLOv3 preset on real (tiny) ppdet YOLOv3 models -----------------------------------------------------

def tiny_yolov3(scale, blocks, classes=C):
    from ppdet.modeling import MobileNet, PPYOLOTinyFPN, YOLOv3Head, YOLOv3Loss
    from ppdet.modeling.architectures import YOLOv3
    backbone = MobileNet(scale=scale, feature_maps=[4, 6, 13], with_extra_blocks=False, extra_block_filters=[])
    neck = PPYOLOTinyFPN(in_channels=[s.channels for s in backbone.out_shape],
                         detection_block_channels=blocks)
    head = YOLOv3Head(in_channels=[s.channels for s in neck.out_shape], num_classes=classes,
                      loss=YOLOv3Loss(num_classes=classes))
    return YOLOv3(backbone=backbone, neck=neck, yolo_head=head, post_process=None)


def test_yolov3_preset_taps_every_output_conv_and_the_neck():
    paddle.seed(0)
    losses = [{'type': 'YOLOv3OutputLoss', 'name': 'kd', 'student': 'yolo_output', 'args': {'mode': 'all'}},
              {'type': 'FeatureMSELoss', 'name': 'neck', 'student': 'fpn'}]
    d = Distiller(student_model=tiny_yolov3(0.25, [32, 24, 16]), teacher_model=tiny_yolov3(0.5, [64, 48, 32]),
                  student_arch='YOLOv3', teacher_arch='YOLOv3', losses=losses, probe_size=64)
    s_shapes = [t.pair.student_shape for t in d._terms]
    # neck and head levels come stride 32 first; every level pairs with the teacher's of the same stride
    assert s_shapes[:3] == [(1, A * (5 + C), 2, 2), (1, A * (5 + C), 4, 4), (1, A * (5 + C), 8, 8)]
    assert [t.pair.teacher_shape[1] for t in d._terms[3:]] == [64, 48, 32]
    assert [loss.align is not None for loss in d.distill_losses[3:]] == [True] * 3

    with pytest.raises(DistillConfigError, match=r'student level 0 \(1, 27, 2, 2\) <- teacher level 0 '
                                                 r'\(1, 30, 2, 2\): YOLOv3OutputLoss: student 27 channels'):
        Distiller(student_model=tiny_yolov3(0.25, [32, 24, 16]), teacher_model=tiny_yolov3(0.25, [32, 24, 16], 5),
                  student_arch='YOLOv3', teacher_arch='YOLOv3', losses=losses[:1], probe_size=64)


# -- IoU-aware heads (PP-YOLO, PP-YOLOv2): A IoU logits first, then A*(5+C) --------------------------------

def iou_level(rng, n=2, h=4, w=5):
    return np.concatenate([rng.standard_normal((n, A, h, w)).astype('float32') * 2, level(rng, n, h, w)], 1)


@pytest.mark.parametrize('mode', ['all', 'cls', 'obj_thresh', 'obj_scaled'])
def test_iou_aware_layout_matches_numpy(mode):
    rng = np.random.default_rng(6)
    s, t = iou_level(rng), iou_level(rng)
    assert s.shape[1] == A * (6 + C)
    loss = YOLOv3OutputLoss(A * (6 + C), A * (6 + C), mode=mode, iou_aware=True)
    want = np_yolo_kd(s[:, A:], t[:, A:], mode)
    if mode != 'cls':  # the IoU logits join the box term, weighted like x, y
        o = np_sigmoid(t[:, A:].reshape(2, A, 5 + C, 4, 5)[:, :, 4].astype(np.float64))
        w = {'all': 1.0, 'obj_thresh': (o > 0.5) * 1.0, 'obj_scaled': o}[mode]
        want += 1000.0 * (w * np_bce(s[:, :A].astype(np.float64), np_sigmoid(t[:, :A].astype(np.float64)))).mean()
    np.testing.assert_allclose(float(loss(tensor(s), tensor(t))), want, rtol=1e-5)
    assert YOLOv3OutputLoss(A * (6 + C), A * (6 + C), num_classes=C, iou_aware=True).num_anchors == A


def yolo_configs(tmp_path, student_iou, teacher_iou, args=None, student_head=None, head=None):
    import yaml
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = {}
    for role, iou in (('student', student_iou), ('teacher', teacher_iou)):
        cfg = {'_BASE_': [os.path.join(root, 'configs', 'demo', f'yolov3_{role}.yml')]}
        if iou is not None:
            cfg['YOLOv3Head'] = {'iou_aware': iou, 'iou_aware_factor': 0.5}
        for extra in (head, student_head if role == 'student' else None):
            cfg.setdefault('YOLOv3Head', {}).update(extra or {})
        tmp_path.mkdir(exist_ok=True)
        paths[role] = tmp_path / f'{role}.yml'
        paths[role].write_text(yaml.safe_dump(cfg))
    distill = {'slim': 'Distiller', 'teacher_config': str(paths['teacher']), 'allow_random_teacher': True,
               'Distiller': {'probe_size': 64, 'losses': [
                   {'type': 'YOLOv3OutputLoss', 'student': 'yolo_output', 'args': args}]}}
    (tmp_path / 'kd.yml').write_text(yaml.safe_dump(distill))
    return str(paths['student']), str(tmp_path / 'kd.yml')


def build_yolo(student, distill):
    from ppdet.core.workspace import global_config, load_config
    from ppdistill.build import build_distiller, load_distill_config
    from ppdistill.config_scope import config_scope
    with config_scope():
        load_config(student)
        load_distill_config(distill)
        return build_distiller(global_config)


def test_iou_aware_layout_is_read_from_the_head_config(tmp_path):
    d = build_yolo(*yolo_configs(tmp_path, True, True, {'mode': 'all'}))
    classes = d.student_model.yolo_head.num_classes
    assert [t.pair.student_shape[1] for t in d._terms] == [A * (6 + classes)] * 3
    assert all(loss.iou_aware and loss.num_anchors == A for loss in d.distill_losses)
    plain = build_yolo(*yolo_configs(tmp_path / 'x', None, False, {'mode': 'all'}))
    assert not any(loss.iou_aware for loss in plain.distill_losses)


@pytest.mark.parametrize('student_iou, teacher_iou, args, match', [
    (False, True, None, 'student config sets YOLOv3Head.iou_aware: False but the teacher config True'),
    (True, True, {'iou_aware': False}, r'args.iou_aware: False contradicts YOLOv3Head.iou_aware: True'),
])
def test_iou_aware_mismatch_is_a_build_error(tmp_path, student_iou, teacher_iou, args, match):
    with pytest.raises(DistillConfigError, match=match):
        build_yolo(*yolo_configs(tmp_path, student_iou, teacher_iou, args))


TWO_ANCHORS = {'anchors': [[6, 8], [12, 18], [22, 32], [30, 42], [56, 76], [80, 104]],
               'anchor_masks': [[4, 5], [2, 3], [0, 1]]}


def test_anchors_per_level_come_from_the_head_config(tmp_path):
    """2 anchors x (5 + 10 classes) = 30 channels, which also splits as 3 x 10: the count is read from
    anchor_masks, not assumed."""
    d = build_yolo(*yolo_configs(tmp_path, None, None, {'mode': 'all'}, head=TWO_ANCHORS))
    assert [t.pair.student_shape[1] for t in d._terms] == [30] * 3
    assert [loss.num_anchors for loss in d.distill_losses] == [2] * 3
    with pytest.raises(DistillConfigError, match=r'num_anchors=3 but the head has 2 anchors at level 0'):
        build_yolo(*yolo_configs(tmp_path / 'b', None, None, {'num_anchors': 3}, head=TWO_ANCHORS))


def test_student_and_teacher_anchors_must_agree(tmp_path):
    moved = {'anchors': [[7, 8], [9, 13], [12, 18], [16, 24], [22, 32], [30, 42], [40, 56], [56, 76], [80, 104]]}
    with pytest.raises(DistillConfigError, match=r'YOLOv3Head.anchors: \[\[7, 8\].* but the teacher config'):
        build_yolo(*yolo_configs(tmp_path, None, None, None, moved))

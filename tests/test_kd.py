"""LogitKDLoss vs NumPy references of Hinton KD (softmax) and per-class binary KD (sigmoid heads)."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest

from ppdistill import Distiller, DistillConfigError
from ppdistill.losses import LogitKDLoss
from toy_models import ToyDet, toy_inputs


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_kd_per_anchor(s, t, num_classes, temperature, activation):
    """Loop over anchors of an [N, A*C, H, W] head (channel a*C + c): KD term of each anchor/position."""
    n, ch, h, w = t.shape
    out = np.zeros((n, ch // num_classes, h, w))
    for i in range(n):
        for a in range(ch // num_classes):
            for y in range(h):
                for x in range(w):
                    ls = s[i, a * num_classes:(a + 1) * num_classes, y, x].astype(np.float64) / temperature
                    lt = t[i, a * num_classes:(a + 1) * num_classes, y, x].astype(np.float64) / temperature
                    if activation == 'softmax':  # Hinton: KL(p_T || p_S) over the classes
                        p = np.exp(lt - lt.max()) / np.exp(lt - lt.max()).sum()
                        q = np.exp(ls - ls.max()) / np.exp(ls - ls.max()).sum()
                        out[i, a, y, x] = np.sum(p * np.log(p / q))
                    else:  # per class: soft-target BCE minus the teacher's entropy
                        p, q = sigmoid(lt), sigmoid(ls)
                        bce = -(p * np.log(q) + (1 - p) * np.log(1 - q))
                        ent = -(p * np.log(p) + (1 - p) * np.log(1 - p))
                        out[i, a, y, x] = np.sum(bce - ent)
    return out * temperature ** 2


def logits(rng, n=2, ch=6, h=3, w=4, scale=2.0):
    return (rng.standard_normal((n, ch, h, w)) * scale).astype('float32')


@pytest.mark.parametrize('activation', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('temperature', [1.0, 3.0])
def test_all_positions_match_numpy_and_gradient_is_t_times_q_minus_p(activation, temperature):
    rng = np.random.default_rng(0)
    s, t = logits(rng), logits(rng)
    module = LogitKDLoss(6, 6, temperature=temperature, activation=activation, num_classes=3,
                         loss_weight=2.0)
    student = paddle.to_tensor(s, stop_gradient=False)
    got = module(student, paddle.to_tensor(t))
    ref = np_kd_per_anchor(s, t, 3, temperature, activation)
    np.testing.assert_allclose(float(got), 2.0 * ref.mean(), rtol=1e-4)
    got.backward()
    # Hinton: d/ds of T^2 * KD(T) is T * (q - p) per logit, here / number of anchors, times the weight
    s5, t5 = s.reshape(2, 2, 3, 3, 4) / temperature, t.reshape(2, 2, 3, 3, 4) / temperature
    if activation == 'softmax':
        q = np.exp(s5) / np.exp(s5).sum(axis=2, keepdims=True)
        p = np.exp(t5) / np.exp(t5).sum(axis=2, keepdims=True)
    else:
        q, p = sigmoid(s5), sigmoid(t5)
    want = 2.0 * temperature * (q - p) / ref.size
    np.testing.assert_allclose(student.grad.numpy(), want.reshape(s.shape), rtol=1e-3, atol=1e-7)


def test_anchor_layout_is_anchor_major():
    """RetinaNet's [N, A*C, H, W] keeps anchor a's classes at channels a*C .. a*C+C-1."""
    rng = np.random.default_rng(1)
    s, t = logits(rng, ch=6), logits(rng, ch=6)
    got = float(LogitKDLoss(6, 6, activation='softmax', num_classes=3)(paddle.to_tensor(s), paddle.to_tensor(t)))
    np.testing.assert_allclose(got, np_kd_per_anchor(s, t, 3, 1.0, 'softmax').mean(), rtol=1e-4)
    # class-major grouping (c*A + a) would be a different number: the layout matters
    perm = [0, 2, 4, 1, 3, 5]
    wrong = np_kd_per_anchor(s[:, perm], t[:, perm], 3, 1.0, 'softmax').mean()
    assert abs(got - wrong) > 1e-3 * got
    same = float(LogitKDLoss(6, 6, activation='softmax', num_anchors=2)(paddle.to_tensor(s), paddle.to_tensor(t)))
    np.testing.assert_allclose(same, got, rtol=1e-6)


@pytest.mark.parametrize('activation,background', [('sigmoid', None), ('softmax', None), ('softmax', 0)])
def test_positive_normalisation_averages_over_teacher_confident_anchors(activation, background):
    rng = np.random.default_rng(2)
    s, t = logits(rng, scale=3.0), logits(rng, scale=3.0)
    module = LogitKDLoss(6, 6, activation=activation, num_classes=3, normalize='positive',
                         pos_threshold=0.6, background_index=background, temperature=2.0)
    t5 = t.reshape(2, 2, 3, 3, 4).astype(np.float64)
    prob = np.exp(t5) / np.exp(t5).sum(axis=2, keepdims=True) if activation == 'softmax' else sigmoid(t5)
    if background is not None:
        prob[:, :, background] = 0
    mask = prob.max(axis=2) >= 0.6
    assert 0 < mask.sum() < mask.size
    ref = np_kd_per_anchor(s, t, 3, 2.0, activation)
    got = float(module(paddle.to_tensor(s), paddle.to_tensor(t)))
    np.testing.assert_allclose(got, ref[mask].mean(), rtol=1e-4)


def test_no_teacher_positive_adds_zero_with_a_gradient_path():
    rng = np.random.default_rng(3)
    s = paddle.to_tensor(logits(rng), stop_gradient=False)
    t = paddle.full([2, 6, 3, 4], -20.0)
    got = LogitKDLoss(6, 6, normalize='positive')(s, t)
    assert float(got) == 0.0
    got.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) == 0.0


def test_zero_when_student_matches():
    t = paddle.to_tensor(logits(np.random.default_rng(4)))
    for activation in ('sigmoid', 'softmax'):
        assert abs(float(LogitKDLoss(6, 6, activation=activation, temperature=2.0)(t, t))) < 1e-6


@pytest.mark.parametrize('kwargs, match', [
    ({'activation': 'tanh'}, 'activation must be one of'),
    ({'normalize': 'sum'}, 'normalize must be one of'),
    ({'num_classes': 4}, 'not a multiple of num_classes=4'),
    ({'num_anchors': 4}, 'not a multiple of num_anchors=4'),
    ({'num_classes': 3, 'num_anchors': 3}, 'not num_anchors=3'),
    ({'temperature': 0}, 'temperature must be > 0'),
    ({'background_index': 6}, 'not a class index'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitKDLoss(6, 6, **kwargs)


def test_channel_mismatch_is_rejected_no_align_conv():
    with pytest.raises(ValueError, match='need the same channels'):
        LogitKDLoss(6, 9)
    assert LogitKDLoss(6, 6).align is None


def make(losses, student_neck):
    paddle.seed(1)
    student = ToyDet(width=8, neck_ch=student_neck, levels=2, dropout=0.0)
    teacher = ToyDet(width=16, neck_ch=8, levels=3, dropout=0.0)
    return Distiller(student_model=student, teacher_model=teacher, losses=losses, probe_size=32)


def test_distiller_rejects_unequal_logits_and_bad_mode_at_build_and_trains_equal_ones():
    with pytest.raises(DistillConfigError, match='differ in channels') as err:
        make([{'type': 'LogitKDLoss', 'student': 'neck'}], student_neck=4)
    assert '\n' not in str(err.value)
    with pytest.raises(DistillConfigError, match=r"loss 'logitkd' .*activation must be one of") as err:
        make([{'type': 'LogitKDLoss', 'student': 'head.cls', 'args': {'activation': 'relu'}}], student_neck=4)
    assert '\n' not in str(err.value)
    d = make([{'type': 'LogitKDLoss', 'student': 'head.cls', 'name': 'kd',
               'args': {'num_classes': 2, 'temperature': 2.0}}], student_neck=4)
    out = d(toy_inputs())
    assert {'distill_kd_l0', 'distill_kd_l1'} <= set(out) and float(out['distill_kd_l0']) > 0
    out['loss'].backward()
    assert all(p.grad is not None for p in d.student_model.head.cls.parameters())


def test_a_distill_config_splits_a_multi_anchor_head_by_the_models_num_classes():
    """An entry with activation softmax and neither num_classes nor num_anchors softmaxed over all A*C
    channels of a RetinaNet-like head (9 anchors x 10 classes), mixing its anchors: the distiller now
    gives the loss the model config's num_classes, as ppdet's create fills __shared__ keys."""
    from ppdet.core.workspace import global_config
    from ppdistill.distiller import _make_loss
    from ppdistill.pairing import LevelPair
    pair = LevelPair(0, 0, (2, 90, 8, 8), (2, 90, 8, 8))
    old = global_config.get('num_classes')
    global_config['num_classes'] = 10
    try:
        loss = _make_loss(LogitKDLoss, pair, {'activation': 'softmax'}, 'kd', 1, (90, 90))
        assert (loss.num_anchors, loss.num_classes) == (9, 10)
        explicit = _make_loss(LogitKDLoss, pair, {'activation': 'softmax', 'num_classes': 30}, 'kd', 1, (90, 90))
        assert (explicit.num_anchors, explicit.num_classes) == (3, 30)  # the entry's own value wins
    finally:
        if old is None:
            global_config.pop('num_classes', None)
        else:
            global_config['num_classes'] = old
    rng = np.random.RandomState(0)
    s, t = rng.randn(2, 90, 3, 3).astype('float32'), rng.randn(2, 90, 3, 3).astype('float32')
    got = float(loss(paddle.to_tensor(s), paddle.to_tensor(t)))
    np.testing.assert_allclose(got, np_kd_per_anchor(s, t, 10, 1.0, 'softmax').mean(), rtol=1e-4)

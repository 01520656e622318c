"""SSDOutputLoss vs NumPy references, and the distiller's multi-tensor ({name: tap}) loss entries.

The references follow the documented formulas, written independently of the implementation: the
confidence KD reshapes the head output the way ppdet's ``SSDHead`` does (``[N, H, W, A*K]`` ->
``[N, H*W*A, K]``), the location term loops over priors.
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from ppdistill import Distiller, DistillConfigError
from ppdistill.errors import PPDistillError
from ppdistill.losses import FeatureMSELoss, SSDOutputLoss
from toy_models import ToyDet, toy_inputs


def np_priors(x, k):
    """ppdet SSDHead layout: [N, A*K, H, W] -> [N, H*W*A, K]."""
    n = x.shape[0]
    return x.transpose(0, 2, 3, 1).reshape(n, -1, k).astype(np.float64)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_conf_kd(s, t, k, temp):
    """Hinton KD per prior: T^2 * mean_priors sum_k p_t (log p_t - log p_s), p = softmax(z / T)."""
    ps, pt = np_softmax(np_priors(s, k) / temp), np_softmax(np_priors(t, k) / temp)
    return temp ** 2 * (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()


def np_loc_pull(s_loc, t_loc, t_conf, k, thresh, bound):
    """Truncated L2 over priors whose teacher foreground probability (background = last class) > thresh."""
    prob = np_softmax(np_priors(t_conf, k))
    s, t = np_priors(s_loc, 4), np_priors(t_loc, 4)
    total, count = 0.0, 0
    for n in range(prob.shape[0]):
        for p in range(prob.shape[1]):
            if prob[n, p, :-1].max() > thresh:
                total += min(((s[n, p] - t[n, p]) ** 2).sum(), bound)
                count += 1
    return total / max(count, 1), count


def outputs(rng, n=2, a=3, k=4, h=5, w=6, scale=2.0):
    return {'conf': (scale * rng.standard_normal((n, a * k, h, w))).astype('float32'),
            'loc': rng.standard_normal((n, a * 4, h, w)).astype('float32')}


def as_tensors(d, grad=False):
    out = {key: paddle.to_tensor(v) for key, v in d.items()}
    for v in out.values():
        v.stop_gradient = not grad
    return out


def make_loss(a=3, k=4, **kw):
    ch = {'conf': a * k, 'loc': a * 4}
    return SSDOutputLoss(dict(ch), dict(ch), **kw)


@pytest.mark.parametrize('temp', [1.0, 2.0, 4.0])
def test_conf_kd_matches_numpy_with_temperature(temp):
    rng = np.random.default_rng(0)
    s, t = outputs(rng), outputs(rng)
    loss = make_loss(temperature=temp, loc_weight=0.0)
    got = float(loss(as_tensors(s), as_tensors(t)))
    np.testing.assert_allclose(got, np_conf_kd(s['conf'], t['conf'], 4, temp), rtol=1e-5)


def test_temperature_changes_the_term_and_identical_outputs_give_zero():
    rng = np.random.default_rng(1)
    s, t = outputs(rng), outputs(rng)
    values = [float(make_loss(temperature=tp, loc_weight=0.0)(as_tensors(s), as_tensors(t))) for tp in (1, 4)]
    assert abs(values[0] - values[1]) > 1e-3
    assert abs(float(make_loss()(as_tensors(t), as_tensors(t)))) < 1e-6


def test_loc_pull_matches_numpy_on_confident_priors_only():
    rng = np.random.default_rng(2)
    s, t = outputs(rng), outputs(rng, scale=4.0)  # a peaky teacher: some priors confident, some not
    ref, count = np_loc_pull(s['loc'], t['loc'], t['conf'], 4, 0.5, 1.5)
    assert 0 < count < 2 * 3 * 5 * 6
    loss = make_loss(temperature=2.0, conf_weight=0.0, loc_weight=0.7, loc_thresh=0.5, loc_bound=1.5)
    np.testing.assert_allclose(float(loss(as_tensors(s), as_tensors(t))), 0.7 * ref, rtol=1e-5)
    both = make_loss(temperature=2.0, conf_weight=1.3, loc_weight=0.7, loc_bound=1.5)
    np.testing.assert_allclose(float(both(as_tensors(s), as_tensors(t))),
                               1.3 * np_conf_kd(s['conf'], t['conf'], 4, 2.0) + 0.7 * ref, rtol=1e-5)


def test_no_confident_prior_adds_zero_loc_but_keeps_the_graph():
    rng = np.random.default_rng(3)
    s, t = outputs(rng), outputs(rng)
    t['conf'] = np.zeros_like(t['conf'])  # uniform over 4 classes: foreground probability 0.25 < 0.5
    st = as_tensors(s, grad=True)
    loss = make_loss(conf_weight=0.0, loc_weight=1.0)(st, as_tensors(t))
    assert float(loss) == 0.0
    loss.backward()
    assert st['loc'].grad is not None and float(st['loc'].grad.abs().sum()) == 0.0


def test_gradient_reaches_both_student_outputs_and_never_the_teacher():
    rng = np.random.default_rng(4)
    s, t = outputs(rng), outputs(rng, scale=4.0)
    st, tt = as_tensors(s, grad=True), as_tensors(t, grad=True)
    make_loss()(st, tt).backward()
    assert float(st['conf'].grad.abs().sum()) > 0 and float(st['loc'].grad.abs().sum()) > 0
    assert tt['conf'].grad is None and tt['loc'].grad is None


@pytest.mark.parametrize('student, teacher, match', [
    ({'conf': 12, 'loc': 12}, {'conf': 15, 'loc': 12}, 'conf: student 12 channels vs teacher 15'),
    ({'conf': 12}, {'conf': 12}, r'needs student: \{conf: <tap>, loc: <tap>\}'),
    (12, 12, 'needs student'),
    ({'conf': 12, 'loc': 10}, {'conf': 12, 'loc': 10}, 'expected A\\*4 and A\\*K'),
])
def test_bad_layouts_are_errors(student, teacher, match):
    with pytest.raises(PPDistillError, match=match):
        SSDOutputLoss(student, teacher)


# -- the distiller's multi-tensor path on a toy detector with two head outputs --------------------------------

class ToyOutHead(nn.Layer):
    """ToyDet's head plus per-level box (4 ch) and flattened (2-D) outputs; ``cls`` has ``classes`` ch."""

    def __init__(self, ch: int, classes: int = 2):
        super().__init__()
        self.convs = nn.LayerList([nn.Conv2D(ch, ch, 3, padding=1)])
        self.cls = nn.Conv2D(ch, classes, 1)
        self.box = nn.Conv2D(ch, 4, 1)
        self.flat = nn.Flatten()

    def forward(self, feats):
        outs = []
        for f in feats:
            x = F.relu(self.convs[0](f))
            outs.extend([self.cls(x), self.box(x), self.flat(x).unsqueeze([2, 3])])
        return outs


def toy(width, neck_ch, levels, classes=2):
    model = ToyDet(width=width, neck_ch=neck_ch, levels=levels, dropout=0.0)
    model.head = ToyOutHead(neck_ch, classes)
    return model


SSD_ENTRY = {'type': 'SSDOutputLoss', 'name': 'ssdkd', 'student': {'conf': 'head.cls', 'loc': 'head.box'},
             'args': {'temperature': 2.0, 'loc_thresh': 0.3}}


def make(losses, teacher_classes=2, teacher_levels=3):
    paddle.seed(1)
    return Distiller(student_model=toy(8, 4, 2), teacher_model=toy(16, 8, teacher_levels, teacher_classes),
                     losses=losses, probe_size=32)


def test_multi_tensor_entry_gets_dicts_per_level_and_matches_the_loss_on_recorded_tensors():
    d = make([SSD_ENTRY])
    assert [t.key for t in d._terms] == ['distill_ssdkd_l0', 'distill_ssdkd_l1']
    assert [(t.pair.student_level, t.pair.teacher_level) for t in d._terms] == [(0, 0), (1, 1)]
    assert all(loss.num_priors == 1 for loss in d.distill_losses)  # 4 loc channels: 1 prior, K = 2
    d.train()
    inputs = toy_inputs()
    out = d(inputs)

    def head_outputs(model, train):
        model.train() if train else model.eval()  # the distiller runs the student in train mode
        feats = model.neck(model.backbone(inputs['image']))
        return [model.head.forward([f]) for f in feats]

    with paddle.no_grad():
        s_levels, t_levels = head_outputs(d.student_model, True), head_outputs(d.teacher_model, False)
    for i in range(2):
        s = {'conf': s_levels[i][0].numpy(), 'loc': s_levels[i][1].numpy()}
        t = {'conf': t_levels[i][0].numpy(), 'loc': t_levels[i][1].numpy()}
        conf = np_conf_kd(s['conf'], t['conf'], 2, 2.0)
        loc, _ = np_loc_pull(s['loc'], t['loc'], t['conf'], 2, 0.3, 1.0)
        np.testing.assert_allclose(float(out[f'distill_ssdkd_l{i}']), conf + 0.5 * loc, rtol=1e-4)


def test_distill_gradient_reaches_the_students_head_outputs():
    d = make([dict(SSD_ENTRY, args={'loc_thresh': 0.0})])  # every prior confident: the loc pull is on
    d.train()
    d(toy_inputs())['distill_loss'].backward()
    for name in ('cls', 'box'):
        grad = getattr(d.student_model.head, name).weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert all(p.grad is None for p in d.teacher_model.parameters())


def test_single_tap_entries_still_work_next_to_a_multi_tensor_entry():
    d = make([SSD_ENTRY, {'type': 'FeatureMSELoss', 'name': 'mse', 'student': 'neck'}])
    assert [t.key for t in d._terms] == ['distill_ssdkd_l0', 'distill_ssdkd_l1', 'distill_mse_l0',
                                         'distill_mse_l1']
    assert isinstance(d.distill_losses[2], FeatureMSELoss) and d.distill_losses[2].align is not None
    d.train()
    out = d(toy_inputs())
    assert set(out) >= {t.key for t in d._terms} | {'distill_loss'}


@pytest.mark.parametrize('entry, kw, match', [
    # teacher logits with another number of classes: no align conv for outputs
    (SSD_ENTRY, {'teacher_classes': 3},
     r"student level 0 \(1, 2, 8, 8\) <- teacher level 0 \(1, 3, 8, 8\): SSDOutputLoss: conf: student 2 "
     r"channels vs teacher 3"),
    # names whose level counts differ (the neck has 2 levels, neck.lateral.0 one)
    (dict(SSD_ENTRY, student={'conf': 'head.cls', 'loc': 'neck.lateral.0'}), {},
     r"the student's tensors must have the same number of levels, got conf \(head.cls\): 2, loc "
     r"\(neck.lateral.0\): 1"),
    (dict(SSD_ENTRY, teacher={'conf': 'head.cls', 'box': 'head.box'}), {},
     'student and teacher must name the same tensors'),
    (dict(SSD_ENTRY, teacher='head.cls'), {}, 'student and teacher must name the same tensors'),
    # a preset role of another architecture
    (dict(SSD_ENTRY, student={'conf': 'cls_logits', 'loc': 'box_reg'}), {},
     "'cls_logits' is a preset role but architecture 'ToyDet' has no preset for it"),
    (dict(SSD_ENTRY, student={}), {}, 'empty'),
    # a 2-D tap as the second tensor of a multi-tensor entry (pairing only looks at the first)
    (dict(SSD_ENTRY, student={'conf': 'head.cls', 'loc': 'head.flat'}), {},
     r"student tensors must be \[N, C, H, W\] maps, got \{'loc': \[\(1, 256\), \(1, 64\)\]\}"),
    # a 2-D tap for a feature loss
    ({'type': 'FeatureMSELoss', 'student': 'head.flat'}, {}, r'tensors must be \[N, C, H, W\] feature maps'),
])
def test_bad_multi_tensor_entries_fail_at_build_in_one_line(entry, kw, match):
    with pytest.raises(DistillConfigError, match=match) as err:
        make([entry], **kw)
    assert '\n' not in str(err.value)


# -- the SSD preset on real (tiny) ppdet SSD models ------------------------------------------------------------

def tiny_ssd(scale, classes=3):
    from ppdet.modeling import MobileNet, SSDHead
    from ppdet.modeling.architectures import SSD
    backbone = MobileNet(scale=scale, feature_maps=[4, 6, 13], with_extra_blocks=False, extra_block_filters=[])
    anchors = {'steps': [8, 16, 32], 'aspect_ratios': [[2.], [2.], [2.]], 'base_size': 64,
               'min_sizes': [8.0, 16.0, 32.0], 'max_sizes': [16.0, 32.0, 60.0]}
    head = SSDHead(num_classes=classes, in_channels=[s.channels for s in backbone.out_shape],
                   anchor_generator=anchors, loss=None)
    return SSD(backbone=backbone, ssd_head=head, post_process=None)


def test_ssd_preset_taps_per_level_confidences_locations_and_backbone_maps():
    paddle.seed(0)
    losses = [{'type': 'SSDOutputLoss', 'name': 'kd', 'student': {'conf': 'cls_logits', 'loc': 'box_reg'}},
              {'type': 'FeatureMSELoss', 'name': 'feat', 'student': 'fpn'}]
    d = Distiller(student_model=tiny_ssd(0.25), teacher_model=tiny_ssd(0.5), student_arch='SSD',
                  teacher_arch='SSD', losses=losses, probe_size=64)
    # 4 priors per cell (ratios 1, 2, 1/2 and the max-size square), 3 classes + background
    assert [t.pair.student_shape for t in d._terms[:3]] == [(1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2)]
    assert [t.student_tap for t in d._terms[:3]] == [{'conf': 'ssd_head.scores*', 'loc': 'ssd_head.boxes*'}] * 3
    assert [loss.num_priors for loss in d.distill_losses[:3]] == [4, 4, 4]
    # MobileNetV1 stages at strides 8/16/32 have 256/512/1024 channels times the scale
    assert [(t.pair.student_channels, t.pair.teacher_channels) for t in d._terms[3:]] == [
        (64, 128), (128, 256), (256, 512)]

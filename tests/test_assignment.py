"""The distiller feeds the student head's own label assignment to the losses that declare
``assignment_keys`` (ppdistill.assignment): the per-level ``pos`` masks equal the assigner's labels sliced
by level (checked with independent NumPy slicing), ``num_pos`` is the positive count, a loss needing the
assignment on an architecture whose preset has none is a one-line build error, and a training step in
which no assigner (or more than one) fires stops with an error."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest
from ppdet.core.workspace import register

from ppdistill import Distiller, DistillConfigError
from ppdistill.assignment import AssignmentError
from ppdistill.build import build_teacher
from ppdistill.losses.base import DistillLoss
from ppdistill.presets import PRESETS
from toy_models import ToyDet, toy_inputs
from conftest import needs_ppdet_heads_on_this_paddle

C = 2  # the toy head's classes; label C is the background


@register
class AssignmentProbeLoss(DistillLoss):
    """Reads both assignment keys; returns 0 (the test looks at what it received)."""
    tensor_names = ('cls',)
    assignment_keys = ('pos', 'num_pos')

    def __init__(self, student_channels, teacher_channels):
        super().__init__()

    def forward(self, student, teacher, inputs=None):
        return student['cls'].sum() * 0.0


class ToyAssigner(nn.Layer):
    """Returns ``(labels, boxes, scores)`` like ppdet's assigners for the labels the batch carries."""

    def forward(self, labels):
        return labels, paddle.zeros(labels.shape + [4]), F.one_hot(labels, C + 1)[..., :C]


class ToyAssignDet(ToyDet):
    """ToyDet whose training forward runs the assigners named by ``inputs['assigners']``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.static_assigner, self.assigner = ToyAssigner(), ToyAssigner()

    def forward(self, inputs):
        out = super().forward(inputs)
        if self.training:
            for name in inputs.get('assigners', ['assigner']):
                getattr(self, name)(inputs['toy_labels'])
        return out


@pytest.fixture
def toy_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, 'ToyAssignDet', {'taps': {'cls_logits': 'head.cls'},
                                                  'assignment': {'taps': ['static_assigner', 'assigner']}})


def toy_distiller(loss='AssignmentProbeLoss', args=None):
    paddle.seed(0)
    d = Distiller(student_model=ToyAssignDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                  teacher_model=ToyAssignDet(width=16, neck_ch=8, levels=2, dropout=0.0),
                  student_arch='ToyAssignDet', teacher_arch='ToyAssignDet',
                  losses=[{'type': loss, 'student': 'cls_logits', 'name': 'probe', 'args': args or {}}], probe_size=32)
    d.train()
    return d


def toy_batch(assigners=('assigner',)):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, C + 1, size=(2, 8 * 8 + 4 * 4))  # levels 8x8 and 4x4 at 32 px
    return dict(toy_inputs(), toy_labels=paddle.to_tensor(labels), assigners=list(assigners)), labels


@pytest.mark.parametrize('assigner', ['static_assigner', 'assigner'])
def test_pos_per_level_is_the_assigners_labels_sliced_by_level(toy_preset, assigner):
    d = toy_distiller()
    inputs, labels = toy_batch([assigner])
    seen = d.inspect(inputs)
    positive = labels != C
    offsets = {0: (0, 8, 8), 1: (64, 4, 4)}
    for level, (off, h, w) in offsets.items():
        fed = seen.term_inputs[f'distill_probe_l{level}'][0]
        expected = positive[:, off:off + h * w].reshape(2, 1, h, w).astype('float32')
        np.testing.assert_array_equal(fed['pos'].numpy(), expected)
        assert float(fed['num_pos']) == positive.sum()
        assert fed['pos'].stop_gradient


def test_num_pos_is_clipped_to_one_without_positives(toy_preset):
    d = toy_distiller()
    inputs, labels = toy_batch()
    inputs['toy_labels'] = paddle.full([2, 80], C, dtype='int64')
    fed = d.inspect(inputs).term_inputs['distill_probe_l0'][0]
    assert float(fed['num_pos']) == 1.0 and float(fed['pos'].sum()) == 0.0


@pytest.mark.parametrize('assigners, match', [((), r'static_assigner: 0, assigner: 0 call\(s\) \(none fired'),
                                              (('static_assigner', 'assigner'), 'static_assigner: 1, assigner: 1'),
                                              (('assigner', 'assigner'), 'assigner: 2')])
def test_a_step_without_exactly_one_assigner_call_is_an_error(toy_preset, assigners, match):
    d = toy_distiller()
    with pytest.raises(AssignmentError, match=match):
        d(toy_batch(assigners)[0])


def test_a_loss_needing_assignment_without_a_preset_row_is_a_one_line_build_error(toy_preset, monkeypatch):
    monkeypatch.setitem(PRESETS, 'ToyAssignDet', {'taps': {'cls_logits': 'head.cls'}})
    with pytest.raises(DistillConfigError, match=r"distill_probe_l0: the loss reads the student head's label "
                                                 r"assignment \(pos, num_pos\), but the preset of architecture "
                                                 r"'ToyAssignDet' has no assignment row.*normalize: locations") as err:
        toy_distiller()
    assert '\n' not in str(err.value)
    # a configuration that needs no assignment builds on the same preset and taps no assigner
    d = toy_distiller('BinaryKDLoss', {'normalize': 'locations'})
    assert d._assignment is None
    d(toy_batch(())[0])


@needs_ppdet_heads_on_this_paddle
def test_picodet_terms_get_the_assigners_positives_per_level():
    """The real PicoHeadV2 (tiny demo student): ATSS at epoch 0, task-aligned at epoch 5; the assigner's
    labels, read by a hook of this test's own, sliced by the levels' H*W in head order."""
    from test_head_presets import picodet_batch
    teacher, _ = build_teacher('configs/demo/tiny/picodet_teacher.yml', None, allow_random=True)
    student, _ = build_teacher('configs/demo/tiny/picodet_student.yml', None, allow_random=True)
    head = {'cls': 'cls_logits', 'reg': 'dfl_logits'}
    d = Distiller(student_model=student, teacher_model=teacher, student_arch='PicoDet', teacher_arch='PicoDet',
                  losses=[{'type': 'BinaryKDLoss', 'student': 'cls_logits'},
                          {'type': 'LDLoss', 'student': head, 'args': {'vlr_weight': 0.0}}], probe_size=96)
    d.train()
    seen_labels = []
    hooks = [getattr(student.head, n).register_forward_post_hook(lambda l, i, o: seen_labels.append(o[0].numpy()))
             for n in ('static_assigner', 'assigner')]
    for epoch in (0, 5):
        seen_labels.clear()
        seen = d.inspect(dict(picodet_batch(), epoch_id=epoch))
        (labels,) = seen_labels
        positive = labels != 10
        assert positive.any()
        off = 0
        for level, cls in enumerate(seen.student_taps['head.head_cls_list.*']):
            h, w = cls.shape[2:]
            expected = positive[:, off:off + h * w].reshape(2, 1, h, w)
            off += h * w
            ld_in = seen.term_inputs[f'distill_ld_l{level}'][0]
            np.testing.assert_array_equal(ld_in['pos'].numpy() != 0, expected)
            assert float(seen.term_inputs[f'distill_binarykd_l{level}'][0]['num_pos']) == positive.sum()
            assert float(seen.terms[f'distill_ld_l{level}']) >= 0
        assert off == labels.shape[1]
    for h in hooks:
        h.remove()


def test_a_reader_fed_assignment_reads_the_batch_keys(toy_preset, monkeypatch):
    """GFL's row: labels and per-image positive counts written by the reader (Gt2GFLTarget); background
    label = the student's class count."""
    monkeypatch.setitem(PRESETS, 'ToyAssignDet', {'taps': {'cls_logits': 'head.cls'},
                                                  'assignment': {'inputs': {'labels': 'labels', 'num_pos': 'pos_num'}}})
    d = toy_distiller()
    inputs, labels = toy_batch(())
    inputs.update(labels=inputs.pop('toy_labels'), pos_num=[paddle.to_tensor([3]), paddle.to_tensor([4])])
    seen = d.inspect(inputs)
    fed = seen.term_inputs['distill_probe_l1'][0]
    np.testing.assert_array_equal(fed['pos'].numpy()[:, 0], (labels[:, 64:] != C).reshape(2, 4, 4))
    assert float(fed['num_pos']) == 7.0
    del inputs['pos_num']
    with pytest.raises(AssignmentError, match=r"the batch has no \['pos_num'\]"):
        d.inspect(inputs)


def test_per_level_reader_labels_with_another_background(toy_preset, monkeypatch):
    """FCOS's row: one batch key per level (labels0, labels1: [N, H, W, 1]) whose background is 0, and no
    count key: num_pos is the positives counted over every level."""
    monkeypatch.setitem(PRESETS, 'ToyAssignDet', {'taps': {'cls_logits': 'head.cls'},
                                                  'assignment': {'inputs': {'labels': 'labels*', 'background': 0}}})
    d = toy_distiller()
    inputs, _ = toy_batch(())
    rng = np.random.default_rng(7)
    levels = [rng.integers(0, 3, size=(2, 8, 8, 1)), rng.integers(0, 3, size=(2, 4, 4, 1))]
    inputs.update({f'labels{i}': paddle.to_tensor(lab) for i, lab in enumerate(levels)}, labels_extra=1)
    seen = d.inspect(inputs)
    for i, lab in enumerate(levels):
        fed = seen.term_inputs[f'distill_probe_l{i}'][0]
        np.testing.assert_array_equal(fed['pos'].numpy()[:, 0], (lab[..., 0] != 0).astype('float32'))
        assert float(fed['num_pos']) == sum(int((x != 0).sum()) for x in levels)
    del inputs['labels0']  # the levels must start at 0 and follow each other
    with pytest.raises(AssignmentError, match=r"the batch has no per-level labels labels\* \(0, 1, \.\.\.\), got "
                                              r"\['labels1'\]"):
        d.inspect(inputs)
    del inputs['labels1']  # with only the first level, the locations do not add up
    inputs['labels0'] = paddle.to_tensor(levels[0])
    with pytest.raises(AssignmentError, match='the assignment has 64 locations but the student levels'):
        d.inspect(inputs)


def test_assigned_scores_sum_is_the_assigners_score_sum(toy_preset):
    """normalize: assigned_scores reads the sum of the fired assigner's scores [N, A, C] (here one-hot over
    the positives, so the positive count), clipped to >= 1."""
    d = toy_distiller('BinaryKDLoss', {'normalize': 'assigned_scores'})
    inputs, labels = toy_batch()
    fed = d.inspect(inputs).term_inputs['distill_probe_l0'][0]
    assert set(fed) == {'cls', 'assigned_scores_sum'}
    assert float(fed['assigned_scores_sum']) == (labels != C).sum()
    inputs['toy_labels'] = paddle.full([2, 80], C, dtype='int64')
    assert float(d.inspect(inputs).term_inputs['distill_probe_l0'][0]['assigned_scores_sum']) == 1.0

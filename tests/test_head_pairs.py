"""The tiny GFL, PP-YOLOE and FCOS demo pairs (configs/demo/tiny/) through the distiller: roles resolve to the
head's sublayers, levels pair by stride, a training step logs one term per level on the reader's or the
assigner's label assignment, eval mode is the student's own output; the PP-YOLOE ``assigned_scores``
normaliser gives ppdet's PP-YOLOE distill class term; and the head-KD build errors are one line each
(unequal reg_max for LD, unequal classes, a missing or silent assigner tap, a role the preset lacks, a
normaliser the assignment cannot give, CrossKD on a head without a valid cut)."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os

import numpy as np
import paddle
import pytest
import yaml

from ppdet.core.workspace import load_config
from ppdet.data.transform import batch_operators
from ppdistill import Distiller, DistillConfigError
from ppdistill.assignment import AssignmentError
from ppdistill.build import build_teacher
from ppdistill.config_scope import config_scope
from ppdistill.presets import PRESETS
from conftest import ROOT, TINY, needs_ppdet_heads_on_this_paddle
from test_head_presets import picodet_batch
from test_assignment import AssignmentProbeLoss  # noqa: F401  (registers the probe loss)

SIZE = 96
HEAD = {'cls': 'cls_logits', 'reg': 'dfl_logits'}
FCOS_HEAD = {'cls': 'cls_logits', 'reg': 'box_reg'}
# arch: (preset row, student taps of cls_logits, strides in head order)
PAIRS = {'gfl': ('GFL', ['head.gfl_head_cls'], [8, 16, 32]),
         'ppyoloe': ('PPYOLOE', ['yolo_head.pred_cls.0', 'yolo_head.pred_cls.1', 'yolo_head.pred_cls.2'],
                     [32, 16, 8]),
         'fcos': ('FCOS', ['fcos_head.fcos_head_cls'], [8, 16, 32])}


def tiny(arch, side):
    return os.path.join(TINY, f'{arch}_{side}.yml')


def models(arch, teacher_cfg=None):
    teacher, t_arch = build_teacher(teacher_cfg or tiny(arch, 'teacher'), None, allow_random=True)
    student, s_arch = build_teacher(tiny(arch, 'student'), None, allow_random=True)
    return student, s_arch, teacher, t_arch


def distiller(arch, losses, teacher_cfg=None, student=None):
    s, s_arch, t, t_arch = models(arch, teacher_cfg)
    if student is not None:
        s, s_arch = student
    return Distiller(student_model=s, teacher_model=t, student_arch=s_arch, teacher_arch=t_arch, losses=losses,
                     probe_size=SIZE)


def bckd(arch, normalize='positives'):
    box = {'box_coder': 'ltrb'} if arch == 'fcos' else {'box_coder': 'dfl'}
    return [{'type': 'BinaryKDLoss', 'name': 'bckd_cls', 'student': 'cls_logits', 'args': {'normalize': normalize}},
            {'type': 'BoxKDLoss', 'name': 'bckd_box', 'student': FCOS_HEAD if arch == 'fcos' else HEAD,
             'args': dict(box, normalize=normalize)}]


def reader_batch(arch, seed=0):
    """A training batch as the tiny config's reader gives it: two 96 px images with boxes, then the config's
    own batch transforms (PadGT, or Gt2GFLTarget / Gt2FCOSTarget writing the head's targets)."""
    if arch == 'ppyoloe':
        return picodet_batch(SIZE)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(2):
        xy = rng.uniform(0, 50, size=(3, 2))
        wh = rng.uniform(12, 45, size=(3, 2))
        samples.append({'image': rng.standard_normal((3, SIZE, SIZE)).astype('float32'),
                        'gt_bbox': np.concatenate([xy, xy + wh], 1).astype('float32'),
                        'gt_class': rng.integers(0, 10, size=(3, 1)).astype('int32'),
                        'is_crowd': np.zeros((3, 1), 'int32'),
                        'im_shape': np.array([SIZE, SIZE], 'float32'), 'scale_factor': np.ones(2, 'float32'),
                        'im_id': np.array([0])})
    with config_scope():
        cfg = load_config(tiny(arch, 'student'))
        for op in cfg['TrainReader']['batch_transforms']:
            (name, args), = op.items()
            samples = getattr(batch_operators, name)(**dict(args, **(
                {'num_classes': cfg['num_classes']} if name == 'Gt2GFLTarget' else {})))(samples)
    batch = {k: paddle.to_tensor(np.stack([s[k] for s in samples])) for k in samples[0] if not k.startswith('gt_')}
    batch['epoch_id'] = 0
    return batch


def one_line(err):
    assert '\n' not in str(err.value), str(err.value)
    return str(err.value)


@needs_ppdet_heads_on_this_paddle
@pytest.mark.parametrize('arch', sorted(PAIRS))
def test_tiny_pair_trains_one_step_with_a_term_per_level_and_evaluates_as_the_student(arch):
    row, cls_taps, strides = PAIRS[arch]
    d = distiller(arch, bckd(arch) + [{'type': 'FeatureMSELoss', 'name': 'neck', 'student': 'fpn'}])
    assert d.student_taps.specs[PRESETS[row]['taps']['cls_logits']] == cls_taps
    # the narrower student neck gets an align conv per level to the teacher's channels; logits none
    aligns = {t.key: m.align for t, m in zip(d._terms, d.distill_losses) if t.key.startswith('distill_neck')}
    assert len(aligns) == 3 and all(a is not None and a.weight.shape[0] > a.weight.shape[1] for a in aligns.values())
    # levels pair by stride (PP-YOLOE's head order is coarse -> fine on both sides)
    terms = {t.key: t for t in d._terms}
    for i, stride in enumerate(strides):
        pair = terms[f'distill_bckd_cls_l{i}'].pair
        assert pair.teacher_level == i and pair.student_shape[2:] == pair.teacher_shape[2:] == (-(-SIZE // stride),) * 2
    assert sorted(terms) == sorted(f'distill_{n}_l{i}' for n in ('bckd_cls', 'bckd_box', 'neck') for i in range(3))
    batch = reader_batch(arch)
    d.train()
    out = d(dict(batch))
    values = [float(out[k]) for k in terms]
    assert all(np.isfinite(v) and v >= 0 for v in values) and sum(values) > 0, dict(zip(terms, values))
    np.testing.assert_allclose(float(out['distill_loss']), sum(values), rtol=1e-5)
    d.eval()
    with paddle.no_grad():
        ours = d(dict(batch))
        d.student_model.eval()
        own = d.student_model(dict(batch))
    np.testing.assert_array_equal(ours['bbox'].numpy(), own['bbox'].numpy())


def test_fcos_assignment_is_the_readers_per_level_labels():
    """FCOS's row reads Gt2FCOSTarget's labels0, labels1, ... ([N, H, W, 1], class + 1 at positives, 0 the
    background): each level's pos is that level's labels != 0, num_pos their count over all levels."""
    d = distiller('fcos', [{'type': 'AssignmentProbeLoss', 'name': 'probe', 'student': 'cls_logits'}])
    batch = reader_batch('fcos')
    labels = [batch[f'labels{i}'].numpy()[..., 0] for i in range(3)]
    count = sum(int((lab != 0).sum()) for lab in labels)
    assert count > 0
    d.train()
    got = d.inspect(dict(batch)).term_inputs
    for i, lab in enumerate(labels):
        fed = got[f'distill_probe_l{i}'][0]
        np.testing.assert_array_equal(fed['pos'].numpy()[:, 0], (lab != 0).astype('float32'))
        assert float(fed['num_pos']) == count


@needs_ppdet_heads_on_this_paddle
def test_assigned_scores_normaliser_gives_ppdets_ppyoloe_distill_class_term():
    """BinaryKD with beta 2 over the student assigner's assigned_scores_sum (normalize: assigned_scores), summed
    over the levels, equals ppdet 2.6.0's DistillPPYOLOELoss.quality_focal_loss on the same logits with the
    score sum read by a hook of this test's own on the assigner that ran."""
    from ppdet.slim.distill_loss import DistillPPYOLOELoss
    d = distiller('ppyoloe', [{'type': 'BinaryKDLoss', 'name': 'cls', 'student': 'cls_logits',
                               'args': {'beta': 2.0, 'normalize': 'assigned_scores', 'loss_weight': 1.0}}])
    scores = []
    layers = dict(d.student_model.named_sublayers())
    handles = [layers[n].register_forward_post_hook(lambda layer, i, out: scores.append(out[2]))
               for n in ('yolo_head.static_assigner', 'yolo_head.assigner')]
    d.train()
    for epoch in (0, 3):  # ATSS, then task-aligned (static_assigner_epoch 1)
        scores.clear()
        seen = d.inspect(dict(picodet_batch(SIZE), epoch_id=epoch))
        (score,) = scores
        fed = seen.term_inputs['distill_cls_l0'][0]['assigned_scores_sum']
        assert float(fed) == pytest.approx(max(float(score.sum()), 1.0), rel=1e-6)

        def probs(side):  # PPYOLOEHead: sigmoid(cls) [N, C, H, W] -> [N*A, C], levels in head order
            maps = [seen.term_inputs[f'distill_cls_l{i}'][side]['cls'] for i in range(3)]
            return paddle.concat([paddle.nn.functional.sigmoid(m).flatten(2).transpose([0, 2, 1])
                                  for m in maps], axis=1).reshape([-1, 10])
        ref = DistillPPYOLOELoss(logits_distill=True, feat_distill=False).quality_focal_loss(
            probs(0), probs(1), beta=2.0, use_sigmoid=False, num_total_pos=paddle.clip(score.sum(), min=1.0))
        ours = sum(float(seen.terms[f'distill_cls_l{i}']) for i in range(3))
        np.testing.assert_allclose(ours, float(ref), rtol=1e-4)
    for h in handles:
        h.remove()


def test_ld_between_unequal_reg_max_is_a_one_line_build_error():
    """PicoDet's reg_max 7 student against the PP-YOLOE teacher's 16: LD compares bins one by one."""
    student = build_teacher(os.path.join(TINY, 'picodet_student.yml'), None, allow_random=True)
    with pytest.raises(DistillConfigError) as err:
        distiller('ppyoloe', [{'type': 'LDLoss', 'student': HEAD, 'args': {'vlr_weight': 0.0}}], student=student)
    assert 'student reg_max 7 and teacher reg_max 16 differ' in one_line(err) and 're-projection' in str(err.value)


@pytest.mark.parametrize('loss', ['BinaryKDLoss', 'LDLoss'])
def test_class_count_mismatch_is_a_one_line_build_error(tmp_path, loss):
    teacher = tmp_path / 'gfl_teacher_4.yml'
    teacher.write_text(yaml.safe_dump({'_BASE_': [tiny('gfl', 'teacher')], 'num_classes': 4}))
    entry = {'type': loss, 'student': HEAD if loss == 'LDLoss' else 'cls_logits',
             'args': {'vlr_weight': 0.0} if loss == 'LDLoss' else {}}
    with pytest.raises(DistillConfigError) as err:
        distiller('gfl', [entry], teacher_cfg=str(teacher))
    text = one_line(err)
    assert ('student 10 channels vs teacher 4' in text) if loss == 'BinaryKDLoss' else (
        'student 10 and teacher 4 classes differ' in text)


def test_an_assignment_row_naming_a_missing_sublayer_is_a_one_line_build_error(monkeypatch):
    monkeypatch.setitem(PRESETS, 'PPYOLOE', dict(PRESETS['PPYOLOE'], assignment={
        'taps': ['yolo_head.static_assigner', 'yolo_head.no_such_assigner']}))
    with pytest.raises(DistillConfigError) as err:
        distiller('ppyoloe', bckd('ppyoloe'))
    assert "student preset 'PPYOLOE': no sublayer named 'yolo_head.no_such_assigner'" in one_line(err)


@needs_ppdet_heads_on_this_paddle
def test_an_assigner_tap_that_never_fires_stops_the_first_step_before_any_update(monkeypatch):
    """A row naming only the task-aligned assigner: in the static-assigner epochs (epoch 0 here) it never
    runs, so the first training forward raises (the distiller's forward, before the trainer's backward and
    update)."""
    monkeypatch.setitem(PRESETS, 'PPYOLOE', dict(PRESETS['PPYOLOE'], assignment={'taps': ['yolo_head.assigner']}))
    d = distiller('ppyoloe', bckd('ppyoloe'))
    d.train()
    with pytest.raises(AssignmentError) as err:
        d(dict(picodet_batch(SIZE), epoch_id=0))
    assert 'yolo_head.assigner: 0 call(s) (none fired' in one_line(err)


def test_a_role_the_heads_preset_lacks_is_a_one_line_build_error():
    """LD needs DFL logits; FCOS regresses (l, t, r, b) directly, so its row has no dfl_logits role."""
    with pytest.raises(DistillConfigError) as err:
        distiller('fcos', [{'type': 'LDLoss', 'student': HEAD, 'args': {'vlr_weight': 0.0}}])
    assert ("'dfl_logits' is a preset role but architecture 'FCOS' has no preset for it (its preset has fpn, "
            'cls_logits, box_reg, quality_logits)') in one_line(err)


def test_assigned_scores_on_a_reader_fed_assignment_is_a_one_line_build_error():
    """GFL's assignment is the reader's labels: no assigner scores to sum."""
    with pytest.raises(DistillConfigError) as err:
        distiller('gfl', bckd('gfl', normalize='assigned_scores'))
    assert 'reads assigned_scores_sum' in one_line(err) and 'use normalize: positives' in str(err.value)


def test_cross_on_ppyoloe_is_a_one_line_build_error():
    """PPYOLOEHead's class branch adds the neck feature back after the stem: no sublayer's output is the
    predictor's whole input, so a cut at the stems would mix the teacher's own neck feature into the
    crossed logits."""
    with pytest.raises(DistillConfigError) as err:
        distiller('ppyoloe', [{'type': 'BinaryKDLoss', 'student': 'cls_logits',
                               'cross': [{'student': 'yolo_head.stem_cls.*'}, {'student': 'yolo_head.stem_reg.*'}]}])
    assert ("CrossKD (cross:) cannot run on architecture 'PPYOLOE': PPYOLOEHead's class predictor reads "
            'stem_cls(feat) + feat') in one_line(err)


@needs_ppdet_heads_on_this_paddle
def test_gfl_crosskd_config_cut_reproduces_the_teacher_with_a_copied_student():
    """The shipped GFL CrossKD config's cut (both towers after their first conv): with the student a copy of
    the teacher, the teacher's tail on the crossed features gives the teacher's own class and DFL logits."""
    raw = yaml.safe_load(open(os.path.join(ROOT, 'configs', 'slim', 'distill', 'crosskd_gfl_teacher_to_student.yml')))
    student = build_teacher(tiny('gfl', 'teacher'), None, allow_random=True)
    teacher, t_arch = build_teacher(tiny('gfl', 'teacher'), None, allow_random=True)
    student[0].set_state_dict(teacher.state_dict())
    d = Distiller(student_model=student[0], teacher_model=teacher, student_arch=student[1], teacher_arch=t_arch,
                  losses=raw['losses'], probe_size=SIZE)
    assert all(m.cross_adapters[0].conv is None for m in list(d.distill_losses)[:3])
    d.eval()
    with paddle.no_grad():
        seen = d.inspect(reader_batch('gfl'))
    assert len(seen.term_inputs) == 6
    for key, (crossed, own) in seen.term_inputs.items():
        for name in ('cls', 'reg'):
            if name in own:
                np.testing.assert_allclose(crossed[name].numpy(), own[name].numpy(), rtol=1e-4, atol=1e-4)

"""PaddleDetection's own distill configs (v2.6.0 ``configs/slim/distill/*.yml``) translate to ppdistill loss
entries with upstream's numbers, and run through ``tools/train.py --slim_config``.

The fixtures (tests/fixtures/upstream/) are the upstream files' distill sections; every expected value
below is written from the upstream file and ppdet 2.6.0's distill code (docs/methods.md "Upstream
configs"), not from the translation.
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os

import pytest
import yaml
from ppdet.core.workspace import global_config, load_config, merge_config

from conftest import ROOT, TINY, run
from ppdistill.build import load_distill_config
from ppdistill.config_scope import config_scope
from ppdistill.distiller import DistillConfigError
from ppdistill.upstream import TEACHER_EVAL, translate

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'upstream')
GFL_STUDENT = os.path.join(FIXTURES, 'gfl_slim_ld_student.yml')  # LDGFLHead, as gfl_slim_ld_r18vd_1x_coco.yml
GFL_TINY = os.path.join(FIXTURES, 'gfl_teacher_tiny.yml')  # GFLHead, as gfl_r50_fpn_1x_coco.yml (and the teachers)
PPYOLOE_STUDENT = os.path.join(FIXTURES, 'ppyoloe_plus_student.yml')
STUDENTS = {  # the student each file is paired with in upstream's configs/slim/distill/README.md
    'gfl_ld_distill.yml': GFL_STUDENT,
    'gfl_r101vd_fpn_coco_distill_cwd.yml': GFL_TINY,
    'retinanet_resnet101_coco_distill.yml': os.path.join(TINY, 'retinanet_student.yml'),
    'retinanet_resnet101_coco_distill_cwd.yml': os.path.join(TINY, 'retinanet_student.yml'),
    'yolov3_mobilenet_v1_coco_distill.yml': os.path.join(TINY, 'yolov3_student.yml'),
    'ppyoloe_plus_distill_x_distill_l.yml': PPYOLOE_STUDENT,
    'ppyoloe_plus_distill_l_distill_m.yml': PPYOLOE_STUDENT,
    'ppyoloe_plus_distill_m_distill_s.yml': PPYOLOE_STUDENT,
}
HEAD = {'cls': 'cls_logits', 'reg': 'dfl_logits'}
LEVELS5 = [0, 1, 2, 3, 4]  # distill_loss_name has 5 names: ppdet applies them to levels 0..4

# PP-YOLOE+: loss_weight.logits 4 x logits_loss_weight {class 1, iou 2.5, dfl 0.5}; dfl is CE summed over
# the 17 bins (reg_max 16), LDLoss's KL averages over them: x17. FGD weights hard-coded in DistillPPYOLOELoss
# times loss_weight.feat 1.
PPYOLOE_ENTRIES = [
    ('BinaryKDLoss', 'kd_cls', 'cls_logits', None, {'beta': 2.0, 'normalize': 'assigned_scores', 'loss_weight': 4.0}),
    ('BoxKDLoss', 'kd_iou', HEAD, None, {'box_coder': 'dfl', 'normalize': 'positives', 'loss_weight': 10.0}),
    ('LDLoss', 'kd_dfl', HEAD, None, {'temperature': 1.0, 'ld_weight': 2.0 * 17, 'vlr_weight': 0.0,
                                      'kd_weight': 0.0, 'normalize': 'mean'}),
    ('FGDLoss', 'feat_fgd', 'fpn', None, {'alpha_fgd': 1e-5, 'beta_fgd': 5e-6, 'gamma_fgd': 1e-5, 'lambda_fgd': 5e-8}),
]
EXPECTED = {
    # LDGFLHead of gfl_slim_ld_r18vd_1x_coco.yml: loss_ld (0.25, T 10), loss_ld_vlr (0.25, T 10), loss_kd (10, T 2);
    # Gt2GFLTarget grid_cell_scale 8, cell_offset 0; fpn_stride 8..128
    'gfl_ld_distill.yml': [
        ('LDLoss', 'ld', HEAD, None, {'temperature': 10.0, 'ld_weight': 0.25, 'vlr_weight': 0.25, 'kd_weight': 10.0,
                                      'kd_temperature': 2.0, 'normalize': 'reference',
                                      'strides': [8, 16, 32, 64, 128], 'grid_cell_scale': 8.0, 'cell_offset': 0.0,
                                      'band_overlap': 'iof'})],
    # CWDDistillModel.get_loss_gfl: the same CWDFeatureLoss(tau 1, weight 5) on the class maps and the neck
    'gfl_r101vd_fpn_coco_distill_cwd.yml': [
        ('CWDLoss', 'cwd_cls_logits', 'cls_logits', LEVELS5, {'tau': 1.0, 'loss_weight': 5.0}),
        ('CWDLoss', 'cwd_fpn', 'fpn', LEVELS5, {'tau': 1.0, 'loss_weight': 5.0})],
    'retinanet_resnet101_coco_distill.yml': [
        ('FGDLoss', 'fgd', 'fpn', LEVELS5, {'temp': 0.5, 'alpha_fgd': 0.001, 'beta_fgd': 0.0005, 'gamma_fgd': 0.0005,
                                            'lambda_fgd': 0.000005})],
    # CWDDistillModel.get_loss_retinanet passes the neck features
    'retinanet_resnet101_coco_distill_cwd.yml': [
        ('CWDLoss', 'cwd_fpn', 'fpn', LEVELS5, {'tau': 1.0, 'loss_weight': 5.0})],
    'yolov3_mobilenet_v1_coco_distill.yml': [
        ('YOLOv3OutputLoss', 'yolov3kd', 'yolo_output', None, {'mode': 'obj_scaled', 'loss_weight': 1000.0})],
    'ppyoloe_plus_distill_x_distill_l.yml': PPYOLOE_ENTRIES,
    'ppyoloe_plus_distill_l_distill_m.yml': PPYOLOE_ENTRIES,
    'ppyoloe_plus_distill_m_distill_s.yml': PPYOLOE_ENTRIES,
}
URLS = {'gfl_ld_distill.yml': 'gfl_r101vd_fpn_mstrain_2x_coco', 'gfl_r101vd_fpn_coco_distill_cwd.yml':
        'gfl_r101vd_fpn_mstrain_2x_coco', 'retinanet_resnet101_coco_distill.yml': 'retinanet_r101_fpn_2x_coco',
        'retinanet_resnet101_coco_distill_cwd.yml': 'retinanet_r101_fpn_2x_coco',
        'yolov3_mobilenet_v1_coco_distill.yml': 'yolov3_r34_270e_coco',
        'ppyoloe_plus_distill_x_distill_l.yml': 'ppyoloe_plus_crn_x_80e_coco',
        'ppyoloe_plus_distill_l_distill_m.yml': 'ppyoloe_plus_crn_l_80e_coco',
        'ppyoloe_plus_distill_m_distill_s.yml': 'ppyoloe_plus_crn_m_80e_coco'}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def read(name: str) -> dict:
    with open(fixture(name)) as f:
        return yaml.safe_load(f)


def translated(name: str, raw: dict = None):
    """``translate`` of an upstream file with its README student loaded (global config restored after)."""
    with config_scope():
        load_config(STUDENTS[name])
        return translate(read(name) if raw is None else raw, fixture(name))


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_each_upstream_file_translates_to_its_terms_with_upstream_numbers(name, monkeypatch):
    logged = []
    monkeypatch.setattr('ppdistill.upstream.logger.info', logged.append)
    cfg, result = translated(name)
    # one log line: the entries and every change from the upstream run
    assert len(logged) == 1 and '\n' not in logged[0] and all(c in logged[0] for c in result.changes)
    got = [(e['type'], e['name'], e['student'], e['levels'], e['args']) for e in result.losses]
    assert got == EXPECTED[name]
    assert all(e['teacher'] == e['student'] and e['weight'] == 1.0 for e in result.losses)
    assert cfg['slim'] == 'Distiller' and cfg['losses'] == result.losses
    assert cfg['teacher_config'] == fixture(name)
    assert cfg['teacher_weights'] == f'https://paddledet.bj.bcebos.com/models/{URLS[name]}.pdparams'
    assert result.changes[-1] == TEACHER_EVAL


def test_ppyoloe_changes_name_every_upstream_defect():
    _, result = translated('ppyoloe_plus_distill_l_distill_m.yml')
    text = ' | '.join(result.changes)
    for defect in ('x0.125', 'main_kd dropped', 'T 10', '20000', 'own label assignment', 'raw features'):
        assert defect in text, defect
    # ppdet's head with for_distill on keeps its first assignment unless a teacher's overwrites it each step
    assert result.student == {'for_distill': False}


def test_ld_builds_the_student_head_as_a_gfl_head_with_the_ld_head_settings():
    _, result = translated('gfl_ld_distill.yml')
    assert result.student['GFL'] == {'head': 'GFLHead'}
    plain = result.student['GFLHead']
    assert not {'loss_ld', 'loss_ld_vlr', 'loss_kd'} & set(plain)
    assert plain['reg_max'] == 16 and plain['loss_dfl'] == {'name': 'DistributionFocalLoss', 'loss_weight': 0.25}


def test_ld_student_checkpoint_loads_into_the_ld_head_config():
    """The GFLHead student the LD translation trains has exactly the LDGFLHead student's tensors."""
    from ppdistill.config_scope import create_fresh
    _, result = translated('gfl_ld_distill.yml')
    shapes = []
    for student in ({}, result.student):
        with config_scope():
            load_config(GFL_STUDENT)
            merge_config(student)
            model = create_fresh('GFL')
            shapes.append({k: list(v.shape) for k, v in model.state_dict().items()})
            shapes.append(type(model.head).__name__)
    assert shapes[1] == 'LDGFLHead' and shapes[3] == 'GFLHead'
    assert shapes[0] == shapes[2]


def test_cwd_tau_other_than_one_keeps_tau_squared_and_says_so():
    raw = read('retinanet_resnet101_coco_distill_cwd.yml')
    raw['CWDFeatureLoss']['tau'] = 2.0
    _, result = translated('retinanet_resnet101_coco_distill_cwd.yml', raw)
    assert result.losses[0]['args'] == {'tau': 2.0, 'loss_weight': 5.0}
    assert 'CWD keeps tau**2 = 4 (upstream drops it)' in result.changes
    _, result = translated('retinanet_resnet101_coco_distill_cwd.yml')
    assert result.changes == [TEACHER_EVAL]


def test_ppyoloe_switches_and_weights_are_honoured():
    raw = read('ppyoloe_plus_distill_m_distill_s.yml')
    raw['DistillPPYOLOELoss'].update(loss_weight={'logits': 2.0, 'feat': 0.5}, logits_ld_distill=False,
                                     feat_distiller='pkd', logits_loss_weight={'iou': 1.0})
    _, result = translated('ppyoloe_plus_distill_m_distill_s.yml', raw)
    # a partial logits_loss_weight keeps ppdet's defaults for the others (class 1.0, dfl 0.5)
    assert [(e['type'], e['args'].get('loss_weight', e['args'].get('ld_weight'))) for e in result.losses] == [
        ('BinaryKDLoss', 2.0 * 1.0), ('BoxKDLoss', 2.0 * 1.0), ('LDLoss', 2.0 * 0.5 * 17), ('PKDLoss', 0.5)]
    assert not any('main_kd' in c or 'raw features' in c for c in result.changes)
    raw['DistillPPYOLOELoss'].update(feat_distill=False, logits_distill=False)
    with pytest.raises(DistillConfigError, match='distils nothing'):
        translated('ppyoloe_plus_distill_m_distill_s.yml', raw)


@pytest.mark.parametrize('name, change, match', [
    ('retinanet_resnet101_coco_distill_cwd.yml', {'slim_method': 'KD'},
     r"slim_method='KD' has no ppdistill translation \(ppdet methods: FGD, CWD, LD, PPYOLOEDistill"),
    ('yolov3_mobilenet_v1_coco_distill.yml', {'distill_loss': 'KnowledgeDistillationKLDivLoss'},
     "DistillYOLOv3Loss only \\(got 'KnowledgeDistillationKLDivLoss'\\)"),
    ('ppyoloe_plus_distill_l_distill_m.yml', {'DistillPPYOLOELoss': {'feat_distiller': 'mgd'}},
     "feat_distiller 'mgd'.*SSIM"),
    ('retinanet_resnet101_coco_distill_cwd.yml', {'CWDFeatureLoss': {'normalize': True}},
     r'CWDFeatureLoss.normalize: true .* not supported'),
    ('retinanet_resnet101_coco_distill_cwd.yml', {'CWDFeatureLoss': {'tua': 1.0}}, r"unknown key\(s\) \['tua'\]"),
    ('yolov3_mobilenet_v1_coco_distill.yml', {'DistillYOLOv3Loss': {'weight': 'x'}},
     'DistillYOLOv3Loss.weight must be a number'),
])
def test_an_upstream_term_without_a_mapping_is_one_line(name, change, match):
    raw = read(name)
    raw.update(change)
    with pytest.raises(DistillConfigError, match=match) as err:
        translated(name, raw)
    assert '\n' not in str(err.value)


def test_cwd_and_ld_need_the_students_upstream_pairs():
    with pytest.raises(DistillConfigError, match=r"CWD is defined for \['GFL', 'RetinaNet'\] students, the "
                                                 r"student is 'YOLOv3'"):
        with config_scope():
            load_config(STUDENTS['yolov3_mobilenet_v1_coco_distill.yml'])
            translate(read('retinanet_resnet101_coco_distill_cwd.yml'), 'x.yml')
    with pytest.raises(DistillConfigError, match=r"student's head is 'GFLHead'.*gfl_slim_ld_r18vd_1x_coco"):
        with config_scope():
            load_config(GFL_TINY)
            translate(read('gfl_ld_distill.yml'), 'x.yml')


def test_load_merges_the_student_settings_and_keeps_teacher_keys(tmp_path):
    raw = read('ppyoloe_plus_distill_x_distill_l.yml')
    raw.pop('pretrain_weights')
    raw.update(allow_random_teacher=True, teacher_min_match=0.9)
    path = tmp_path / 'up.yml'
    path.write_text(yaml.safe_dump(raw))
    with config_scope():
        load_config(PPYOLOE_STUDENT)
        assert global_config['for_distill'] is True
        load_distill_config(str(path))
        assert global_config['for_distill'] is False
        assert global_config['allow_random_teacher'] is True and global_config['teacher_min_match'] == 0.9
        assert [e['type'] for e in global_config['Distiller']['losses']] == [e[0] for e in PPYOLOE_ENTRIES]


# -- integration: tools/train.py -c <tiny student> --slim_config <upstream-format file> ------------------
@pytest.fixture(scope='module')
def data(tmp_path_factory):
    wd = tmp_path_factory.mktemp('upstream')
    run(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '4', '--num_val', '2'], wd)
    return wd


def upstream_file(wd, name: str, teacher: str, levels: int = None) -> str:
    """The upstream file as a user runs it: its distill section on a local teacher config, random teacher
    (``levels``: distill_loss_name cut to a tiny model's level count)."""
    raw = read(name)
    raw.pop('pretrain_weights')
    raw.update({'_BASE_': [teacher], 'allow_random_teacher': True})
    if levels:
        raw['distill_loss_name'] = raw['distill_loss_name'][:levels]
    path = wd / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def distill_run(wd, name: str, student: str, teacher: str, terms, levels: int = None, epochs: int = 1):
    slim = upstream_file(wd, name, teacher, levels)
    proc = run(['train.py', '-c', student, '--slim_config', slim, '-o', f'epoch={epochs}', 'TrainReader.batch_size=2'],
               wd)
    log = proc.stdout + proc.stderr
    assert 'ppdet ' in log and 'changed from upstream' in log and 'teacher in eval mode' in log
    for term in terms:
        assert term in log, term
    out = wd / 'output' / os.path.splitext(name)[0]
    assert os.path.isfile(out / 'model_final.pdparams')
    return log


@pytest.mark.integration
def test_upstream_retinanet_cwd_runs_and_leaves_a_plain_student(data):
    # the demo RetinaNet's FPN has 4 levels (upstream's 5): the user's file names 4
    student = os.path.join(TINY, 'retinanet_student.yml')
    distill_run(data, 'retinanet_resnet101_coco_distill_cwd.yml', student,
                os.path.join(TINY, 'retinanet_teacher.yml'), [f'distill_cwd_fpn_l{i}' for i in range(4)], levels=4)
    weights = data / 'output' / 'retinanet_resnet101_coco_distill_cwd' / 'model_final'
    proc = run(['eval.py', '-c', student, '-o', f'weights={weights}'], data)
    assert 'Average Precision' in proc.stdout + proc.stderr


@pytest.mark.integration
def test_upstream_yolov3_runs(data):
    distill_run(data, 'yolov3_mobilenet_v1_coco_distill.yml', os.path.join(TINY, 'yolov3_student.yml'),
                os.path.join(TINY, 'yolov3_teacher.yml'), [f'distill_yolov3kd_l{i}' for i in range(3)])


@pytest.mark.integration
def test_upstream_gfl_cwd_runs_on_class_maps_and_neck(data):
    distill_run(data, 'gfl_r101vd_fpn_coco_distill_cwd.yml', GFL_TINY, GFL_TINY,
                [f'distill_cwd_{r}_l{i}' for r in ('cls_logits', 'fpn') for i in range(5)])


@pytest.mark.integration
def test_upstream_ppyoloe_plus_runs_through_both_assigners(data):
    # static_assigner_epoch 1: epoch 0 assigns with ATSS, epoch 1 with the task-aligned assigner
    distill_run(data, 'ppyoloe_plus_distill_l_distill_m.yml', PPYOLOE_STUDENT, fixture('ppyoloe_tiny.yml'),
                [f'distill_{t}_l{i}' for t in ('kd_cls', 'kd_iou', 'kd_dfl', 'feat_fgd') for i in range(3)]
                + ['Epoch: [1]'], epochs=2)


@pytest.mark.integration
def test_upstream_gfl_ld_runs(data):
    distill_run(data, 'gfl_ld_distill.yml', GFL_STUDENT, GFL_TINY,
                [f'distill_ld_l{i}_{t}' for i in range(5) for t in ('ld', 'vlr', 'kd')])

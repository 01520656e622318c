"""Integration: SSD and YOLOv3 output distillation through the tools, on the tiny SSD/YOLOv3 pairs.

The shipped distill configs (configs/slim/distill/kd_ssd_..., yolov3kd_yolov3_...) run with their teacher
pointed at the tiny teacher config and checkpoint; everything else is theirs.
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os

import paddle
import pytest
import yaml

from ppdet.core.workspace import load_config
from ppdistill.config_scope import config_scope, create_fresh
from conftest import ROOT, TINY, run  # the `work` fixture (tiny dataset + teachers) is in conftest.py

pytestmark = pytest.mark.integration

DISTILL = os.path.join(ROOT, 'configs', 'slim', 'distill')
PAIRS = {'ssd': 'kd_ssd_teacher_to_student', 'yolov3': 'yolov3kd_yolov3_teacher_to_student'}


@pytest.fixture(scope='module')
def output_work(work):
    """``work`` plus tiny SSD and YOLOv3 teachers trained with plain tools/train.py."""
    for arch in PAIRS:
        run(['train.py', '-c', os.path.join(TINY, f'{arch}_teacher.yml'), '--seed', '0'], work)
        assert os.path.isfile(work / 'output' / f'{arch}_teacher' / 'model_final.pdparams')
    return work


def shipped_config(arch, path, **changes):
    """The shipped distill config of ``arch`` with the tiny teacher, plus ``changes`` to its loss args."""
    with open(os.path.join(DISTILL, PAIRS[arch] + '.yml')) as f:
        cfg = yaml.safe_load(f)
    cfg['teacher_config'] = os.path.join(TINY, f'{arch}_teacher.yml')
    cfg['teacher_weights'] = str(path.parent / 'output' / f'{arch}_teacher' / 'model_final')
    cfg['Distiller']['losses'][0]['args'].update(changes)
    return cfg


def student_keys(arch):
    with config_scope():
        cfg = load_config(os.path.join(TINY, f'{arch}_student.yml'))
        model = create_fresh(cfg['architecture'])
    return set(model.state_dict())


@pytest.mark.parametrize('arch, extra', [('ssd', None), ('yolov3', 'neck_mse')])
def test_output_kd_trains_logs_per_level_and_saves_a_plain_student(output_work, arch, extra):
    cfg = shipped_config(arch, output_work / 'x')
    if extra:  # the config's commented neck-feature MSE entry, switched on next to the output loss
        cfg['Distiller']['losses'].append({'type': 'FeatureMSELoss', 'name': extra, 'student': 'fpn'})
    name = f'{arch}_out_tiny'
    (output_work / f'{name}.yml').write_text(yaml.safe_dump(cfg))
    student = os.path.join(TINY, f'{arch}_student.yml')
    proc = run(['train.py', '-c', student, '--slim_config', f'{name}.yml', '--seed', '0'], output_work)
    log = proc.stdout + proc.stderr
    loss_name = cfg['Distiller']['losses'][0]['name']
    for i in range(3):  # three levels (strides 8/16/32) in both demo pairs
        assert f'distill_{loss_name}_l{i}:' in log
        if extra:
            assert f'distill_{extra}_l{i}:' in log
    assert 'distill_loss:' in log
    out = output_work / 'output' / name
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == student_keys(arch)
    run(['eval.py', '-c', student, '-o', f'weights={out}/model_final'], output_work)


@pytest.mark.parametrize('arch, change, want', [
    ('yolov3', {'mode': 'box'}, "unknown mode 'box'"),
    ('ssd', {'temperature': 0}, 'temperature and loc_bound must be > 0'),
])
def test_bad_output_loss_arguments_are_one_line_errors_before_training(output_work, tmp_path, arch, change,
                                                                       want):
    (tmp_path / 'bad.yml').write_text(yaml.safe_dump(shipped_config(arch, output_work / 'x', **change)))
    proc = run(['train.py', '-c', os.path.join(TINY, f'{arch}_student.yml'), '--slim_config',
                str(tmp_path / 'bad.yml')], output_work, ok=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith('ppdistill: error:')]
    assert len(err) == 1 and want in err[0] and 'Traceback' not in proc.stderr
    assert 'Epoch: [0]' not in proc.stdout + proc.stderr

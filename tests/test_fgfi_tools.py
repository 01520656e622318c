"""Integration: the shipped FGFI distill configs through tools/train.py and tools/eval.py on the tiny
RetinaNet (anchor-based) and PicoDet (anchor-free, virtual anchors) pairs."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import json
import os
import re

import paddle
import pytest
import yaml

from ppdet.core.workspace import load_config
from ppdistill.config_scope import config_scope, create_fresh
from conftest import ROOT, TINY, run

pytestmark = pytest.mark.integration

DISTILL = os.path.join(ROOT, 'configs', 'slim', 'distill')


@pytest.mark.parametrize('arch, architecture, strides_key', [
    ('retinanet', 'RetinaNet', ('RetinaHead', 'anchor_generator', 'strides')),
    ('picodet', 'PicoDet', ('PicoHeadV2', 'fpn_stride'))])
def test_fgfi_config_trains_logs_every_level_and_saves_a_plain_student(work, arch, architecture, strides_key):
    name = f'fgfi_{arch}_teacher_to_student'
    student_cfg = os.path.join(TINY, f'{arch}_student.yml')
    # the shipped config as is: its teacher_weights (output/<arch>_teacher) is where `work` trained it
    proc = run(['train.py', '-c', student_cfg, '--slim_config', os.path.join(DISTILL, f'{name}.yml'),
                '--seed', '0', '-o', 'log_iter=1'], work)
    log = proc.stdout + proc.stderr
    with config_scope():
        node = load_config(student_cfg)
        for key in strides_key:
            node = node[key]
        levels = len(node)  # the student's FPN levels, all shared with the teacher
    for i in range(levels):
        values = [float(v) for v in re.findall(rf'distill_fgfi_l{i}: ([0-9.e+-]+)', log)]
        # every GT box marks at least its best anchor's cell on every level, and every batch has digits
        assert values and any(v > 0 for v in values), f'distill_fgfi_l{i}: {values}'
    assert f'distill_fgfi_l{levels}:' not in log and 'distill_loss:' in log

    out = work / 'output' / name
    with config_scope():
        load_config(student_cfg)
        keys = set(create_fresh(architecture).state_dict())
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == keys
    distill = paddle.load(str(out / 'model_final.pddistill'))
    assert {k for k in distill if k.endswith('adaptation.0.weight')} == \
        {f'{i}.adaptation.0.weight' for i in range(levels)}

    metrics = f'fgfi_{arch}_metrics.json'
    run(['eval.py', '-c', student_cfg, '--save_metrics', metrics, '-o', f'weights={out}/model_final'], work)
    bbox = json.loads((work / metrics).read_text())['bbox']
    assert len(bbox) == 12 and all(-1 <= v <= 1 for v in bbox)


def test_anchor_count_mismatch_is_a_one_line_error_before_training(work, tmp_path):
    with open(os.path.join(DISTILL, 'fgfi_retinanet_teacher_to_student.yml')) as f:
        cfg = yaml.safe_load(f)
    cfg['teacher_config'] = os.path.join(ROOT, 'configs', 'demo', 'retinanet_teacher.yml')
    cfg['FGFIDistillModel']['anchors']['strides'] = [8, 16, 32]  # the student has 4 FPN levels
    (tmp_path / 'bad.yml').write_text(yaml.safe_dump(cfg))
    proc = run(['train.py', '-c', os.path.join(TINY, 'retinanet_student.yml'), '--slim_config',
                str(tmp_path / 'bad.yml')], work, ok=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith('ppdistill: error:')]
    assert len(err) == 1 and 'strides has 3 entries but the student has 4 levels' in err[0]
    assert 'Epoch: [0]' not in proc.stdout + proc.stderr

"""Integration: every CWD / PKD / logit-KD / combined distill config in configs/slim/distill/ trains its
tiny student for one epoch (8 images) through tools/train.py; every configured term is logged per level;
``model_final.pdparams`` is a plain student checkpoint (tools/eval.py runs on one per student architecture).

The shipped configs are used as they are, except that the teacher becomes the tiny variant of the same
model config, with the weights trained by the session's ``work`` fixture (tests/conftest.py).
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import json
import math
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
CONFIGS = [
    'cwd_picodet_teacher_to_student', 'cwd_retinanet_teacher_to_student',
    'pkd_picodet_teacher_to_student', 'pkd_retinanet_teacher_to_student',
    'pkd_retinanet_teacher_to_picodet_student',
    'kd_picodet_teacher_to_student', 'kd_retinanet_teacher_to_student',
    'combined_picodet_teacher_to_student',
]

# tools/eval.py (which demands every student tensor by name and shape) once per student architecture;
# the other checkpoints are shown to hold exactly the student's keys, as tools/eval.py needs.
EVALUATED = {'cwd_retinanet_teacher_to_student', 'pkd_retinanet_teacher_to_picodet_student'}


def pair_of(name):
    """(teacher arch, student arch) from ``<method>_<arch>_teacher_to_[<arch>_]student``."""
    m = re.fullmatch(r'[a-z]+_(picodet|retinanet)_teacher_to_(?:(picodet|retinanet)_)?student', name)
    return m.group(1), m.group(2) or m.group(1)


def tiny_student(arch):
    """The tiny student's state-dict keys and neck levels (LCPAN num_features; FPN inputs + extra stages)."""
    with config_scope():  # load_config fills the global config, which the scope restores on exit
        cfg = load_config(os.path.join(TINY, f'{arch}_student.yml'))
        keys = set(create_fresh(cfg['architecture']).state_dict())
        if arch == 'picodet':
            return keys, cfg['LCPAN']['num_features']
        return keys, len(cfg['FPN']['spatial_scales']) + cfg['FPN']['extra_stage']


@pytest.mark.parametrize('name', CONFIGS)
def test_distill_config_trains_the_tiny_student(work, name, tmp_path):
    teacher, student = pair_of(name)
    raw = yaml.safe_load(open(os.path.join(DISTILL, f'{name}.yml')))
    assert os.path.basename(raw['teacher_config']) == f'{teacher}_teacher.yml'
    raw['teacher_config'] = os.path.join(TINY, f'{teacher}_teacher.yml')
    raw['teacher_weights'] = str(work / 'output' / f'{teacher}_teacher' / 'model_final')
    slim = tmp_path / f'{name}.yml'
    slim.write_text(yaml.safe_dump(raw))
    cfg = os.path.join(TINY, f'{student}_student.yml')
    proc = run(['train.py', '-c', cfg, '--slim_config', str(slim), '--seed', '0', '-o', 'log_iter=1'], work)
    log = proc.stdout + proc.stderr
    steps = '\n'.join(line for line in log.splitlines() if 'Epoch: [' in line)  # ppdet's per-step lines
    # every loss entry, every student level (all pair by stride: strides 8.. are shared), finite values
    keys, levels = tiny_student(student)
    for entry in raw['losses']:
        for i in range(levels):
            values = re.findall(rf"distill_{entry['name']}_l{i}: (\S+)", steps)
            assert values and all(math.isfinite(float(v)) for v in values), (entry['name'], i)
        assert f"distill_{entry['name']}_l{levels}:" not in steps
    assert 'distill_loss:' in steps

    out = work / 'output' / name
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == keys
    if name in EVALUATED:
        metrics = tmp_path / 'metrics.json'
        run(['eval.py', '-c', cfg, '--save_metrics', str(metrics), '-o', f'weights={out}/model_final'], work)
        assert len(json.loads(metrics.read_text())['bbox']) == 12


def test_logits_of_different_heads_are_a_one_line_error_before_training(work, tmp_path):
    """RetinaNet's 9 anchors x 10 classes vs PicoDet's 10 classes per position: no align conv for logits."""
    slim = tmp_path / 'kd_bad.yml'
    slim.write_text(yaml.safe_dump({
        'slim': 'Distiller', 'teacher_config': os.path.join(TINY, 'retinanet_teacher.yml'),
        'teacher_weights': str(work / 'output' / 'retinanet_teacher' / 'model_final'),
        'losses': [{'type': 'LogitKDLoss', 'student': 'cls_logits'}]}))
    proc = run(['train.py', '-c', os.path.join(TINY, 'picodet_student.yml'), '--slim_config', str(slim)],
               work, ok=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith('ppdistill: error:')]
    assert len(err) == 1 and 'differ in channels' in err[0]
    assert '(1, 10, 40, 40)' in err[0] and '(1, 90, 40, 40)' in err[0]  # stride 8 at the 320 px probe
    assert 'Epoch: [0]' not in proc.stdout + proc.stderr

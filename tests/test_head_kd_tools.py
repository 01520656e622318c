"""Integration: the head-KD distill configs (BCKD, LD, CrossKD) of the PicoDet, GFL and PP-YOLOE pairs train
their tiny student for one epoch through tools/train.py, log every configured term (and LD's sub-terms) per
level, and leave a plain student checkpoint that tools/eval.py accepts.

The shipped configs are used as they are, except that the teacher becomes the tiny teacher of the pair
(trained by the session's ``work`` fixture, tests/conftest.py, for PicoDet; random for the others).
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import json
import math
import os
import re

import paddle
import pytest

from ppdet.core.workspace import load_config
from ppdistill.config_scope import config_scope, create_fresh
from conftest import TINY, run, train_shipped_config

pytestmark = pytest.mark.integration

# config: {entry name: logged sub-terms}
CONFIGS = {'bckd_picodet_teacher_to_student': {}, 'crosskd_picodet_teacher_to_student': {},
           'ld_picodet_teacher_to_student': {'ld': ['ld', 'vlr']},
           'bckd_gfl_teacher_to_student': {}, 'crosskd_gfl_teacher_to_student': {},
           'ld_gfl_teacher_to_student': {'ld': ['ld', 'vlr']},
           'bckd_ppyoloe_teacher_to_student': {}, 'ld_ppyoloe_teacher_to_student': {'ld': ['ld', 'vlr']}}
# the session's `work` fixture trains the tiny PicoDet teacher; the GFL and PP-YOLOE pairs run against a
# random teacher (what is checked here is the plumbing: terms, logs, checkpoint, eval)
TRAINED_TEACHERS = {'picodet'}


def student_keys(arch):
    """The tiny student's state-dict keys (every head here has three levels, strides 8/16/32)."""
    with config_scope():  # load_config fills the global config, which the scope restores on exit
        cfg = load_config(os.path.join(TINY, f'{arch}_student.yml'))
        return set(create_fresh(cfg['architecture']).state_dict())


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_head_kd_config_trains_the_tiny_student(work, name, tmp_path):
    arch = name.split('_')[1]
    cfg = os.path.join(TINY, f'{arch}_student.yml')
    weights = str(work / 'output' / f'{arch}_teacher' / 'model_final') if arch in TRAINED_TEACHERS else None
    raw, lines, out = train_shipped_config(work, name, os.path.join(TINY, f'{arch}_teacher.yml'), weights, cfg,
                                           tmp_path)
    steps = '\n'.join(lines)
    levels = 3
    for entry in raw['losses']:
        for i in range(levels):
            for sub in [''] + ['_' + s for s in CONFIGS[name].get(entry['name'], [])]:
                values = re.findall(rf"distill_{entry['name']}_l{i}{sub}: (\S+)", steps)
                assert values and all(math.isfinite(float(v)) for v in values), (entry['name'], i, sub)
        assert f"distill_{entry['name']}_l{levels}:" not in steps
    assert 'distill_loss:' in steps

    assert set(paddle.load(str(out / 'model_final.pdparams'))) == student_keys(arch)  # adapters stay outside
    metrics = tmp_path / 'metrics.json'
    run(['eval.py', '-c', cfg, '--save_metrics', str(metrics), '-o', f'weights={out}/model_final'], work)
    assert len(json.loads(metrics.read_text())['bbox']) == 12


def test_the_ppyoloe_feature_config_calibrates_its_weight_and_distills_its_two_levels(work, tmp_path):
    """fgd_ppyoloe (the feature method the PP-YOLOE head methods are compared with) sets its weight with
    weight: auto and distills neck levels 1 and 2 (strides 16 and 8: PP-YOLOE's neck is coarse -> fine)."""
    name = 'fgd_ppyoloe_teacher_to_student'
    cfg = os.path.join(TINY, 'ppyoloe_student.yml')
    raw, lines, out = train_shipped_config(work, name, os.path.join(TINY, 'ppyoloe_teacher.yml'), None, cfg,
                                           tmp_path)
    assert raw['Distiller']['losses'][0]['weight'] == 'auto'
    steps = '\n'.join(lines)
    for level in (1, 2):
        values = re.findall(rf'distill_fgd_l{level}: (\S+)', steps)
        assert values and all(math.isfinite(float(v)) and float(v) > 0 for v in values), level
    assert 'distill_fgd_l0:' not in steps
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == student_keys('ppyoloe')
    state = paddle.load(str(out / 'model_final.pddistill'))
    assert any('auto' in str(k) for k in state), sorted(state)[:10]  # the measured weight is saved

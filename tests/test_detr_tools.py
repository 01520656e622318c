"""Integration: the DINO distill configs (encoder PKD, DETRDistill's Hungarian KD, KD-DETR's shared queries)
train the tiny DINO student for a few steps through tools/train.py against a tiny DINO teacher trained
here; every term is logged; ``model_final.pdparams`` is a plain student checkpoint that tools/eval.py
accepts."""
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
from conftest import ROOT, TINY, needs_ppdet_heads_on_this_paddle, provide_offline_font, run, train_shipped_config

pytestmark = [pytest.mark.integration, needs_ppdet_heads_on_this_paddle]

DISTILL = os.path.join(ROOT, 'configs', 'slim', 'distill')
# config -> the logged terms of one step
CONFIGS = {
    'pkd_dino_teacher_to_student': ['distill_pkd_encoder_l0', 'distill_pkd_encoder_l1', 'distill_pkd_encoder_l2'],
    'detrdistill_dino_teacher_to_student': [f'distill_detrdistill_l0{k}' for k in ('', '_class', '_bbox', '_giou')],
    'kddetr_dino_teacher_to_student': [f'distill_kddetr_l0{k}' for k in ('', '_class', '_bbox', '_giou')],
}
STEPS = 4  # one epoch: batch 2 of the 8 tiny images


@pytest.fixture(scope='module')
def dino_work(tmp_path_factory):
    """The tiny dataset and a tiny DINO teacher trained for one epoch (4 steps)."""
    wd = tmp_path_factory.mktemp('dino')
    provide_offline_font(wd)
    run(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '8', '--num_val', '4'], wd)
    run(['train.py', '-c', os.path.join(TINY, 'dino_teacher.yml'), '--seed', '0'], wd)
    assert os.path.isfile(wd / 'output' / 'dino_teacher' / 'model_final.pdparams')
    return wd


def student_keys():
    with config_scope():
        cfg = load_config(os.path.join(TINY, 'dino_student.yml'))
        return set(create_fresh(cfg['architecture']).state_dict())


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_dino_distill_config_trains_the_tiny_student_and_evaluates(dino_work, name, tmp_path):
    assert os.path.basename(yaml.safe_load(open(os.path.join(DISTILL, f'{name}.yml')))['teacher_config']) == \
        'dino_teacher.yml'
    cfg = os.path.join(TINY, 'dino_student.yml')
    _, steps, out = train_shipped_config(dino_work, name, os.path.join(TINY, 'dino_teacher.yml'),
                                         str(dino_work / 'output' / 'dino_teacher' / 'model_final'), cfg, tmp_path)
    assert len(steps) == STEPS, steps
    for key in CONFIGS[name]:
        for line in steps:
            value = re.search(rf'{key}: (\S+)', line)
            assert value and math.isfinite(float(value.group(1))), (key, line)
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == student_keys()
    metrics = tmp_path / 'metrics.json'
    run(['eval.py', '-c', cfg, '--save_metrics', str(metrics), '-o', f'weights={out}/model_final'], dino_work)
    assert len(json.loads(metrics.read_text())['bbox']) == 12

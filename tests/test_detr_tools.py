"""Integration: the DETR distill configs (encoder PKD, DETRDistill's Hungarian KD, KD-DETR's shared queries) of the
DINO and RT-DETR pairs train the tiny student for a few steps through tools/train.py against a tiny teacher of
its pair trained here; every term is logged; ``model_final.pdparams`` is a plain student checkpoint that
tools/eval.py accepts. RT-DETR needs PaddleDetection develop (skipped on the 2.6.0 wheel)."""
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
from conftest import (ROOT, TINY, needs_ppdet_heads_on_this_paddle, needs_rtdetr, provide_offline_font, run,
                      train_shipped_config)

pytestmark = pytest.mark.integration

DISTILL = os.path.join(ROOT, 'configs', 'slim', 'distill')
DECODER_TERMS = ('', '_class', '_bbox', '_giou')
# config -> the logged terms of one step
CONFIGS = {
    'pkd_dino_teacher_to_student': ['distill_pkd_encoder_l0', 'distill_pkd_encoder_l1', 'distill_pkd_encoder_l2'],
    'detrdistill_dino_teacher_to_student': [f'distill_detrdistill_l0{k}' for k in DECODER_TERMS],
    'kddetr_dino_teacher_to_student': [f'distill_kddetr_l0{k}' for k in DECODER_TERMS],
    'pkd_rtdetr_teacher_to_student': ['distill_pkd_neck_l0', 'distill_pkd_neck_l1', 'distill_pkd_neck_l2'],
    'detrdistill_rtdetr_teacher_to_student': [f'distill_detrdistill_l0{k}' for k in DECODER_TERMS],
    'kddetr_rtdetr_teacher_to_student': [f'distill_kddetr_l0{k}' for k in DECODER_TERMS],
}
NEEDS = {'dino': needs_ppdet_heads_on_this_paddle, 'rtdetr': needs_rtdetr}
STEPS = 4  # one epoch: batch 2 of the 8 tiny images


def arch_of(name: str) -> str:
    return name.split('_')[1]


@pytest.fixture(scope='module')
def detr_work(tmp_path_factory):
    """``work(arch)``: a directory with the tiny dataset and the tiny ``<arch>_teacher`` trained for one epoch
    (4 steps), made once per architecture."""
    made = {}

    def work(arch):
        if arch not in made:
            wd = tmp_path_factory.mktemp(arch)
            provide_offline_font(wd)
            run(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '8', '--num_val', '4'], wd)
            run(['train.py', '-c', os.path.join(TINY, f'{arch}_teacher.yml'), '--seed', '0'], wd)
            assert os.path.isfile(wd / 'output' / f'{arch}_teacher' / 'model_final.pdparams')
            made[arch] = wd
        return made[arch]
    return work


def student_keys(arch):
    with config_scope():
        cfg = load_config(os.path.join(TINY, f'{arch}_student.yml'))
        return set(create_fresh(cfg['architecture']).state_dict())


@pytest.mark.parametrize('name', [pytest.param(n, marks=NEEDS[arch_of(n)]) for n in sorted(CONFIGS)])
def test_detr_distill_config_trains_the_tiny_student_and_evaluates(detr_work, name, tmp_path):
    arch = arch_of(name)
    assert os.path.basename(yaml.safe_load(open(os.path.join(DISTILL, f'{name}.yml')))['teacher_config']) == \
        f'{arch}_teacher.yml'
    wd = detr_work(arch)
    cfg = os.path.join(TINY, f'{arch}_student.yml')
    _, steps, out = train_shipped_config(wd, name, os.path.join(TINY, f'{arch}_teacher.yml'),
                                         str(wd / 'output' / f'{arch}_teacher' / 'model_final'), cfg, tmp_path)
    assert len(steps) == STEPS, steps
    for key in CONFIGS[name]:
        for line in steps:
            value = re.search(rf'{key}: (\S+)', line)
            assert value and math.isfinite(float(value.group(1))), (key, line)
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == student_keys(arch)
    metrics = tmp_path / 'metrics.json'
    run(['eval.py', '-c', cfg, '--save_metrics', str(metrics), '-o', f'weights={out}/model_final'], wd)
    assert len(json.loads(metrics.read_text())['bbox']) == 12

"""Integration: the head-KD distill configs (BCKD, LD, CrossKD) train the tiny PicoDet student for one
epoch through tools/train.py, log every configured term (and LD's sub-terms) per level, and leave a plain
student checkpoint that tools/eval.py accepts.

The shipped configs are used as they are, except that the teacher becomes the tiny teacher trained by the
session's ``work`` fixture (tests/conftest.py).
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import json
import math
import os
import re

import paddle
import pytest

from conftest import TINY, run, train_shipped_config
from test_methods_tools import tiny_student

pytestmark = pytest.mark.integration

CONFIGS = {'bckd_picodet_teacher_to_student': {}, 'crosskd_picodet_teacher_to_student': {},
           'ld_picodet_teacher_to_student': {'ld': ['ld', 'vlr']}}  # config: {entry name: logged sub-terms}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_head_kd_config_trains_the_tiny_student(work, name, tmp_path):
    cfg = os.path.join(TINY, 'picodet_student.yml')
    raw, lines, out = train_shipped_config(work, name, os.path.join(TINY, 'picodet_teacher.yml'),
                                           str(work / 'output' / 'picodet_teacher' / 'model_final'), cfg, tmp_path)
    steps = '\n'.join(lines)
    keys, levels = tiny_student('picodet')
    for entry in raw['losses']:
        for i in range(levels):
            for sub in [''] + ['_' + s for s in CONFIGS[name].get(entry['name'], [])]:
                values = re.findall(rf"distill_{entry['name']}_l{i}{sub}: (\S+)", steps)
                assert values and all(math.isfinite(float(v)) for v in values), (entry['name'], i, sub)
        assert f"distill_{entry['name']}_l{levels}:" not in steps
    assert 'distill_loss:' in steps

    assert set(paddle.load(str(out / 'model_final.pdparams'))) == keys  # adapters and losses stay outside
    metrics = tmp_path / 'metrics.json'
    run(['eval.py', '-c', cfg, '--save_metrics', str(metrics), '-o', f'weights={out}/model_final'], work)
    assert len(json.loads(metrics.read_text())['bbox']) == 12

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
import yaml

from conftest import ROOT, TINY, run
from test_methods_tools import tiny_student

pytestmark = pytest.mark.integration

DISTILL = os.path.join(ROOT, 'configs', 'slim', 'distill')
CONFIGS = {'bckd_picodet_teacher_to_student': {}, 'crosskd_picodet_teacher_to_student': {},
           'ld_picodet_teacher_to_student': {'ld': ['ld', 'vlr']}}  # config: {entry name: logged sub-terms}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_head_kd_config_trains_the_tiny_student(work, name, tmp_path):
    raw = yaml.safe_load(open(os.path.join(DISTILL, f'{name}.yml')))
    raw['teacher_config'] = os.path.join(TINY, 'picodet_teacher.yml')
    raw['teacher_weights'] = str(work / 'output' / 'picodet_teacher' / 'model_final')
    slim = tmp_path / f'{name}.yml'
    slim.write_text(yaml.safe_dump(raw))
    cfg = os.path.join(TINY, 'picodet_student.yml')
    proc = run(['train.py', '-c', cfg, '--slim_config', str(slim), '--seed', '0', '-o', 'log_iter=1'], work)
    steps = '\n'.join(line for line in (proc.stdout + proc.stderr).splitlines() if 'Epoch: [' in line)
    keys, levels = tiny_student('picodet')
    for entry in raw['losses']:
        for i in range(levels):
            for sub in [''] + ['_' + s for s in CONFIGS[name].get(entry['name'], [])]:
                values = re.findall(rf"distill_{entry['name']}_l{i}{sub}: (\S+)", steps)
                assert values and all(math.isfinite(float(v)) for v in values), (entry['name'], i, sub)
        assert f"distill_{entry['name']}_l{levels}:" not in steps
    assert 'distill_loss:' in steps

    out = work / 'output' / name
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == keys  # adapters and losses stay outside
    metrics = tmp_path / 'metrics.json'
    run(['eval.py', '-c', cfg, '--save_metrics', str(metrics), '-o', f'weights={out}/model_final'], work)
    assert len(json.loads(metrics.read_text())['bbox']) == 12

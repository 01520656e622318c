"""Integration: the ppdet-style tools on tiny PicoDet/RetinaNet pairs and a tiny demo dataset.

Every tool runs as a subprocess in a temporary working directory (datasets and outputs are relative to
the CWD, as in ppdet), exactly as a user would type it.
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import glob
import json
import os
import re

import numpy as np
import paddle
import pytest
import yaml

from ppdet.core.workspace import load_config
from ppdistill.config_scope import config_scope, create_fresh
from conftest import ROOT, TINY, run  # the `work` fixture is in conftest.py too

pytestmark = pytest.mark.integration

def write_distill(path, slim, teacher, weights, section=None):
    cfg = {'slim': slim, 'teacher_config': os.path.join(TINY, f'{teacher}.yml'),
           'teacher_weights': str(weights)}
    if section:
        cfg[slim] = section
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def student_keys(arch):
    with config_scope():
        load_config(os.path.join(TINY, f'{arch}_student.yml'))
        model = create_fresh('PicoDet' if arch == 'picodet' else 'RetinaNet')
    return set(model.state_dict())


def test_mgd_picodet_train_eval_infer_export(work):
    slim = write_distill(work / 'mgd_tiny.yml', 'MGDDistillModel', 'picodet_teacher',
                         work / 'output/picodet_teacher/model_final')
    proc = run(['train.py', '-c', os.path.join(TINY, 'picodet_student.yml'), '--slim_config', slim,
                '--eval', '--seed', '0', '--use_vdl', '--vdl_log_dir', 'vdl', '-o', 'log_iter=1'], work)
    log = proc.stdout + proc.stderr
    out = work / 'output' / 'mgd_tiny'
    # one logged loss per paired level, plus the total
    with config_scope():
        levels = load_config(os.path.join(TINY, 'picodet_student.yml'))['LCPAN']['num_features']
    for i in range(levels):
        assert f'distill_mgd_l{i}:' in log
    assert 'distill_loss:' in log
    from visualdl import LogReader
    tags = LogReader(file_path=glob.glob(str(work / 'vdl' / '*'))[0]).get_tags()['scalar']
    assert {f'distill_mgd_l{i}' for i in range(levels)} | {'distill_loss', 'loss'} <= set(tags)
    # model_final / best_model are plain student checkpoints; distill state beside them
    keys = student_keys('picodet')
    for name in ('model_final', 'best_model'):
        assert set(paddle.load(str(out / f'{name}.pdparams'))) == keys
    distill = paddle.load(str(out / 'model_final.pddistill'))
    assert {k.split('.')[0] for k in distill} == {str(i) for i in range(levels)}
    assert not glob.glob(str(out / '*.tmp*'))

    weights = ['-o', f'weights={out}/model_final']
    cfg = os.path.join(TINY, 'picodet_student.yml')
    run(['eval.py', '-c', cfg, '--save_metrics', 'metrics.json'] + weights, work)
    metrics = json.loads((work / 'metrics.json').read_text())
    assert len(metrics['bbox']) == 12 and all(-1 <= v <= 1 for v in metrics['bbox'])
    image = sorted(glob.glob(str(work / 'dataset/digits_tiny/val/*')))[0]
    run(['infer.py', '-c', cfg, '--infer_img', image, '--output_dir', 'infer_out', '--draw_threshold', '0.0']
        + weights, work)
    assert os.path.isfile(work / 'infer_out' / os.path.basename(image))
    run(['export_model.py', '-c', cfg, '--output_dir', 'exported'] + weights, work)
    exported = os.listdir(work / 'exported' / 'picodet_student')
    program = 'model.json' if paddle.__version__.startswith('3') else 'model.pdmodel'  # paddle 3 saves PIR
    assert program in exported and 'model.pdiparams' in exported and 'infer_cfg.yml' in exported


def test_fgd_retinanet_and_resume_continues_with_distill_state(work):
    slim = write_distill(work / 'fgd_tiny.yml', 'FocalGlobalDistillModel', 'retinanet_teacher',
                         work / 'output/retinanet_teacher/model_final')
    cfg = os.path.join(TINY, 'retinanet_student.yml')
    two_epochs = ['-o', 'epoch=2', 'snapshot_epoch=1', 'log_iter=1']
    run(['train.py', '-c', cfg, '--slim_config', slim, '--seed', '0'] + two_epochs, work)
    out = work / 'output' / 'fgd_tiny'
    assert set(paddle.load(str(out / 'model_final.pdparams'))) == student_keys('retinanet')
    first = paddle.load(str(out / '0.pddistill'))
    final = paddle.load(str(out / 'model_final.pddistill'))
    assert any(not np.array_equal(first[k].numpy(), final[k].numpy()) for k in first)

    proc = run(['train.py', '-c', cfg, '--slim_config', slim, '-r', str(out / '0'), '--seed', '0']
               + two_epochs, work)
    log = proc.stdout + proc.stderr
    assert 'Resumed distill modules' in log and 'epoch 1' in log
    assert 'Epoch: [1]' in log and 'Epoch: [0]' not in log
    assert 'distill_fgd_l0:' in log


@pytest.mark.parametrize('case', ['missing', 'mismatched', 'unset', 'bad_key'])
def test_bad_teacher_setup_is_a_one_line_error_before_training(work, case, tmp_path):
    weights = {'missing': tmp_path / 'nope/model_final',
               'mismatched': work / 'output/retinanet_teacher/model_final',
               'unset': '', 'bad_key': work / 'output/picodet_teacher/model_final'}[case]
    section = {'alpha_mgdd': 1.0} if case == 'bad_key' else None
    slim = write_distill(tmp_path / 'bad.yml', 'MGDDistillModel', 'picodet_teacher', weights, section)
    proc = run(['train.py', '-c', os.path.join(TINY, 'picodet_student.yml'), '--slim_config', slim], work,
               ok=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith('ppdistill: error:')]
    assert len(err) == 1 and 'Traceback' not in proc.stderr
    want = {'missing': 'weights file not found', 'mismatched': 'match only',
            'unset': 'teacher_weights is missing', 'bad_key': "unknown option(s) ['alpha_mgdd']"}[case]
    assert want in err[0]
    if case in ('missing', 'mismatched'):
        assert str(weights) in err[0]
    assert 'Epoch: [0]' not in proc.stdout + proc.stderr


def test_two_process_launch_keeps_ranks_identical(work, tmp_path):
    # weight: auto: each rank measures its own batch and the all-reduce makes the weight their mean (the log
    # line counts 2 batches); the weights are equal on both ranks (DataParallel's wrap broadcasts buffers too)
    slim = write_distill(tmp_path / 'mgd_dist.yml', 'MGDDistillModel', 'picodet_teacher',
                         work / 'output/picodet_teacher/model_final',
                         {'weight': 'auto', 'auto_weight': {'batches': 1}})
    dump = tmp_path / 'params'
    cmd = ['paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir', str(tmp_path / 'log'),
           os.path.join(ROOT, 'tools', 'train.py'), '-c', os.path.join(TINY, 'picodet_student.yml'),
           '--slim_config', slim, '--seed', '0', '-o', 'log_iter=1']
    proc = run(cmd, work, env={'PPDISTILL_DUMP_PARAMS': str(dump)}, ok=False, module=True)
    logs = {p: open(p).read() for p in sorted(glob.glob(str(tmp_path / 'log' / 'workerlog.*')))}
    if proc.returncode != 0:
        pytest.fail('launch failed:\n' + '\n'.join(f'== {p}\n{t[-3000:]}' for p, t in logs.items()))
    assert len(logs) == 2
    ranks = [dict(np.load(dump / f'rank{r}.npz')) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) and any(k.startswith('distill_losses.') for k in ranks[0])
    assert 'auto_weights.factors' in ranks[0]
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    rank0 = logs[str(tmp_path / 'log' / 'workerlog.0')]  # ppdet logs INFO on rank 0 only
    assert 'Cross-rank check: ' in rank0 and 'identical on 2 ranks' in rank0
    assert 'distill_mgd_l0:' in rank0
    assert re.search(r"weight: auto: loss 'mgd' .* \(mean over 2 batches\) -> weight", rank0)  # 1 per rank

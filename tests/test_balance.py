"""Loss-balance report and the structured training log: the warning rules on synthetic series, the
windowed ratios read back from step records, ``train_log.jsonl`` written by the trainer's callback (the
detection loss taken from the student itself), and the distiller's sub-term logging (FGD fg/bg/mask/rela)."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import io
import logging
import types

import numpy as np
import paddle
import pytest
from ppdet.core.workspace import AttrDict  # what ppdet gives a callback as trainer.cfg
from ppdet.utils.stats import TrainingStats

from ppdistill import Distiller
from ppdistill.balance import LossBalance, balance_summary, balance_warnings
from ppdistill.trainer import TRAIN_LOG, TrainLog, read_train_log
from toy_models import ToyDet, toy_inputs


def logged(run):
    """What ``run()`` logs through ppdistill.trainer's logger (ppdet's handlers bypass pytest capture)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger('ppdistill.trainer')
    logger.addHandler(handler)
    try:
        run()
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def kinds(found):
    return sorted((name, kind) for name, kind, _ in found)


def test_low_and_high_ratios_are_flagged_on_the_latest_point():
    det = [2.0, 2.0]
    terms = {'a': [0.5, 0.019], 'b': [0.5, 0.021], 'c': [1.0, 2.1], 'd': [1.0, 1.9]}
    # a: 0.0095 < 1%; b: 1.05% ok; c: 1.05x > 1x; d: 0.95x ok
    assert kinds(balance_warnings(det, terms)) == [('a', 'low'), ('c', 'high')]


def test_growing_needs_term_up_and_detection_down_by_more_than_ten_percent():
    det = [4.0, 3.8, 3.6, 3.4, 3.0, 2.8]       # first third mean 3.9, last third 2.9: falls 26%
    terms = {
        'up': [0.4, 0.4, 0.5, 0.6, 0.5, 0.5],      # 0.4 -> 0.5: +25%
        'flat': [0.4, 0.4, 0.5, 0.6, 0.43, 0.43],  # 0.4 -> 0.43: +7.5%
        'down': [0.4, 0.4, 0.3, 0.2, 0.2, 0.2],
    }
    assert kinds(balance_warnings(det, terms)) == [('up', 'growing')]
    # the same growth while the detection loss stays level is not flagged
    assert kinds(balance_warnings([3.0] * 6, terms)) == []
    # fewer than three points: no trend judgement
    assert kinds(balance_warnings([4.0, 2.0], {'up': [0.1, 0.5]})) == []


def test_issue_example_fgd_rising_above_detection_loss_is_flagged_high_and_growing():
    # distill ~0.8x -> ~1.7x the detection loss in the first epoch (issue 5)
    det = np.linspace(2.0, 1.2, 10)
    distill = det * np.linspace(0.8, 1.7, 10)
    found = kinds(balance_warnings(list(det), {'distill_loss': list(distill)}))
    assert found == [('distill_loss', 'growing'), ('distill_loss', 'high')]


def test_balance_points_are_window_means_and_warn_once():
    balance = LossBalance(every=2)
    det = [3.0, 3.0, 2.5, 2.5, 2.0, 2.0, 1.5, 1.5]
    small = [0.001] * 8                              # 0.03% .. 0.07% of det: low
    big = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]   # grows while det falls, ends > det
    records = []
    for step in range(8):
        record = {'step': step, 'det_loss': det[step], 'distill_loss': small[step] + big[step],
                  'distill_x_l0': small[step], 'distill_y_l0': big[step]}
        point = balance.update(record)
        assert (point is None) == (step % 2 == 1)
        records.append(dict(record, balance=point) if point else record)
    points = [r['balance'] for r in records if 'balance' in r]
    # window means over every=2 steps: step 0 sees one value, step 2 sees steps 1..2
    want_det = [3.0, (3.0 + 2.5) / 2, (2.5 + 2.0) / 2, (2.0 + 1.5) / 2]
    np.testing.assert_allclose([p['det_loss'] for p in points], want_det)
    want_big = [1.0, 1.5, 2.5, 3.5]
    np.testing.assert_allclose([p['ratios']['distill_y_l0'] for p in points], np.divide(want_big, want_det))
    warned = [(w['term'], w['kind']) for p in points for w in p['warnings']]
    assert sorted(warned) == [('distill_loss', 'growing'), ('distill_loss', 'high'), ('distill_x_l0', 'low'),
                              ('distill_y_l0', 'growing'), ('distill_y_l0', 'high')]  # once each
    summary = balance_summary(records)
    assert summary['terms']['distill_y_l0'] == {'start': pytest.approx(1.0 / 3.0), 'end': pytest.approx(3.5 / 1.75)}
    assert summary['det_loss'] == {'start': 3.0, 'end': 1.75} and len(summary['warnings']) == 5
    assert balance_summary([{'step': 0, 'det_loss': 1.0}]) == {'terms': {}, 'warnings': []}


def _trainer(tmp_path, model, log_iter=1, start_epoch=0):
    cfg = AttrDict(save_dir=str(tmp_path), filename='run', log_iter=log_iter)
    return types.SimpleNamespace(cfg=cfg, model=model, start_epoch=start_epoch)


def _train_steps(callback, model, inputs, steps, epoch=0, steps_per_epoch=10, window=1):
    """What ppdet's training loop does around the callback: forward, statistics update, on_step_end."""
    stats = TrainingStats(window_size=window)
    callback.on_train_begin({})
    outputs = []
    for step in range(steps):
        out = model(inputs)
        stats.update(out)
        callback.on_step_end({'mode': 'train', 'epoch_id': epoch, 'step_id': step, 'steps_per_epoch': steps_per_epoch,
                              'learning_rate': 0.1, 'training_staus': stats})
        outputs.append({k: float(v) for k, v in out.items()})
    return outputs


def _distiller(weight):
    paddle.seed(3)
    losses = [{'type': 'MGDLoss', 'student': 'neck', 'teacher': 'neck', 'weight': weight,
               'args': {'lambda_mgd': 0.0, 'alpha_mgd': 1.0}}]
    return Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                     teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0), losses=losses, probe_size=32)


def test_train_log_writes_one_line_per_step_with_the_students_own_loss(tmp_path):
    d = _distiller(1.0)
    d.train()
    inputs = toy_inputs()
    callback = TrainLog(_trainer(tmp_path, d, log_iter=2))
    text = logged(lambda: _train_steps(callback, d, inputs, steps=3, epoch=1))
    lines = read_train_log(str(tmp_path / 'run' / TRAIN_LOG))
    assert [(r['epoch'], r['step'], r['iter']) for r in lines] == [(1, 0, 10), (1, 1, 11), (1, 2, 12)]
    # independently: the student alone on the same batch (no dropout: deterministic)
    own = float(d.student_model(inputs)['loss'])
    for r in lines:
        assert r['det_loss'] == pytest.approx(own, rel=1e-6) and r['lr'] == 0.1
        assert r['loss'] == pytest.approx(r['det_loss'] + r['distill_loss'], rel=1e-5)
        assert {'loss_cls', 'distill_mgd_l0', 'distill_mgd_l1'} <= set(r)
    assert [('balance' in r) for r in lines] == [True, False, True]      # log_iter=2: steps 0 and 2
    assert lines[0]['balance']['ratios']['distill_mgd_l0'] == pytest.approx(lines[0]['distill_mgd_l0'] / own, rel=1e-5)
    assert 'ppdistill balance: epoch 1 step 2' in text
    # resuming at epoch 2 keeps the lines of the epochs before it (not a line a kill cut short); a fresh
    # run starts the file anew
    with open(tmp_path / 'run' / TRAIN_LOG, 'a') as f:
        f.write('{"epoch": 1, "step": 3, "lo')
    TrainLog(_trainer(tmp_path, d, start_epoch=2)).on_train_begin({})
    assert len(read_train_log(str(tmp_path / 'run' / TRAIN_LOG))) == 3
    TrainLog(_trainer(tmp_path, d, start_epoch=1)).on_train_begin({})
    assert read_train_log(str(tmp_path / 'run' / TRAIN_LOG)) == []


def test_balance_ratios_when_distill_dwarfs_the_detection_loss(tmp_path):
    """With distill ~10^9 times the detection loss, ``loss - distill_loss`` in float32 is 0: the monitor
    then printed det_loss 0 and every ratio nan. The ratios now come from the student's own loss."""
    d = _distiller(1e9)
    d.train()
    inputs = toy_inputs()
    out = d(inputs)
    assert float(out['loss'] - out['distill_loss']) == 0.0   # the case meant: the difference is lost
    own = float(d.student_model(inputs)['loss'])
    callback = TrainLog(_trainer(tmp_path, d))
    text = logged(lambda: _train_steps(callback, d, inputs, steps=1))
    point = read_train_log(str(tmp_path / 'run' / TRAIN_LOG))[0]['balance']
    assert point['det_loss'] == pytest.approx(own, rel=1e-6) and own > 0
    for term in ('distill_mgd_l0', 'distill_loss'):
        assert np.isfinite(point['ratios'][term]) and point['ratios'][term] > 1e6
    ratio = float(out['distill_mgd_l0']) / own
    assert point['ratios']['distill_mgd_l0'] == pytest.approx(ratio, rel=1e-5)
    assert 'nan' not in text and 'det_loss 0 ' not in text


def test_train_log_of_a_plain_model_has_no_balance(tmp_path):
    model = ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0)
    model.train()
    callback = TrainLog(_trainer(tmp_path, model))
    assert logged(lambda: _train_steps(callback, model, toy_inputs(), steps=2)) == ''
    lines = read_train_log(str(tmp_path / 'run' / TRAIN_LOG))
    assert len(lines) == 2 and all(r['det_loss'] == r['loss'] and 'balance' not in r for r in lines)


def test_distiller_logs_fgd_sub_terms_and_sums_them_once():
    paddle.seed(1)
    losses = [{'type': 'FGDLoss', 'student': 'neck', 'teacher': 'neck', 'weight': 2.0,
               'args': {'alpha_fgd': 1.0, 'beta_fgd': 1.0, 'gamma_fgd': 1.0, 'lambda_fgd': 1.0}}]
    d = Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                  teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0), losses=losses,
                  probe_size=32)
    d.train()
    out = d(toy_inputs())
    subs = ('fg', 'bg', 'mask', 'rela')
    for level in (0, 1):
        key = f'distill_fgd_l{level}'
        parts = [float(out[f'{key}_{s}']) for s in subs]
        assert parts[0] > 0 and parts[2] > 0 and parts[3] > 0  # bg is 0 where the box covers the map
        np.testing.assert_allclose(float(out[key]), sum(parts), rtol=1e-5)
    # the total counts each level once (sub-terms are only logged), and enters the training loss
    total = float(out['distill_fgd_l0']) + float(out['distill_fgd_l1'])
    np.testing.assert_allclose(float(out['distill_loss']), total, rtol=1e-5)
    np.testing.assert_allclose(float(out['loss']), float(out['loss_cls']) + total, rtol=1e-5)

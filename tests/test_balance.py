"""Loss-balance report: the warning rules on synthetic series, the callback's log lines read back, and the
distiller's sub-term logging (FGD fg/bg/mask/rela)."""
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
from ppdistill.balance import LossBalanceMonitor, balance_summary, balance_warnings, parse_balance_log
from toy_models import ToyDet, toy_inputs


def logged(run):
    """What ``run()`` logs through ppdistill.balance's logger (ppdet's handlers bypass pytest capture)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger('ppdistill.balance')
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


def _status(stats, step):
    return {'mode': 'train', 'epoch_id': 0, 'step_id': step, 'training_staus': stats}


def test_monitor_logs_ratios_and_warns_once_and_the_log_parses_back():
    trainer = types.SimpleNamespace(cfg=AttrDict(log_iter=2))
    monitor = LossBalanceMonitor(trainer)
    stats = TrainingStats(window_size=2)
    det = [3.0, 3.0, 2.5, 2.5, 2.0, 2.0, 1.5, 1.5]
    small = [0.001] * 8                              # 0.03% .. 0.07% of det: low
    big = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]   # grows while det falls, ends > det

    def train():
        for step in range(8):
            out = {'loss': det[step] + small[step] + big[step], 'distill_loss': small[step] + big[step],
                   'distill_x_l0': small[step], 'distill_y_l0': big[step]}
            stats.update({k: paddle.to_tensor(v, dtype='float64') for k, v in out.items()})
            monitor.on_step_end(_status(stats, step))
    text = logged(train)
    points, warnings = parse_balance_log(text)
    assert [p['step'] for p in points] == [0, 2, 4, 6]
    # window means over log_iter=2 steps: step 0 sees one value, step 2 sees steps 1..2
    want_det = [3.0, (3.0 + 2.5) / 2, (2.5 + 2.0) / 2, (2.0 + 1.5) / 2]
    np.testing.assert_allclose([p['det_loss'] for p in points], want_det, rtol=1e-3)
    want_big = [1.0, 1.5, 2.5, 3.5]
    np.testing.assert_allclose([p['ratios']['distill_y_l0'] for p in points],
                               np.array(want_big) / np.array(want_det), rtol=1e-3)
    assert sorted((w['term'], w['kind']) for w in warnings) == [
        ('distill_loss', 'growing'), ('distill_loss', 'high'), ('distill_x_l0', 'low'),
        ('distill_y_l0', 'growing'), ('distill_y_l0', 'high')]  # once each, though true at many points
    summary = balance_summary(text)
    assert summary['terms']['distill_y_l0']['start'] == pytest.approx(1.0 / 3.0, rel=1e-3)
    assert summary['terms']['distill_y_l0']['end'] == pytest.approx(3.5 / 1.75, rel=1e-3)


def test_monitor_ignores_runs_without_distillation():
    trainer = types.SimpleNamespace(cfg=AttrDict(log_iter=1))
    monitor = LossBalanceMonitor(trainer)
    stats = TrainingStats(window_size=1)
    stats.update({'loss': paddle.to_tensor(1.0)})
    assert logged(lambda: monitor.on_step_end(_status(stats, 0))) == ''


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

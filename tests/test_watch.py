"""The runtime watch: a distill term that is zero, negative or negligible over the first training steps
warns once, loudly, after them; no host synchronisation before that."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import logging

import paddle
import pytest

from ppdistill import Distiller
from ppdistill.watch import TermWatch
from toy_models import ToyDet, toy_inputs


@pytest.fixture
def warnings(caplog):
    logger = logging.getLogger('ppdistill.watch')
    logger.addHandler(caplog.handler)
    yield lambda: [r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING and r.name == 'ppdistill.watch']
    logger.removeHandler(caplog.handler)


def forbid_host_reads(m):
    """Any read of a tensor's value on the host fails (within the monkeypatch context ``m``)."""
    def forbid(*_, **__):
        raise AssertionError('host read')
    for name in ('numpy', 'item', '__float__', '__bool__', 'tolist'):
        m.setattr(paddle.Tensor, name, forbid)


def test_each_finding_warns_once_after_the_watched_steps(warnings, monkeypatch):
    watch = TermWatch(['zero', 'neg', 'low', 'fine', 'spiky'], hints={'zero': 'Check the mask.'}, steps=5)
    det = [2.0, 1.5, 1.0, 0.8, 0.5]
    rows = [[0.0, 0.3, 0.004 * d, 0.5, 0.0] for d in det]
    rows[2][1] = -0.2  # negative once
    rows[3][4] = 0.2   # below 1% except on one step: not flagged
    with monkeypatch.context() as m:  # steps before the last: accumulated on the device only
        forbid_host_reads(m)
        for d, row in zip(det[:-1], rows[:-1]):
            watch.update(paddle.to_tensor(d), [paddle.to_tensor(v) for v in row])
    assert warnings() == [] and not watch.done
    watch.update(paddle.to_tensor(det[-1]), [paddle.to_tensor(v) for v in rows[-1]])
    assert watch.findings == {'zero': 'zero', 'neg': 'negative', 'low': 'low'}
    found = warnings()
    assert len(found) == 3
    assert 'zero was exactly 0 in each of the first 5 training steps' in found[0] and 'Check the mask.' in found[0]
    assert 'neg was negative (-0.2)' in found[1]
    assert 'low stayed below 1% of the detection loss in value (at most 0.40%)' in found[2]
    assert 'tools/benchmark.py gradients' in found[2] and 'weight: auto' in found[2]
    for _ in range(10):  # once only
        watch.update(paddle.to_tensor(1.0), [paddle.to_tensor(0.0)] * 5)
    assert len(warnings()) == 3


def test_a_nonfinite_step_is_not_a_finding(warnings):
    watch = TermWatch(['t'], steps=2)
    watch.update(paddle.to_tensor(1.0), [paddle.to_tensor(float('nan'))])
    watch.update(paddle.to_tensor(1.0), [paddle.to_tensor(0.0)])
    assert watch.done and watch.findings == {} and warnings() == []


def distiller(losses):
    paddle.seed(3)
    return Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2),
                     teacher_model=ToyDet(width=16, neck_ch=8, levels=2), probe_size=32, losses=losses)


def test_distiller_warns_about_an_fgfi_mask_empty_on_every_image(warnings):
    """Half-pixel anchors at the cell corners of strides 4 and 8 never touch a 2-pixel box between them:
    FGFI's mask is empty on every image and the term is exactly 0."""
    tiny = {'wh': [[[0.5, 0.5]], [[0.5, 0.5]]]}
    d = distiller([{'type': 'FGFILoss', 'student': 'neck', 'args': {'anchors': tiny}},
                   {'type': 'MGDLoss', 'student': 'neck', 'weight': 1e-9, 'args': {'lambda_mgd': 0.0}},
                   {'type': 'MGDLoss', 'name': 'mgd_ok', 'student': 'neck', 'levels': [0], 'weight': 100.0,
                    'args': {'lambda_mgd': 0.0}}])
    d.train()
    for step in range(20):
        inputs = toy_inputs(seed=step)
        inputs['gt_bbox'] = paddle.to_tensor([[[9., 9., 11., 11.]]] * 2)
        out = d(inputs)
        assert float(out['distill_fgfi_l0']) == 0 and float(out['distill_fgfi_l1']) == 0
        if step < 19:
            assert warnings() == []
    assert d.watch.findings == {'distill_fgfi_l0': 'zero', 'distill_fgfi_l1': 'zero',
                                'distill_mgd_l0': 'low', 'distill_mgd_l1': 'low'}
    found = warnings()
    assert len(found) == 4 and 'check FGFI anchors' in found[0]
    d(toy_inputs(seed=99))
    assert len(warnings()) == 4


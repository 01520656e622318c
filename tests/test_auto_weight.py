"""``weight: auto``: a loss entry's weight measured from its gradient on the student before training.

A toy loss whose gradient on the student is exactly ``c`` times the toy detector's detection loss's (and
whose value is not: a teacher-only part adds value without gradient) gives the expected weight
``target / c`` analytically; the measured weights survive save/resume without measuring again, two ranks
(a fake all-reduce) set the same weights as one process on all their batches, and each impossible case is
a one-line error. The loss-balance warnings leave an auto entry's value ratio alone.
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import glob
import math
import os
import re
import types

import numpy as np
import paddle
import paddle.distributed as dist
import pytest
import yaml
from ppdet.core.workspace import register

from ppdistill import Distiller, PPDistillError
from ppdistill.auto_weight import AutoWeightError, weights_from_ratios
from ppdistill.balance import balance_warnings
from ppdistill.checkpoint import resume_checkpoint, save_checkpoint
from ppdistill.gradients import student_parameters
from ppdistill.losses import DistillLoss
from ppdistill.trainer import DistillTrainer, calibrated_keys
from ppdistill.watch import TermWatch
from toy_models import ToyDet, toy_inputs


@register
class AutoToyLoss(DistillLoss):
    """``c * mean(S^2) + mean(T^2)`` on ToyDet's class outputs: summed over the levels, its gradient on the
    student is ``c`` times ToyDet's detection loss's (``sum_l mean(o_l^2)``); the teacher part adds value
    but no gradient. ``split``: the same as two sub-terms, ``a`` holding 2/3 of the student part and the
    teacher part, ``b`` the other 1/3."""
    equal_channels = True

    def __init__(self, student_channels, teacher_channels, c: float = 1.0, split: bool = False):
        super().__init__()
        self.c, self.split = c, split

    def forward(self, student, teacher, inputs=None):
        pull, const = self.c * paddle.mean(student ** 2), paddle.mean(teacher ** 2)
        return {'a': pull * 2 / 3 + const, 'b': pull / 3} if self.split else pull + const


class NoLossDet(ToyDet):
    """A student whose train-mode outputs carry no ``loss``."""

    def forward(self, inputs):
        out = super().forward(inputs)
        return {'loss_cls': out['loss_cls']} if self.training else out


class FlatDet(ToyDet):
    """A student whose detection loss has no gradient."""

    def forward(self, inputs):
        out = super().forward(inputs)
        return {'loss': out['loss'] * 0.0} if self.training else out


def toy(name, c, weight='auto', **args):
    return {'type': 'AutoToyLoss', 'name': name, 'student': 'head.cls', 'weight': weight, 'args': dict(c=c, **args)}


def make(losses, auto_weight=None, student=ToyDet):
    paddle.seed(1)
    return Distiller(student_model=student(width=8, neck_ch=4, levels=2, dropout=0.0),
                     teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0), losses=losses,
                     probe_size=32, auto_weight=auto_weight)


def batches(n, first=0):
    return [toy_inputs(seed=s) for s in range(first, first + n)]


def backward_norm(loss, model):
    """``||d loss / d student params||`` from a plain backward pass (independent of ppdistill.gradients)."""
    model.clear_gradients()
    loss.backward(retain_graph=True)
    total = sum(float(np.square(p.grad.numpy().astype('float64')).sum()) for p in model.parameters()
                if p.grad is not None)
    model.clear_gradients()
    return math.sqrt(total)


def teacher_part(d, inputs):
    """``sum_l mean(T_l^2)`` of the teacher's class outputs, computed from its layers directly."""
    t = d.teacher_model
    t.eval()
    with paddle.no_grad():
        outs = t.head(t.neck(t.backbone(inputs['image'])))
    return sum(float(paddle.mean(o ** 2)) for o in outs)


def test_each_auto_entry_gets_target_over_its_gradient_ratio_and_keeps_its_own_proportions():
    d = make([toy('three', 3.0), toy('half', 0.5, split=True), toy('fixed', 1.0, weight=2.0)],
             {'target': 0.15, 'batches': 3})
    got = d.calibrate(batches(3))
    assert list(got) == ['three', 'half']  # the fixed entry is not measured
    np.testing.assert_allclose([got['three'], got['half']], [0.15 / 3.0, 0.15 / 0.5], rtol=1e-5)

    d.train()
    inputs = toy_inputs(seed=11)
    out = d(inputs)
    entry = {n: paddle.add_n([out[f'distill_{n}_l{i}'] for i in range(2)]) for n in ('three', 'half', 'fixed')}
    # the student's pull of each auto entry is now 0.15x the detection loss's, in gradient
    student_det = d.student_model(inputs)['loss']
    det, teacher = float(student_det), teacher_part(d, inputs)
    det_norm = backward_norm(student_det, d.student_model)
    for name in ('three', 'half'):
        np.testing.assert_allclose(backward_norm(entry[name], d.student_model) / det_norm, 0.15, rtol=1e-4)
    np.testing.assert_allclose(backward_norm(entry['fixed'], d.student_model) / det_norm, 2.0, rtol=1e-4)
    # values: the weight scales the whole entry (the teacher part too), sub-terms keep their 2:1 pull
    np.testing.assert_allclose(float(entry['three']), 0.05 * (3 * det + teacher), rtol=1e-5)
    np.testing.assert_allclose(float(entry['fixed']), 2.0 * (det + teacher), rtol=1e-5)
    b = sum(float(out[f'distill_half_l{i}_b']) for i in range(2))
    a = sum(float(out[f'distill_half_l{i}_a']) for i in range(2))
    np.testing.assert_allclose([a, b], [0.3 * (det / 3 + teacher), 0.3 * det / 6], rtol=1e-5)


def test_measuring_changes_no_parameter_buffer_or_gradient():
    d = make([toy('three', 3.0)])
    before = {k: v.numpy().copy() for k, v in d.state_dict().items() if not k.startswith('auto_weights.')}
    d.eval()
    d.calibrate(batches(2))
    assert not d.training  # the mode it had
    for k, v in d.state_dict().items():
        if k in before:  # the student's BatchNorm statistics included
            np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)
    assert all(p.grad is None for p in d.parameters())


def test_training_before_measuring_is_an_error_and_inspect_shows_weight_one():
    d = make([toy('three', 3.0)])
    d.train()
    with pytest.raises(PPDistillError, match=r"weight: auto entries \['three'\] are not measured yet"):
        d(toy_inputs())
    inputs = toy_inputs(seed=4)
    seen = d.inspect(inputs)
    det, teacher = float(seen.det_loss), teacher_part(d, inputs)
    np.testing.assert_allclose(float(seen.distill_loss), 3 * det + teacher, rtol=1e-5)


def test_resumed_distill_state_keeps_the_weights_and_nothing_is_measured_again(tmp_path, monkeypatch):
    losses, settings = [toy('three', 3.0), toy('half', 0.5)], {'batches': 2}
    d1 = make(losses, settings)
    d1.calibrate(batches(2))
    save_checkpoint(d1, paddle.optimizer.SGD(parameters=d1.parameters()), str(tmp_path), 'ckpt', 1)
    assert 'auto_weights.factors' in paddle.load(str(tmp_path / 'ckpt.pddistill'))

    d2 = make(losses, settings)
    resume_checkpoint(d2, paddle.optimizer.SGD(parameters=d2.parameters()), str(tmp_path / 'ckpt'))
    assert d2.auto_weights.values() == d1.auto_weights.values()
    measured, restarted = [], []
    monkeypatch.setattr(d2, 'calibrate', lambda b: measured.append(b))
    trainer = types.SimpleNamespace(model=d2, loader=iter(batches(4)), start_epoch=1,
                                    _restart_epoch=lambda: restarted.append(1))
    DistillTrainer.calibrate_auto_weights(trainer)
    assert measured == [] and restarted == []
    d1.train()
    d2.train()
    inputs = toy_inputs(seed=5)
    np.testing.assert_allclose(float(d2(inputs)['distill_loss']), float(d1(inputs)['distill_loss']), rtol=1e-6)


def test_the_trainer_measures_on_the_first_batches_then_restarts_the_epoch(monkeypatch):
    d = make([toy('three', 3.0)], {'batches': 3})
    given, restarted = [], []
    real = d.calibrate
    monkeypatch.setattr(d, 'calibrate', lambda b: given.append(b) or real(b))
    loader = iter(batches(6))
    trainer = types.SimpleNamespace(model=d, loader=loader, start_epoch=0, _restart_epoch=lambda: restarted.append(1))
    DistillTrainer.calibrate_auto_weights(trainer)
    assert len(given) == 1 and len(given[0]) == 3 and all(b['epoch_id'] == 0 for b in given[0])
    assert restarted == [1] and d.auto_weights.measured()
    assert len(list(loader)) == 3  # it took exactly its batches


def test_resuming_an_auto_config_from_a_run_without_auto_is_a_one_line_error(tmp_path):
    plain = make([toy('three', 3.0, weight=1.0)])
    save_checkpoint(plain, paddle.optimizer.SGD(parameters=plain.parameters()), str(tmp_path), 'ckpt', 1)
    d = make([toy('three', 3.0)])
    with pytest.raises(PPDistillError) as err:
        resume_checkpoint(d, paddle.optimizer.SGD(parameters=d.parameters()), str(tmp_path / 'ckpt'))
    assert 'holds no measured weights' in str(err.value) and '\n' not in str(err.value)


def test_two_ranks_set_the_same_weights_as_one_process_on_all_their_batches(monkeypatch):
    """Each rank measures its own batches; the sums are all-reduced (a fake collective here: paddle's
    all-reduce needs several processes). Rank 0 has 2 batches and rank 1 one: the weight is the mean over
    the 3 batches, not the mean of the two ranks' means."""
    losses = [{'type': 'MGDLoss', 'name': 'mgd', 'student': 'neck', 'weight': 'auto', 'args': {'lambda_mgd': 0.0}}]
    data = batches(3)
    data[2]['image'] = data[2]['image'] * 8.0  # batches whose ratios differ
    single = make(losses).calibrate(data)['mgd']
    means = [make(losses).calibrate(part)['mgd'] for part in (data[:2], data[2:])]
    # ratios r = target / weight: the mean of the rank means is another number
    assert abs(0.15 / (0.15 / means[0] / 2 + 0.15 / means[1] / 2) - single) > 1e-3 * single

    from ppdistill import auto_weight
    shards = {0: data[:2], 1: data[2:]}
    local = {}
    for r, part in shards.items():  # each rank's own sums, as calibrate computes them
        d = make(losses)
        local[r] = auto_weight.measure_ratios(d.inspect, [d.auto_weighted_terms()], part,
                                              student_parameters(d))
    got = {}
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    for r in (0, 1):
        def all_reduce(tensor, other=local[1 - r]):  # SUM: this rank's tensor plus the other rank's
            tensor.set_value(tensor + paddle.to_tensor(other))
        monkeypatch.setattr(dist, 'all_reduce', all_reduce)
        got[r] = make(losses).calibrate(shards[r])['mgd']
    assert got[0] == got[1]
    np.testing.assert_allclose(got[0], single, rtol=1e-6)


def test_one_process_uses_no_collective(monkeypatch):
    def fail(*_):
        raise AssertionError('collective on one process')
    monkeypatch.setattr(dist, 'all_reduce', fail)
    assert make([toy('three', 3.0)]).calibrate(batches(1))


FGFI_EMPTY = {'type': 'FGFILoss', 'student': 'neck', 'weight': 'auto', 'args': {'anchors': {'wh': [[[0.5, 0.5]], [[0.5, 0.5]]]}}}


def no_box_batches():
    """Half-pixel anchors at the cell corners never touch a 2-pixel box between them: FGFI's mask is empty
    on every image and the term is exactly 0 (as in tests/test_watch.py)."""
    out = batches(2)
    for b in out:
        b['gt_bbox'] = paddle.to_tensor([[[9., 9., 11., 11.]]] * 2)
    return out


@pytest.mark.parametrize('case, message', [
    ('no loss', "the student returned no 'loss' in train mode"),
    ('no det gradient', 'the detection loss has no gradient on the student (zero or not finite on 2 of 2'),
    ('no term gradient', "loss 'fgfi' has no gradient on the student in any of the 2 measured batches, and auto "
                         'cannot scale a term with no gradient'),
])
def test_what_cannot_be_measured_is_a_one_line_error(case, message):
    if case == 'no term gradient':
        d, data = make([FGFI_EMPTY]), no_box_batches()
    else:
        d, data = make([toy('three', 3.0)], student=NoLossDet if case == 'no loss' else FlatDet), batches(2)
    with pytest.raises(AutoWeightError) as err:
        d.calibrate(data)
    assert message in str(err.value) and '\n' not in str(err.value)
    assert not d.auto_weights.measured()


def test_a_term_zero_on_some_batches_counts_as_zero_pull_in_the_mean():
    totals = np.array([0.0 + 0.2 + 0.0 + 0.2, 4, 0])  # ratios 0, 0.2, 0, 0.2 on four batches
    weights, ratios = weights_from_ratios(totals, ['t'], 0.15)
    np.testing.assert_allclose([weights[0], ratios[0]], [1.5, 0.1])
    with pytest.raises(AutoWeightError, match="gradient of loss 't' on the student is not finite"):
        weights_from_ratios(np.array([np.nan, 4, 0]), ['t'], 0.15)


@pytest.mark.parametrize('losses, auto_weight, message', [
    ([toy('t', 1.0)], {'target': 0}, 'auto_weight: target must be a number > 0'),
    ([toy('t', 1.0)], {'target': -0.1}, 'auto_weight: target must be a number > 0'),
    ([toy('t', 1.0)], {'target': 'high'}, 'auto_weight: target must be a number > 0'),
    ([toy('t', 1.0)], {'batches': 0}, 'auto_weight: batches must be an integer >= 1'),
    ([toy('t', 1.0)], {'targets': 0.1}, 'auto_weight must be {target: '),
    ([toy('t', 1.0, weight=1.0)], {'target': 0.1}, 'auto_weight is set but no loss entry has weight: auto'),
    ([toy('t', 1.0, weight='automatic')], None, "weight must be a number or auto (measured from the gradients "
                                                "before training), got 'automatic'"),
    # a negative weight pushes the student away from the teacher: it was caught only by the step-20 watch
    ([toy('t', 1.0, weight=-0.5)], None, 'weight must be a finite number >= 0 (or auto), got -0.5'),
    ([toy('t', 1.0, weight='nan')], None, "weight must be a finite number >= 0 (or auto), got 'nan'"),
])
def test_bad_settings_are_one_line_build_errors(losses, auto_weight, message):
    with pytest.raises(PPDistillError) as err:
        make(losses, auto_weight)
    assert message in str(err.value) and '\n' not in str(err.value)


def test_a_numeric_string_weight_still_works():
    d = make([toy('t', 1.0, weight='1e-3')])
    assert d._terms[0].weight == 1e-3 and d.auto_weights is None


def test_named_presets_take_weight_auto():
    from ppdistill import MGDDistillModel
    paddle.seed(1)
    d = MGDDistillModel(student_model=ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                        teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0), feature='neck',
                        probe_size=32, weight='auto', auto_weight={'target': 0.1, 'batches': 1})
    assert d.auto_weights.entries == ['mgd'] and d.auto_weights.target == 0.1 and d.auto_weights.batches == 1


# -- the warnings speak of the gradient share ---------------------------------------------------------

def test_the_watch_does_not_call_a_measured_term_low():
    watch = TermWatch(['auto_t', 'fixed_t'], steps=2, calibrated=['auto_t'])
    for _ in range(2):
        watch.update(paddle.to_tensor(10.0), [paddle.to_tensor(0.001), paddle.to_tensor(0.001)])
    assert watch.findings == {'fixed_t': 'low'}


def test_balance_leaves_low_and_high_to_the_gradient_share_of_measured_terms():
    det = [2.0, 2.0]
    terms = {'distill_a_l0': [0.01, 0.01], 'distill_a_l0_fg': [5.0, 5.0], 'distill_b_l0': [0.01, 0.01],
             'distill_b_l0_fg': [5.0, 5.0]}
    found = balance_warnings(det, terms, calibrated=['distill_a_l0'])
    assert sorted((n, k) for n, k, _ in found) == [('distill_b_l0', 'low'), ('distill_b_l0_fg', 'high')]
    for _, _, message in found:
        assert 'in value' in message and 'tools/benchmark.py gradients' in message and 'weight: auto' in message


def test_distill_loss_counts_as_measured_only_when_every_term_is():
    both = make([toy('x', 1.0), toy('y', 2.0)])
    mixed = make([toy('x', 1.0), toy('y', 2.0, weight=1.0)])
    assert calibrated_keys(both) == ['distill_x_l0', 'distill_x_l1', 'distill_y_l0', 'distill_y_l1', 'distill_loss']
    assert calibrated_keys(mixed) == ['distill_x_l0', 'distill_x_l1']


# -- integration ------------------------------------------------------------------------------------

@pytest.mark.integration
def test_train_measures_logs_saves_and_resumes_the_weight(work, tmp_path):
    from conftest import TINY, run
    slim = tmp_path / 'mgd_auto.yml'
    slim.write_text(yaml.safe_dump({
        'slim': 'MGDDistillModel', 'teacher_config': os.path.join(TINY, 'picodet_teacher.yml'),
        'teacher_weights': str(work / 'output' / 'picodet_teacher' / 'model_final'),
        'MGDDistillModel': {'alpha_mgd': 2.0e-5, 'weight': 'auto', 'auto_weight': {'batches': 2}}}))
    args = ['train.py', '-c', os.path.join(TINY, 'picodet_student.yml'), '--slim_config', str(slim), '--seed', '0',
            '-o', 'log_iter=1', 'epoch=2', 'snapshot_epoch=1']
    first = run(list(args), work)  # run() takes the tool name off its list
    log = first.stdout + first.stderr
    lines = re.findall(r"weight: auto: loss 'mgd' .*-> weight (\S+) for 0.15x", log)
    assert len(lines) == 1 and float(lines[0]) > 0
    steps = re.findall(r'distill_mgd_l0: (\S+)', '\n'.join(line for line in log.splitlines() if 'Epoch: [' in line))
    assert len(steps) == 8 and all(math.isfinite(float(v)) for v in steps)  # 2 epochs of 4 steps
    out = work / 'output' / 'mgd_auto'
    saved = float(paddle.load(str(out / '0.pddistill'))['auto_weights.factors'].numpy()[0])
    np.testing.assert_allclose(saved, float(lines[0]), rtol=1e-5)
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / 'model_final.*'))) == [
        'model_final.pddistill', 'model_final.pdopt', 'model_final.pdparams']

    resumed = run(list(args) + ['-r', str(out / '0')], work)
    log = resumed.stdout + resumed.stderr
    assert 'its gradient on the student is' not in log
    assert re.search(r"weight: auto: loss 'mgd' weight (\S+) \(from the resumed distill state", log).group(1) == \
        f'{saved:.6g}'
    assert 'Epoch: [1]' in log and 'Epoch: [0]' not in log

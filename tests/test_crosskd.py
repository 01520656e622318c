"""CrossKD (a loss entry's ``cross``): the student's head features after the cut run through the frozen
teacher's remaining head. On the demo PicoDet pair (shipped teacher weights, tiny configs): with a student
that is a copy of the teacher the crossed outputs are the teacher's own; no gradient reaches the teacher;
the student's layers before the cut get the KD gradient and its own predictors none; the adapters train
and live in the distill state only; ``align_scale`` against a NumPy reference."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest

from ppdistill import Distiller, DistillConfigError
from ppdistill.build import build_teacher
from ppdistill.crossing import align_scale
from test_head_presets import picodet_batch
from conftest import needs_ppdet_heads_on_this_paddle

TEACHER = ('configs/demo/tiny/picodet_teacher.yml', 'configs/demo/weights/picodet_teacher')
HEAD = {'cls': 'cls_logits', 'reg': 'dfl_logits'}


def cross_losses(normalize='sum'):
    return [{'type': 'BinaryKDLoss', 'name': 'xcls', 'student': 'cls_logits', 'cross': {'student': 'cross_cut'},
             'args': {'normalize': normalize}},
            {'type': 'BoxKDLoss', 'name': 'xbox', 'student': HEAD, 'cross': {'student': 'cross_cut'},
             'args': {'normalize': normalize}}]


def distiller(student_cfg, losses, student_weights=None):
    teacher, _ = build_teacher(*TEACHER)
    student, _ = build_teacher(student_cfg, student_weights, allow_random=student_weights is None)
    return Distiller(student_model=student, teacher_model=teacher, student_arch='PicoDet', teacher_arch='PicoDet',
                     losses=losses, probe_size=96)


def test_align_scale_matches_numpy_reference():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 4, 5)) * 3 + 1
    t = rng.standard_normal((2, 3, 6, 6)) * 0.5 - 2
    got = align_scale(paddle.to_tensor(s, 'float32'), paddle.to_tensor(t, 'float32')).numpy()
    s_mean, s_std = s.mean(axis=(0, 2, 3), keepdims=True), s.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    t_mean, t_std = t.mean(axis=(0, 2, 3), keepdims=True), t.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    np.testing.assert_allclose(got, (s - s_mean) / (s_std + 1e-6) * t_std + t_mean, rtol=1e-4, atol=1e-5)


def test_crossed_outputs_equal_the_teachers_when_the_student_is_a_copy():
    """Equal widths (no adapter conv) and the same weights: the student's cut features are the teacher's, so
    the teacher's tail reproduces its own class and DFL logits (eval mode: the same BN statistics)."""
    d = distiller(TEACHER[0], cross_losses(), student_weights=TEACHER[1])
    # the class and box entries share one crossing: its adapters live in the first entry's loss modules
    assert [hasattr(m, 'cross_adapters') for m in d.distill_losses] == [True] * 3 + [False] * 3
    assert all(m.cross_adapters[0].conv is None for m in list(d.distill_losses)[:3])
    d.eval()
    with paddle.no_grad():
        seen = d.inspect(picodet_batch())
    assert set(seen.crossed) == {'xcls'}
    for key, (crossed, own) in seen.term_inputs.items():
        for name in own:
            np.testing.assert_allclose(crossed[name].numpy(), own[name].numpy(), rtol=1e-4, atol=1e-4)
        assert float(seen.terms[key]) < 1e-4, key  # summed over every location and class


@needs_ppdet_heads_on_this_paddle
def test_cross_terms_train_the_student_before_the_cut_only_and_never_the_teacher():
    d = distiller('configs/demo/tiny/picodet_student.yml', cross_losses())
    d.train()
    runs = []
    hook = d.teacher_model.backbone.register_forward_pre_hook(lambda layer, x: runs.append(1))
    out = d(picodet_batch())
    hook.remove()
    assert len(runs) == 2  # the teacher's own pass and one crossed pass shared by both entries
    assert all(float(out[f'distill_{n}_l{i}']) > 0 for n in ('xcls', 'xbox') for i in (0, 1))
    out['distill_loss'].backward()
    assert all(p.grad is None for p in d.teacher_model.parameters())
    grads = {n: p.grad for n, p in d.student_model.named_parameters()}

    def total(prefix):
        found = [g for n, g in grads.items() if n.startswith(prefix)]
        assert found, prefix
        return sum(0.0 if g is None else float(g.abs().sum()) for g in found)
    for i in range(3):  # the student's own predictors: no KD gradient
        assert total(f'head.head_cls_list.{i}.') == 0 and total(f'head.head_reg_list.{i}.') == 0
    assert total('head.conv_feat.se.0.') > 0 and total('neck.') > 0 and total('backbone.') > 0
    adapters = [p for n, p in d.distill_losses.named_parameters() if 'cross_adapter' in n]
    assert adapters and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in adapters)
    # the shared adapters learn from the box term too
    d.clear_gradients()
    out = d(picodet_batch())
    out['distill_xbox_l0'].backward()
    assert float(d.distill_losses[0].cross_adapters[0].conv.weight.grad.abs().sum()) > 0
    # adapters are distill state, saved beside the student, never in it
    assert any('cross_adapter' in k for k in d.distill_state_dict())
    assert not any('cross_adapter' in k for k in d.student_model.state_dict())


@needs_ppdet_heads_on_this_paddle
def test_cross_terms_get_the_students_assignment():
    d = distiller('configs/demo/tiny/picodet_student.yml', cross_losses('positives'))
    d.train()
    seen = d.inspect(picodet_batch())
    num_pos = [float(seen.term_inputs[f'distill_xcls_l{i}'][0]['num_pos']) for i in range(3)]
    assert num_pos[0] == num_pos[1] == num_pos[2] >= 1


@pytest.mark.parametrize('cross, match', [
    ({'student': 'cross_cut', 'teacher': 'x'}, r'cross must be \{student: <student cut tap>'),
    # PicoFeat returns (cls_feat, se_feat) per level: 6 tensors for 3 head levels
    ({'student': 'head.conv_feat.se.*', 'at': 'head.conv_feat'},
     r"the teacher's cut head.conv_feat has 6 levels but its outputs head.head_cls_list.\* 3: cut at a sublayer"),
])
def test_bad_cross_is_a_one_line_build_error(cross, match):
    with pytest.raises(DistillConfigError, match=match) as err:
        distiller('configs/demo/tiny/picodet_student.yml',
                  [{'type': 'BinaryKDLoss', 'student': 'cls_logits', 'cross': cross, 'args': {'normalize': 'sum'}}])
    assert '\n' not in str(err.value)


# GFL (tiny model section of the upstream config): separate class and box towers shared by every level, so
# two cuts (one per branch) are crossed together; the teacher tail is relu -> gfl_head_cls / gfl_head_reg ->
# the level's ScaleReg (p<i>_feat).
GFL_CUTS = [{'student': 'head.conv_feat.fcos_head_cls_tower_conv_1'},
            {'student': 'head.conv_feat.fcos_head_reg_tower_conv_1'}]


def gfl_pair(tmp_path, student_width):
    from test_head_presets import GFL_MODEL, build
    teacher, arch = build(tmp_path, 'gfl_teacher', GFL_MODEL)
    narrow = GFL_MODEL.replace('out_channel: 16', f'out_channel: {student_width}').replace(
        'feat_in: 16, feat_out: 16', f'feat_in: {student_width}, feat_out: {student_width}').replace(
        'feat_in_chan: 16', f'feat_in_chan: {student_width}')
    student, _ = build(tmp_path, 'gfl_student', narrow)
    if student_width == 16:
        student.set_state_dict(teacher.state_dict())
    losses = [{'type': 'BinaryKDLoss', 'name': 'xcls', 'student': 'cls_logits', 'cross': GFL_CUTS,
               'args': {'normalize': 'sum'}},
              {'type': 'BoxKDLoss', 'name': 'xbox', 'student': HEAD, 'cross': GFL_CUTS, 'args': {'normalize': 'sum'}}]
    d = Distiller(student_model=student, teacher_model=teacher, student_arch=arch, teacher_arch=arch,
                  losses=losses, probe_size=128)
    d.eval()
    return d


def test_gfl_two_branch_cut_copy_gives_the_teachers_outputs(tmp_path):
    d = gfl_pair(tmp_path, 16)
    with paddle.no_grad():
        seen = d.inspect(picodet_batch(128))
    assert len(seen.term_inputs) == 10  # 2 entries x 5 levels
    for key, (crossed, own) in seen.term_inputs.items():
        for name in own:
            np.testing.assert_allclose(crossed[name].numpy(), own[name].numpy(), rtol=1e-4, atol=1e-4)


def test_gfl_cross_gradient_reaches_both_towers_before_the_cut_not_the_predictors(tmp_path):
    d = gfl_pair(tmp_path, 8)
    seen = d.inspect(picodet_batch(128))
    seen.distill_loss.backward()
    assert all(p.grad is None for p in d.teacher_model.parameters())
    grads = {n: p.grad for n, p in d.student_model.named_parameters()}
    got = lambda prefix: sum(0.0 if g is None else float(g.abs().sum())  # noqa: E731
                             for n, g in grads.items() if n.startswith(prefix))
    assert got('head.gfl_head_cls.') == 0 and got('head.gfl_head_reg.') == 0 and got('head.p3_feat.') == 0
    for branch in ('cls', 'reg'):  # every cut crossed: both towers' convs before it learn from the KD
        assert got(f'head.conv_feat.fcos_head_{branch}_tower_conv_0.') > 0


def test_the_fast_teacher_path_falls_back_for_cross_terms():
    """The crossed pass reruns the eager teacher on student features, so a fast teacher would serve only
    half of the step: ``teacher_mode: fast`` keeps the eager path and says why."""
    from ppdistill.fast_teacher import attach_teacher_path
    d = distiller(TEACHER[0], cross_losses())
    assert d.crossed_terms() == [f'distill_{n}_l{i}' for n in ('xcls', 'xbox') for i in range(3)]
    line = attach_teacher_path(d, 'fast')
    assert line.startswith('teacher path: eager (teacher_mode: fast fell back: ') and 'cross' in line, line
    assert d.fast_teacher is None

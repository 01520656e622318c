"""DETR-family distillation: the DINO preset (encoder memory as per-level maps, decoder outputs by tuple item)
and the RTDETR preset (hybrid-encoder outputs, the same decoder tuple, one decoder layer in eval mode),
Hungarian-matched query KD (DETRDistill) against a brute-force NumPy reference and its invariants, shared-query
decoder KD (KD-DETR adapted) on the tiny DINO and RT-DETR pairs (RT-DETR needs PaddleDetection develop), the
denoising split, layers counted from the last, the teacher's gradients and the one-line build errors."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import itertools

import numpy as np
import paddle
import pytest

from conftest import needs_ppdet_heads_on_this_paddle, needs_rtdetr

from ppdistill import Distiller, DistillConfigError
from ppdistill.build import build_teacher
from ppdistill.losses import HungarianKDLoss, SharedQueryKDLoss
from ppdistill.losses.shared_query_kd import shared_ranking
from ppdistill.taps import TapSet, sequence_maps

TEACHER = 'configs/demo/tiny/dino_teacher.yml'
STUDENT = 'configs/demo/tiny/dino_student.yml'
# the tiny pairs: configs, the transformer's config section, probed decoder layers (teacher, student): RT-DETR
# returns only its eval_idx layer in eval mode
PAIRS = {'dino': {'teacher': TEACHER, 'student': STUDENT, 'transformer': 'DINOTransformer', 'layers': (3, 2)},
         'rtdetr': {'teacher': 'configs/demo/tiny/rtdetr_teacher.yml',
                    'student': 'configs/demo/tiny/rtdetr_student.yml', 'transformer': 'RTDETRTransformer',
                    'layers': (1, 1)}}
ON_PAIRS = pytest.mark.parametrize('pair', [pytest.param('dino', marks=needs_ppdet_heads_on_this_paddle),
                                            pytest.param('rtdetr', marks=needs_rtdetr)])
DECODER = {'boxes': 'decoder_boxes', 'logits': 'decoder_logits'}
SHARED = dict(DECODER, enc_scores='encoder_scores', enc_boxes='encoder_boxes')
SIZE = 128


# -- NumPy references written from the equations (docs/methods.md) --------------------------------------
def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_giou(a, b):
    """GIoU of (cx, cy, w, h) boxes a [..., 4], b [..., 4] (broadcast)."""
    a = np.concatenate([a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2], -1)
    b = np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a) + area(b) - inter
    hull = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
    hull = hull[..., 0] * hull[..., 1]
    return inter / union - (hull - union) / hull


def np_terms(s_logit, s_box, t_logit, t_box, w=(1.0, 5.0, 2.0), relative=False):
    """Per query (aligned, broadcast): weighted class, L1 and GIoU terms."""
    p = np_sigmoid(t_logit)
    cls = np_softplus(s_logit) - s_logit * p
    if relative:
        cls = cls - (np_softplus(t_logit) - t_logit * p)
    return (w[0] * cls.sum(-1), w[1] * np.abs(s_box - t_box).sum(-1), w[2] * (1 - np_giou(s_box, t_box)))


def np_hungarian(student, teacher, layers, num_queries, w=(1.0, 5.0, 2.0)):
    """Brute force: per layer pair and image, the minimum over every one-to-one assignment of the student's
    queries to the teacher's of the summed per-pair cost; per pair divided by the matched count."""
    s_box, s_log = (student[k][:, :, -num_queries:] for k in ('boxes', 'logits'))
    t_box, t_log = teacher['boxes'], teacher['logits']
    total = np.zeros(3)
    for lt, ls in layers:
        found, count = np.zeros(3), 0
        for n in range(s_box.shape[1]):
            qs, qt = s_box.shape[2], t_box.shape[2]
            best = None
            for perm in itertools.permutations(range(qt), qs):
                terms = np.array([np_terms(s_log[ls, n, i], s_box[ls, n, i], t_log[lt, n, j], t_box[lt, n, j], w)
                                  for i, j in enumerate(perm)]).sum(0)
                if best is None or terms.sum() < best.sum():
                    best = terms
            found += best
            count += qs
        total += found / count
    return total


def random_decoder(rng, layers, batch, queries, classes, dn=0):
    centre = rng.uniform(0.2, 0.8, (layers, batch, dn + queries, 2))
    size = rng.uniform(0.05, 0.4, (layers, batch, dn + queries, 2))
    return {'boxes': np.concatenate([centre, size], -1),
            'logits': rng.standard_normal((layers, batch, dn + queries, classes)) * 2}


def as_tensors(d, grad=False):
    out = {k: paddle.to_tensor(v, dtype='float32') for k, v in d.items()}
    for v in out.values():
        v.stop_gradient = not grad
    return out


def shapes_of(d, queries):
    """The probe shapes: batch 1, no denoising queries (eval mode)."""
    return {k: (v.shape[0], 1, queries, v.shape[3]) for k, v in d.items()}


# -- Hungarian KD -------------------------------------------------------------------------------------------
def test_hungarian_kd_equals_a_brute_force_numpy_reference():
    rng = np.random.default_rng(0)
    student = random_decoder(rng, layers=2, batch=2, queries=4, classes=3, dn=3)
    teacher = random_decoder(rng, layers=3, batch=2, queries=5, classes=3)
    for w, layers in (((1.0, 5.0, 2.0), None), ((0.5, 2.0, 3.0), [[0, 1], [2, 0]])):
        loss = HungarianKDLoss(shapes_of(student, 4), shapes_of(teacher, 5), layers=layers,
                               class_weight=w[0], bbox_weight=w[1], giou_weight=w[2])
        got = loss(as_tensors(student), as_tensors(teacher))
        want = np_hungarian(student, teacher, [(1, 0), (2, 1)] if layers is None else layers, 4, w)
        np.testing.assert_allclose([float(got[k]) for k in ('class', 'bbox', 'giou')], want, rtol=1e-5)


def test_hungarian_kd_is_invariant_to_permuting_the_teachers_queries():
    rng = np.random.default_rng(1)
    student = random_decoder(rng, layers=2, batch=2, queries=6, classes=4, dn=2)
    teacher = random_decoder(rng, layers=2, batch=2, queries=6, classes=4)
    loss = HungarianKDLoss(shapes_of(student, 6), shapes_of(teacher, 6))
    base = loss(as_tensors(student), as_tensors(teacher))
    perm = rng.permutation(6)
    shuffled = {k: v[:, :, perm] for k, v in teacher.items()}
    other = loss(as_tensors(student), as_tensors(shuffled))
    for k in base:
        np.testing.assert_allclose(float(other[k]), float(base[k]), rtol=1e-6)
    # and the teacher order does matter to a query-aligned loss: the permutation is not a no-op here
    assert not np.allclose(shuffled['boxes'], teacher['boxes'])


@pytest.mark.parametrize('cls', ['hungarian', 'shared'])
def test_denoising_queries_never_enter_a_loss(cls):
    """The first Ndn student queries (denoising groups in training) change nothing and get no gradient."""
    rng = np.random.default_rng(2)
    student = random_decoder(rng, layers=2, batch=2, queries=5, classes=3, dn=4)
    teacher = random_decoder(rng, layers=2, batch=2, queries=5, classes=3)
    if cls == 'hungarian':
        loss = HungarianKDLoss(shapes_of(student, 5), shapes_of(teacher, 5))
    else:
        grid = {'enc_scores': (1, 20, 3), 'enc_boxes': (1, 20, 4)}
        loss = SharedQueryKDLoss(dict(shapes_of(student, 5), **grid), dict(shapes_of(teacher, 5), **grid))
    s = as_tensors(student, grad=True)
    base = loss(s, as_tensors(teacher))
    sum(base.values()).backward()
    for k in ('boxes', 'logits'):
        grad = s[k].grad.numpy()
        assert np.all(grad[:, :, :4] == 0) and np.abs(grad[:, :, 4:]).sum() > 0, k
    changed = {k: v.copy() for k, v in student.items()}
    changed['boxes'][:, :, :4] = rng.uniform(0.3, 0.6, changed['boxes'][:, :, :4].shape)
    changed['logits'][:, :, :4] = 50.0
    other = loss(as_tensors(changed), as_tensors(teacher))
    for k in base:
        assert float(other[k]) == float(base[k]), k


@pytest.mark.parametrize('cls', ['hungarian', 'shared'])
def test_layers_count_from_the_last_when_training_returns_more_than_the_probe(cls):
    """RT-DETR's decoder returns only its eval layer in eval mode (the probe, the teacher) and every layer in
    training: probed layer 0 of one is the last layer of the student's training outputs."""
    rng = np.random.default_rng(6)
    student = random_decoder(rng, layers=3, batch=2, queries=4, classes=3, dn=2)
    teacher = random_decoder(rng, layers=1, batch=2, queries=4, classes=3)
    probed = shapes_of({k: v[-1:] for k, v in student.items()}, 4)
    if cls == 'hungarian':
        loss = HungarianKDLoss(probed, shapes_of(teacher, 4))
        want = np_hungarian({k: v[-1:] for k, v in student.items()}, teacher, [(0, 0)], 4)
    else:
        grid = {'enc_scores': (1, 20, 3), 'enc_boxes': (1, 20, 4)}
        loss = SharedQueryKDLoss(dict(probed, **grid), dict(shapes_of(teacher, 4), **grid))
        w = np_sigmoid(teacher['logits'][0]).max(-1)
        terms = np_terms(student['logits'][2, :, 2:], student['boxes'][2, :, 2:], teacher['logits'][0],
                         teacher['boxes'][0], relative=True)
        want = [(w * t).sum() / w.sum() for t in terms]
    assert loss.layers == [(0, 0)]
    got = loss(as_tensors(student), as_tensors(teacher))
    np.testing.assert_allclose([float(got[k]) for k in ('class', 'bbox', 'giou')], want, rtol=1e-5)


def test_shared_query_loss_equals_the_numpy_formula():
    rng = np.random.default_rng(3)
    student = random_decoder(rng, layers=2, batch=2, queries=5, classes=3, dn=2)
    teacher = random_decoder(rng, layers=3, batch=2, queries=5, classes=3)
    grid = {'enc_scores': (1, 20, 3), 'enc_boxes': (1, 20, 4)}
    loss = SharedQueryKDLoss(dict(shapes_of(student, 5), **grid), dict(shapes_of(teacher, 5), **grid),
                             bbox_weight=4.0)
    got = loss(as_tensors(student), as_tensors(teacher))
    want = np.zeros(3)
    for lt, ls in [(1, 0), (2, 1)]:
        w = np_sigmoid(teacher['logits'][lt]).max(-1)
        terms = np_terms(student['logits'][ls, :, 2:], student['boxes'][ls, :, 2:], teacher['logits'][lt],
                         teacher['boxes'][lt], (1.0, 4.0, 2.0), relative=True)
        want += [(w * t).sum() / w.sum() for t in terms]
    np.testing.assert_allclose([float(got[k]) for k in ('class', 'bbox', 'giou')], want, rtol=1e-5)
    same = loss(as_tensors({k: np.concatenate([v[1:], v[1:]], 0)[:2] for k, v in teacher.items()}),
                as_tensors(teacher))  # student layers 0, 1 = teacher layers 1, 2
    np.testing.assert_allclose(float(sum(same.values())), 0.0, atol=1e-5)


def test_shared_ranking_puts_the_teachers_top_then_random_positions_first():
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((3, 40, 5))
    paddle.seed(0)
    ranking = shared_ranking(paddle.to_tensor(scores, 'float32'), 8, 3).numpy()
    for n in range(3):
        order = np.argsort(-scores[n].max(-1))
        chosen = np.argsort(-ranking[n])[:8]
        assert list(chosen[:5]) == list(order[:5])  # the teacher's top Q - G in its own order
        assert not set(chosen[5:]) & set(order[:5]) and len(set(chosen)) == 8
        assert sorted(ranking[n][chosen]) == list(range(1, 9)) and np.count_nonzero(ranking[n]) == 8
    seen = {tuple(np.argsort(-shared_ranking(paddle.to_tensor(scores, 'float32'), 8, 3).numpy()[0])[5:8])
            for _ in range(5)}
    assert len(seen) > 1  # the general points are drawn again each step
    only_top = shared_ranking(paddle.to_tensor(scores, 'float32'), 8, 0).numpy()
    all_random = shared_ranking(paddle.to_tensor(scores, 'float32'), 8, 8).numpy()
    for n in range(3):
        assert list(np.argsort(-only_top[n])[:8]) == list(np.argsort(-scores[n].max(-1))[:8])
        assert np.count_nonzero(only_top[n]) == 8 and np.count_nonzero(all_random[n]) == 8


def test_sequence_maps_lays_tokens_out_row_major_level_after_level():
    rng = np.random.default_rng(5)
    sizes = [(4, 6), (2, 3), (1, 2)]
    seq = rng.standard_normal((2, sum(h * w for h, w in sizes), 7))
    maps = sequence_maps([paddle.to_tensor(seq, 'float32')], sizes)
    start = 0
    for (h, w), got in zip(sizes, maps):
        assert list(got.shape) == [2, 7, h, w]
        for y, x in itertools.product(range(h), range(w)):
            np.testing.assert_allclose(got.numpy()[:, :, y, x], seq[:, start + y * w + x], rtol=1e-6)
        start += h * w


# -- on the tiny DINO and RT-DETR pairs ------------------------------------------------------------------
def detr_batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    boxes = [paddle.to_tensor(np.concatenate([rng.uniform(0.3, 0.7, (k, 2)), rng.uniform(0.1, 0.3, (k, 2))], 1),
                              'float32') for k in (2, 3)[:n]]
    return {'image': paddle.to_tensor(rng.standard_normal((n, 3, SIZE, SIZE)), 'float32'),
            'pad_mask': paddle.ones([n, SIZE, SIZE]),
            'im_shape': paddle.to_tensor([[SIZE, SIZE]] * n, 'float32'),
            'scale_factor': paddle.ones([n, 2]),
            'gt_bbox': boxes, 'gt_class': [paddle.to_tensor(rng.integers(0, 10, (len(b), 1)), 'int32') for b in boxes]}


def detr_distiller(losses, student=None, copy=False, pair='dino', **student_opts):
    """A distiller on the tiny ``pair`` (random weights): its student config or ``student``, or with ``copy``
    a student that is a weight copy of the teacher."""
    teacher, arch = build_teacher(PAIRS[pair]['teacher'], None, allow_random=True)
    if copy:
        student_model, _ = build_teacher(PAIRS[pair]['teacher'], None, allow_random=True)
        student_model.set_state_dict(teacher.state_dict())
    else:
        student_model, _ = build_teacher(student or PAIRS[pair]['student'], None, allow_random=True)
    return Distiller(student_model=student_model, teacher_model=teacher, student_arch=arch, teacher_arch=arch,
                     losses=losses, probe_size=SIZE, **student_opts)


def freeze_batch_norm(model):
    """BatchNorm on running statistics in train mode: the student's forward then equals the eval teacher's."""
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer.eval()


@ON_PAIRS
def test_detr_preset_encoder_maps_pair_by_stride_and_train(pair):
    """fpn: DINO's encoder memory per level, RT-DETR's hybrid-encoder outputs; both tiny students are 32-dim
    and the teachers 64-dim at strides 8/16/32."""
    d = detr_distiller([{'type': 'PKDLoss', 'name': 'enc', 'student': 'fpn'}], pair=pair)
    assert [(t.pair.student_level, t.pair.teacher_level) for t in d._terms] == [(0, 0), (1, 1), (2, 2)]
    assert [tuple(t.pair.student_shape) for t in d._terms] == [(1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4)]
    assert [tuple(t.pair.teacher_shape) for t in d._terms] == [(1, 64, 16, 16), (1, 64, 8, 8), (1, 64, 4, 4)]
    assert all(m.align is not None for m in d.distill_losses)  # 32 -> 64 align convs
    d.train()
    out = d(detr_batch())
    assert all(np.isfinite(float(out[f'distill_enc_l{i}'])) for i in range(3))
    out['loss'].backward()
    assert all(p.grad is None for p in d.teacher_model.parameters())


@needs_ppdet_heads_on_this_paddle
def test_dino_preset_encoder_maps_are_the_memory_per_level():
    d = detr_distiller([{'type': 'PKDLoss', 'name': 'enc', 'student': 'fpn'}])
    # the maps are the encoder output, independently reshaped
    model = d.teacher_model
    taps = TapSet(model, ['transformer.encoder', 'transformer.encoder@transformer.input_proj.*'])
    with paddle.no_grad(), taps.record():
        model(detr_batch())
    memory = taps.levels('transformer.encoder')[0].numpy()
    start = 0
    for level in taps.levels('transformer.encoder@transformer.input_proj.*'):
        n, c, h, w = level.shape
        want = memory[:, start:start + h * w].reshape(n, h, w, c).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(level.numpy(), want, rtol=1e-6)
        start += h * w
    assert start == memory.shape[1]


@ON_PAIRS
def test_shared_query_loss_is_zero_when_the_student_is_a_copy_of_the_teacher(pair):
    """Train mode, denoising queries in the student's run, random general points: the shared-query runs of a
    weight copy reproduce the teacher's outputs query by query (BatchNorm on running statistics, as the eval
    teacher's); the eval-mode teacher's layers are the student's last (RT-DETR: one)."""
    d = detr_distiller([{'type': 'SharedQueryKDLoss', 'name': 'sq', 'student': SHARED,
                         'args': {'num_random': 10}}], copy=True, pair=pair)
    d.train()
    freeze_batch_norm(d.student_model)
    seen = d.inspect(detr_batch())
    s, t = seen.term_inputs['distill_sq_l0']
    assert s['logits'].shape[2] > t['logits'].shape[2] == 30  # the student's run has denoising queries
    for k in ('class', 'bbox', 'giou'):
        assert abs(float(seen.terms[f'distill_sq_l0_{k}'])) < 1e-4, k
    layers = PAIRS[pair]['layers'][0]
    assert s['boxes'].shape[0] == 3 and t['boxes'].shape[0] == layers  # the student's training forward: every layer
    np.testing.assert_allclose(s['boxes'].numpy()[-layers:, :, -30:], t['boxes'].numpy(), atol=1e-5)


@ON_PAIRS
def test_shared_query_runs_use_the_teachers_positions_and_train_only_the_student(pair):
    d = detr_distiller([{'type': 'SharedQueryKDLoss', 'name': 'sq', 'student': SHARED,
                         'args': {'num_random': 10}}], pair=pair)
    # trained-like box heads (ppdet initialises their last layer to 0, which would make both models' boxes equal)
    for seed, model in enumerate((d.teacher_model, d.student_model)):
        last = model.transformer.enc_bbox_head.layers[-1]
        rng = np.random.default_rng(seed)
        for p in (last.weight, last.bias):
            p.set_value(rng.normal(0, 0.1, p.shape).astype('float32'))
    d.train()
    runs = {'student': 0, 'teacher': 0}
    hooks = [m.transformer.register_forward_pre_hook(lambda layer, x, side=side: runs.__setitem__(side, runs[side] + 1))
             for side, m in (('student', d.student_model), ('teacher', d.teacher_model))]
    refs = {'student': [], 'teacher': []}  # the decoders' initial reference boxes (inverse sigmoid), per run
    hooks += [m.transformer.decoder.register_forward_pre_hook(lambda layer, x, side=side: refs[side].append(x[1]))
              for side, m in (('student', d.student_model), ('teacher', d.teacher_model))]
    out = d(detr_batch())
    for h in hooks:
        h.remove()
    assert runs == {'student': 2, 'teacher': 2}  # own forward + shared-query run each
    # the student's run selected the teacher's top positions with the teacher's boxes: after its denoising
    # queries, its first Q - G = 20 references are the teacher's own top 20 (the teacher's first forward), in
    # order; the teacher's run has the same 30 references as the student's run
    student_run, teacher_own, teacher_run = refs['student'][1][:, -30:], refs['teacher'][0], refs['teacher'][1]
    np.testing.assert_allclose(student_run.numpy()[:, :20], teacher_own.numpy()[:, :20], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(student_run.numpy(), teacher_run.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(student_run.numpy()[:, 20:], teacher_own.numpy()[:, 20:])
    assert float(out['distill_sq_l0']) > 0
    out['loss'].backward()
    assert all(p.grad is None for p in d.teacher_model.parameters())
    grads = [p.grad for n, p in d.student_model.named_parameters() if n.startswith('transformer.decoder')]
    assert grads and all(g is not None for g in grads)


@ON_PAIRS
def test_hungarian_kd_trains_on_the_tiny_pair_without_teacher_gradients(pair):
    d = detr_distiller([{'type': 'HungarianKDLoss', 'name': 'hkd', 'student': DECODER}], pair=pair)
    teacher_layers, student_layers = PAIRS[pair]['layers']
    assert d._terms[0].pair.student_shape == (student_layers, 1, 30, 4)
    assert d.distill_losses[0].layers == {'dino': [(1, 0), (2, 1)], 'rtdetr': [(0, 0)]}[pair]
    d.train()
    out = d(detr_batch())
    assert {f'distill_hkd_l0_{k}' for k in ('class', 'bbox', 'giou')} <= set(out)
    out['loss'].backward()
    assert all(p.grad is None for p in d.teacher_model.parameters())
    d.eval()
    with paddle.no_grad():
        own = d.student_model(detr_batch(1))
        via = d(detr_batch(1))
    np.testing.assert_allclose(via['bbox'].numpy(), own['bbox'].numpy())


# -- one-line build errors --------------------------------------------------------------------------------
def one_line(err):
    text = str(err.value)
    assert '\n' not in text, text
    return text


def test_detr_roles_on_a_detr_without_dinos_transformer_are_a_one_line_error():
    from ppdet.modeling.architectures import DETR
    from ppdet.modeling.backbones import ResNet
    from ppdet.modeling.heads import DETRHead
    from ppdet.modeling.transformers import DETRTransformer
    backbone = ResNet(depth=18, return_idx=[3], num_stages=4)
    model = DETR(backbone, DETRTransformer(num_queries=10, hidden_dim=32, nhead=4, num_encoder_layers=1,
                                           num_decoder_layers=1, dim_feedforward=32, backbone_num_channels=512),
                 DETRHead(num_classes=10, hidden_dim=32, nhead=4, num_mlp_layers=2))
    with pytest.raises(DistillConfigError) as err:
        Distiller(student_model=model, teacher_model=model, student_arch='DETR', teacher_arch='DETR',
                  losses=[{'type': 'HungarianKDLoss', 'student': DECODER}], probe_size=64)
    text = one_line(err)
    assert 'decoder_boxes' in text and 'transformer: DINOTransformer' in text and 'DETRTransformer' in text
    assert 'transformer: RTDETRTransformer' in text


@pytest.mark.parametrize('entry, opts, expected', [
    ({'type': 'HungarianKDLoss', 'student': {'boxes': 'encoder_boxes', 'logits': 'encoder_scores'}}, {},
     "not a DETR decoder's outputs"),
    ({'type': 'HungarianKDLoss', 'student': DECODER, 'levels': [0]}, {}, 'takes its tensors whole'),
    ({'type': 'HungarianKDLoss', 'student': DECODER, 'args': {'layers': [[0, 2]]}}, {}, 'out of range'),
    ({'type': 'SharedQueryKDLoss', 'student': SHARED, 'args': {'num_random': 31}}, {}, 'num_random'),
    ({'type': 'SharedQueryKDLoss', 'student': DECODER}, {}, 'enc_scores'),
    ({'type': 'HungarianKDLoss', 'student': 'fpn'}, {}, 'needs student: {boxes: <tap>, logits: <tap>}'),
])
@needs_ppdet_heads_on_this_paddle
def test_bad_detr_entries_are_one_line_errors(entry, opts, expected):
    with pytest.raises(DistillConfigError) as err:
        detr_distiller([entry], **opts)
    assert expected in one_line(err)


@ON_PAIRS
def test_shared_queries_need_the_same_number_of_queries(pair, tmp_path):
    cfg = tmp_path / 'student_20q.yml'
    cfg.write_text(f"_BASE_: ['{__import__('os').path.abspath(PAIRS[pair]['student'])}']\n"
                   f"{PAIRS[pair]['transformer']}:\n  num_queries: 20\n")
    with pytest.raises(DistillConfigError) as err:
        detr_distiller([{'type': 'SharedQueryKDLoss', 'student': SHARED}], student=str(cfg), pair=pair)
    assert 'num_queries (student 20, teacher 30)' in one_line(err)


@needs_ppdet_heads_on_this_paddle
@pytest.mark.parametrize('entry, reason', [
    ({'type': 'SharedQueryKDLoss', 'student': SHARED}, 'run the teacher model again (cross, or a loss with replacements)'),
    ({'type': 'PKDLoss', 'student': 'fpn'}, 'token sequences laid out as maps (seq@levels)'),
])
def test_teacher_mode_fast_keeps_the_eager_teacher_for_reruns_and_sequence_maps(entry, reason):
    from ppdistill.fast_teacher import attach_teacher_path
    d = detr_distiller([entry])
    line = attach_teacher_path(d, 'fast')
    assert line.startswith('teacher path: eager') and reason in line and d.fast_teacher is None

"""BinaryKDLoss (BCKD classification KD) vs a NumPy reference of the equation, and vs ppdet 2.6.0's own
PP-YOLOE distill class term (``DistillPPYOLOELoss.quality_focal_loss``) on the same tensors."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest

from ppdistill.errors import PPDistillError
from ppdistill.losses import BinaryKDLoss


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_binary_kd(s, t, beta):
    """sum over locations and classes of BCE(s, sigmoid(t)) * |sigmoid(t) - sigmoid(s)|^beta, written
    with the explicit log-probabilities (float64)."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    p, q = sigmoid(t), sigmoid(s)
    bce = -(p * np.log(q) + (1 - p) * np.log(1 - q))
    return np.sum(bce * np.abs(p - q) ** beta)


def logits(rng, shape, scale=2.0):
    return (rng.standard_normal(shape) * scale).astype('float32')


@pytest.mark.parametrize('beta', [0.0, 1.0, 2.0])
@pytest.mark.parametrize('normalize', ['positives', 'assigned_scores', 'locations', 'sum', 'weights'])
def test_matches_numpy_reference(beta, normalize):
    rng = np.random.default_rng(1)
    s, t = logits(rng, (2, 5, 3, 4)), logits(rng, (2, 5, 3, 4))
    loss = BinaryKDLoss(5, 5, beta=beta, normalize=normalize, loss_weight=1.5)
    got = loss({'cls': paddle.to_tensor(s), 'num_pos': paddle.to_tensor(7.0),
                'assigned_scores_sum': paddle.to_tensor(3.25)}, paddle.to_tensor(t))
    total = np_binary_kd(s, t, beta)
    div = {'positives': 7.0, 'assigned_scores': 3.25, 'locations': 2 * 3 * 4, 'sum': 1.0,
           'weights': np.sum(np.abs(sigmoid(t.astype(np.float64)) - sigmoid(s.astype(np.float64))) ** beta)}
    np.testing.assert_allclose(float(got), 1.5 * total / div[normalize], rtol=1e-5)


def test_num_pos_is_clipped_to_one_and_zero_when_student_equals_teacher():
    rng = np.random.default_rng(2)
    s, t = logits(rng, (1, 3, 2, 2)), logits(rng, (1, 3, 2, 2))
    got = BinaryKDLoss(3, 3)({'cls': paddle.to_tensor(s), 'num_pos': paddle.to_tensor(0.0)}, paddle.to_tensor(t))
    np.testing.assert_allclose(float(got), np_binary_kd(s, t, 1.0), rtol=1e-5)
    same = BinaryKDLoss(3, 3, normalize='sum')(paddle.to_tensor(s), paddle.to_tensor(s))
    assert float(same) == 0.0  # focal factor |p_t - p_s| is 0


def test_gradient_reaches_student_only():
    rng = np.random.default_rng(3)
    s = paddle.to_tensor(logits(rng, (1, 3, 2, 2)), stop_gradient=False)
    t = paddle.to_tensor(logits(rng, (1, 3, 2, 2)), stop_gradient=False)
    BinaryKDLoss(3, 3, normalize='locations')(s, t).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    assert t.grad is None


def test_positives_without_num_pos_is_an_error():
    x = paddle.zeros([1, 3, 2, 2])
    with pytest.raises(PPDistillError, match='num_pos'):
        BinaryKDLoss(3, 3)(x, x)
    with pytest.raises(PPDistillError, match='assigned_scores_sum'):
        BinaryKDLoss(3, 3, normalize='assigned_scores')({'cls': x, 'num_pos': paddle.to_tensor(2.0)}, x)


@pytest.mark.parametrize('normalize, keys', [('positives', ('num_pos',)),
                                             ('assigned_scores', ('assigned_scores_sum',)),
                                             ('locations', ()), ('weights', ()), ('sum', ())])
def test_each_normaliser_asks_for_its_assignment_key_only(normalize, keys):
    assert BinaryKDLoss(3, 3, normalize=normalize).assignment_keys == keys


def test_class_count_mismatch_is_an_error():
    with pytest.raises(PPDistillError, match='classes differ'):
        BinaryKDLoss(80, 20)


def test_beta2_equals_ppdet_ppyoloe_distill_class_term():
    """ppdet's term takes post-sigmoid scores [N*A, C] over all levels, divided by the student's
    assigned_scores_sum; ours runs per level on the logits and the level terms add up."""
    from ppdet.slim.distill_loss import DistillPPYOLOELoss
    rng = np.random.default_rng(4)
    shapes = [(2, 6, 2, 2), (2, 6, 4, 4), (2, 6, 8, 8)]  # PP-YOLOE order: coarse -> fine
    s_levels = [logits(rng, sh) for sh in shapes]
    t_levels = [logits(rng, sh) for sh in shapes]
    num_pos = 5.75  # assigned_scores_sum is a float sum of scores
    loss = BinaryKDLoss(6, 6, beta=2.0)
    ours = sum(float(loss({'cls': paddle.to_tensor(s), 'num_pos': paddle.to_tensor(num_pos)},
                          paddle.to_tensor(t))) for s, t in zip(s_levels, t_levels))

    def scores(levels):  # PPYOLOEHead: sigmoid(cls).flatten(2).transpose -> [N, A, C], levels concatenated
        return np.concatenate([sigmoid(x).reshape(2, 6, -1).transpose(0, 2, 1) for x in levels], axis=1)
    upstream = DistillPPYOLOELoss(logits_distill=True, feat_distill=False)
    ref = upstream.quality_focal_loss(paddle.to_tensor(scores(s_levels).reshape(-1, 6).astype('float32')),
                                      paddle.to_tensor(scores(t_levels).reshape(-1, 6).astype('float32')),
                                      beta=2.0, use_sigmoid=False, num_total_pos=paddle.to_tensor(num_pos))
    np.testing.assert_allclose(ours, float(ref), rtol=1e-4)

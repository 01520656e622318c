"""Binary (per-class) KD of a sigmoid classification head: BCKD's classification term.

Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object Detection",
ICCV 2023. Every class of every location is its own binary problem with the teacher's sigmoid as the soft
target, modulated like a quality focal loss by ``|p_t - p_s|**beta``::

    L = loss_weight * sum_{i, c} BCE(s_ic, p^t_ic) * |p^t_ic - sigmoid(s_ic)|**beta / normaliser
    BCE(x, p) = max(x, 0) - x*p + log(1 + exp(-|x|)),   p^t = sigmoid(t)

over all locations of the level (not only positives). BCKD: ``beta=1``, normaliser ``N_pos`` (the
student assignment's positives over all levels), so the per-level terms add up to the paper's loss.
ppdet's PP-YOLOE distill class term (``DistillPPYOLOELoss.quality_focal_loss``) is the same loss with
``beta=2`` and ``normalize='assigned_scores'`` (the student assigner's ``assigned_scores_sum``). CrossKD's ``KDQualityFocalLoss`` is
``beta=1`` on the crossed logits.

Deviation from the official code: BCKD computes the term only when the batch has positives on that
level; this loss always computes it.
"""
from typing import Dict, Optional, Union

import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from ..errors import PPDistillError
from .base import DistillLoss
from .dense_head import Maps, as_maps, check_normalize, normalizer, normalizer_keys

__all__ = ['BinaryKDLoss', 'binary_kd_map']


def binary_kd_map(student_logits: paddle.Tensor, teacher_logits: paddle.Tensor,
                  beta: float) -> paddle.Tensor:
    """Elementwise ``BCE(s, sigmoid(t)) * |sigmoid(t) - sigmoid(s)|**beta`` (any shape, logits)."""
    target = F.sigmoid(teacher_logits)
    bce = F.binary_cross_entropy_with_logits(student_logits, target, reduction='none')
    return bce * (target - F.sigmoid(student_logits)).abs().pow(beta)


@register
class BinaryKDLoss(DistillLoss):
    """BCKD binary classification KD (see the module docstring).

    Inputs per level: the class logits ``[N, C, H, W]`` of student and teacher as ``{'cls': ...}`` (a config
    names one tap per side, ``student: cls_logits``); with ``normalize='positives'`` (``'assigned_scores'``)
    the student mapping also carries ``num_pos`` (``assigned_scores_sum``)
    (:class:`~ppdistill.losses.base.DistillLoss`, ``assignment_keys``).

    Args:
        student_channels, teacher_channels: ``C`` (or ``{'cls': C, ...}``); must be equal.
        beta: focal exponent (BCKD and CrossKD 1, ppdet PP-YOLOE 2).
        normalize: ``'positives'`` (default, the papers: ``/ N_pos``), ``'assigned_scores'`` (``/`` the
            assigner's ``assigned_scores_sum``, as PP-YOLOE's head and ppdet's PP-YOLOE distill term),
            ``'locations'`` (``/ N*H*W`` of the level: a mean, no assignment needed), ``'weights'`` (``/ sum of
            the focal factors``) or ``'sum'``.
        loss_weight: weight (BCKD 1.0).
    """

    equal_channels = True
    tensor_names = ('cls',)
    assignment_keys = ('num_pos', 'assigned_scores_sum')

    def __init__(self, student_channels: Union[int, Dict[str, int]], teacher_channels: Union[int, Dict[str, int]],
                 beta: float = 1.0, normalize: str = 'positives', loss_weight: float = 1.0):
        super().__init__()
        s = student_channels['cls'] if isinstance(student_channels, dict) else student_channels
        t = teacher_channels['cls'] if isinstance(teacher_channels, dict) else teacher_channels
        if int(s) != int(t):
            raise PPDistillError(f'BinaryKDLoss compares class logits one by one: student {s} and teacher {t} '
                                 'classes differ (no re-projection of classes exists)')
        if float(beta) < 0:
            raise PPDistillError(f'BinaryKDLoss: beta must be >= 0, got {beta}')
        self.beta = float(beta)
        self.normalize = check_normalize(normalize, 'BinaryKDLoss')
        self.loss_weight = float(loss_weight)
        self.assignment_keys = normalizer_keys(normalize)

    def forward(self, student: Maps, teacher: Maps, inputs: Optional[dict] = None) -> paddle.Tensor:
        """``student``/``teacher``: ``[N, C, H, W]`` logits or ``{'cls': ..., [<assignment key>: ...]}``; a
        scalar."""
        student, teacher = as_maps(student, 'BinaryKDLoss', ['cls']), as_maps(teacher, 'BinaryKDLoss', ['cls'])
        s, t = student['cls'], teacher['cls'].detach()
        per_elem = binary_kd_map(s, t, self.beta)
        n, _, h, w = [int(v) for v in s.shape]
        weights = (F.sigmoid(t) - F.sigmoid(s)).abs().pow(self.beta) if self.normalize == 'weights' else None
        return self.loss_weight * per_elem.sum() / normalizer(self.normalize, student, n * h * w, weights,
                                                              'BinaryKDLoss')

"""Logit knowledge distillation on dense classification outputs.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 workshop
(arXiv:1503.02531), applied per anchor/position of a detector's classification head. Softmax heads:
``KL(softmax(t/T) || softmax(s/T)) * T**2`` (as mmrazor's ``KLDivergence``). Sigmoid heads (RetinaNet's
focal loss, PicoDet/GFL's quality focal loss) treat every class as a binary problem, with the teacher's
``sigmoid(t/T)`` as the soft target.
"""
from typing import Optional

import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from .base import FeatureLoss

__all__ = ['LogitKDLoss', 'softmax_kl']

_ACTIVATIONS = ('sigmoid', 'softmax')
_NORMALIZE = ('all', 'positive')


def softmax_kl(student: paddle.Tensor, teacher: paddle.Tensor, axis: int) -> paddle.Tensor:
    """Elementwise ``p_T * (log p_T - log p_S)`` with ``p = softmax(logits, axis)``; summed over ``axis``
    it is ``KL(p_T || p_S)`` (computed from log-softmax for stability)."""
    log_p_t = F.log_softmax(teacher, axis=axis)
    return paddle.exp(log_p_t) * (log_p_t - F.log_softmax(student, axis=axis))


def _anchors_and_classes(channels: int, num_classes: Optional[int], num_anchors: Optional[int]):
    """Split a head's ``A*C`` output channels into ``(A, C)`` (ValueError when they do not divide)."""
    if num_classes is None and num_anchors is None:
        return 1, channels
    if num_classes is not None:
        num_classes = int(num_classes)
        if num_classes <= 0 or channels % num_classes:
            raise ValueError(f'LogitKDLoss: {channels} logit channels are not a multiple of num_classes='
                             f'{num_classes} (channels = anchors x classes)')
        anchors = channels // num_classes
        if num_anchors is not None and int(num_anchors) != anchors:
            raise ValueError(f'LogitKDLoss: {channels} channels = {anchors} anchors x {num_classes} classes, '
                             f'not num_anchors={num_anchors}')
        return anchors, num_classes
    num_anchors = int(num_anchors)
    if num_anchors <= 0 or channels % num_anchors:
        raise ValueError(f'LogitKDLoss: {channels} logit channels are not a multiple of num_anchors='
                         f'{num_anchors} (channels = anchors x classes)')
    return num_anchors, channels // num_anchors


@register
class LogitKDLoss(FeatureLoss):
    """Logit KD per anchor/position of a dense classification head (Hinton et al., 2014).

    A conv head's logits ``[N, A*C, H, W]`` (ppdet's RetinaNet layout: channel ``a*C + c``) are viewed as
    ``[N, A, C, H, W]``; each of the ``N*A*H*W`` anchors/positions gets a KD term summed over its classes:

    * ``activation='softmax'``: ``T**2 * KL(softmax(t/T) || softmax(s/T))`` over the C classes;
    * ``activation='sigmoid'``: ``T**2 * sum_c KL(Bernoulli(sigmoid(t_c/T)) || Bernoulli(sigmoid(s_c/T)))``
      — binary cross-entropy with the teacher's ``sigmoid(t/T)`` as soft target, minus the teacher's
      entropy (a constant: same gradient, and 0 when the student matches).

    Normalisation (``normalize``):

    * ``'all'``: the mean over all anchors/positions;
    * ``'positive'``: the mean over *teacher-positive* anchors/positions only, those whose highest class
      probability at ``T=1`` (sigmoid or softmax; ``background_index`` excluded) is ``>= pos_threshold``;
      a batch without any adds 0 (every parameter still in the graph).

    Logits are compared class by class, so there is no align conv: teacher and student must have the same
    channels (``equal_channels``; the distiller checks it at build time for every level pair).

    Args:
        student_channels, teacher_channels (int): ``A*C`` of each head; must be equal.
        temperature (float): ``T > 0``. Default 1.0.
        activation (str): ``'sigmoid'`` (default) or ``'softmax'``, as the head's own loss.
        num_classes (int): ``C``; the anchors ``A = channels / C``. In a distill config it defaults to the
            model config's ``num_classes``; constructed directly, ``num_anchors`` decides, or one anchor per
            position (``C`` = channels).
        num_anchors (int): ``A`` (alternative to ``num_classes``).
        normalize (str): ``'all'`` (default) or ``'positive'``, see above.
        pos_threshold (float): teacher confidence of a positive, in [0, 1]. Default 0.5.
        background_index (int): class index ignored when finding positives (softmax heads with a
            background class). Default None.
        loss_weight (float): weight. Default 1.0.
    """

    equal_channels = True
    # The model config's num_classes when the entry does not set it (the distiller fills __shared__ keys,
    # as ppdet's create does): without it a softmax or a 'positive' mask over all A*C channels of a
    # multi-anchor head would silently mix its anchors.
    __shared__ = ['num_classes']

    def __init__(self, student_channels: int, teacher_channels: int, temperature: float = 1.0,
                 activation: str = 'sigmoid', num_classes: Optional[int] = None,
                 num_anchors: Optional[int] = None, normalize: str = 'all', pos_threshold: float = 0.5,
                 background_index: Optional[int] = None, loss_weight: float = 1.0):
        if int(student_channels) != int(teacher_channels):
            raise ValueError(f'LogitKDLoss compares logits class by class: student ({student_channels}) and '
                             f'teacher ({teacher_channels}) need the same channels (anchors x classes)')
        super().__init__(student_channels, teacher_channels)
        if activation not in _ACTIVATIONS:
            raise ValueError(f'LogitKDLoss: activation must be one of {_ACTIVATIONS}, got {activation!r}')
        if normalize not in _NORMALIZE:
            raise ValueError(f'LogitKDLoss: normalize must be one of {_NORMALIZE}, got {normalize!r}')
        if float(temperature) <= 0:
            raise ValueError(f'LogitKDLoss: temperature must be > 0, got {temperature}')
        if not 0.0 <= float(pos_threshold) <= 1.0:
            raise ValueError(f'LogitKDLoss: pos_threshold must be in [0, 1], got {pos_threshold}')
        self.num_anchors, self.num_classes = _anchors_and_classes(self.teacher_channels, num_classes,
                                                                  num_anchors)
        if background_index is not None and not 0 <= int(background_index) < self.num_classes:
            raise ValueError(f'LogitKDLoss: background_index {background_index} is not a class index '
                             f'(0..{self.num_classes - 1})')
        self.temperature = float(temperature)
        self.activation = activation
        self.normalize = normalize
        self.pos_threshold = float(pos_threshold)
        self.background_index = None if background_index is None else int(background_index)
        self.loss_weight = float(loss_weight)

    def _split(self, x: paddle.Tensor) -> paddle.Tensor:
        n, _, h, w = [int(v) for v in x.shape]
        return x.reshape([n, self.num_anchors, self.num_classes, h, w])

    def per_anchor(self, student: paddle.Tensor, teacher: paddle.Tensor) -> paddle.Tensor:
        """``[N, A, C, H, W]`` logits → ``[N, A, H, W]`` KD term of every anchor/position (times ``T**2``)."""
        s, t = student / self.temperature, teacher / self.temperature
        if self.activation == 'softmax':
            kl = softmax_kl(s, t, axis=2)
        else:
            p_t = F.sigmoid(t)
            kl = (p_t * (F.log_sigmoid(t) - F.log_sigmoid(s))
                  + (1 - p_t) * (F.log_sigmoid(-t) - F.log_sigmoid(-s)))
        return kl.sum(axis=2) * self.temperature ** 2

    def teacher_positive(self, teacher: paddle.Tensor) -> paddle.Tensor:
        """``[N, A, C, H, W]`` teacher logits → float ``[N, A, H, W]``, 1 where the teacher is confident."""
        prob = F.softmax(teacher, axis=2) if self.activation == 'softmax' else F.sigmoid(teacher)
        if self.background_index is not None:
            keep = paddle.ones([self.num_classes], dtype=prob.dtype)
            keep[self.background_index] = 0
            prob = prob * keep.reshape([1, 1, -1, 1, 1])
        return paddle.cast(prob.max(axis=2) >= self.pos_threshold, prob.dtype)

    def forward(self, student_feat: paddle.Tensor, teacher_feat: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        """``student_feat``/``teacher_feat``: ``[N, A*C, H, W]`` logits → scalar loss."""
        self.check_shapes(student_feat, teacher_feat)
        student, teacher = self._split(student_feat), self._split(teacher_feat.detach())
        per_anchor = self.per_anchor(student, teacher)
        if self.normalize == 'all':
            loss = per_anchor.mean()
        else:
            mask = self.teacher_positive(teacher)
            loss = (per_anchor * mask).sum() / paddle.clip(mask.sum(), min=1.0)
        return self.loss_weight * loss

"""SSD output distillation: soft-target KL on the confidences, bounded L2 pull on the locations.

After Chen, Choi, Yu, Han, Chandraker, "Learning Efficient Object Detection Models with Knowledge
Distillation", NeurIPS 2017 (soft targets with temperature; a bounded regression term), applied to the
per-level outputs of ppdet's ``SSDHead``. The student keeps its own MultiBox loss (ppdet ``SSDLoss``); this
loss is added on top, one term per level.
"""
from typing import Dict, Optional

import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from ..errors import PPDistillError
from .base import DistillLoss
from .outputs import same_output_channels, split_anchors

__all__ = ['SSDOutputLoss']


@register
class SSDOutputLoss(DistillLoss):
    """KL(teacher conf || student conf) over every prior plus an optional bounded location pull.

    Inputs per level (taps ``student: {conf: cls_logits, loc: box_reg}`` of the ``SSD`` preset):
    ``conf`` ``[N, A*K, H, W]`` confidence logits, ``K`` = classes + background (ppdet puts background
    last), ``loc`` ``[N, A*4, H, W]`` prior-box offsets; ``A = C_loc / 4`` priors per cell. Teacher and
    student must have identical layouts (same ``A`` and ``K``; no align conv for outputs).

    With ``p = softmax(conf / T)`` over the ``K`` classes of each prior (background included) and
    ``P = N*A*H*W`` priors of the level::

        conf term = conf_weight * T**2 / P * sum_priors KL(p_T || p_S)
        loc term  = loc_weight / max(1, |M|) * sum_{priors in M} min(||loc_S - loc_T||**2, loc_bound)
        M         = priors whose teacher foreground probability max_{k != bg} softmax(conf_T)_k > loc_thresh

    The ``T**2`` factor keeps the gradient scale independent of ``T`` (Hinton et al. 2015).

    The location term is *not* Chen et al.'s teacher-bounded loss, which needs each prior's ground-truth
    regression target ``y`` (``||R_s - y||^2`` only while ``||R_s - y||^2 + m > ||R_t - y||^2``): ``y``
    comes from SSD's prior matching over all levels at once, which a per-level, architecture-agnostic
    term does not have. Instead the student is pulled towards the teacher only where the teacher is
    confident, and each prior's pull is capped at ``loc_bound`` (a truncated L2: a teacher box far from the
    student's — likely a teacher mistake — gives no gradient), so the teacher can never outweigh the GT
    regression of the student's own MultiBox loss. ``loc_weight = 0`` turns it off (Chen et al.'s weight
    of their regression distillation term is 0.5, our default).

    Args:
        student_channels, teacher_channels: ``{'conf': C, 'loc': C}`` of the level (from the distiller).
        temperature: ``T`` (> 0) of the confidence soft targets.
        conf_weight: weight of the confidence KL term.
        loc_weight: weight of the location term (0 disables it).
        loc_thresh: teacher foreground probability above which a prior's location is pulled.
        loc_bound: per-prior cap of the squared location distance (> 0).
    """

    equal_channels = True  # outputs are compared prior by prior: no align conv
    tensor_names = ('conf', 'loc')

    def __init__(self, student_channels: Dict[str, int], teacher_channels: Dict[str, int],
                 temperature: float = 2.0, conf_weight: float = 1.0, loc_weight: float = 0.5,
                 loc_thresh: float = 0.5, loc_bound: float = 1.0):
        super().__init__()
        channels = same_output_channels('SSDOutputLoss', student_channels, teacher_channels, ('conf', 'loc'))
        priors = channels['loc'] // 4
        if channels['loc'] % 4 or priors == 0 or channels['conf'] % priors or channels['conf'] // priors < 2:
            raise PPDistillError(f"SSDOutputLoss: loc has {channels['loc']} channels and conf "
                                 f"{channels['conf']}: expected A*4 and A*K (A priors per cell)")
        if float(temperature) <= 0 or float(loc_bound) <= 0:
            raise PPDistillError(f'SSDOutputLoss: temperature and loc_bound must be > 0, got {temperature} '
                                 f'and {loc_bound}')
        self.num_priors = priors
        self.temperature = float(temperature)
        self.conf_weight = float(conf_weight)
        self.loc_weight = float(loc_weight)
        self.loc_thresh = float(loc_thresh)
        self.loc_bound = float(loc_bound)

    def conf_loss(self, student: paddle.Tensor, teacher: paddle.Tensor) -> paddle.Tensor:
        """``T**2 * mean over priors of KL(softmax(t/T) || softmax(s/T))``; inputs ``[N, A*K, H, W]``."""
        t = self.temperature
        log_s = F.log_softmax(split_anchors(student, self.num_priors) / t, axis=2)
        log_t = F.log_softmax(split_anchors(teacher, self.num_priors) / t, axis=2)
        kl = (log_t.exp() * (log_t - log_s)).sum(axis=2)  # [N, A, H, W]
        return kl.mean() * t * t

    def loc_loss(self, student: paddle.Tensor, teacher: paddle.Tensor,
                 teacher_conf: paddle.Tensor) -> paddle.Tensor:
        """Truncated L2 between ``[N, A*4, H, W]`` locations on the teacher's confident priors."""
        prob = F.softmax(split_anchors(teacher_conf, self.num_priors), axis=2)
        confident = paddle.cast(prob[:, :, :-1].max(axis=2) > self.loc_thresh, student.dtype)  # [N, A, H, W]
        dist = (split_anchors(student, self.num_priors) - split_anchors(teacher, self.num_priors)) ** 2
        capped = paddle.minimum(dist.sum(axis=2), paddle.full([1], self.loc_bound, student.dtype))
        # no confident prior: 0, and the student's loc output still takes part in the graph
        return (capped * confident).sum() / paddle.clip(confident.sum(), min=1.0)

    def forward(self, student: Dict[str, paddle.Tensor], teacher: Dict[str, paddle.Tensor],
                inputs: Optional[dict] = None) -> paddle.Tensor:
        """``student``/``teacher``: ``{'conf': [N, A*K, H, W], 'loc': [N, A*4, H, W]}``; returns a scalar."""
        teacher = {k: v.detach() for k, v in teacher.items()}
        loss = self.conf_weight * self.conf_loss(student['conf'], teacher['conf'])
        if self.loc_weight:
            loss = loss + self.loc_weight * self.loc_loss(student['loc'], teacher['loc'], teacher['conf'])
        return loss

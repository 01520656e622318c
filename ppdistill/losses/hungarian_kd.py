"""Hungarian-matched query KD of a DETR decoder: DETRDistill's logits/box term.

Chang et al., "DETRDistill: A Universal Knowledge Distillation Framework for DETR-families", ICCV 2023
(Hungarian-matching logits distillation). Per mapped decoder layer pair ``(l_t, l_s)`` and image, the
student's ``Qs`` matching queries are matched one to one to the teacher's ``Qt`` queries (``min(Qs, Qt)``
pairs) by the Hungarian algorithm on the cost (:mod:`~ppdistill.losses.query_kd` terms)::

    cost(i, j) = w_cls * sum_c BCE(s_ic, sigmoid(t_jc)) + w_l1 * |b^s_i - b^t_j|_1 + w_giou * (1 - GIoU(b^s_i, b^t_j))

and the loss is the same sum over the matched pairs ``M`` of all images, normalised by their count::

    L = sum_{(l_t, l_s)} sum_{(i, j) in M_l} cost_l(i, j) / |M_l|

with DETR's weights ``w_cls, w_l1, w_giou = 1, 5, 2`` for the matching and the loss alike, so the matching
minimises exactly the loss. The matching runs on the host once per step and layer pair
(``scipy.optimize.linear_sum_assignment``) on detached costs; gradients reach the student through the
matched pairs' terms. The teacher's queries are a set: permuting them changes nothing.

Denoising queries never enter (:mod:`~ppdistill.losses.query_kd`: the last ``Q`` queries of each side).
Layers: ``layers: [[teacher layer, student layer], ...]``; default the last ``min(Ls, Lt)`` layers aligned.

Deviations from the paper: the class term's minimum is the teacher's binary entropy, not 0 (the paper's
BCE); the per-layer losses are summed (the paper applies the term to every decoder layer as auxiliary
losses); the target-aware feature term and the query-prior assignment of DETRDistill are not part of this
loss (encoder feature KD: the DETR preset's ``fpn`` role with MGD/FGD/CWD/PKD).
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import paddle
from ppdet.core.workspace import register
from ..optional import require
from .query_kd import DecoderKDLoss

__all__ = ['HungarianKDLoss']


@register
class HungarianKDLoss(DecoderKDLoss):
    """DETRDistill's Hungarian-matched logits and box KD (see the module docstring).

    Inputs, ``student``/``teacher``: ``{'boxes': [L, N, Ndn + Q, 4], 'logits': [L, N, Ndn + Q, C]}`` (the DETR
    preset: ``student: {boxes: decoder_boxes, logits: decoder_logits}``).

    Args:
        student_shapes, teacher_shapes: the probe shapes ``{'boxes': ..., 'logits': ...}`` (filled in by the
            distiller); equal class counts.
        layers: ``[[teacher layer, student layer], ...]``; default the last ``min(Ls, Lt)`` layers aligned.
        class_weight, bbox_weight, giou_weight: ``w_cls``, ``w_l1``, ``w_giou`` of the cost and the loss
            (DETRDistill / DETR: 1, 5, 2).
    """

    def match(self, cost: paddle.Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[N, Qs, Qt]`` costs -> ``(image, student query, teacher query)`` index arrays of the minimum-cost
        one-to-one matching of every image."""
        # imported here: the training path imports scipy only when a Hungarian loss runs (ppdet requires it)
        assign = require('scipy.optimize', 'HungarianKDLoss (its matching)').linear_sum_assignment
        found = [assign(c) for c in cost.numpy()]
        image = np.concatenate([np.full(len(r), n) for n, (r, _) in enumerate(found)])
        return (image.astype('int64'), np.concatenate([r for r, _ in found]).astype('int64'),
                np.concatenate([c for _, c in found]).astype('int64'))

    def layer_terms(self, s_logits: paddle.Tensor, s_boxes: paddle.Tensor, t_logits: paddle.Tensor,
                    t_boxes: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        """The matched pairs' terms of one layer pair, each summed and divided by the matched count."""
        with paddle.no_grad():
            cost = self.terms.pairwise(s_logits, s_boxes, t_logits, t_boxes)
        n, i, j = (paddle.to_tensor(a) for a in self.match(cost))
        s_idx, t_idx = paddle.stack([n, i], 1), paddle.stack([n, j], 1)
        pair = self.terms.aligned(paddle.gather_nd(s_logits, s_idx), paddle.gather_nd(s_boxes, s_idx),
                                  paddle.gather_nd(t_logits, t_idx), paddle.gather_nd(t_boxes, t_idx))
        count = float(max(int(n.shape[0]), 1))
        return {k: v.sum() / count for k, v in pair.items()}

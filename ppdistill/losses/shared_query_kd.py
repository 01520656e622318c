"""Shared-query decoder KD: KD-DETR's consistent distillation points, adapted to DINO/RT-DETR query selection.

Wang et al., "KD-DETR: Knowledge Distillation for Detection Transformer with Consistent Distillation Points
Sampling", CVPR 2024. Teacher and student decoders are run on the *same* queries, so their predictions
correspond query by query and need no matching. In DINO (and RT-DETR) a query is an encoder position chosen
by the top-``Q`` encoder class scores: its reference box is the encoder box head's output there plus the
position's anchor, its content the model's own (learnt ``tgt_embed`` slot, or the encoder output at that
position). Both models share the position grid when their levels and strides agree, so positions transfer:

* the shared set ``I`` (``Q`` positions per image, in this order): the teacher's top ``Q - G`` positions by
  ``max_c`` of its encoder class logits (KD-DETR's *specific* points) and ``G`` positions drawn uniformly
  from the others each step (its *general* points);
* the student runs again with its encoder score head returning a ranking that puts ``I`` first in that
  order, and its encoder box head returning the teacher's (detached): its top-``Q`` selection is ``I`` with
  the teacher's reference boxes, its content queries its own; the teacher runs again without gradient with
  the same ranking (skipped when ``G = 0``: its own forward already selected ``I``). Both runs replace a
  tapped sublayer's output (:meth:`~ppdistill.losses.base.DistillLoss.replacements`,
  :meth:`~ppdistill.taps.TapSet.replace`), as CrossKD's crossing does;
* per mapped decoder layer pair ``(l_t, l_s)``, with ``w_i = max_c sigmoid(t_ic)`` (detached)::

      L_l = sum_i w_i [w_cls sum_c KL(sigmoid(t_ic) || sigmoid(s_ic)) + w_l1 |b^s_i - b^t_i|_1
                       + w_giou (1 - GIoU(b^s_i, b^t_i))] / sum_i w_i

  over the ``Q`` shared queries of every image (denoising queries dropped,
  :mod:`~ppdistill.losses.query_kd`), summed over the layer pairs. ``KL`` is the binary KL (the BCE with the
  teacher's sigmoid as target minus its value at ``s = t``), so the loss is 0 when the student equals the
  teacher.

Deviations from KD-DETR: binary (sigmoid) class KD instead of the softmax KL, since DINO/RT-DETR classify
with sigmoids; the specific and general points share the model's ``Q`` query slots (``num_queries`` fixes
the selection size) instead of being extra queries; the general points are encoder positions (the
queries of a two-stage DETR), not random learnt embeddings. Cost: one more student forward with gradient and
(for ``G > 0``) one more teacher forward per step. Student and teacher need the same ``num_queries``, classes
and encoder grid (levels and strides), checked at build time; the student's second forward runs in train
mode like its first (BatchNorm running statistics are updated by both).
"""
from typing import Dict, Optional, Sequence, Tuple

import paddle
import paddle.nn.functional as F
from ppdet.core.workspace import register

from ..errors import PPDistillError
from .query_kd import DecoderKDLoss

__all__ = ['SharedQueryKDLoss', 'shared_ranking']


def shared_ranking(teacher_scores: paddle.Tensor, num_queries: int, num_random: int) -> paddle.Tensor:
    """The shared query set as a ranking: ``[N, P, C]`` teacher encoder logits -> ``[N, P]`` scores whose
    top-``Q`` (descending) are the teacher's top ``Q - G`` positions by ``max_c``, in its order, then ``G``
    other positions drawn uniformly (values ``Q .. 1``); every other position scores 0."""
    score = teacher_scores.max(-1)
    chosen = []
    if num_queries > num_random:
        chosen.append(paddle.topk(score, num_queries - num_random, axis=1)[1])
    if num_random:
        noise = paddle.rand(score.shape)
        if chosen:  # the teacher's top positions are taken
            noise = paddle.put_along_axis(noise, chosen[0], -1.0, axis=1)
        chosen.append(paddle.topk(noise, num_random, axis=1)[1])
    rank = paddle.arange(num_queries, 0, -1, dtype='float32').unsqueeze(0).tile([int(score.shape[0]), 1])
    return paddle.put_along_axis(paddle.zeros_like(score), paddle.concat(chosen, axis=1), rank, axis=1)


@register
class SharedQueryKDLoss(DecoderKDLoss):
    """KD-DETR shared-query decoder KD (see the module docstring).

    Inputs, ``student``/``teacher``: ``{'boxes': [L, N, Ndn + Q, 4], 'logits': [L, N, Ndn + Q, C], 'enc_scores':
    [N, P, C] encoder class logits, 'enc_boxes': [N, P, 4] encoder box-head output}`` (the DETR preset roles
    ``decoder_boxes``, ``decoder_logits``, ``encoder_scores``, ``encoder_boxes``); the loss itself receives
    the decoder outputs of the shared-query runs.

    Args:
        student_shapes, teacher_shapes: probe shapes per name (filled in by the distiller).
        layers: ``[[teacher layer, student layer], ...]``; default the last ``min(Ls, Lt)`` layers aligned.
        num_random: ``G``, general (random) positions among the ``Q`` shared queries; default ``Q // 3``.
        class_weight, bbox_weight, giou_weight: ``w_cls``, ``w_l1``, ``w_giou`` (RT-DETR's 1, 5, 2).
    """

    tensor_names = ('boxes', 'logits', 'enc_scores', 'enc_boxes')

    def __init__(self, student_shapes: Dict[str, Tuple[int, ...]], teacher_shapes: Dict[str, Tuple[int, ...]],
                 layers: Optional[Sequence[Sequence[int]]] = None, num_random: Optional[int] = None,
                 class_weight: float = 1.0, bbox_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__(student_shapes, teacher_shapes, layers, class_weight, bbox_weight, giou_weight)
        qs, qt, cs = self.student_queries, self.teacher_queries, self.num_classes
        if qs != qt:
            raise PPDistillError(f'SharedQueryKDLoss runs both decoders on the same queries: num_queries (student '
                                 f'{qs}, teacher {qt}) must be equal')
        grid = {side: (tuple(shapes['enc_scores']), tuple(shapes['enc_boxes']))
                for side, shapes in (('student', student_shapes), ('teacher', teacher_shapes))}
        for side, (scores, boxes) in grid.items():
            if len(scores) != 3 or scores[-1] != cs or tuple(boxes) != scores[:2] + (4,):
                raise PPDistillError(f"SharedQueryKDLoss: the {side}'s encoder scores {list(scores)} and boxes "
                                     f'{list(boxes)} are not [N, P, C] and [N, P, 4]: tap the encoder score and box '
                                     'heads (the DETR preset roles encoder_scores, encoder_boxes)')
        if grid['student'][0][1] != grid['teacher'][0][1]:
            raise PPDistillError(f"SharedQueryKDLoss shares encoder positions: the student's encoder has "
                                 f"{grid['student'][0][1]} positions and the teacher's {grid['teacher'][0][1]} at the "
                                 'probe size; the two need the same feature levels and strides')
        self.queries = qs
        self.num_random = qs // 3 if num_random is None else int(num_random)
        if not 0 <= self.num_random <= qs:
            raise ValueError(f'SharedQueryKDLoss: num_random must be in [0, num_queries = {qs}], got {num_random!r}')

    def replacements(self, student: Dict[str, paddle.Tensor],
                     teacher: Dict[str, paddle.Tensor]) -> Dict[str, Dict[str, paddle.Tensor]]:
        """The shared-query runs: both encoder score heads return :func:`shared_ranking` (``[N, P, C]``, every
        class the same), the student's encoder box head the teacher's output; the teacher's run only when
        ``G > 0``."""
        scores = teacher['enc_scores'].detach()
        ranking = shared_ranking(scores, self.queries, self.num_random).unsqueeze(-1).tile(
            [1, 1, int(scores.shape[-1])])
        given = {'student': {'enc_scores': ranking, 'enc_boxes': teacher['enc_boxes'].detach()}}
        if self.num_random:
            given['teacher'] = {'enc_scores': ranking}
        return given

    def layer_terms(self, s_logits: paddle.Tensor, s_boxes: paddle.Tensor, t_logits: paddle.Tensor,
                    t_boxes: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        """Query ``i`` against query ``i`` of the shared-query runs, weighted by ``w_i`` and normalised by their
        sum."""
        w = F.sigmoid(t_logits).max(-1)  # [N, Q]
        norm = w.sum().clip(min=1e-6)
        terms = self.terms.aligned(s_logits, s_boxes, t_logits, t_boxes, relative=True)
        return {k: (w * v).sum() / norm for k, v in terms.items()}

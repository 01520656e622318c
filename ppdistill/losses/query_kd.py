"""Shared pieces of the DETR query distillation losses (Hungarian KD, shared-query KD): the decoder-output
contract, the teacher -> student layer map, the denoising split and the per-query terms.

**Decoder outputs** (ppdet 2.6 ``DINOTransformer`` and PaddleDetection develop's ``RTDETRTransformer`` return
the same tuple; the DINO and RTDETR preset rows tap items 0 and 1):

* ``boxes``: ``[L, N, Ndn + Q, 4]``, per decoder layer the sigmoid-normalised ``(cx, cy, w, h)`` boxes;
* ``logits``: ``[L, N, Ndn + Q, C]``, per layer the class logits (sigmoid classification).

In training the first ``Ndn`` queries are the denoising groups, the last ``Q`` the matching queries
(``dn_meta['dn_num_split'] == [Ndn, Q]``; ``DINOHead`` splits them so). ``Q`` is the model's
``num_queries``, which the build-time probe reads (it runs in eval mode, where there are no denoising
queries): keeping the last ``Q`` queries of every forward is the split ``dn_num_split`` gives, without
reading ``dn_meta``. Denoising queries never enter a loss.

**Layers** are numbered as the probe sees them and counted from the last: layer ``l`` of ``L`` probed layers
is ``l - L`` of every forward. RT-DETR's decoder returns every layer in training but only its ``eval_idx``
layer (the last by default) in eval mode, where the probe and the teacher run: its probe shows ``L = 1``,
and layer 0 is the teacher's eval layer and the student's last layer of a training step. DINO returns every
layer in both modes, where counting from the last changes nothing.

**Per-query terms** between a student query ``i`` and a teacher query ``j`` (class weight ``w_cls``, box
weights ``w_l1``, ``w_giou``; DETR's 1 / 5 / 2)::

    class(i, j) = sum_c BCE(s_ic, sigmoid(t_jc))        (binary KD on the sigmoid scores)
    l1(i, j)    = sum_k |b^s_ik - b^t_jk|                 (cx, cy, w, h, normalised)
    giou(i, j)  = 1 - GIoU(xyxy(b^s_i), xyxy(b^t_j))
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import paddle
import paddle.nn.functional as F

from ..errors import PPDistillError
from .base import DistillLoss
from .dense_head import giou

__all__ = ['decoder_shapes', 'layer_map', 'matching_queries', 'decoder_sides', 'cxcywh_to_xyxy', 'soft_bce',
           'QueryTerms', 'DecoderKDLoss']

Shape = Tuple[int, ...]


def decoder_shapes(shapes: Mapping[str, Shape], side: str, loss: str) -> Tuple[int, int, int]:
    """``(L, Q, C)`` of one side's ``{'boxes': [L, N, Q, 4], 'logits': [L, N, Q, C]}`` probe shapes; a
    :class:`PPDistillError` naming the shapes when they are not a DETR decoder's outputs."""
    boxes, logits = (tuple(shapes[k]) for k in ('boxes', 'logits'))  # probe shapes: Python ints
    if len(boxes) != 4 or len(logits) != 4 or boxes[-1] != 4 or boxes[:3] != logits[:3]:
        raise PPDistillError(f"{loss}: the {side}'s boxes {list(boxes)} and logits {list(logits)} are not a DETR "
                             'decoder\'s outputs ([L, N, Q, 4] and [L, N, Q, C]): tap the transformer\'s decoder '
                             'boxes and logits (the DETR preset roles decoder_boxes, decoder_logits)')
    return boxes[0], boxes[2], logits[3]


def layer_map(layers: Optional[Sequence[Sequence[int]]], student_layers: int, teacher_layers: int,
              loss: str) -> List[Tuple[int, int]]:
    """``[(teacher layer, student layer), ...]``: the configured pairs (checked), or by default the last
    ``min(Ls, Lt)`` layers of both aligned (teacher 6, student 3: ``(3, 0), (4, 1), (5, 2)``). ``Ls``, ``Lt``
    are the probed layer counts (module docstring: layers count from the last)."""
    if layers is None:
        k = min(student_layers, teacher_layers)
        return [(teacher_layers - k + j, student_layers - k + j) for j in range(k)]
    try:
        pairs = [(int(t), int(s)) for t, s in layers]
    except (TypeError, ValueError):
        raise ValueError(f'{loss}: layers must be [[teacher layer, student layer], ...], got {layers!r}') from None
    bad = [p for p in pairs if not (0 <= p[0] < teacher_layers and 0 <= p[1] < student_layers)]
    if not pairs or bad:
        raise ValueError(f'{loss}: layers {layers!r} must pair teacher layers 0..{teacher_layers - 1} with student '
                         f'layers 0..{student_layers - 1}' + (f'; out of range: {bad}' if bad else ''))
    return pairs


def matching_queries(x: paddle.Tensor, num_queries: int) -> paddle.Tensor:
    """``[L, N, Ndn + Q, K]`` -> ``[L, N, Q, K]``: the last ``Q`` (matching) queries, denoising dropped."""
    return x[:, :, int(x.shape[2]) - num_queries:]


def decoder_sides(student: Mapping[str, paddle.Tensor], teacher: Mapping[str, paddle.Tensor], student_queries: int,
                  teacher_queries: int) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """``(student boxes, student logits, teacher boxes, teacher logits)``, each ``[L, N, Q, 4 | C]``: the
    matching queries of both sides' decoder outputs, the teacher's detached."""
    s = [matching_queries(student[k], student_queries) for k in ('boxes', 'logits')]
    t = [matching_queries(teacher[k].detach(), teacher_queries) for k in ('boxes', 'logits')]
    return s[0], s[1], t[0], t[1]


def cxcywh_to_xyxy(b: paddle.Tensor) -> paddle.Tensor:
    return paddle.concat([b[..., :2] - 0.5 * b[..., 2:], b[..., :2] + 0.5 * b[..., 2:]], axis=-1)


def soft_bce(student_logits: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    """Elementwise ``BCE(s, p) = softplus(s) - s*p`` (binary cross-entropy of logits ``s`` with soft target ``p``)."""
    return F.softplus(student_logits) - student_logits * target


class QueryTerms:
    """The weighted per-query terms (module docstring) of one student and one teacher decoder layer.

    Args:
        class_weight, bbox_weight, giou_weight: ``w_cls``, ``w_l1``, ``w_giou``.
    """

    def __init__(self, class_weight: float, bbox_weight: float, giou_weight: float, loss: str):
        weights = {'class_weight': class_weight, 'bbox_weight': bbox_weight, 'giou_weight': giou_weight}
        for k, v in weights.items():
            if not float(v) >= 0:
                raise ValueError(f'{loss}: {k} must be >= 0, got {v!r}')
        self.weights = {'class': float(class_weight), 'bbox': float(bbox_weight), 'giou': float(giou_weight)}

    def pairwise(self, s_logits: paddle.Tensor, s_boxes: paddle.Tensor, t_logits: paddle.Tensor,
                 t_boxes: paddle.Tensor) -> paddle.Tensor:
        """Every student query against every teacher query of each image: ``[N, Qs, Qt]``, the weighted sum of
        the three terms (``s_*``: ``[N, Qs, C|4]``, ``t_*``: ``[N, Qt, C|4]``)."""
        p = F.sigmoid(t_logits)
        cls = F.softplus(s_logits).sum(-1, keepdim=True) - paddle.matmul(s_logits, p, transpose_y=True)
        l1 = (s_boxes.unsqueeze(2) - t_boxes.unsqueeze(1)).abs().sum(-1)
        g = 1.0 - giou(cxcywh_to_xyxy(s_boxes).unsqueeze(2), cxcywh_to_xyxy(t_boxes).unsqueeze(1))
        w = self.weights
        return w['class'] * cls + w['bbox'] * l1 + w['giou'] * g

    def aligned(self, s_logits: paddle.Tensor, s_boxes: paddle.Tensor, t_logits: paddle.Tensor,
                t_boxes: paddle.Tensor, relative: bool = False) -> Dict[str, paddle.Tensor]:
        """Query ``i`` of the student against query ``i`` of the teacher (``[..., K, C|4]`` each): ``{'class',
        'bbox', 'giou'}``, each weighted, ``[..., K]``. ``relative``: the class term minus its value at
        ``s = t`` (the teacher's binary entropy), i.e. the binary KL ``sum_c KL(sigmoid(t_c) || sigmoid(s_c))``,
        0 when the student's logits equal the teacher's (same gradient as the BCE)."""
        w = self.weights
        p = F.sigmoid(t_logits)
        cls = soft_bce(s_logits, p) - soft_bce(t_logits, p) if relative else soft_bce(s_logits, p)
        return {'class': w['class'] * cls.sum(-1),
                'bbox': w['bbox'] * (s_boxes - t_boxes).abs().sum(-1),
                'giou': w['giou'] * (1.0 - giou(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes)))}


class DecoderKDLoss(DistillLoss):
    """Common base of the DETR decoder losses (not registered itself): the shape checks, the layer map, the
    weighted :class:`QueryTerms`, and a forward that sums a subclass's :meth:`layer_terms` over the layer
    pairs on the matching queries.

    Args:
        student_shapes, teacher_shapes: probe shapes per name (``boxes`` ``[L, 1, Q, 4]``, ``logits``
            ``[L, 1, Q, C]``), filled in by the distiller; equal class counts.
        layers: ``[[teacher layer, student layer], ...]``; default the last ``min(Ls, Lt)`` layers aligned.
        class_weight, bbox_weight, giou_weight: ``w_cls``, ``w_l1``, ``w_giou``.
    """

    whole_output = True
    tensor_names = ('boxes', 'logits')

    def __init__(self, student_shapes: Dict[str, Shape], teacher_shapes: Dict[str, Shape],
                 layers: Optional[Sequence[Sequence[int]]] = None, class_weight: float = 1.0,
                 bbox_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__()
        name = type(self).__name__
        ls, self.student_queries, cs = decoder_shapes(student_shapes, 'student', name)
        lt, self.teacher_queries, ct = decoder_shapes(teacher_shapes, 'teacher', name)
        if cs != ct:
            raise PPDistillError(f'{name} compares class scores one by one: student {cs} and teacher {ct} classes '
                                 'differ')
        self.num_classes = cs
        self.probed_layers = (lt, ls)  # (teacher, student): layers are indexed from the last (module docstring)
        self.layers = layer_map(layers, ls, lt, name)
        self.terms = QueryTerms(class_weight, bbox_weight, giou_weight, name)

    def layer_terms(self, s_logits: paddle.Tensor, s_boxes: paddle.Tensor, t_logits: paddle.Tensor,
                    t_boxes: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        """One layer pair's ``{'class', 'bbox', 'giou'}`` scalars from ``[N, Qs, C|4]`` student and ``[N, Qt,
        C|4]`` teacher (detached) tensors."""
        raise NotImplementedError

    def forward(self, student: Dict[str, paddle.Tensor], teacher: Dict[str, paddle.Tensor],
                inputs: Optional[dict] = None) -> Dict[str, paddle.Tensor]:
        """``{'class', 'bbox', 'giou'}``: each weighted term of :meth:`layer_terms`, summed over the layer pairs
        (indexed from the last layer of each side's outputs: the student's training forward may return more
        layers than its probe)."""
        s_boxes, s_logits, t_boxes, t_logits = decoder_sides(student, teacher, self.student_queries,
                                                             self.teacher_queries)
        total = {k: paddle.zeros([]) for k in ('class', 'bbox', 'giou')}
        t_count, s_count = self.probed_layers
        for lt, ls in self.layers:
            lt, ls = lt - t_count, ls - s_count
            terms = self.layer_terms(s_logits[ls], s_boxes[ls], t_logits[lt], t_boxes[lt])
            total = {k: total[k] + terms[k] for k in total}
        return total

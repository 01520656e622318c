"""Tap-name tables per architecture.

A preset maps a *role* (what a loss distills, e.g. ``fpn``) to the exact sublayer name whose output
provides it in that architecture, plus the sublayer prefixes MGD's ``init_student`` may copy from the
teacher. Supporting a new architecture means adding a row here — never a branch in the distiller.
Roles resolve to a list of per-level tensors (see :mod:`ppdistill.taps`).

A head row may name ``cross_cut``: the per-level sublayer after which CrossKD runs the teacher's remaining
head on the student's features (a loss entry's ``cross: {student: cross_cut}``); whatever the head computes
from that sublayer's output on is the teacher tail, so no tail code is written per head. A row whose head
has no valid cut says why in ``no_cross_cut``, and a ``cross:`` entry on such a model is a build error.

A row serves the architecture named by its key, or those listed in ``architectures``; a row with
``head: {sublayer: class name}`` serves them only when the model's sublayer has that class (PP-YOLOE+
configs say ``architecture: YOLOv3`` with a ``PPYOLOEHead``). :func:`select_preset` picks the row: a
matching ``head`` row first, else the architecture's plain row.

A row with ``fixed_eval_size`` (what the model fixes) is for a model whose eval mode, where teachers run, only
takes the config's ``eval_size`` when one is set: a student trained at other sizes is a build error.

Head rows also say where the student head's label assignment comes from (``assignment``), which the
head-KD losses need for ``N_pos`` and LD's main region (:mod:`ppdistill.losses.dense_head`): ``taps``
are the assigner sublayers (only the one that runs in a step fires: the static ATSS assigner for the
first ``static_assigner_epoch`` epochs, then the task-aligned one); ``inputs`` are batch keys written
by the reader (GFL's ``Gt2GFLTarget``).
"""
from typing import Dict, List, Optional

import paddle.nn as nn

__all__ = ['PRESETS', 'LOGIT_ROLES', 'resolve_tap', 'init_prefixes', 'select_preset']

# Roles whose tensors are raw logits compared element by element, one tensor per level: a loss on them
# gets no align conv (a conv would remix classes or bins), so student and teacher need equal channels.
LOGIT_ROLES = frozenset({'cls_logits', 'dfl_logits'})

PRESETS: Dict[str, dict] = {
    # ppdet FPN forward returns [P3..P7] (5 levels, strides 8..128). RetinaHead.retina_cls is one conv
    # shared by all levels (called once per level): logits [N, A*C, H, W], channel a*C + c.
    'RetinaNet': {'taps': {'fpn': 'neck', 'cls_logits': 'head.retina_cls'},
                  'init_student': ['neck', 'head']},
    # ppdet LCPAN forward returns 3 or 4 levels (strides 8..64). PicoHeadV2 has one 1x1 class conv per
    # level, head.head_cls_list.<i>: logits [N, C, H, W] (before the sigmoid and the cls_align quality;
    # PicoHead v1 with share_cls_reg puts box outputs in the same conv: name its taps explicitly).
    # head.head_reg_list.<i>: DFL logits [N, 4*(reg_max+1), H, W] (reg_max 7), channel side*(n+1)+bin, sides
    # l, t, r, b; levels fine -> coarse. The cls_align.<i> quality map [N, 1, H, W] multiplies into the score.
    # CrossKD cut: PicoFeat's per-level SE conv+BN head.conv_feat.se.<i> (before its activation), the one
    # input of both predictors; the teacher's tail after it is the activation and head_cls/head_reg_list.<i>.
    'PicoDet': {'taps': {'fpn': 'neck', 'cls_logits': 'head.head_cls_list.*', 'dfl_logits': 'head.head_reg_list.*',
                         'quality_logits': 'head.cls_align.*', 'cross_cut': 'head.conv_feat.se.*'},
                'assignment': {'taps': ['head.static_assigner', 'head.assigner']},
                'init_student': ['neck', 'head']},
    # ppdet GFLHead: gfl_head_cls is shared by all levels (one call per level): logits [N, C, H, W]; the DFL
    # logits are the per-level ScaleReg outputs p3_feat..p7_feat [N, 4*(reg_max+1), H, W] (reg_max 16;
    # gfl_head_reg is *before* the scale). Levels 8..128, fine -> coarse. Assignment: the reader's
    # Gt2GFLTarget (labels == num_classes is background, pos_num per image).
    'GFL': {'taps': {'fpn': 'neck', 'cls_logits': 'head.gfl_head_cls', 'dfl_logits': 'head.p*_feat'},
            'assignment': {'inputs': {'labels': 'labels', 'num_pos': 'pos_num'}},
            'init_student': ['neck', 'head']},
    # ppdet PPYOLOEHead (architecture PPYOLOE, YOLOv3 in the PP-YOLOE(+) base configs, PPYOLOEWithAuxHead for
    # PP-YOLOE+ t, whose aux head is not distilled): per level
    # yolo_head.pred_cls.<i> -> logits [N, C, H, W] and pred_reg.<i> -> DFL logits [N, 4*(reg_max+1), H, W]
    # (reg_max 16). Levels are coarse -> fine (strides 32, 16, 8): pair by stride, never by index.
    # No CrossKD cut: the class predictor reads stem_cls.<i>(feat) + feat, a sum that no sublayer returns, so a
    # cut at the stems would run the teacher's predictor on the student's stem plus the teacher's own neck
    # feature; the head's per-level inputs come from different neck sublayers (pan_stages.<j>,
    # fpn_stages.<last>) that also feed each other.
    'PPYOLOE': {'architectures': ['PPYOLOE', 'YOLOv3', 'PPYOLOEWithAuxHead'], 'head': {'yolo_head': 'PPYOLOEHead'},
                'taps': {'fpn': 'neck', 'cls_logits': 'yolo_head.pred_cls.*', 'dfl_logits': 'yolo_head.pred_reg.*'},
                'assignment': {'taps': ['yolo_head.static_assigner', 'yolo_head.assigner']},
                'no_cross_cut': "PPYOLOEHead's class predictor reads stem_cls(feat) + feat, a sum no sublayer "
                                "returns: a cut at the stems would leave the teacher's own neck feature in the "
                                'crossed class logits, and no per-level sublayer returns the head input (docs/'
                                'methods.md, CrossKD)',
                'init_student': ['neck', 'yolo_head']},
    # ppdet FCOS (FCOSHead): fcos_head_cls, fcos_head_centerness are shared by all levels (one call per level):
    # class logits [N, C, H, W] and centerness logits [N, 1, H, W]; the box outputs are the per-level ScaleReg
    # outputs p3_feat.. [N, 4, H, W], raw (l, t, r, b) before the head's relu (norm_reg_targets; else exp)
    # (BoxKDLoss box_coder: ltrb). Levels 8..128, fine -> coarse. Assignment: the reader's Gt2FCOSTarget,
    # labels0, labels1, ... per level [N, H, W, 1], class + 1 at positives, 0 the background.
    'FCOS': {'taps': {'fpn': 'neck', 'cls_logits': 'fcos_head.fcos_head_cls', 'box_reg': 'fcos_head.p*_feat',
                      'quality_logits': 'fcos_head.fcos_head_centerness'},
             'assignment': {'inputs': {'labels': 'labels*', 'background': 0}},
             'init_student': ['neck', 'fcos_head']},
    # ppdet SSD: the backbone's multi-scale maps feed SSDHead directly (no neck); per level i the head has
    # `scores{i}` -> [N, A*(C+1), H, W] confidence logits (background included) and `boxes{i}` ->
    # [N, A*4, H, W] prior-box offsets.
    'SSD': {'taps': {'fpn': 'backbone', 'cls_logits': 'ssd_head.scores*', 'box_reg': 'ssd_head.boxes*'},
            'init_student': ['ssd_head']},
    # ppdet DETR with a DINOTransformer (DINO; RT-DETR is the next row). fpn: the encoder's output memory
    # [N, sum_l H_l*W_l, D] laid out on the levels of the input projections transformer.input_proj.<l>
    # ([N, D, H_l, W_l], strides of the backbone maps, plus stride-2 extra levels when num_levels exceeds
    # them), i.e. per level [N, D, H_l, W_l] encoder features
    # (taps.sequence_maps). The transformer returns (boxes [L, N, Ndn+Q, 4] sigmoid cxcywh, logits
    # [L, N, Ndn+Q, C], enc_topk_boxes, enc_topk_logits, dn_meta): decoder_boxes/decoder_logits are items 0/1
    # (denoising queries first in training). encoder_scores: enc_score_head [N, P, C] class logits of every
    # encoder position; encoder_boxes: enc_bbox_head [N, P, 4], the box offsets added to the positions' anchors
    # (inverse-sigmoid space). Their top-Q positions by max_c are the decoder's queries.
    'DINO': {'architectures': ['DETR'], 'head': {'transformer': 'DINOTransformer'},
             'taps': {'fpn': 'transformer.encoder@transformer.input_proj.*',
                      'decoder_boxes': 'transformer[0]', 'decoder_logits': 'transformer[1]',
                      'encoder_scores': 'transformer.enc_score_head', 'encoder_boxes': 'transformer.enc_bbox_head'},
             'init_student': ['transformer']},
    # RT-DETR: PaddleDetection develop's DETR with an RTDETRTransformer (neck HybridEncoder, head DINOHead; not
    # in the 2.6.0 wheel). fpn: the HybridEncoder's outputs, per level [N, D, H_l, W_l] (strides 8/16/32, fine ->
    # coarse), which the transformer's input_proj flattens into the decoder's memory (its own encoder is the
    # neck). The transformer returns DINO's tuple (boxes [L, N, Ndn+Q, 4] sigmoid cxcywh, logits [L, N, Ndn+Q,
    # C], enc_topk_boxes, enc_topk_logits, dn_meta; denoising queries first in training), except that in eval
    # mode L is 1: only the decoder layer eval_idx (the decoder losses count layers from the last,
    # losses/query_kd.py). encoder_scores/encoder_boxes: enc_score_head [N, P, C] and enc_bbox_head [N, P, 4]
    # on every memory position, the latter added to the positions' anchors (inverse-sigmoid space), as DINO's.
    'RTDETR': {'architectures': ['DETR'], 'head': {'transformer': 'RTDETRTransformer'},
               'taps': {'fpn': 'neck',
                        'decoder_boxes': 'transformer[0]', 'decoder_logits': 'transformer[1]',
                        'encoder_scores': 'transformer.enc_score_head', 'encoder_boxes': 'transformer.enc_bbox_head'},
               'fixed_eval_size': "the encoder's position embedding and the decoder's anchors",
               'init_student': ['neck', 'transformer']},
    # ppdet YOLOv3 (also PP-YOLO/v2): YOLOv3FPN returns 3 levels (strides 32, 16, 8); per level the head's
    # 1x1 conv `yolo_output.{i}` -> [N, A*(5+C), H, W] raw (x, y, w, h, objectness, classes) per anchor.
    'YOLOv3': {'taps': {'fpn': 'neck', 'yolo_output': 'yolo_head.yolo_output.*'},
               'init_student': ['neck', 'yolo_head']},
}


def resolve_tap(spec: str, preset: dict, arch: str = '') -> str:
    """A loss entry's ``student``/``teacher`` value: a preset role, or else an exact sublayer name."""
    roles = preset.get('taps', {})
    if spec in roles:
        return roles[spec]
    if any(spec in p['taps'] for p in PRESETS.values()):
        if preset.get('unmatched'):
            raise KeyError(f"'{spec}' is a preset role but {preset['unmatched']}")
        known = (f"its preset has {', '.join(roles)}" if roles else
                 f"it has no preset row (presets: {', '.join(sorted(PRESETS))})")
        raise KeyError(f"'{spec}' is a preset role but architecture '{arch}' has no preset for it ({known}); name "
                       'the sublayer instead (e.g. student: neck), or add the role to its row in ppdistill/presets.py')
    return spec


def init_prefixes(preset: dict) -> List[str]:
    return list(preset.get('init_student', []))


def _head_matches(row: dict, model: Optional[nn.Layer]) -> bool:
    if model is None:
        return False
    layers = dict(model.named_sublayers())
    return all(name in layers and type(layers[name]).__name__ == cls for name, cls in row['head'].items())


def select_preset(arch: str, model: Optional[nn.Layer] = None) -> dict:
    """The preset row of architecture ``arch`` for ``model``: a row whose ``head`` classes the model has
    wins over the architecture's plain row; ``{}`` if none serves ``arch``, or ``{'unmatched': why}`` when
    rows serve ``arch`` only for other head classes (DETR with another transformer than DINO's)."""
    rows = [row for key, row in PRESETS.items() if arch in row.get('architectures', [key])]
    for row in rows:
        if 'head' in row and _head_matches(row, model):
            return row
    plain = [row for row in rows if 'head' not in row]
    if plain or not rows:
        return plain[0] if plain else {}
    layers = dict(model.named_sublayers()) if model is not None else {}
    wanted = '; '.join(', '.join(f'{name}: {cls}' for name, cls in row['head'].items()) for row in rows)
    has = ', '.join(f"{name}: {type(layers[name]).__name__ if name in layers else 'none'}"
                    for name in dict.fromkeys(n for row in rows for n in row['head']))
    return {'unmatched': f"architecture '{arch}' has presets only for models with {wanted}, and this one has "
                         f'{has} (whose outputs the preset taps do not describe); name the sublayers instead'}

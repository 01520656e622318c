"""Tap-name tables per architecture.

A preset maps a *role* (what a loss distills, e.g. ``fpn``) to the exact sublayer name whose output
provides it in that architecture, plus the sublayer prefixes MGD's ``init_student`` may copy from the
teacher. Supporting a new architecture means adding a row here — never a branch in the distiller.
Roles resolve to a list of per-level tensors (see :mod:`ppdistill.taps`).
"""
from typing import Dict, List

__all__ = ['PRESETS', 'LOGIT_ROLES', 'resolve_tap', 'init_prefixes']

# Roles whose tensors are raw class logits, one tensor per level: a loss on them gets no align conv (a
# conv would remix classes), so student and teacher need equal channels (anchors x classes).
LOGIT_ROLES = frozenset({'cls_logits'})

PRESETS: Dict[str, dict] = {
    # ppdet FPN forward returns [P3..P7] (5 levels, strides 8..128). RetinaHead.retina_cls is one conv
    # shared by all levels (called once per level): logits [N, A*C, H, W], channel a*C + c.
    'RetinaNet': {'taps': {'fpn': 'neck', 'cls_logits': 'head.retina_cls'},
                  'init_student': ['neck', 'head']},
    # ppdet LCPAN forward returns 3 or 4 levels (strides 8..64). PicoHeadV2 has one 1x1 class conv per
    # level, head.head_cls_list.<i>: logits [N, C, H, W] (before the sigmoid and the cls_align quality;
    # PicoHead v1 with share_cls_reg puts box outputs in the same conv: name its taps explicitly).
    'PicoDet': {'taps': {'fpn': 'neck', 'cls_logits': 'head.head_cls_list.*'},
                'init_student': ['neck', 'head']},
    # ppdet SSD: the backbone's multi-scale maps feed SSDHead directly (no neck); per level i the head has
    # `scores{i}` -> [N, A*(C+1), H, W] confidence logits (background included) and `boxes{i}` ->
    # [N, A*4, H, W] prior-box offsets.
    'SSD': {'taps': {'fpn': 'backbone', 'cls_logits': 'ssd_head.scores*', 'box_reg': 'ssd_head.boxes*'},
            'init_student': ['ssd_head']},
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
        raise KeyError(f"'{spec}' is a preset role but architecture '{arch}' has no preset for it (presets: "
                       f"{', '.join(sorted(PRESETS))}); name the sublayer instead (e.g. student: neck)")
    return spec


def init_prefixes(preset: dict) -> List[str]:
    return list(preset.get('init_student', []))

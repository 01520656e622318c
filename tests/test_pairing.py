"""Levels pair by their actual stride (input size / feature size with the ceil rule of stride-2 convs)."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import math

import pytest
from ppdet.core.workspace import merge_config

from ppdistill import Distiller
from ppdistill.config_scope import create_fresh, isolated_scope
from ppdistill.pairing import PairingError, pair_levels


def ceil_chain(size, strides, channels=8):
    """Feature shapes of stride-2 conv stages (``ceil``) at the given strides."""
    return [(1, channels, math.ceil(size / s), math.ceil(size / s)) for s in strides]


# ppdet configs/ssd/_base_/ssd_mobilenet_v1_300.yml: MobileNetV1 feature maps 11 and 13 plus four extra
# blocks -> 19, 10, 5, 3, 2, 1 at 300 px.
SSD300 = {
    'architecture': 'SSD', 'num_classes': 20,
    'SSD': {'backbone': 'MobileNet', 'ssd_head': 'SSDHead', 'post_process': 'BBoxPostProcess'},
    'MobileNet': {'norm_decay': 0., 'scale': 1.0, 'conv_learning_rate': 0.1, 'with_extra_blocks': True,
                  'extra_block_filters': [[256, 512], [128, 256], [128, 256], [64, 128]],
                  'feature_maps': [11, 13, 14, 15, 16, 17]},
    'SSDHead': {'anchor_generator': {
        'steps': [0, 0, 0, 0, 0, 0], 'aspect_ratios': [[2.], [2., 3.], [2., 3.], [2., 3.], [2., 3.], [2., 3.]],
        'min_ratio': 20, 'max_ratio': 90, 'base_size': 300,
        'min_sizes': [60.0, 105.0, 150.0, 195.0, 240.0, 285.0],
        'max_sizes': [[], 150.0, 195.0, 240.0, 285.0, 300.0], 'offset': 0.5, 'flip': True,
        'min_max_aspect_ratios_order': False}},
    'BBoxPostProcess': {'decode': {'name': 'SSDBox'},
                        'nms': {'name': 'MultiClassNMS', 'keep_top_k': 200, 'score_threshold': 0.01,
                                'nms_threshold': 0.45, 'nms_top_k': 400, 'nms_eta': 1.0}},
}


def test_stock_ssd300_six_levels_pair_one_to_one():
    """3x3 and 2x2 (strides 128 and 256) used to share a rounded-log2 key: student level 4 took teacher
    level 3 and teacher level 4 was never used."""
    with isolated_scope():
        merge_config(SSD300)
        student, teacher = create_fresh('SSD'), create_fresh('SSD')
    d = Distiller(student_model=student, teacher_model=teacher, student_arch='SSD', teacher_arch='SSD',
                  probe_size=300, losses=[{'type': 'SSDOutputLoss',
                                           'student': {'conf': 'cls_logits', 'loc': 'box_reg'}}])
    assert [t.pair.student_shape[2] for t in d._terms] == [19, 10, 5, 3, 2, 1]
    assert [(t.pair.student_level, t.pair.teacher_level) for t in d._terms] == [(i, i) for i in range(6)]


def test_pairing_uses_strides_not_rounded_ratios():
    strides = [16, 32, 64, 128, 256, 512]
    shapes = ceil_chain(300, strides)
    assert [s[2] for s in shapes] == [19, 10, 5, 3, 2, 1]
    pairs = pair_levels(shapes, shapes, 300)
    assert [(p.student_level, p.teacher_level) for p in pairs] == [(i, i) for i in range(6)]
    # a student without the stride-128 level: its 2x2 level pairs with the teacher's 2x2, not the 3x3
    student = [s for s, stride in zip(shapes, strides) if stride != 128]
    pairs = pair_levels(student, shapes, 300)
    assert [(p.student_level, p.teacher_level) for p in pairs] == [(0, 0), (1, 1), (2, 2), (3, 4), (4, 5)]
    with pytest.raises(PairingError, match=r'student level 3 .* has no teacher level'):
        pair_levels(shapes, student, 300, levels=[3])


def test_existing_architectures_keep_their_pairs():
    # RetinaNet P3-P7 (5 levels) teacher, PicoDet 4-level and YOLOv3 3-level (strides 32, 16, 8) students
    retina = ceil_chain(320, [8, 16, 32, 64, 128])
    pico = ceil_chain(320, [8, 16, 32, 64])
    yolo = ceil_chain(320, [32, 16, 8])
    assert [(p.student_level, p.teacher_level) for p in pair_levels(pico, retina, 320)] == [(i, i) for i in range(4)]
    assert [(p.student_level, p.teacher_level) for p in pair_levels(yolo, retina, 320)] == [(0, 2), (1, 1), (2, 0)]
    # pooling (floor) and stride-2 convs (ceil) of one stride pair: 300 px, stride 16 -> 18 or 19
    assert [(p.student_level, p.teacher_level)
            for p in pair_levels([(1, 4, 18, 18)], [(1, 4, 19, 19)], 300)] == [(0, 0)]


def test_two_levels_of_one_model_with_one_stride_are_an_error():
    # at a 64 px probe, RetinaNet's P6 and P7 are both 1x1
    retina = ceil_chain(64, [8, 16, 32, 64, 128])
    assert retina[-1][2] == retina[-2][2] == 1
    with pytest.raises(PairingError, match=r'teacher levels 3 .* and 4 .* same stride 64 at probe size 64.*probe_size'):
        pair_levels(ceil_chain(64, [8, 16]), retina, 64, what='x')
    with pytest.raises(PairingError, match='student levels 3'):
        pair_levels(retina, ceil_chain(64, [8, 16]), 64, what='x')


def test_student_levels_left_out_by_default_are_named_in_a_warning(caplog):
    import logging
    logger = logging.getLogger('ppdistill.pairing')
    logger.addHandler(caplog.handler)
    try:
        pairs = pair_levels(ceil_chain(320, [8, 16, 32, 64, 128]), ceil_chain(320, [8, 16, 32]), 320, what='x')
        assert [(p.student_level, p.teacher_level) for p in pairs] == [(0, 0), (1, 1), (2, 2)]
        pair_levels(ceil_chain(320, [8, 16]), ceil_chain(320, [8, 16, 32]), 320, what='y')
        pair_levels(ceil_chain(320, [8, 16, 32]), ceil_chain(320, [8]), 320, levels=[0], what='z')
    finally:
        logger.removeHandler(caplog.handler)
    found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(found) == 1 and found[0].startswith('x: student level(s) [3, 4]') and 'levels: [0, 1, 2]' in found[0]

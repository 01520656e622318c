"""Head presets (GFL, PicoDet, PP-YOLOE(+)) against real ppdet 2.6.0 models built from ppdet configs
(the upstream base configs' model sections at tiny widths): every role names sublayers that exist and
give per-level class logits [N, C, H, W] and DFL logits [N, 4*(reg_max+1), H, W] at the head's strides,
and a PP-YOLOE(+) config whose architecture is YOLOv3 selects the PP-YOLOE row."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import paddle
import pytest

from ppdistill.build import build_teacher
from ppdistill.pairing import probe_shapes
from ppdistill.presets import PRESETS, select_preset
from ppdistill.taps import TapSet, find_sublayer
from conftest import needs_ppdet_heads_on_this_paddle

PPYOLOE_MODEL = """
num_classes: 4
norm_type: bn
depth_mult: 0.33
width_mult: 0.125
{arch}:
  backbone: CSPResNet
  neck: CustomCSPPAN
  yolo_head: PPYOLOEHead
  post_process: ~
CSPResNet:
  layers: [3, 6, 6, 3]
  channels: [64, 128, 256, 512, 1024]
  return_idx: [1, 2, 3]
  use_large_stem: True
  use_alpha: True
CustomCSPPAN:
  out_channels: [768, 384, 192]
  stage_num: 1
  block_num: 3
  act: 'swish'
  spp: true
PPYOLOEHead:
  fpn_strides: [32, 16, 8]
  grid_cell_scale: 5.0
  grid_cell_offset: 0.5
  static_assigner_epoch: 30
  use_varifocal_loss: True
  loss_weight: {{class: 1.0, iou: 2.5, dfl: 0.5}}
  static_assigner: {{name: ATSSAssigner, topk: 9}}
  assigner: {{name: TaskAlignedAssigner, topk: 13, alpha: 1.0, beta: 6.0}}
  nms: {{name: MultiClassNMS, nms_top_k: 100, keep_top_k: 10, score_threshold: 0.01, nms_threshold: 0.7}}
"""

GFL_MODEL = """
architecture: GFL
num_classes: 4
GFL:
  backbone: ResNet
  neck: FPN
  head: GFLHead
ResNet:
  depth: 18
  variant: b
  norm_type: bn
  freeze_at: 0
  return_idx: [1, 2, 3]
  num_stages: 4
FPN:
  out_channel: 16
  spatial_scales: [0.125, 0.0625, 0.03125]
  extra_stage: 2
  has_extra_convs: true
  use_c5: false
GFLHead:
  conv_feat: {name: FCOSFeat, feat_in: 16, feat_out: 16, num_convs: 2, norm_type: bn, use_dcn: false}
  fpn_stride: [8, 16, 32, 64, 128]
  prior_prob: 0.01
  reg_max: 16
  feat_in_chan: 16
  loss_class: {name: QualityFocalLoss, use_sigmoid: True, beta: 2.0, loss_weight: 1.0}
  loss_dfl: {name: DistributionFocalLoss, loss_weight: 0.25}
  loss_bbox: {name: GIoULoss, loss_weight: 2.0}
  nms: {name: MultiClassNMS, nms_top_k: 100, keep_top_k: 10, score_threshold: 0.025, nms_threshold: 0.6}
"""

AUX_HEAD = """
SimpleConvHead:
  feat_in: 96
  feat_out: 96
  num_convs: 1
  fpn_strides: [32, 16, 8]
  norm_type: 'gn'
  act: 'LeakyReLU'
  reg_max: 16
"""

SIZE = 128


def ppyoloe_t_aux() -> str:
    """PP-YOLOE+ t's model section (PPYOLOEWithAuxHead: equal neck widths, an aux head on both necks)."""
    return ('architecture: PPYOLOEWithAuxHead\n' + PPYOLOE_MODEL.format(arch='PPYOLOEWithAuxHead').replace(
        '  yolo_head: PPYOLOEHead\n', '  yolo_head: PPYOLOEHead\n  aux_head: SimpleConvHead\n').replace(
        'out_channels: [768, 384, 192]', 'out_channels: [384, 384, 384]') + AUX_HEAD)


def build(tmp_path, name, text):
    path = tmp_path / f'{name}.yml'
    path.write_text(text)
    return build_teacher(str(path), None, allow_random=True)


def models(tmp_path):
    """(config name, model, architecture, expected row, classes, reg_max, strides in level order)."""
    for arch in ('YOLOv3', 'PPYOLOE'):  # PP-YOLOE+ base configs say YOLOv3, the distill students PPYOLOE
        text = f'architecture: {arch}\n' + PPYOLOE_MODEL.format(arch=arch)
        yield (f'PP-YOLOE (architecture: {arch})',) + build(tmp_path, arch, text) + ('PPYOLOE', 4, 16, [32, 16, 8])
    yield ('PP-YOLOE+ t (PPYOLOEWithAuxHead)',) + build(tmp_path, 'ppyoloe_t', ppyoloe_t_aux()) + (
        'PPYOLOE', 4, 16, [32, 16, 8])
    yield ('GFL',) + build(tmp_path, 'gfl', GFL_MODEL) + ('GFL', 4, 16, [8, 16, 32, 64, 128])
    yield ('PicoDet demo',) + build_teacher('configs/demo/tiny/picodet_teacher.yml', None, allow_random=True) + (
        'PicoDet', 10, 7, [8, 16, 32])


def test_head_rows_name_real_sublayers_with_the_documented_shapes(tmp_path):
    for what, model, arch, row, classes, reg_max, strides in models(tmp_path):
        preset = select_preset(arch, model)
        assert preset is PRESETS[row], what
        taps = preset['taps']
        tapset = TapSet(model, [taps['cls_logits'], taps['dfl_logits']])
        shapes = probe_shapes(model, tapset, SIZE)
        cls, dfl = shapes[taps['cls_logits']], shapes[taps['dfl_logits']]
        assert [s[1] for s in cls] == [classes] * len(strides), what
        assert [s[1] for s in dfl] == [4 * (reg_max + 1)] * len(strides), what
        assert [SIZE // s[2] for s in cls] == strides and [SIZE // s[2] for s in dfl] == strides, what
        for name in preset['assignment'].get('taps', []):
            find_sublayer(model, name)  # raises if the assigner sublayer is missing
        tapset.remove()


def test_yolov3_head_keeps_the_yolov3_row():
    model, arch = build_teacher('configs/demo/tiny/yolov3_teacher.yml', None, allow_random=True)
    assert arch == 'YOLOv3' and select_preset(arch, model) is PRESETS['YOLOv3']
    assert select_preset('YOLOv3') is PRESETS['YOLOv3']  # no model: the architecture's plain row
    assert select_preset('NoSuchArch') == {}


def check_assignment_taps(model, arch, inputs, epochs, classes):
    """In a training forward exactly one of the row's assignment taps fires (ATSS before
    static_assigner_epoch, task-aligned after), giving (labels [N, A], boxes [N, A, 4], scores [N, A, C], ...)
    with A = the sum of the levels' H*W in head order and label C = background: what the distiller reads for
    N_pos and LD's main region (ppdet 2.6.0 adds the positive mask [N, G, A]; PaddleDetection develop's
    assigners return the first three)."""
    preset = select_preset(arch, model)
    static, dynamic = preset['assignment']['taps']
    taps = TapSet(model, [static, dynamic, preset['taps']['cls_logits']])
    model.train()
    for epoch, fired, silent in ((epochs[0], static, dynamic), (epochs[1], dynamic, static)):
        with taps.record():
            model(dict(inputs, epoch_id=epoch))
        assert taps.taps[silent].calls == []
        out, = taps.taps[fired].calls
        labels, boxes, scores = out[:3]
        anchors = sum(int(t.shape[2] * t.shape[3]) for t in taps.levels(preset['taps']['cls_logits']))
        assert list(labels.shape) == [2, anchors] and list(scores.shape) == [2, anchors, classes]
        assert list(boxes.shape) == [2, anchors, 4]
        assert len(out) == 3 or list(out[3].shape) == [2, 2, anchors]
        positive = labels.numpy() != classes
        assert positive.any() and (scores.numpy().sum(-1)[~positive] == 0).all()
    taps.remove()


@needs_ppdet_heads_on_this_paddle
def test_ppyoloe_assignment_taps_fire_in_training_one_assigner_per_step(tmp_path):
    model, arch = build(tmp_path, 'ppyoloe_train', 'architecture: YOLOv3\n' + PPYOLOE_MODEL.format(arch='YOLOv3'))
    check_assignment_taps(model, arch, picodet_batch(SIZE), (0, 40), 4)  # static_assigner_epoch 30


@needs_ppdet_heads_on_this_paddle
def test_picodet_assignment_taps_fire_in_training_one_assigner_per_step():
    model, arch = build_teacher('configs/demo/tiny/picodet_student.yml', None, allow_random=True)
    check_assignment_taps(model, arch, picodet_batch(), (0, 5), 10)  # static_assigner_epoch 1


def picodet_batch(size=96):
    """A training batch of two images (one padded GT row), as ppdet's PadGT reader gives it."""
    return {'image': paddle.rand([2, 3, size, size]), 'im_shape': paddle.to_tensor([[size, size]] * 2, 'float32'),
            'scale_factor': paddle.ones([2, 2]), 'gt_class': paddle.to_tensor([[[1], [0]], [[2], [3]]], dtype='int32'),
            'gt_bbox': paddle.to_tensor([[[10., 10., 60., 70.], [0., 0., 0., 0.]],
                                         [[30., 20., 90., 90.], [5., 40., 40., 90.]]]),
            'pad_gt_mask': paddle.to_tensor([[[1.], [0.]], [[1.], [1.]]]), 'epoch_id': 0,
            'im_id': paddle.to_tensor([[0], [1]])}


@needs_ppdet_heads_on_this_paddle
def test_head_losses_train_in_the_distiller_on_the_picodet_pair():
    """What runs with today's distiller (no assignment feed): BinaryKD and BoxKD with normalisers that
    need no assignment, and LD's VLR term, on the preset roles, one term per level; the student gets
    their gradient."""
    from ppdistill import Distiller
    teacher, _ = build_teacher('configs/demo/tiny/picodet_teacher.yml', None, allow_random=True)
    student, _ = build_teacher('configs/demo/tiny/picodet_student.yml', None, allow_random=True)
    head = {'cls': 'cls_logits', 'reg': 'dfl_logits'}
    losses = [{'type': 'BinaryKDLoss', 'student': 'cls_logits', 'args': {'normalize': 'locations'}},
              {'type': 'BoxKDLoss', 'student': head, 'args': {'normalize': 'weights'}},
              {'type': 'LDLoss', 'student': head, 'args': {'ld_weight': 0.0, 'strides': [8, 16, 32],
                                                           'grid_cell_scale': 5.0, 'cell_offset': 0.5}}]
    d = Distiller(student_model=student, teacher_model=teacher, student_arch='PicoDet', teacher_arch='PicoDet',
                  losses=losses, probe_size=96)
    d.train()
    out = d(picodet_batch())
    for name in ('binarykd', 'boxkd', 'ld'):
        values = [float(out[f'distill_{name}_l{i}']) for i in range(3)]
        assert all(v == v and v >= 0 for v in values) and sum(values) > 0, (name, values)
    assert 'distill_ld_l0_vlr' in out
    out['distill_loss'].backward()  # the distill terms alone reach the student's class and DFL convs
    for prefix in ('head.head_cls_list.0.', 'head.head_reg_list.2.'):
        grads = [p.grad for n, p in student.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads), prefix


@needs_ppdet_heads_on_this_paddle
def test_distiller_selects_the_ppyoloe_row_for_a_yolov3_architecture_and_feeds_its_assignment(tmp_path):
    """A PP-YOLOE+ config (architecture YOLOv3, PPYOLOEHead): the roles resolve to the PP-YOLOE head's
    sublayers, and the losses reading the assignment get it per level (coarse -> fine, head order)."""
    from ppdistill import Distiller
    text = 'architecture: YOLOv3\n' + PPYOLOE_MODEL.format(arch='YOLOv3')
    student, arch = build(tmp_path, 'student', text)
    teacher, _ = build(tmp_path, 'teacher', text)
    head = {'cls': 'cls_logits', 'reg': 'dfl_logits'}
    d = Distiller(student_model=student, teacher_model=teacher, student_arch=arch, teacher_arch=arch,
                  losses=[{'type': 'BinaryKDLoss', 'student': 'cls_logits'},
                          {'type': 'LDLoss', 'student': head, 'args': {'vlr_weight': 0.0}}], probe_size=SIZE)
    d.train()
    seen = d.inspect(dict(picodet_batch(SIZE), epoch_id=0))
    assert set(seen.student_taps) == {'yolo_head.pred_cls.*', 'yolo_head.pred_reg.*'}
    pos = [seen.term_inputs[f'distill_ld_l{i}'][0]['pos'] for i in range(3)]
    assert [list(p.shape[2:]) for p in pos] == [[SIZE // s] * 2 for s in (32, 16, 8)]
    num_pos = float(seen.term_inputs['distill_binarykd_l0'][0]['num_pos'])
    assert num_pos == sum(float(p.sum()) for p in pos) > 0

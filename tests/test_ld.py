"""LDLoss vs NumPy references written from the LD equations (the /4 and /16 constants, the 'mean'
option), the VLR mask vs a brute-force loop over images, GTs and anchors, empty images, and parity
with ppdet 2.6.0's own LDGFLHead losses and get_vlr_region on the same tensors."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest

from ppdistill.errors import PPDistillError
from ppdistill.losses import LDLoss
from ppdistill.losses.ld import vlr_weights
from conftest import needs_ppdet_heads_on_this_paddle


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_kl_mean(a, b, temp):
    """T^2 * mean_k q_k (log q_k - log p_k), p = softmax(a/T), q = softmax(b/T)."""
    a, b = np.asarray(a, np.float64) / temp, np.asarray(b, np.float64) / temp
    log_p = a - a.max() - np.log(np.exp(a - a.max()).sum())
    log_q = b - b.max() - np.log(np.exp(b - b.max()).sum())
    return temp ** 2 * np.mean(np.exp(log_q) * (log_q - log_p))


def np_box(a):
    return np.asarray(a, np.float64)


def np_overlaps(a, g, band_overlap):
    """(IoU, DIoU) of one anchor a and one GT g, (x1, y1, x2, y2)."""
    a, g = np_box(a), np_box(g)
    iw = max(0.0, min(a[2], g[2]) - max(a[0], g[0]))
    ih = max(0.0, min(a[3], g[3]) - max(a[1], g[1]))
    inter = iw * ih
    area_a, area_g = (a[2] - a[0]) * (a[3] - a[1]), (g[2] - g[0]) * (g[3] - g[1])
    iou = inter / (area_a + area_g - inter)
    overlap = iou if band_overlap == 'iou' else inter / area_a
    rho2 = ((a[0] + a[2] - g[0] - g[2]) / 2) ** 2 + ((a[1] + a[3] - g[1] - g[3]) / 2) ** 2
    c2 = (max(a[2], g[2]) - min(a[0], g[0])) ** 2 + (max(a[3], g[3]) - min(a[1], g[1])) ** 2
    return iou, overlap - rho2 / c2


def np_anchors(h, w, stride, scale, offset):
    half = scale * stride / 2
    return [((x + offset) * stride - half, (y + offset) * stride - half,
             (x + offset) * stride + half, (y + offset) * stride + half) for y in range(h) for x in range(w)]


def np_vlr(gts, grids, level, scale=8.0, topk=9, offset=0.0, band_overlap='iou'):
    """Brute force, straight from the definition: per image, per GT, per anchor."""
    h, w, stride = grids[level]
    out = np.zeros((len(gts), h * w))
    for b, boxes in enumerate(gts):
        for g in boxes:
            gc = np.array([(g[0] + g[2]) / 2, (g[1] + g[3]) / 2])
            cand = []
            for gh, gw, gs in grids:
                anchors = np_anchors(gh, gw, gs, scale, offset)
                dist = [np.hypot((a[0] + a[2]) / 2 - gc[0], (a[1] + a[3]) / 2 - gc[1]) for a in anchors]
                for i in np.argsort(dist, kind='stable')[:min(topk, len(anchors))]:
                    cand.append(np_overlaps(anchors[i], g, 'iou')[0])
            gamma = np.mean(cand) + np.std(cand, ddof=1)
            for i, a in enumerate(np_anchors(h, w, stride, scale, offset)):
                iou, diou = np_overlaps(a, g, band_overlap)
                if 0.25 * gamma <= diou < gamma:
                    out[b, i] = max(out[b, i], iou)
    return out


def random_gts(rng, n_per_image, size):
    gts = []
    for n in n_per_image:
        xy = rng.uniform(0, size * 0.7, (n, 2))
        wh = rng.uniform(size * 0.08, size * 0.5, (n, 2))
        gts.append(np.concatenate([xy, np.minimum(xy + wh, size - 1)], axis=1).astype('float32'))
    return gts


def padded(gts):
    m = max(len(g) for g in gts)
    boxes = np.zeros((len(gts), max(m, 1), 4), 'float32')
    mask = np.zeros((len(gts), max(m, 1), 1), 'float32')
    for i, g in enumerate(gts):
        boxes[i, :len(g)] = g
        mask[i, :len(g)] = 1
    return boxes, mask


@pytest.mark.parametrize('band_overlap', ['iou', 'iof'])
@pytest.mark.parametrize('offset,scale', [(0.0, 8.0), (0.5, 5.0)])
def test_vlr_matches_brute_force(band_overlap, offset, scale):
    rng = np.random.default_rng(0)
    gts = random_gts(rng, [3, 0, 5], 96)  # an image without boxes in the middle
    boxes, mask = padded(gts)
    valid = paddle.to_tensor(mask[..., 0] > 0)
    grids = [(12, 12, 8.0), (6, 6, 16.0), (3, 3, 32.0)]
    for level in range(3):
        got = vlr_weights(paddle.to_tensor(boxes), valid, grids, level, scale, 9, offset, band_overlap).numpy()
        ref = np_vlr(gts, grids, level, scale, 9, offset, band_overlap)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert (got[1] == 0).all()
    assert sum(np_vlr(gts, grids, lv, scale, 9, offset, band_overlap).astype(bool).sum() for lv in range(3)) > 10


def test_vlr_hand_case():
    """One 16x16 GT on the top-left 2x2 cells of an 8-pixel grid, anchors = the cells (scale 1, centres at
    cell centres), topk 4: the 4 candidates all have IoU 64/256 = 0.25, so gamma = 0.25 + 0; their DIoU
    is 0.25 - (4^2 + 4^2) / (16^2 + 16^2) = 0.1875, inside [0.0625, 0.25): VLR = IoU = 0.25 there only."""
    boxes = paddle.to_tensor([[[0.0, 0.0, 16.0, 16.0]]])
    got = vlr_weights(boxes, paddle.to_tensor([[True]]), [(4, 4, 8.0)], 0, scale=1.0, topk=4, offset=0.5)
    expected = np.zeros((1, 16))
    expected[0, [0, 1, 4, 5]] = 0.25
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)


def np_ld_terms(s_cls, t_cls, s_reg, t_reg, pos, vlr, temp=10.0, kd_temp=2.0, normalize='reference'):
    """(ld, vlr, kd) with weights 0.25, 0.25, 10, looping over locations (from the LD equations)."""
    n, _, h, w = s_cls.shape
    bins = s_reg.shape[1] // 4
    ld = vl = kd = wsum = vsum = npos = 0.0
    for b in range(n):
        for y in range(h):
            for x in range(w):
                i = y * w + x
                kls = sum(np_kl_mean(s_reg[b, e * bins:(e + 1) * bins, y, x], t_reg[b, e * bins:(e + 1) * bins, y, x],
                                     temp) for e in range(4))
                if pos[b, i]:
                    wi = sigmoid(s_cls[b, :, y, x].astype(np.float64)).max()
                    ld += wi * kls
                    wsum += wi
                    kd += np_kl_mean(s_cls[b, :, y, x], t_cls[b, :, y, x], kd_temp)
                    npos += 1
                vl += vlr[b, i] * kls
                vsum += vlr[b, i]
    if normalize == 'reference':
        return 0.25 * ld / 4, 0.25 * vl / 16, 10 * kd / max(npos, 1)
    # an empty region gives 0
    return (0.25 * ld / 4 / wsum if wsum else 0.0), (0.25 * vl / 4 / vsum if vsum else 0.0), 10 * kd / max(npos, 1)


def level_tensors(rng, n, c, h, w, reg_max):
    def r(*shape):
        return (rng.standard_normal(shape) * 2).astype('float32')
    return r(n, c, h, w), r(n, c, h, w), r(n, 4 * (reg_max + 1), h, w), r(n, 4 * (reg_max + 1), h, w)


@pytest.mark.parametrize('normalize', ['reference', 'mean'])
def test_ld_terms_match_numpy(normalize):
    rng = np.random.default_rng(1)
    gts = random_gts(rng, [2, 3], 64)
    boxes, mask = padded(gts)
    inputs = {'image': paddle.zeros([2, 3, 64, 64]), 'gt_bbox': paddle.to_tensor(boxes),
              'pad_gt_mask': paddle.to_tensor(mask)}
    grids = [(8, 8, 8.0), (4, 4, 16.0)]
    vlr_cells = 0
    for level, (h, w, _) in enumerate(grids):
        s_cls, t_cls, s_reg, t_reg = level_tensors(rng, 2, 3, h, w, 4)
        pos = rng.random((2, h * w)) < 0.2
        loss = LDLoss({'cls': 3, 'reg': 20}, {'cls': 3, 'reg': 20}, kd_weight=10.0, strides=[16, 8],
                      normalize=normalize)
        got = loss({'cls': paddle.to_tensor(s_cls), 'reg': paddle.to_tensor(s_reg),
                    'pos': paddle.to_tensor(pos.reshape(2, 1, h, w).astype('float32'))},
                   {'cls': paddle.to_tensor(t_cls), 'reg': paddle.to_tensor(t_reg)}, inputs)
        vlr = np_vlr(gts, grids, level)
        vlr_cells += int((vlr > 0).sum())
        ref = np_ld_terms(s_cls, t_cls, s_reg, t_reg, pos, vlr, normalize=normalize)
        np.testing.assert_allclose([float(got['ld']), float(got['vlr']), float(got['kd'])], ref, rtol=1e-5)
    assert vlr_cells > 3


def test_vlr_read_from_the_readers_vlr_regions_when_gt_bbox_is_gone():
    """ppdet's Gt2GFLTarget (compute_vlr_region) replaces gt_bbox by vlr_regions [N, sum H*W] in ascending
    stride: each level's term uses its own slice (random regions, so a wrong offset cannot match)."""
    rng = np.random.default_rng(5)
    grids = [(8, 8, 8.0), (4, 4, 16.0)]
    regions = rng.random((2, 64 + 16)).astype('float32') * (rng.random((2, 80)) < 0.3)
    inputs = {'image': paddle.zeros([2, 3, 64, 64]), 'vlr_regions': paddle.to_tensor(regions)}
    starts = [0, 64]
    for level, (h, w, _) in enumerate(grids):
        s_cls, t_cls, s_reg, t_reg = level_tensors(rng, 2, 3, h, w, 4)
        pos = rng.random((2, h * w)) < 0.2
        loss = LDLoss({'cls': 3, 'reg': 20}, {'cls': 3, 'reg': 20}, strides=[16, 8])
        got = loss({'cls': paddle.to_tensor(s_cls), 'reg': paddle.to_tensor(s_reg),
                    'pos': paddle.to_tensor(pos.reshape(2, 1, h, w).astype('float32'))},
                   {'cls': paddle.to_tensor(t_cls), 'reg': paddle.to_tensor(t_reg)}, inputs)
        vlr = regions[:, starts[level]:starts[level] + h * w]
        ref = np_ld_terms(s_cls, t_cls, s_reg, t_reg, pos, vlr, normalize='reference')
        np.testing.assert_allclose([float(got['ld']), float(got['vlr'])], ref[:2], rtol=1e-5)
    with pytest.raises(PPDistillError, match='vlr_regions has 80 locations per image but strides'):
        LDLoss({'cls': 3, 'reg': 20}, {'cls': 3, 'reg': 20}, strides=[8, 16, 32])(
            {'cls': paddle.zeros([2, 3, 8, 8]), 'reg': paddle.zeros([2, 20, 8, 8]), 'pos': paddle.zeros([2, 1, 8, 8])},
            {'cls': paddle.zeros([2, 3, 8, 8]), 'reg': paddle.zeros([2, 20, 8, 8])}, inputs)


def test_reference_scales_with_positives_mean_does_not():
    """Duplicating the batch doubles the reference sums; the 'mean' option is unchanged."""
    rng = np.random.default_rng(2)
    s_cls, t_cls, s_reg, t_reg = level_tensors(rng, 1, 3, 4, 4, 7)
    pos = (rng.random((1, 1, 4, 4)) < 0.5).astype('float32')
    out = {}
    for normalize in ('reference', 'mean'):
        loss = LDLoss({'cls': 3, 'reg': 32}, {'cls': 3, 'reg': 32}, vlr_weight=0.0, normalize=normalize)
        for reps in (1, 2):
            def cat(x):
                return paddle.to_tensor(np.concatenate([x] * reps))
            out[normalize, reps] = float(loss({'cls': cat(s_cls), 'reg': cat(s_reg), 'pos': cat(pos)},
                                              {'cls': cat(t_cls), 'reg': cat(t_reg)})['ld'])
    np.testing.assert_allclose(out['reference', 2], 2 * out['reference', 1], rtol=1e-5)
    np.testing.assert_allclose(out['mean', 2], out['mean', 1], rtol=1e-5)


def test_images_without_boxes_give_zeros_and_a_graph():
    rng = np.random.default_rng(3)
    s_cls, t_cls, s_reg, t_reg = level_tensors(rng, 2, 3, 4, 4, 4)
    s_reg_t = paddle.to_tensor(s_reg, stop_gradient=False)
    loss = LDLoss({'cls': 3, 'reg': 20}, {'cls': 3, 'reg': 20}, strides=[8], kd_weight=1.0)
    for gt in ([np.zeros((0, 4), 'float32')] * 2, paddle.zeros([2, 0, 4])):
        terms = loss({'cls': paddle.to_tensor(s_cls), 'reg': s_reg_t, 'pos': paddle.zeros([2, 1, 4, 4])},
                     {'cls': paddle.to_tensor(t_cls), 'reg': paddle.to_tensor(t_reg)},
                     {'image': paddle.zeros([2, 3, 32, 32]), 'gt_bbox': gt})
        assert {k: float(v) for k, v in terms.items()} == {'ld': 0.0, 'vlr': 0.0, 'kd': 0.0}
    sum(terms.values()).backward()
    assert s_reg_t.grad is not None


def test_zero_when_student_equals_teacher():
    rng = np.random.default_rng(4)
    s_cls, _, s_reg, _ = level_tensors(rng, 1, 3, 4, 4, 4)
    boxes = paddle.to_tensor([[[2.0, 3.0, 20.0, 25.0]]])
    side = {'cls': paddle.to_tensor(s_cls), 'reg': paddle.to_tensor(s_reg)}
    terms = LDLoss({'cls': 3, 'reg': 20}, {'cls': 3, 'reg': 20}, strides=[8], kd_weight=1.0)(
        dict(side, pos=paddle.ones([1, 1, 4, 4])), side, {'image': paddle.zeros([1, 3, 32, 32]), 'gt_bbox': boxes})
    for v in terms.values():
        assert abs(float(v)) < 1e-6


def test_build_errors():
    ch = {'cls': 3, 'reg': 20}
    with pytest.raises(PPDistillError, match='reg_max 4 and teacher reg_max 16'):
        LDLoss(ch, {'cls': 3, 'reg': 68}, vlr_weight=0)
    with pytest.raises(PPDistillError, match='needs strides'):
        LDLoss(ch, ch)
    with pytest.raises(PPDistillError, match="'pos'"):
        x = paddle.zeros([1, 3, 2, 2])
        LDLoss(ch, ch, vlr_weight=0)({'cls': x, 'reg': paddle.zeros([1, 20, 2, 2])},
                                     {'cls': x, 'reg': paddle.zeros([1, 20, 2, 2])})
    with pytest.raises(PPDistillError, match='not one of strides'):
        x = paddle.zeros([1, 3, 2, 2])
        LDLoss(ch, ch, strides=[8, 16], ld_weight=0)({'cls': x, 'reg': paddle.zeros([1, 20, 2, 2])},
                                                     {'cls': x, 'reg': paddle.zeros([1, 20, 2, 2])},
                                                     {'image': paddle.zeros([1, 3, 64, 64]),
                                                      'gt_bbox': paddle.zeros([1, 0, 4])})


@needs_ppdet_heads_on_this_paddle
def test_parity_with_ppdet_ldgflhead_and_get_vlr_region():
    """ppdet's Gt2GFLTarget grid cells (scale 8, offset 0) and ATSSAssigner.get_vlr_region give the VLR
    per image (its 'diou' divides the overlap by the anchor area: band_overlap='iof'); LDGFLHead.get_loss
    with KL(0.25, T10), KL(0.25, T10), KL(10, T2) gives loss_ld, loss_ld_vlr, loss_kd summed over levels.
    Ours, per level with the same positives, must add up to the same three numbers."""
    from ppdet.data.transform.atss_assigner import ATSSAssigner
    from ppdet.data.transform.batch_operators import Gt2GFLTarget
    from ppdet.modeling.heads.fcos_head import FCOSFeat
    from ppdet.modeling.heads.gfl_head import LDGFLHead
    from ppdet.modeling.losses import DistributionFocalLoss, GIoULoss, QualityFocalLoss
    from ppdet.slim.distill_loss import KnowledgeDistillationKLDivLoss as KL

    rng = np.random.default_rng(5)
    n, c, reg_max, size, strides = 2, 3, 4, 128, [8, 16, 32]
    grids = [(size // s, size // s, float(s)) for s in strides]
    head = LDGFLHead(conv_feat=FCOSFeat(feat_in=8, feat_out=8, num_convs=1), num_classes=c, fpn_stride=strides,
                     feat_in_chan=8, reg_max=reg_max,
                     loss_class=QualityFocalLoss(use_sigmoid=True, beta=2.0, loss_weight=1.0),
                     loss_dfl=DistributionFocalLoss(loss_weight=0.25), loss_bbox=GIoULoss(loss_weight=2.0),
                     loss_ld=KL(loss_weight=0.25, T=10), loss_ld_vlr=KL(loss_weight=0.25, T=10),
                     loss_kd=KL(loss_weight=10, T=2))
    target = Gt2GFLTarget(downsample_ratios=strides, grid_cell_scale=8)
    cells = np.concatenate([target.get_grid_cells((h, w), 8, s) for h, w, s in grids])
    num_level = [h * w for h, w, _ in grids]
    gts = random_gts(rng, [2, 3], size)
    vlr = np.stack([ATSSAssigner().get_vlr_region(cells, num_level, g) for g in gts])
    levels = [level_tensors(rng, n, c, h, w, reg_max) for h, w, _ in grids]
    total = sum(num_level)
    labels = np.where(rng.random((n, total)) < 0.15, rng.integers(0, c, (n, total)), c)
    ctr = (cells[:, :2] + cells[:, 2:]) / 2
    bbox_targets = np.tile(np.concatenate([ctr - 10, ctr + 12], axis=1)[None], (n, 1, 1)).astype('float32')
    gt_meta = {'grid_cells': paddle.to_tensor(np.tile(cells[None], (n, 1, 1))), 'labels': paddle.to_tensor(labels),
               'label_weights': paddle.ones([n, total]), 'bbox_targets': paddle.to_tensor(bbox_targets),
               'vlr_regions': paddle.to_tensor(vlr.astype('float32')), 'pos_num': [int((labels < c).sum())]}
    upstream = head.get_loss(([paddle.to_tensor(x[0]) for x in levels], [paddle.to_tensor(x[2]) for x in levels]),
                             gt_meta, [paddle.to_tensor(x[1]) for x in levels],
                             [paddle.to_tensor(x[3]) for x in levels])

    boxes, mask = padded(gts)
    inputs = {'image': paddle.zeros([n, 3, size, size]), 'gt_bbox': paddle.to_tensor(boxes),
              'pad_gt_mask': paddle.to_tensor(mask)}
    loss = LDLoss({'cls': c, 'reg': 20}, {'cls': c, 'reg': 20}, kd_weight=10.0, strides=strides,
                  band_overlap='iof')
    ours, start = {'ld': 0.0, 'vlr': 0.0, 'kd': 0.0}, 0
    for (s_cls, t_cls, s_reg, t_reg), (h, w, _) in zip(levels, grids):
        pos = (labels[:, start:start + h * w] < c).reshape(n, 1, h, w).astype('float32')
        np.testing.assert_allclose(loss.vlr(inputs, h, w).numpy(), vlr[:, start:start + h * w], rtol=1e-5, atol=1e-6)
        start += h * w
        terms = loss({'cls': paddle.to_tensor(s_cls), 'reg': paddle.to_tensor(s_reg), 'pos': paddle.to_tensor(pos)},
                     {'cls': paddle.to_tensor(t_cls), 'reg': paddle.to_tensor(t_reg)}, inputs)
        ours = {k: ours[k] + float(v) for k, v in terms.items()}
    assert vlr.astype(bool).sum() > 3
    np.testing.assert_allclose([ours['ld'], ours['vlr'], ours['kd']],
                               [float(upstream['loss_ld']), float(upstream['loss_ld_vlr']),
                                float(upstream['loss_kd'])], rtol=1e-5)


def test_assignment_keys_say_what_each_configuration_needs():
    from ppdistill.losses import BinaryKDLoss, BoxKDLoss
    ch = {'cls': 3, 'reg': 20}
    assert LDLoss(ch, ch, strides=[8]).assignment_keys == ('pos',)
    assert LDLoss(ch, ch, strides=[8], ld_weight=0).assignment_keys == ()
    assert BinaryKDLoss(3, 3).assignment_keys == ('num_pos',)
    assert BinaryKDLoss(3, 3, normalize='locations').assignment_keys == ()
    assert BoxKDLoss(ch, ch).assignment_keys == ('num_pos',)
    assert BoxKDLoss(ch, ch, normalize='sum').assignment_keys == ()

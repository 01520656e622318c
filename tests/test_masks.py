"""ppdistill.masks vs a naive Python-loop port of the FGD reference mask construction."""
import ppdet  # noqa: F401  (import before paddle: pycocotools/numpy import order)
import numpy as np
import paddle
import pytest

from ppdistill.masks import box_cells, fgd_masks, pad_boxes, scale_boxes_to_grid


def ref_fgd_masks(boxes_per_image, input_size, height, width):
    """Loop port of yzd-v/FGD ``FeatureLoss.forward`` mask building (``x / img_w * W`` in float32, as torch
    computes it), with ``img_shape`` = the padded input size ``(Hp, Wp)`` that the feature map covers,
    grid indices clipped to the map and the area taken from the unclipped range. Degenerate rows
    (x2<=x1 or y2<=y1 or NaN, e.g. padding) skip."""
    n = len(boxes_per_image)
    fg = np.zeros((n, height, width), dtype=np.float64)
    bg = np.ones((n, height, width), dtype=np.float64)
    im_h, im_w = np.float32(input_size[0]), np.float32(input_size[1])
    for i in range(n):
        for box in np.asarray(boxes_per_image[i], dtype=np.float32).reshape(-1, 4):
            if not (box[2] > box[0] and box[3] > box[1]):
                continue
            wmin = int(np.floor(box[0] / im_w * np.float32(width)))
            wmax = int(np.ceil(box[2] / im_w * np.float32(width)))
            hmin = int(np.floor(box[1] / im_h * np.float32(height)))
            hmax = int(np.ceil(box[3] / im_h * np.float32(height)))
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            h0, h1 = max(hmin, 0), min(hmax + 1, height)
            w0, w1 = max(wmin, 0), min(wmax + 1, width)
            if h0 < h1 and w0 < w1:
                fg[i, h0:h1, w0:w1] = np.maximum(fg[i, h0:h1, w0:w1], area)
        bg[i] = np.where(fg[i] > 0, 0.0, 1.0)
        if bg[i].sum():
            bg[i] /= bg[i].sum()
    return fg, bg


def random_boxes(rng, n, im_h, im_w):
    """Boxes of mixed sizes, some crossing or lying beyond the image border, some tiny."""
    x1 = rng.uniform(-0.3 * im_w, 1.1 * im_w, n)
    y1 = rng.uniform(-0.3 * im_h, 1.1 * im_h, n)
    kind = rng.integers(0, 3, n)
    bw = np.where(kind == 0, rng.uniform(0.05, 1.5, n), rng.uniform(2.0, 0.8 * im_w, n))
    bh = np.where(kind == 0, rng.uniform(0.05, 1.5, n), rng.uniform(2.0, 0.8 * im_h, n))
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype('float32')


def to_padded(boxes_per_image):
    m = max([len(b) for b in boxes_per_image] + [0])
    out = np.zeros((len(boxes_per_image), m, 4), dtype='float32')
    for i, b in enumerate(boxes_per_image):
        out[i, :len(b)] = b
    return out


def check(boxes_per_image, input_size, h, w, **kw):
    fg_ref, bg_ref = ref_fgd_masks(boxes_per_image, input_size, h, w)
    as_list = [paddle.to_tensor(np.asarray(b, dtype='float32').reshape(-1, 4)) for b in boxes_per_image]
    for gt in (as_list, paddle.to_tensor(to_padded(boxes_per_image))):
        fg, bg = fgd_masks(gt, input_size, h, w, **kw)
        assert list(fg.shape) == [len(boxes_per_image), h, w] and list(bg.shape) == list(fg.shape)
        assert fg.stop_gradient and bg.stop_gradient
        np.testing.assert_allclose(fg.numpy(), fg_ref, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(bg.numpy(), bg_ref, rtol=1e-6, atol=1e-8)
    return fg_ref, bg_ref


def test_random_boxes_match_reference():
    rng = np.random.default_rng(0)
    im_shape = [[96, 128], [80, 120], [96, 100], [64, 128]]  # unpadded sizes, padded to 96 x 128
    boxes = [random_boxes(rng, 7, *im_shape[0]), random_boxes(rng, 3, *im_shape[1]),
             np.zeros((0, 4), 'float32'), random_boxes(rng, 12, *im_shape[3])]
    fg, _ = check(boxes, (96, 128), 12, 16)
    assert fg[0].max() > 0 and fg[3].max() > 0 and fg[2].max() == 0  # the test exercises both cases


def test_grid_aligned_edges_are_inclusive():
    # stride 8 -> exact grid coordinates; x2/y2 on a grid line still cover that row/column (ceil + 1).
    boxes = [np.array([[8, 16, 24, 32], [0, 0, 8, 8], [-16, -8, 4, 4], [60, 44, 80, 70]], 'float32')]
    fg, bg = check(boxes, (48, 64), 6, 8)
    assert fg[0, 2, 1] == pytest.approx(1 / 9)  # rows 2..4, cols 1..3
    assert fg[0, 0, 0] == pytest.approx(1 / 4)  # max over the overlapping boxes
    assert bg[0].sum() == pytest.approx(1.0)


def test_border_and_tiny_boxes():
    boxes = [np.array([[-50, -50, 3, 3], [100, 90, 200, 200], [30.2, 20.1, 30.3, 20.15]], 'float32'),
             np.array([[200, 200, 300, 300]], 'float32')]  # entirely outside the image
    fg, bg = check(boxes, (96, 128), 12, 16)
    assert (fg[1] == 0).all() and bg[1].sum() == pytest.approx(1.0)


def test_all_empty_batch():
    h, w = 5, 7
    im = (40, 56)
    inputs = ([paddle.zeros([0, 4]), paddle.zeros([0, 4])], paddle.zeros([2, 0, 4]),
              paddle.zeros([2, 3, 4]))
    for gt in inputs:
        fg, bg = fgd_masks(gt, im, h, w)
        assert float(fg.abs().sum()) == 0.0
        np.testing.assert_allclose(bg.numpy(), np.full((2, h, w), 1.0 / (h * w)), rtol=1e-6)


def test_box_covering_whole_map_gives_zero_background():
    fg, bg = check([np.array([[0, 0, 64, 48]], 'float32')], (48, 64), 6, 8)
    assert (bg == 0).all() and (fg > 0).all()


def test_pad_boxes_list_and_padded():
    b0 = paddle.to_tensor([[1.0, 2.0, 5.0, 6.0], [3.0, 3.0, 4.0, 9.0]])
    b1 = paddle.zeros([0, 4])
    boxes, valid = pad_boxes([b0, b1])
    assert list(boxes.shape) == [2, 2, 4] and boxes.dtype == paddle.float32
    assert valid.numpy().tolist() == [[True, True], [False, False]]
    np.testing.assert_array_equal(boxes.numpy()[0], b0.numpy())
    assert (boxes.numpy()[1] == 0).all()
    boxes2, valid2 = pad_boxes(boxes)
    np.testing.assert_array_equal(boxes2.numpy(), boxes.numpy())
    np.testing.assert_array_equal(valid2.numpy(), valid.numpy())
    # numpy per-image arrays and an empty batch
    boxes3, valid3 = pad_boxes([b0.numpy(), np.zeros((0, 4), 'float32')])
    np.testing.assert_array_equal(valid3.numpy(), valid.numpy())
    boxes4, valid4 = pad_boxes([np.zeros((0, 4), 'float32')] * 3)
    assert list(boxes4.shape) == [3, 0, 4] and list(valid4.shape) == [3, 0]


def test_pad_gt_mask_is_anded():
    boxes = paddle.to_tensor(np.array([[[0, 0, 16, 16], [32, 24, 64, 48]]], 'float32'))
    pad_gt_mask = paddle.to_tensor(np.array([[[1.0], [0.0]]], 'float32'))
    _, valid = pad_boxes(boxes, pad_gt_mask)
    assert valid.numpy().tolist() == [[True, False]]
    fg, _ = fgd_masks(boxes, (48, 64), 6, 8, pad_gt_mask=pad_gt_mask)
    fg_ref, _ = ref_fgd_masks([boxes.numpy()[0, :1]], (48, 64), 6, 8)
    np.testing.assert_allclose(fg.numpy(), fg_ref, rtol=1e-6)
    with pytest.raises(ValueError):
        pad_boxes(boxes, paddle.ones([1, 3, 1]))


def test_cells_are_floor_ceil_in_grid_units():
    boxes = paddle.to_tensor(np.array([[[10.0, 5.0, 40.0, 30.0]]], 'float32'))
    grid = scale_boxes_to_grid(boxes, (48, 64), 6, 8)
    np.testing.assert_allclose(grid.numpy()[0, 0], [1.25, 0.625, 5.0, 3.75])
    np.testing.assert_array_equal(box_cells(grid).numpy()[0, 0], [1, 0, 5, 4])


def test_bad_input_size_raises():
    with pytest.raises(ValueError):
        fgd_masks([paddle.zeros([0, 4])], (8, 8, 3), 2, 2)


def test_padded_batch_of_landscape_and_portrait_images():
    """PadBatch pads a 64x96 (h x w) and a 96x64 image to 96x96; at stride 8 the map is 12x12 and a box
    covers the cells floor(x1/8)..ceil(x2/8), whatever the image's own (unpadded) size."""
    landscape = np.array([[8, 16, 88, 40], [0, 0, 96, 64]], 'float32')  # the second one is the whole image
    portrait = np.array([[8, 16, 24, 88], [40, 60, 63, 95]], 'float32')
    fg, bg = check([landscape, portrait], (96, 96), 12, 12)
    # independent geometry: the portrait's first box covers rows 2..11, cols 1..3 -> 1 / (10 * 3)
    assert fg[1, 2, 1] == pytest.approx(1 / 30) and fg[1, 11, 3] == pytest.approx(1 / 30)
    assert fg[1, 1, 1] == 0 and fg[1, 2, 4] == 0 and fg[1, 2, 0] == 0
    # the whole landscape image covers rows 0..8 (64 / 8 = 8, inclusive) and every column, not the map
    assert (fg[0, :9] > 0).all() and (fg[0, 9:] == 0).all()
    assert bg[0, 9:].sum() == pytest.approx(1.0) and (bg[0, :9] == 0).all()


def test_right_edge_uses_reference_order_of_operations():
    """Wp = 52, W = 7 (stride 8, ceil): x2 = Wp gives 52 / 52 * 7 = 7 exactly; 52 * (7 / 52) is
    7.0000005 in float32, whose ceil adds a column and shrinks the box's value."""
    assert np.ceil(np.float32(52) * (np.float32(7) / np.float32(52))) == 8  # the trap exists
    box = [np.array([[26, 0, 52, 52]], 'float32')]
    fg, _ = check(box, (52, 52), 7, 7)
    # rows 0..7 (8) x cols 3..7 (5): 1 / 40 on the visible cells 3..6
    assert fg[0, 0, 3] == pytest.approx(1 / 40) and fg[0, 0, 2] == 0


def test_degenerate_boxes_cover_nothing_and_masks_stay_finite():
    boxes = [np.array([[10, 10, 10, 30],              # zero width
                       [30, 10, 20, 30],              # negative width
                       [10, 30, 40, 30],              # zero height
                       [-80, -60, -10, -5],           # wholly outside (before the image)
                       [300, 200, 500, 260],          # wholly outside (beyond the padded image)
                       [np.nan, 5, 20, 20],           # broken annotation
                       [-1e6, -1e6, 1e6, 1e6]], 'float32'),  # huge, covering the map
             np.array([[5, 5, 5, 5], [40, 40, 30, 30]], 'float32')]  # only degenerate boxes
    fg, bg = check(boxes, (64, 96), 8, 12)
    assert np.isfinite(fg).all() and np.isfinite(bg).all()
    assert (fg[1] == 0).all() and bg[1].sum() == pytest.approx(1.0)


@pytest.mark.parametrize('mask_fn', ['fgd', 'fgfi'])
def test_normalised_boxes_are_an_error_not_a_corner_mask(monkeypatch, mask_fn):
    """ppdet's YOLOv3/SSD readers normalise gt_bbox (NormalizeBox): read as pixels every box would fall
    into the first cell. Pixel boxes pass, and after one passing batch nothing is read on the host again."""
    import ppdistill.masks as masks
    from ppdistill.errors import PPDistillError
    monkeypatch.setattr(masks, '_PIXEL_BOXES_SEEN', False)
    make = {'fgd': lambda b: masks.fgd_masks(b, (64, 64), 8, 8),
            'fgfi': lambda b: masks.fgfi_masks(b, [[16, 16]], 8, 8, 8, 8)}[mask_fn]
    normalised = paddle.to_tensor([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.0, 0.0]]], dtype='float32')
    with pytest.raises(PPDistillError, match='gt_bbox is normalised to'):
        make(normalised)
    make(normalised * 64.0)
    assert masks._PIXEL_BOXES_SEEN
    make(normalised)  # checked once per process: no more host reads

"""Look at what distillation compares: per distilled level, teacher and student feature energy, their
difference and the method's masks, overlaid on an image.

    python -m ppdistill.tools.visualize -c configs/demo/picodet_student.yml \
        --slim_config configs/slim/distill/fgd_picodet_teacher_to_student.yml \
        --infer_img dataset/digits/val/000000.jpg [-o weights=output/picodet_student/model_final] \
        [--output_dir output/visualize] [--draw_threshold 0.5]

Writes one PNG per distill term (``<image>_<term>.png``, e.g. one per FPN level). Panels: the image with
the boxes used for GT-aware masks; teacher energy ``mean_C |T|``; student energy ``mean_C |S|``; their
difference after dividing each by its mean over the map (shape, not scale, since the channel counts and
magnitudes differ), for each named tensor of a multi-tensor loss (SSD's ``conf``/``loc``); then the
method's own masks from its loss module: FGD foreground/background (:func:`ppdistill.masks.fgd_masks`)
and teacher/student spatial attention (``FGDLoss.attention``), MGD's random keep-mask (``MGDLoss.sample_mask``). The boxes are the ground truth when the image is in the eval
set's COCO annotation (matched by file name); for a free image the teacher's detections above
``--draw_threshold`` stand in. The student is the plain checkpoint in ``weights`` (default: the student
config's), the teacher the distill config's. Tensors, masks and each title's term value come from
:meth:`ppdistill.distiller.Distiller.inspect` with the student in eval mode and those boxes as ``gt_bbox``.
"""
import ppdistill  # noqa: F401  (CPU defaults before paddle loads; registers ppdistill classes)

import math
import os
from typing import Callable, Dict, List, Tuple

import numpy as np
import paddle
from ppdet.core.workspace import create

from ppdistill.build import build_distiller, load_checked_weights
from ppdistill.cli import arg_parser, load_tool_config, run_main
from ppdistill.errors import PPDistillError
from ppdistill.losses import FGDLoss, MGDLoss
from ppdistill.masks import fgd_masks
from ppdistill.optional import require

Panels = List[Tuple[str, np.ndarray]]


def parse_args():
    parser = arg_parser()
    parser.add_argument('--infer_img', required=True, help='image to visualise')
    parser.add_argument('--output_dir', default='output/visualize', help='where the PNGs go')
    parser.add_argument('--draw_threshold', type=float, default=0.5,
                        help='for an image without annotation: teacher detections above this score stand '
                             'in for GT boxes (FGD masks)')
    return parser.parse_args()


def _fgd_panels(loss: FGDLoss, student: paddle.Tensor, teacher: paddle.Tensor, inputs: dict) -> Panels:
    h, w = teacher.shape[2:]
    fg, bg = fgd_masks(inputs['gt_bbox'], inputs['image'].shape[2:4], h, w)
    s_t, _ = FGDLoss.attention(teacher, loss.temp)
    s_s, _ = FGDLoss.attention(loss.align_student(student), loss.temp)
    return [('FGD foreground mask', fg[0].numpy()), ('FGD background mask', bg[0].numpy()),
            ('FGD teacher spatial attention', s_t[0].numpy()),
            ('FGD student spatial attention', s_s[0].numpy())]


def _mgd_panels(loss: MGDLoss, student: paddle.Tensor, teacher: paddle.Tensor, inputs: dict) -> Panels:
    mask = loss.sample_mask(teacher.shape)[0]  # [1, H, W] (spatial) or [C, 1, 1] (channel)
    if loss.mask_mode != 'spatial':
        return []
    return [(f'MGD random keep-mask (lambda={loss.lambda_mgd:g})', mask[0].numpy())]


# A method's masks come from its own loss module; losses without an entry show the energies only.
METHOD_PANELS: Dict[type, Callable[..., Panels]] = {FGDLoss: _fgd_panels, MGDLoss: _mgd_panels}


def _method_panels(loss, student, teacher, inputs) -> Panels:
    for cls, fn in METHOD_PANELS.items():
        if isinstance(loss, cls):
            return fn(loss, student, teacher, inputs)
    return []


def _energy(x: paddle.Tensor) -> np.ndarray:
    """Feature energy ``mean_C |x|`` of the first image, ``[H, W]``."""
    return paddle.mean(paddle.abs(x[0]), axis=0).numpy()


def _energy_panels(student, teacher) -> Panels:
    """Teacher and student energy and their shape difference, per named tensor of a multi-tensor loss."""
    if isinstance(student, dict):
        return [(f'{name} {title}', grid) for name in student
                for title, grid in _energy_panels(student[name], teacher[name])]
    e_t, e_s = _energy(teacher), _energy(student)
    return [('teacher energy mean|T|', e_t), ('student energy mean|S|', e_s),
            ('difference T/mean - S/mean', e_t / (e_t.mean() or 1.0) - e_s / (e_s.mean() or 1.0))]


def _shape(x) -> str:
    return str({k: list(v.shape[1:]) for k, v in x.items()} if isinstance(x, dict) else list(x.shape[1:]))


def _one_image_batch(path: str) -> dict:
    if not os.path.isfile(path):
        raise PPDistillError(f'--infer_img {path}: file not found')
    dataset = create('TestDataset')()
    dataset.set_images([path])
    loader = create('TestReader')(dataset, 0)
    return next(iter(loader))


def _annotated_boxes(cfg, image_path: str):
    """GT boxes ``[M, 4]`` (x1, y1, x2, y2, original pixels) of ``image_path`` if the eval set's COCO
    annotation lists a file of that name, else None."""
    import json
    dataset = cfg.get('EvalDataset')
    anno = os.path.join(getattr(dataset, 'dataset_dir', '') or '', getattr(dataset, 'anno_path', '') or '')
    if not os.path.isfile(anno):
        return None
    with open(anno) as f:
        coco = json.load(f)
    name = os.path.basename(image_path)
    ids = {im['id'] for im in coco.get('images', []) if os.path.basename(im['file_name']) == name}
    if not ids:
        return None
    xywh = np.array([a['bbox'] for a in coco.get('annotations', []) if a['image_id'] in ids],
                    'float32').reshape([-1, 4])
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _teacher_boxes(teacher_out: dict, threshold: float) -> np.ndarray:
    """Teacher detections above ``threshold``, ``[M, 4]`` in original image pixels."""
    bbox = teacher_out['bbox'].numpy().reshape([-1, 6])
    return bbox[bbox[:, 1] >= threshold, 2:6].astype('float32')


def _save_figure(path: str, image: np.ndarray, valid: Tuple[float, float], boxes: np.ndarray,
                 panels: Panels, title: str) -> None:
    matplotlib = require('matplotlib', 'tools/visualize.py')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    cols = min(4, len(panels) + 1)
    rows_ = math.ceil((len(panels) + 1) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 3.2 * rows_ + 0.4), squeeze=False)
    axes = axes.reshape(-1)
    height, width = image.shape[:2]
    axes[0].imshow(image)
    axes[0].set_title('image (+ boxes for masks)', fontsize=8)
    for x1, y1, x2, y2 in boxes:
        axes[0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color='lime', lw=1))
    for ax, (name, grid) in zip(axes[1:], panels):
        # the map covers the padded network input; keep the part over the image and stretch it onto it
        rows = max(1, math.ceil(grid.shape[0] * valid[0]))
        cols_ = max(1, math.ceil(grid.shape[1] * valid[1]))
        ax.imshow(image)
        cmap = 'coolwarm' if name.startswith('difference') else 'magma'
        lim = np.abs(grid).max() or 1.0
        kw = {'vmin': -lim, 'vmax': lim} if cmap == 'coolwarm' else {}
        shown = ax.imshow(grid[:rows, :cols_], cmap=cmap, alpha=0.6, extent=[0, width, height, 0],
                          interpolation='nearest', **kw)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis('off')
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    flags = parse_args()
    cfg = load_tool_config(flags, mode='train')
    if not flags.slim_config or not cfg.get('teacher_config'):
        raise PPDistillError('visualize needs --slim_config <distill config> (it names the teacher and method)')
    distiller = build_distiller(cfg)
    load_checked_weights(distiller.student_model, cfg.weights, min_match=1.0, role='student')
    batch = _one_image_batch(flags.infer_img)
    distiller.eval()  # the student's BN uses its running statistics, as at inference
    boxes = _annotated_boxes(cfg, flags.infer_img)
    source = 'ground-truth boxes'
    if boxes is None:
        with paddle.no_grad():
            boxes = _teacher_boxes(distiller.teacher_model(batch), flags.draw_threshold)
        source = f'teacher boxes >= {flags.draw_threshold:g}'
    sy, sx = batch['scale_factor'].numpy().reshape(-1)[:2]
    input_boxes = boxes * np.array([sx, sy, sx, sy], 'float32')  # network-input pixels, as gt_bbox in training
    inputs = dict(batch, gt_bbox=[paddle.to_tensor(input_boxes.reshape([-1, 4]))])
    with paddle.no_grad():
        seen = distiller.inspect(inputs)
    losses = distiller.term_losses()
    from PIL import Image
    image = np.asarray(Image.open(flags.infer_img).convert('RGB'))
    im_h, im_w = batch['im_shape'].numpy()[0]
    in_h, in_w = batch['image'].shape[2:]
    valid = (float(im_h) / in_h, float(im_w) / in_w)
    os.makedirs(flags.output_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(flags.infer_img))[0]
    written = []
    for key, (s, t) in seen.term_inputs.items():
        if losses[key].whole_output:  # DETR decoder outputs: queries, not maps over the image
            print(f'[visualize] {key}: {type(losses[key]).__name__} compares decoder queries, no maps to draw')
            continue
        panels = _energy_panels(s, t)
        with paddle.no_grad():
            panels += _method_panels(losses[key], s, t, inputs)
        path = os.path.join(flags.output_dir, f'{stem}_{key}.png')
        _save_figure(path, image, valid, boxes, panels,
                     f'{key} = {float(seen.terms[key]):.4g}: student {_shape(s)} vs teacher {_shape(t)}; '
                     f'{len(boxes)} {source}')
        written.append(path)
    print(f'[visualize] masks from {len(boxes)} {source}')
    print('\n'.join(f'[visualize] wrote {p}' for p in written))


def run() -> None:
    """Console entry point (``ppdistill-visualize``)."""
    run_main(main)


if __name__ == '__main__':
    run()

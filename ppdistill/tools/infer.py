"""Run a detector checkpoint on images and draw/save the detections.

    python -m ppdistill.tools.infer -c configs/demo/picodet_student.yml -o weights=output/<run>/model_final \
        --infer_img dataset/digits/val/000000.jpg
"""
import ppdistill  # noqa: F401  (CPU defaults before paddle loads)

import glob
import os

from ppdistill.cli import arg_parser, load_tool_config, run_main, trainer_with_weights
from ppdistill.errors import PPDistillError

_EXTS = ('.jpg', '.jpeg', '.png', '.bmp')


def parse_args():
    parser = arg_parser()
    parser.add_argument('--infer_img', type=str, default=None, help='one image')
    parser.add_argument('--infer_dir', type=str, default=None, help='a directory of images')
    parser.add_argument('--output_dir', type=str, default='output', help='where drawn images go')
    parser.add_argument('--draw_threshold', type=float, default=0.5, help='score threshold to draw')
    parser.add_argument('--save_results', action='store_true', default=False, help='also write bbox.json')
    return parser.parse_args()


def _images(flags):
    if flags.infer_img:
        if not os.path.isfile(flags.infer_img):
            raise PPDistillError(f'image not found: {flags.infer_img}')
        return [flags.infer_img]
    if flags.infer_dir and os.path.isdir(flags.infer_dir):
        found = sorted(p for p in glob.glob(os.path.join(flags.infer_dir, '*')) if p.lower().endswith(_EXTS))
        if found:
            return found
    raise PPDistillError('no images: pass --infer_img <file> or --infer_dir <dir with images>')


def main():
    flags = parse_args()
    cfg = load_tool_config(flags, mode='test')
    images = _images(flags)
    trainer = trainer_with_weights(cfg, mode='test')
    trainer.predict(images, draw_threshold=flags.draw_threshold, output_dir=flags.output_dir,
                    save_results=flags.save_results)


def run() -> None:
    """Console entry point (``ppdistill-infer``)."""
    run_main(main)


if __name__ == '__main__':
    run()

"""Look at what distillation compares: per distilled level, teacher and student feature energy, their
difference and the method's masks, overlaid on an image.

    python tools/visualize.py -c configs/demo/picodet_student.yml \
        --slim_config configs/slim/distill/fgd_picodet_teacher_to_student.yml \
        --infer_img dataset/digits/val/000000.jpg [-o weights=output/picodet_student/model_final] \
        [--output_dir output/visualize] [--draw_threshold 0.5]

Writes one PNG per distill term (``<image>_<term>.png``, e.g. one per FPN level). Panels: the image with
the boxes used for GT-aware masks; teacher energy ``mean_C |T|``; student energy ``mean_C |S|``; their
difference after dividing each by its mean over the map (shape, not scale, since the channel counts and
magnitudes differ); then the method's own masks from its loss module: FGD foreground/background
(:func:`ppdistill.masks.fgd_masks`) and teacher/student spatial attention (``FGDLoss.attention``), MGD's
random keep-mask (``MGDLoss.sample_mask``). The boxes are the ground truth when the image is in the eval
set's COCO annotation (matched by file name); for a free image the teacher's detections above
``--draw_threshold`` stand in. The student is the plain checkpoint in ``weights`` (default: the student
config's), the teacher the distill config's.
"""
import _path  # noqa: F401  (repo root on sys.path: runs from a checkout without installing)

from ppdistill.tools.visualize import run

if __name__ == '__main__':
    run()

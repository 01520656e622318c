"""Draw what distillation compares, per level (``ppdistill.tools.visualize``; ``--help`` for the options).

    python tools/visualize.py -c configs/demo/picodet_student.yml \
        --slim_config configs/slim/distill/fgd_picodet_teacher_to_student.yml \
        --infer_img dataset/digits/val/000000.jpg [-o weights=output/picodet_student/model_final]
"""
import _path  # noqa: F401  (repo root on sys.path: runs from a checkout without installing)

from ppdistill.tools.visualize import run

if __name__ == '__main__':
    run()

"""Run a detector checkpoint on images and draw/save the detections.

    python tools/infer.py -c configs/demo/picodet_student.yml -o weights=output/<run>/model_final \
        --infer_img dataset/digits/val/000000.jpg
"""
import _path  # noqa: F401  (repo root on sys.path: runs from a checkout without installing)

from ppdistill.tools.infer import run

if __name__ == '__main__':
    run()

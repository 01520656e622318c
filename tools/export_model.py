"""Export a detector checkpoint to a static inference model (Paddle Inference / FastDeploy).

    python tools/export_model.py -c configs/demo/picodet_student.yml -o weights=output/<run>/model_final \
        --output_dir output_inference
"""
import _path  # noqa: F401  (repo root on sys.path: runs from a checkout without installing)

from ppdistill.tools.export_model import run

if __name__ == '__main__':
    run()

"""Evaluate a detector checkpoint (a distilled student is a plain checkpoint of the student config).

    python tools/eval.py -c configs/demo/picodet_student.yml -o weights=output/<run>/model_final
"""
import _path  # noqa: F401  (repo root on sys.path: runs from a checkout without installing)

from ppdistill.tools.eval import run

if __name__ == '__main__':
    run()

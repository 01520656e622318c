"""Train a detector, or distill one with ``--slim_config`` (ppdet's tools/train.py conventions).

    python tools/train.py -c configs/demo/picodet_student.yml \
        --slim_config configs/slim/distill/mgd_picodet_teacher_to_student.yml --eval [-o k=v] [-r ckpt]
    python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py ...
"""
import _path  # noqa: F401  (repo root on sys.path: runs from a checkout without installing)

from ppdistill.tools.train import run

if __name__ == '__main__':
    run()

"""Train a detector, or distill one with ``--slim_config`` (ppdet's tools/train.py conventions).

    python -m ppdistill.tools.train -c configs/demo/picodet_student.yml \
        --slim_config configs/slim/distill/mgd_picodet_teacher_to_student.yml --eval [-o k=v] [-r ckpt]
    python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py ...
"""
import ppdistill  # noqa: F401  (CPU defaults before paddle loads; registers ppdistill classes)

from ppdet.engine import init_parallel_env, set_random_seed

from ppdistill.build import build_distiller
from ppdistill.cli import arg_parser, load_tool_config, run_main
from ppdistill.trainer import DistillTrainer


def parse_args():
    parser = arg_parser()
    parser.add_argument('--eval', action='store_true', default=False,
                        help='evaluate on the eval set after every snapshot (keeps best_model)')
    parser.add_argument('-r', '--resume', default=None, help='checkpoint to resume from (no suffix)')
    parser.add_argument('--amp', action='store_true', default=False, help='mixed precision (GPU)')
    parser.add_argument('--use_vdl', action='store_true', default=False, help='log to VisualDL')
    parser.add_argument('--vdl_log_dir', type=str, default='vdl_log_dir/scalar', help='VisualDL log dir')
    parser.add_argument('--seed', type=int, default=None, help='seed paddle/numpy/random (reproducible runs)')
    return parser.parse_args()


def main():
    flags = parse_args()
    cfg = load_tool_config(flags, mode='train')
    init_parallel_env()
    if flags.seed is not None:
        set_random_seed(flags.seed)
    if flags.slim_config and cfg.get('teacher_config'):
        cfg['model'] = build_distiller(cfg)
        cfg['slim_type'] = 'Distill'
    trainer = DistillTrainer(cfg, mode='train')
    if flags.resume is not None:
        trainer.resume_weights(flags.resume)
    elif cfg.get('pretrain_weights') and 'model' not in cfg:
        trainer.load_weights(cfg.pretrain_weights)
    trainer.train(flags.eval)


def run() -> None:
    """Console entry point (``ppdistill-train``)."""
    run_main(main)


if __name__ == '__main__':
    run()

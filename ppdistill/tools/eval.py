"""Evaluate a detector checkpoint (a distilled student is a plain checkpoint of the student config).

    python -m ppdistill.tools.eval -c configs/demo/picodet_student.yml -o weights=output/<run>/model_final
"""
import ppdistill  # noqa: F401  (CPU defaults before paddle loads)

from ppdet.engine import init_parallel_env

from ppdistill.cli import arg_parser, load_tool_config, run_main, trainer_with_weights
from ppdistill.trainer import MetricsSaver


def parse_args():
    parser = arg_parser()
    parser.add_argument('--output_eval', default=None, type=str, help='where to write bbox.json')
    parser.add_argument('--classwise', action='store_true', default=False, help='per-class AP table')
    parser.add_argument('--save_metrics', default=None, type=str,
                        help='also write the metric results (e.g. COCO bbox AP list) to this JSON file')
    return parser.parse_args()


def main():
    flags = parse_args()
    cfg = load_tool_config(flags, mode='eval')
    init_parallel_env()
    trainer = trainer_with_weights(cfg, mode='eval')
    if flags.save_metrics:
        trainer.register_callbacks([MetricsSaver(trainer, flags.save_metrics)])
    trainer.evaluate()


def run() -> None:
    """Console entry point (``ppdistill-eval``)."""
    run_main(main)


if __name__ == '__main__':
    run()

"""Export a detector checkpoint to a static inference model (Paddle Inference / FastDeploy).

    python -m ppdistill.tools.export_model -c configs/demo/picodet_student.yml -o weights=output/<run>/model_final \
        --output_dir output_inference
"""
import os

# ppdet 2.6 exports through to_static(...).forward.main_program, which paddle 2.6 only builds in
# full-graph (AST) mode; without this it raises "Can't call main_program when full_graph=False".
os.environ.setdefault('ENABLE_FALL_BACK', 'False')

import ppdistill  # noqa: F401  (CPU defaults before paddle loads)

from ppdistill.cli import arg_parser, load_tool_config, run_main, trainer_with_weights


def parse_args():
    parser = arg_parser()
    parser.add_argument('--output_dir', type=str, default='output_inference', help='export directory')
    return parser.parse_args()


def main():
    flags = parse_args()
    cfg = load_tool_config(flags, mode='test')
    trainer = trainer_with_weights(cfg, mode='test')
    trainer.export(flags.output_dir)


def run() -> None:
    """Console entry point (``ppdistill-export``)."""
    run_main(main)


if __name__ == '__main__':
    run()

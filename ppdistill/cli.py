"""What every ppdistill tool does before its job: parse ppdet-style arguments, load the student config,
merge ``-o`` overrides, handle ``--slim_config``, pick the device, and turn user errors into one line.
"""
import os
import sys
from typing import Callable, Optional

import paddle
from ppdet.core.workspace import load_config
from ppdet.engine import Trainer
from ppdet.utils.check import check_config, check_version
from ppdet.utils.cli import ArgsParser, merge_args
from ppdet.utils.logger import setup_logger

from .build import check_teacher_is_not_student, is_distill_config, load_checked_weights, load_distill_config
from .errors import PPDistillError
from .overrides import merge_overrides

logger = setup_logger('ppdistill')

__all__ = ['arg_parser', 'load_tool_config', 'trainer_with_weights', 'run_main']


def arg_parser() -> ArgsParser:
    """ppdet's parser (``-c``, ``-o k=v``) plus ``--slim_config``."""
    parser = ArgsParser()
    parser.add_argument('--slim_config', default=None, type=str,
                        help='distill config (teacher + method); ignored by eval/infer/export')
    return parser


# The dataset each mode reads itself. infer/export ('test') need none: the test dataset's annotation
# file only names the categories, and ppdet falls back to default categories without it.
_OWN_DATASET = {'train': 'TrainDataset', 'eval': 'EvalDataset'}


def _drop_missing_test_labels(cfg) -> None:
    """infer/export without the TestDataset's annotation file: unset ``anno_path`` so ppdet uses default
    category names (ppdet 2.6 does so for a missing file; PaddleDetection develop opens any set path)."""
    dataset = cfg.get('TestDataset')
    anno = getattr(dataset, 'anno_path', None)
    path = os.path.join(getattr(dataset, 'dataset_dir', None) or '', anno or '')
    if anno and not os.path.isfile(path):
        logger.warning(f'TestDataset: annotation file {path} not found: default category names are used')
        dataset.anno_path = None


def _check_dataset(cfg, mode: str) -> None:
    if mode == 'test':
        _drop_missing_test_labels(cfg)
    key = _OWN_DATASET.get(mode)
    dataset = cfg.get(key) if key else None
    if dataset is None or not hasattr(dataset, 'dataset_dir'):
        return
    anno = getattr(dataset, 'anno_path', None)
    if anno:
        path = os.path.join(dataset.dataset_dir or '', anno)
        if not os.path.isfile(path):
            raise PPDistillError(f'{key}: annotation file {path} not found (dataset_dir is relative to the '
                                 'current directory; for the demo data run tools/make_demo_data.py)')


def load_tool_config(flags, mode: str):
    """Student config with overrides; for ``mode='train'`` a distill ``--slim_config`` is merged too."""
    if not flags.config or not os.path.isfile(flags.config):
        raise PPDistillError(f'config file not found: {flags.config!r} (pass -c <model config .yml>)')
    cfg = load_config(flags.config)
    if 'architecture' not in cfg:
        raise PPDistillError(f'{flags.config} has no architecture: pass the model config with -c')
    merge_args(cfg, flags)
    merge_overrides(flags.opt)
    slim = getattr(flags, 'slim_config', None)
    if slim:
        if not os.path.isfile(slim):
            raise PPDistillError(f'slim config not found: {slim}')
        if is_distill_config(slim):
            if mode == 'train':
                load_distill_config(slim, flags.opt)  # -o's distill keys count in its checks
                merge_overrides(flags.opt)  # -o wins over the distill config as well
                check_teacher_is_not_student(flags.config, cfg, getattr(flags, 'resume', None))
            else:
                logger.info(f'{slim} is a distill config: {mode} runs on the student alone')
        else:  # pruning / quantisation: ppdet's own slim machinery
            from ppdet.slim import build_slim_model
            cfg = build_slim_model(cfg, slim, mode)
    use_gpu = bool(cfg.get('use_gpu', False))
    if use_gpu and not paddle.is_compiled_with_cuda():
        logger.warning('use_gpu is true but this paddle has no CUDA: running on CPU '
                       '(install paddlepaddle-gpu for GPUs)')
        use_gpu = False
    cfg['use_gpu'] = use_gpu
    for key in ('use_npu', 'use_xpu', 'use_mlu'):
        cfg.setdefault(key, False)
    paddle.set_device('gpu' if use_gpu else 'cpu')
    check_config(cfg)
    check_version()
    _check_dataset(cfg, mode)
    return cfg


def trainer_with_weights(cfg, mode: str):
    """ppdet ``Trainer`` for eval/test with ``cfg.weights`` loaded; every model tensor must match."""
    if not cfg.get('weights'):
        raise PPDistillError('no weights: pass -o weights=<checkpoint>')
    trainer = Trainer(cfg, mode=mode)
    load_checked_weights(trainer.model, cfg.weights, min_match=1.0, role='model')
    return trainer


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Run a tool's ``main``; a :class:`PPDistillError` becomes one line on stderr and exit status 2."""
    try:
        code = main()
    except PPDistillError as err:
        print(f'ppdistill: error: {err}', file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

"""What the speed and gradients benchmarks measure on: a student config's batches, a fresh student and one
distiller per method, with the benchmark's teacher (given weights or random)."""
import random
from typing import Dict, Optional

import numpy as np
import paddle


def seed_all(seed: int) -> None:
    """Python's, NumPy's and paddle's generators."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def teacher_settings(args, teacher_cfg: str) -> dict:
    """The distill-config keys that point at the benchmark's teacher (random unless weights are given)."""
    if args.teacher_weights:
        return {'teacher_config': teacher_cfg, 'teacher_weights': args.teacher_weights}
    return {'teacher_config': teacher_cfg, 'teacher_weights': None, 'allow_random_teacher': True}


class BenchSetup:
    """Student config, batches, a plain student and one distiller per method (random or given teacher)."""

    def __init__(self, args, methods: Dict[str, str], teacher_cfg: str, student_cfg: str,
                 build_student: bool = True, seed: Optional[int] = None):
        """``seed``: reseed before each distiller is built, so its student and distill modules (MGD's
        generators, FGD's context blocks) do not depend on which methods were built before it."""
        from ppdet.core.workspace import create, load_config
        from ppdet.utils.cli import ArgsParser
        from ppdistill.build import build_distiller, load_distill_config
        from ppdistill.config_scope import config_scope, create_fresh
        from ppdistill.overrides import merge_overrides

        self.cfg = load_config(student_cfg)
        opts = ArgsParser()._parse_opt(args.opt) if args.opt else {}
        merge_overrides(opts)
        dataset = self.cfg['TrainDataset'] = create('TrainDataset')()
        loader = create('TrainReader')(dataset, self.cfg.worker_num)
        need = args.warmup + args.steps
        self.batches = []
        while len(self.batches) < need:  # cycle through a small dataset
            for batch in loader:
                batch['epoch_id'] = 0  # as ppdet's trainer sets it (PicoDet's assigner depends on it)
                self.batches.append(batch)
                if len(self.batches) == need:
                    break
        self.student = create_fresh(self.cfg.architecture) if build_student else None
        self.distillers = {}
        for name, path in methods.items():
            if seed is not None:
                seed_all(seed)
            with config_scope():
                load_distill_config(path)
                merge_overrides(dict(teacher_settings(args, teacher_cfg), **opts))
                self.distillers[name] = build_distiller(self.cfg)

    def optimizer(self, model) -> paddle.optimizer.Optimizer:
        # The same optimizer for every variant (its step is part of each train step); learning rate 0 keeps
        # the weights, so every variant and step sees the same model (the update still runs in full).
        return paddle.optimizer.AdamW(learning_rate=0.0, parameters=model.parameters())

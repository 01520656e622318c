"""ppdet's ``Trainer`` with distillation-aware checkpoints, resume, a cross-rank check and a structured
training log (``train_log.jsonl``: every step's losses, for the loss-balance report and the benchmark).

Training itself (loop, LR, AMP, EMA, logging, VisualDL, ``--eval``) is ppdet's, unchanged.
"""
import contextlib
import json
import os
from typing import List, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist
from ppdet.engine import Trainer
from ppdet.engine.callbacks import Callback, Checkpointer, ComposeCallback
from ppdet.utils.logger import setup_logger

from .balance import LossBalance
from .checkpoint import resume_checkpoint, save_checkpoint
from .ema import ema_from_config

logger = setup_logger(__name__)

__all__ = ['DistillTrainer', 'DistillCheckpointer', 'RankConsistencyCheck', 'MetricsSaver', 'TrainLog',
           'param_fingerprints', 'run_output_dir', 'TRAIN_LOG', 'read_train_log']

TRAIN_LOG = 'train_log.jsonl'


def run_output_dir(cfg) -> str:
    """``<save_dir>/<config name>``: the distill config's name when distilling, else the model config's."""
    return os.path.join(cfg.save_dir, cfg.filename)


class DistillCheckpointer(Checkpointer):
    """ppdet's snapshot/best-model policy, saved through :func:`ppdistill.checkpoint.save_checkpoint`."""

    def __init__(self, trainer):
        super().__init__(trainer)
        # ppdet 2.6 appends the config name to save_dir, PaddleDetection develop does not: decide it here.
        self.save_dir = run_output_dir(trainer.cfg)

    def _best_ap(self) -> Optional[float]:
        for metric in self.model._metrics:
            results = metric.get_results()
            for key in ('bbox', 'keypoint', 'mask'):
                if key in results:
                    return float(results[key][0])
        logger.warning('Evaluation results empty: too few iterations or wrong weights?')
        return None

    def on_epoch_end(self, status):
        if dist.get_world_size() > 1 and dist.get_rank() != 0:
            return
        trainer, epoch_id, save_name = self.model, status['epoch_id'], None
        if status['mode'] == 'train':
            end_epoch = trainer.cfg.epoch
            if (epoch_id + 1) % trainer.cfg.snapshot_epoch == 0 or epoch_id == end_epoch - 1:
                save_name = 'model_final' if epoch_id == end_epoch - 1 else str(epoch_id)
        elif status['mode'] == 'eval' and status.get('save_best_model'):
            ap = self._best_ap()
            if ap is None:
                return
            if ap >= self.best_ap:
                self.best_ap, save_name = ap, 'best_model'
            logger.info(f'Best test bbox ap is {abs(self.best_ap):0.3f}.')
        if save_name:
            raw, ema = (status.get('weight'), trainer.ema) if trainer.use_ema else (None, None)
            save_checkpoint(trainer.model, trainer.optimizer, self.save_dir, save_name, epoch_id + 1,
                            raw, ema)


def param_fingerprints(model: paddle.nn.Layer,
                       state: Optional[dict] = None) -> Tuple[List[str], np.ndarray]:
    """Names and [P, 2] (sum, sum of squares) in float64 of every trainable parameter, read from
    ``state`` (a state dict of ``model``) when given."""
    names = [n for n, p in model.named_parameters() if p.trainable]
    tensors = state if state is not None else dict(model.named_parameters())
    values = np.array([[t.sum(), np.square(t).sum()] for t in
                       (tensors[n].numpy().astype('float64') for n in names)], dtype='float64')
    return names, values


class RankConsistencyCheck(Callback):
    """After every epoch on ≥2 ranks, stop if any trainable parameter differs from rank 0's.

    DataParallel keeps ranks identical only if every parameter gets a gradient on every rank; a parameter
    used on some ranks only makes them drift apart silently. ``PPDISTILL_DUMP_PARAMS=<dir>`` also writes
    each rank's trainable parameters (and ``weight: auto`` weights, ``auto_weights.factors``) to
    ``<dir>/rank<r>.npz`` at the end of training (for debugging).
    With EMA, ppdet has put the EMA weights into rank 0's model at a snapshot (and only there); the raw
    weights it saved in ``status['weight']`` are what every rank compares.
    """

    def on_epoch_end(self, status):
        if status['mode'] != 'train' or dist.get_world_size() < 2:
            return
        names, local = param_fingerprints(self.model.model, status.get('weight'))
        gathered = []
        dist.all_gather(gathered, paddle.to_tensor(local))
        reference = gathered[0].numpy()
        for rank, other in enumerate(gathered[1:], start=1):
            bad = [names[i] for i in np.nonzero((other.numpy() != reference).any(axis=1))[0]]
            if bad:
                raise RuntimeError(f'rank {rank} diverged from rank 0 in {len(bad)} parameters (e.g. '
                                   f'{bad[:3]}): a parameter got gradient on some ranks only')
        logger.info(f'Cross-rank check: {len(names)} trainable parameters identical on '
                    f'{dist.get_world_size()} ranks')

    def on_train_end(self, status):
        out_dir = os.environ.get('PPDISTILL_DUMP_PARAMS')
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            arrays = {n: p.numpy() for n, p in self.model.model.named_parameters() if p.trainable}
            auto = getattr(self.model.model, 'auto_weights', None)
            if auto is not None:
                arrays['auto_weights.factors'] = auto.factors.numpy()
            np.savez(os.path.join(out_dir, f'rank{max(dist.get_rank(), 0)}.npz'), **arrays)


class MetricsSaver(Callback):
    """Write every evaluation's metric results (e.g. the 12 COCO bbox numbers) to a JSON file.

    ppdet resets its metrics right after logging them, so they are captured in ``on_epoch_end``.
    """

    def __init__(self, trainer, path: str):
        super().__init__(trainer)
        self.path = path

    def on_epoch_end(self, status):
        if status.get('mode') != 'eval':
            return
        results = {k: [float(x) for x in v] for m in self.model._metrics for k, v in m.get_results().items()}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, 'w') as f:
            json.dump(results, f, indent=1)


def _host(value) -> float:
    return float(np.asarray(value, dtype='float64').reshape(-1)[0])


class TrainLog(Callback):
    """Every training step's losses as one JSON line in ``<save_dir>/<config name>/train_log.jsonl``.

    A line: ``{"epoch", "step", "iter", "lr", "loss", <the detector's terms>, "det_loss", "distill_*"}``
    (``iter = epoch * steps_per_epoch + step``). ``det_loss`` is the student's own loss, read from its
    forward (a post-hook on ``student_model``), never ``loss - distill_loss``: that difference is
    rounded in float32, to 0 once distill is ~10^7 times larger. The other values are the host copies
    ppdet's training statistics already made. On a distilled run every ``log_iter``-th line also has a
    ``balance`` point (see :class:`ppdistill.balance.LossBalance`), which is logged as
    ``ppdistill balance: ...`` with a warning per new finding. Rank 0 only; a resumed run keeps the
    lines of the epochs before the resumed one and appends.
    """

    def __init__(self, trainer):
        super().__init__(trainer)
        self.path = os.path.join(run_output_dir(trainer.cfg), TRAIN_LOG)
        self.student = getattr(trainer.model, 'student_model', None)
        self.balance = (LossBalance(trainer.cfg.log_iter, calibrated_keys(trainer.model))
                        if self.student is not None else None)
        self._det = None
        if self.student is not None:
            self.student.register_forward_post_hook(self._keep_det_loss)

    def _keep_det_loss(self, layer, inputs, outputs):
        if layer.training and isinstance(outputs, dict) and 'loss' in outputs:
            self._det = outputs['loss'].detach()

    def _is_writer(self) -> bool:
        return dist.get_world_size() < 2 or dist.get_rank() == 0

    def on_train_begin(self, status):
        if not self._is_writer():
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        start = getattr(self.model, 'start_epoch', 0)
        kept = [r for r in read_train_log(self.path) if r['epoch'] < start] if start > 0 else []
        with open(self.path, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in kept)

    def on_step_end(self, status):
        if status.get('mode') != 'train' or not self._is_writer():
            return
        meters = getattr(status.get('training_staus'), 'meters', None) or {}
        epoch, step = status['epoch_id'], status['step_id']
        record = {'epoch': epoch, 'step': step, 'iter': epoch * status['steps_per_epoch'] + step,
                  'lr': float(status.get('learning_rate', float('nan')))}
        record.update({k: _host(m.value) for k, m in meters.items()})
        if 'loss' in record:
            record['det_loss'] = _host(self._det.numpy()) if self._det is not None else record['loss']
        point = self.balance.update(record) if self.balance and 'distill_loss' in record else None
        if point is not None:
            record['balance'] = point
            ratios = ' '.join(f'{k} {v:.4g}' for k, v in point['ratios'].items())
            logger.info(f"ppdistill balance: epoch {epoch} step {step} det_loss {point['det_loss']:.4g} | {ratios}")
            for w in point['warnings']:
                logger.warning(f"ppdistill balance warning: {w['term']} {w['kind']}: {w['message']}")
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def calibrated_keys(distiller) -> List[str]:
    """The logged keys whose gradient share ``weight: auto`` set: the auto entries' terms, and
    ``distill_loss`` when every term is one of them."""
    keys = distiller.auto_weighted_terms()
    return keys + ['distill_loss'] if keys and len(keys) == len(distiller.term_losses()) else keys


def read_train_log(path: str) -> List[dict]:
    """The step records of a ``train_log.jsonl`` (empty when the file is missing); a line cut short by a
    killed run is left out."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


class DistillTrainer(Trainer):
    """``ppdet.engine.Trainer`` whose checkpoints, EMA and resume understand the distiller."""

    def __init__(self, cfg, mode: str = 'train'):
        use_ema = bool(cfg.get('use_ema', False))
        if use_ema:  # ppdet would build a ModelEMA over the whole distiller, teacher included
            cfg = cfg.copy()
            cfg['use_ema'] = False
        super().__init__(cfg, mode)
        if use_ema:
            self.cfg['use_ema'] = self.use_ema = True
            self.ema = ema_from_config(self.model, self.cfg)

    def _init_callbacks(self):
        super()._init_callbacks()
        if self.mode != 'train':
            return
        self._callbacks = [DistillCheckpointer(self) if type(cb) is Checkpointer else cb
                           for cb in self._callbacks] + [RankConsistencyCheck(self), TrainLog(self)]
        self._compose_callback = ComposeCallback(self._callbacks)

    def _restart_epoch(self) -> None:
        """The loader starts epoch ``start_epoch`` afresh, with that epoch's order. paddle's sampler seeds its
        shuffle with its own epoch counter (which starts at 0); ppdet's loader already started an iterator
        over the sampler when it was built, so that iterator is replaced."""
        sampler = getattr(self.loader, '_batch_sampler', None)
        if hasattr(sampler, 'set_epoch') and hasattr(self.loader, 'dataloader'):
            sampler.set_epoch(self.start_epoch)
            self.loader.loader = iter(self.loader.dataloader)

    def resume_weights(self, weights: str) -> None:
        self.start_epoch = resume_checkpoint(self.model, self.optimizer, weights,
                                             self.ema if self.use_ema else None)
        self._restart_epoch()  # the resumed epoch shuffles as it would have uninterrupted
        logger.info(f'Resumed from {weights} at epoch {self.start_epoch}')

    def calibrate_auto_weights(self) -> None:
        """``weight: auto``: measure the entries' weights on this process's first training batches, before the
        first optimizer update (:meth:`~ppdistill.distiller.Distiller.calibrate`); the loader then restarts
        the epoch, so those batches are trained on as usual. Weights already set (resumed with ``-r``)
        are kept, not measured again."""
        auto = getattr(self.model, 'auto_weights', None)
        if auto is None:
            return
        if auto.measured():
            logger.info('weight: auto: ' + ', '.join(f"loss '{k}' weight {v:.6g}" for k, v in auto.values().items())
                        + ' (from the resumed distill state, not measured again)')
            return
        batches = []
        for data in self.loader:
            data['epoch_id'] = self.start_epoch  # as the training loop gives it (some heads read it)
            batches.append(data)
            if len(batches) == auto.batches:
                break
        # under AMP, the autocast the training loop uses (ppdet's), so the student runs as in training
        amp = paddle.amp.auto_cast(enable=self.cfg.use_gpu or self.cfg.get('use_npu') or self.cfg.get('use_mlu'),
                                   custom_white_list=self.custom_white_list, custom_black_list=self.custom_black_list,
                                   level=self.amp_level) if getattr(self, 'use_amp', False) else contextlib.nullcontext()
        with amp:
            self.model.calibrate(batches)
        self._restart_epoch()

    def train(self, validate: bool = False):
        self.calibrate_auto_weights()
        return super().train(validate)

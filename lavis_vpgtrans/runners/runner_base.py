"""LAVIS's RunnerBase, made to run on CPU, single-process and under torchrun with gloo.

Written against salesforce-lavis 1.0.2 (checked when a runner is built: `require_lavis`),
whose RunnerBase it extends through private members that a later LAVIS may rename or drop:
  - attributes set by RunnerBase.__init__ that it reads and resets: `_model`,
    `_wrapped_model`, `_optimizer`, `_lr_sched`, `_scaler`, `_dataloaders`;
  - private methods it overrides under LAVIS's names:
    `_save_checkpoint`, `_load_checkpoint`, `_reload_best_model`;
  - also overridden: `setup_output_dir`, `create_loaders`, `train`, `train_epoch`,
    `eval_epoch`, `evaluate` and the properties `model`, `scaler`, `dataloaders`, `max_epoch`.

The loop is here; our other concerns each have a module, mixed into PortableRunner:
  model_setup.py       the model setup step: activation checkpointing -> sharding -> device -> DDP,
                       run when the runner is built and at a stage switch (`model`, `prepare_model`)
  save_resume.py       checkpoints and resuming (`_save_checkpoint`, `_load_checkpoint`, ...)
  extra_validation.py  run.extra_validation: more benchmarks validated every epoch
  loaders.py           the data loaders (`dataloaders`, `create_loaders`)

Fixes, each where LAVIS 1.0.2 breaks:
  - `model` returned None when the model was already on its device (e.g. device: cpu);
  - dist.barrier() ran unguarded after every epoch (crashes without a process group);
  - the prefetch loader created a CUDA stream even on CPU;
  - evaluation moved samples to CUDA (`cuda_enabled=True` hard-coded);
  - relative output_dir landed inside site-packages/lavis, and a second runner in one
    process died re-registering its paths;
  - checkpoints leaked tied / frozen weights and buffers, were written non-atomically, and
    were read back with pickle and a silent strict=False fallback;
  - a NaN loss trained NaN weights and saved them as the best checkpoint: the training step is
    checked (common/train_loop.py, run.max_nonfinite_steps) and nothing non-finite is written.

The runner records epochs (metrics.jsonl: run id, epoch, benchmark, split, metrics, plus what
a subclass adds in `epoch_record`); the paper's epoch count is the analysis's business
(lavis_vpgtrans.analysis.speedup derives it from the run's config).
"""

import datetime
import importlib.metadata
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, is_dist_avail_and_initialized, main_process
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase

from lavis_vpgtrans.common.dist import from_rank0
from lavis_vpgtrans.common.finite import DEFAULT_MAX_NONFINITE_STEPS, NonFiniteGuard
from lavis_vpgtrans.runners.extra_validation import ExtraValidation
from lavis_vpgtrans.runners.loaders import Loaders
from lavis_vpgtrans.runners.model_setup import ModelSetup
from lavis_vpgtrans.runners.run_record import METRICS_FILE, new_run_id
from lavis_vpgtrans.runners.save_resume import SaveResume

LAVIS_VERSION = "1.0.2"  # the salesforce-lavis whose RunnerBase internals this runner relies on


def require_lavis(found=None) -> None:
    """Raises if the installed salesforce-lavis is not the version this runner was written against."""
    found = found or importlib.metadata.version("salesforce-lavis")
    if found != LAVIS_VERSION:
        raise RuntimeError(f"lavis_vpgtrans's runner overrides private members of LAVIS {LAVIS_VERSION}'s RunnerBase "
                           f"(see lavis_vpgtrans/runners/runner_base.py), but salesforce-lavis {found} is installed: "
                           f"install salesforce-lavis=={LAVIS_VERSION}")


def job_dir_of(run_cfg, job_id) -> Path:
    """<run.output_dir>/<job_id>, a relative output_dir taken from the working directory."""
    output_dir = Path(run_cfg.output_dir).expanduser()
    if not output_dir.is_absolute():
        output_dir = Path.cwd() / output_dir
    return output_dir / str(job_id)


@registry.register_runner("runner_vpgtrans_base")
class PortableRunner(ModelSetup, SaveResume, ExtraValidation, Loaders, RunnerBase):
    """Epoch-based training and evaluation with LAVIS's loop, on any device."""

    def __init__(self, cfg, task, model, datasets, job_id):
        require_lavis()
        self._train_samplers = []  # filled by create_loaders, epoch set by train_epoch
        # what the loop decides with; saved in every checkpoint and restored on resume
        self.best_agg_metric, self.best_epoch = -math.inf, 0
        self.run_id = new_run_id(job_id)  # a resumed run takes its checkpoint's
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)
        # the validation's name in metrics.jsonl: the datasets that hold a validation split (the
        # training sets of a recipe, e.g. COCO train + SBU beside COCO val, are not part of it)
        validated = [name for name, splits in datasets.items() if set(self.valid_splits) & set(splits)]
        self.benchmark_name = "+".join(validated or self.config.datasets_cfg.keys())
        # the training step's non-finite check (common/train_loop.py); its count spans epochs
        self.task.nonfinite_guard = NonFiniteGuard(
            self.config.run_cfg.get("max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS))
        self.prepare_model()

    # ------------------------------------------------------------------ setup

    def setup_output_dir(self):
        output_dir = job_dir_of(self.config.run_cfg, self.job_id)
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        # Direct assignment: registry.register_path refuses to overwrite, so a second runner
        # in the same process (tests, notebooks) would fail.
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        self.result_dir = result_dir
        self.output_dir = output_dir

    @property
    def scaler(self):
        # GradScaler is for CUDA fp16; on CPU amp is a no-op.
        if self.config.run_cfg.get("amp", False) and self.cuda_enabled and self._scaler is None:
            self._scaler = torch.cuda.amp.GradScaler()
        return self._scaler

    # ------------------------------------------------------------------ loop

    def train(self):
        start_time = time.time()
        self.log_config()
        revalidate = False
        if not self.evaluate_only and self.resume_ckpt_path is not None:
            revalidate = self._load_checkpoint(self.resume_ckpt_path)
            self._check_resume_fits()

        cur_epoch = self.start_epoch
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                if revalidate:  # the checkpoint holds this epoch's training; its validation did not finish
                    logging.info("Epoch %d was trained but not validated before the run stopped: validating it",
                                 cur_epoch)
                    revalidate = False
                else:
                    logging.info("Start training epoch %d", cur_epoch)
                    self.log_stats(split_name="train", stats=self.train_epoch(cur_epoch))
                    self.report_skipped(cur_epoch)
                    self._save_checkpoint(cur_epoch, validated=not self.validates)

            improved = self.validate_epoch(cur_epoch)
            if not self.evaluate_only and self.validates:
                if improved:
                    self._save_checkpoint(cur_epoch, is_best=True, validated=True)
                # the same weights again, now marked validated with the best score so far
                self._save_checkpoint(cur_epoch, validated=True)

            if self.evaluate_only:
                break
            if is_dist_avail_and_initialized():
                dist.barrier()

        test_epoch = "best" if self.valid_splits and not self.evaluate_only else cur_epoch
        self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only)
        logging.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))

    @property
    def validates(self) -> bool:
        return bool(self.valid_splits or self.extra_benchmarks)

    def validate_epoch(self, cur_epoch) -> bool:
        """Every validation of an epoch, logged to metrics.jsonl; True when the primary split's
        agg_metrics beat the best so far (self.best_agg_metric / best_epoch are updated). Rank
        0 computes the metrics and decides for every rank (a sharded checkpoint write needs
        them all)."""
        improved = False
        for split_name in self.valid_splits:
            logging.info("Evaluating on %s.", split_name)
            val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
            if val_log is None:  # non-main ranks: metrics are computed on rank 0
                continue
            agg_metrics = val_log["agg_metrics"]
            if split_name == self.valid_splits[0] and agg_metrics > self.best_agg_metric:
                self.best_epoch, self.best_agg_metric, improved = cur_epoch, agg_metrics, True
            self.log_metrics(cur_epoch, self.benchmark_name, split_name, val_log)
            val_log.update({"best_epoch": self.best_epoch, "epoch": cur_epoch})
            self.log_stats(val_log, split_name)
        self.validate_extra_benchmarks(cur_epoch)
        return from_rank0(improved)

    def evaluate(self, cur_epoch="best", skip_reload=False):
        test_logs = {}
        for split_name in self.test_splits:
            test_logs[split_name] = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch,
                                                    skip_reload=skip_reload)
            if test_logs[split_name] is not None:
                self.log_stats({**test_logs[split_name], "epoch": cur_epoch}, f"test_{split_name}")
        return test_logs

    @torch.no_grad()
    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        data_loader = self.dataloaders.get(split_name, None)
        if data_loader is None:
            raise KeyError(f"no data loader for split {split_name!r}; have {sorted(self.dataloaders)}")
        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        model.eval()
        self.task.before_evaluation(model=model, dataset=self.datasets[split_name])
        try:
            results = self.task.evaluation(model, data_loader, cuda_enabled=self.cuda_enabled)
        finally:
            self.reshard_after_evaluation()
        if results is None:
            return None
        return self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)

    @property
    def iters_per_inner_epoch(self):
        value = self.config.run_cfg.get("iters_per_inner_epoch", None)
        return int(value) if value else None

    @property
    def infinite_train_loader(self) -> bool:
        # Epoch-based runs iterate the training set afresh each epoch; iteration-based runs
        # draw from endless loaders.
        return self.iters_per_inner_epoch is not None

    @property
    def max_epoch(self):
        if self.iters_per_inner_epoch is None:
            return int(self.config.run_cfg.max_epoch)
        max_iters = int(self.config.run_cfg.get("max_iters", 0))
        if max_iters <= 0 or max_iters % self.iters_per_inner_epoch:
            raise ValueError(f"run.max_iters={max_iters} must be a positive multiple of "
                             f"run.iters_per_inner_epoch={self.iters_per_inner_epoch}")
        return max_iters // self.iters_per_inner_epoch

    def train_epoch(self, epoch):
        self.seed_epoch(epoch)
        self.dataloaders  # noqa: B018  built lazily; creates the samplers
        for sampler in self._train_samplers:
            sampler.set_epoch(epoch)
        if self.iters_per_inner_epoch is None:
            if not hasattr(self.train_loader, "__len__"):
                raise ValueError("this training set is a mixture or a stream without a length: "
                                 "set run.iters_per_inner_epoch and run.max_iters (iteration-based)")
            return super().train_epoch(epoch)
        self.model.train()
        return self.task.train_iters(
            epoch=epoch, start_iters=epoch * self.iters_per_inner_epoch,
            iters_per_inner_epoch=self.iters_per_inner_epoch, model=self.model,
            data_loader=self.train_loader, optimizer=self.optimizer, scaler=self.scaler,
            lr_scheduler=self.lr_scheduler, cuda_enabled=self.cuda_enabled, log_freq=self.log_freq,
            accum_grad_iters=self.accum_grad_iters)

    def report_skipped(self, epoch):
        """Training images skipped as unreadable this epoch (run.skip_bad_samples)."""
        train = self.datasets.get("train", None)
        parts = train if isinstance(train, (list, tuple)) else getattr(train, "datasets", [train])
        skipped = sum(d.take_skipped() for d in parts if hasattr(d, "take_skipped"))
        if skipped:
            logging.warning("epoch %d: %d unreadable training image(s) skipped (run.skip_bad_samples; each is "
                            "named in a warning above)", epoch, skipped)

    def seed_epoch(self, epoch):
        """Seeds python, numpy and torch from (seed, epoch, rank): an epoch's dropout and
        augmentation do not depend on what ran before it, so resuming repeats it exactly."""
        seed = (int(self.config.run_cfg.seed) * 100_003 + epoch) * 1_009 + get_rank()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ record

    def epoch_record(self, epoch) -> dict:
        """Hook: what a subclass records about an epoch besides its number, in metrics.jsonl
        and the epoch's checkpoints (runner_vpgtrans: its stage)."""
        return {}

    @main_process
    def log_metrics(self, epoch, benchmark, split, metrics):
        """One line of metrics.jsonl, read by lavis_vpgtrans.analysis.speedup."""
        record = {"run_id": self.run_id, "epoch": epoch, **self.epoch_record(epoch), "benchmark": benchmark,
                  "split": split,
                  "metrics": {k: v for k, v in metrics.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        with open(os.path.join(self.output_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")

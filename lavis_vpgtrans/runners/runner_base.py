"""LAVIS's RunnerBase, made to run on CPU, single-process and under torchrun with gloo.

Written against salesforce-lavis 1.0.2 (checked when a runner is built: `require_lavis`),
whose RunnerBase it extends through private members that a later LAVIS may rename or drop:
  - attributes set by RunnerBase.__init__ that it reads and resets: `_model`,
    `_wrapped_model`, `_optimizer`, `_lr_sched`, `_scaler`, `_dataloaders`;
  - private methods it overrides under LAVIS's names:
    `_save_checkpoint`, `_load_checkpoint`, `_reload_best_model`;
  - also overridden: `setup_output_dir`, `create_loaders`, `train`, `train_epoch`,
    `eval_epoch`, `evaluate` and the properties `model`, `scaler`, `dataloaders`, `max_epoch`.

Fixes, each where LAVIS 1.0.2 breaks:
  - `model` returned None when the model was already on its device (e.g. device: cpu);
  - dist.barrier() ran unguarded after every epoch (crashes without a process group);
  - the prefetch loader created a CUDA stream even on CPU;
  - evaluation moved samples to CUDA (`cuda_enabled=True` hard-coded);
  - relative output_dir landed inside site-packages/lavis, and a second runner in one
    process died re-registering its paths;
  - checkpoints leaked tied / frozen weights and buffers, were written non-atomically, and
    were read back with pickle and a silent strict=False fallback.

The runner records epochs (metrics.jsonl: run id, epoch, benchmark, split, metrics, plus what
a subclass adds in `epoch_record`); the paper's epoch count is the analysis's business
(lavis_vpgtrans.analysis.speedup derives it from the run's config).
"""

import datetime
import functools
import importlib.metadata
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import torch
import torch.distributed as dist
import webdataset as wds
from lavis.common.dist_utils import (get_rank, get_world_size, is_dist_avail_and_initialized,
                                     is_main_process, main_process)
from lavis.common.registry import registry
from lavis.datasets.data_utils import concat_datasets, reorg_datasets_by_split
from lavis.datasets.datasets.dataloader_utils import IterLoader, MultiIterLoader, PrefetchLoader
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data.dataset import ChainDataset

from lavis_vpgtrans.common import sharding
from lavis_vpgtrans.common.checkpoint import (load_checkpoint_file, load_trained_state, save_checkpoint_atomic,
                                              trainable_state)
from lavis_vpgtrans.common.config import PluginConfig
from lavis_vpgtrans.common.dist import from_rank0
from lavis_vpgtrans.runners.run_record import METRICS_FILE, RunDirError, new_run_id, run_ids_in


LAVIS_VERSION = "1.0.2"  # the salesforce-lavis whose RunnerBase internals this runner relies on


def require_lavis(found=None) -> None:
    """Raises if the installed salesforce-lavis is not the version this runner was written against."""
    found = found or importlib.metadata.version("salesforce-lavis")
    if found != LAVIS_VERSION:
        raise RuntimeError(f"lavis_vpgtrans's runner overrides private members of LAVIS {LAVIS_VERSION}'s RunnerBase "
                           f"(see lavis_vpgtrans/runners/runner_base.py), but salesforce-lavis {found} is installed: "
                           f"install salesforce-lavis=={LAVIS_VERSION}")


def _without_skipped(collate, samples):
    return collate([s for s in samples if s is not None])


def _dropping_skipped(collate):
    """A collate function that drops the samples a dataset skipped (None, run.skip_bad_samples),
    also where LAVIS's ConcatDataset.collater (several training sets) would fail on them."""
    return None if collate is None else functools.partial(_without_skipped, collate)


def job_dir_of(run_cfg, job_id) -> Path:
    """<run.output_dir>/<job_id>, a relative output_dir taken from the working directory."""
    output_dir = Path(run_cfg.output_dir).expanduser()
    if not output_dir.is_absolute():
        output_dir = Path.cwd() / output_dir
    return output_dir / str(job_id)


@registry.register_runner("runner_vpgtrans_base")
class PortableRunner(RunnerBase):
    """Epoch-based training and evaluation with LAVIS's loop, on any device."""


    def __init__(self, cfg, task, model, datasets, job_id):
        require_lavis()
        self._train_samplers = []  # filled by create_loaders, epoch set by train_epoch
        self._checkpointing_applied = False  # run.activation_checkpointing, applied once
        # what the loop decides with; saved in every checkpoint and restored on resume
        self.best_agg_metric, self.best_epoch = -math.inf, 0
        self.run_id = new_run_id(job_id)  # a resumed run takes its checkpoint's
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)
        # the validation's name in metrics.jsonl: the datasets that hold a validation split (the
        # training sets of a recipe, e.g. COCO train + SBU beside COCO val, are not part of it)
        validated = [name for name, splits in datasets.items() if set(self.valid_splits) & set(splits)]
        self.benchmark_name = "+".join(validated or self.config.datasets_cfg.keys())

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
    def sharding_config(self):
        """`run.fsdp` (common/sharding.py), or None: plain DDP."""
        return sharding.ShardingConfig.parse(self.config.run_cfg.get("fsdp", None))

    @property
    def checkpointing_config(self):
        """`run.activation_checkpointing` (common/sharding.py), or None."""
        return sharding.CheckpointingConfig.parse(self.config.run_cfg.get("activation_checkpointing", None))

    @property
    def model(self):
        """The model on its device: wrapped in DDP when distributed, or with `run.fsdp` sharded in
        place (once: a stage switch changes which parameters train, not the sharding)."""
        first = self._wrapped_model is None and not sharding.is_sharded(self._model)
        if self.checkpointing_config is not None and not self._checkpointing_applied:
            sharding.apply_activation_checkpointing(self._model, self.checkpointing_config)
            self._checkpointing_applied = True
            logging.info("run.activation_checkpointing: %s", self.checkpointing_config)
        if first and self.sharding_config is not None:
            if not self.use_distributed:
                raise ValueError("run.fsdp shards the model over the processes of a distributed run: "
                                 "launch with torchrun (or remove run.fsdp)")
            from torch.distributed.device_mesh import init_device_mesh

            # sharded where it sits, then moved: a rank never holds the whole LLM on its device
            mesh = init_device_mesh(self.device.type, (get_world_size(),))
            sharding.shard_model(self._model, self.sharding_config, mesh=mesh)
            logging.info("run.fsdp: %s", self.sharding_config)
        if self._model.device != self.device:
            self._model = self._model.to(self.device)
        if sharding.is_sharded(self._model):
            # parameters sharded again after an evaluation: the optimizer is built from these
            self._wrapped_model = sharding.resharded(self._model)
        elif self._wrapped_model is None:
            if self.use_distributed:
                device_ids = [self.config.run_cfg.gpu] if self.cuda_enabled else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids)
            else:
                self._wrapped_model = self._model
        if first and hasattr(self._model, "llm_model"):
            logging.info("this rank holds %d bytes of the LLM's weights and buffers",
                         sharding.local_bytes(self._model.llm_model))
        return self._wrapped_model

    def unwrap_dist_model(self, model):
        return model.module if isinstance(model, DDP) else model

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
        results = self.task.evaluation(model, data_loader, cuda_enabled=self.cuda_enabled)
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

    # ------------------------------------------------------------------ validation


    @main_process
    def log_metrics(self, epoch, benchmark, split, metrics):
        """One line of metrics.jsonl, read by lavis_vpgtrans.analysis.speedup."""
        record = {"run_id": self.run_id, "epoch": epoch, **self.epoch_record(epoch), "benchmark": benchmark,
                  "split": split,
                  "metrics": {k: v for k, v in metrics.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        with open(os.path.join(self.output_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def extra_benchmarks(self):
        """`run.extra_validation`: [{name, cfg_path, split}] of evaluation configs (their task,
        datasets and generation settings; their model section is not used) run every epoch."""
        if not hasattr(self, "_extra_benchmarks"):
            self._extra_benchmarks = []
            for entry in self.config.run_cfg.get("extra_validation", None) or []:
                self._extra_benchmarks.append(self._build_benchmark(entry))
        return self._extra_benchmarks

    def _build_benchmark(self, entry):
        from lavis import tasks
        from omegaconf import OmegaConf

        for key in ("name", "cfg_path"):
            if key not in entry:
                raise KeyError(f"run.extra_validation entry {dict(entry)} has no {key!r}")
        # relative to the working directory, or else to the directory of the run's config
        main_cfg_dir = os.path.dirname(os.path.abspath(self.config.args.cfg_path))
        candidates = [entry.cfg_path, os.path.join(main_cfg_dir, entry.cfg_path)]
        cfg_path = next((c for c in candidates if os.path.isfile(c)), None)
        if cfg_path is None:
            raise FileNotFoundError(f"run.extra_validation {entry.name!r}: no config at {' or '.join(candidates)}")
        raw = OmegaConf.load(cfg_path)
        raw = OmegaConf.merge(raw, {"datasets": entry.get("datasets", {}) or {}})
        run_cfg = OmegaConf.merge(raw.run, entry.get("run", {}) or {})
        cfg = SimpleNamespace(run_cfg=run_cfg, datasets_cfg=PluginConfig.build_dataset_config(raw).datasets)
        task = tasks.setup_task(cfg)
        datasets = task.build_datasets(cfg)
        split = entry.get("split", None) or (list(run_cfg.get("test_splits", [])) or ["val"])[0]
        dataset = [d[split] for d in datasets.values()]
        if len(dataset) != 1:
            raise ValueError(f"run.extra_validation {entry.name!r}: expected one dataset, got {list(datasets)}")
        loader = self.create_loaders([dataset[0]], num_workers=self.config.run_cfg.num_workers,
                                     batch_sizes=[self.config.run_cfg.batch_size_eval], is_trains=[False],
                                     collate_fns=[getattr(dataset[0], "collater", None)])[0]
        return SimpleNamespace(name=entry.name, task=task, split=split, dataset=dataset[0], loader=loader)

    @torch.no_grad()
    def validate_extra_benchmarks(self, epoch):
        if not self.extra_benchmarks:
            return
        model = self.unwrap_dist_model(self.model)
        model.eval()
        result_dir = registry.get_path("result_dir")
        for bench in self.extra_benchmarks:
            # each benchmark's result files in its own folder: tasks name them by split only
            registry.mapping["paths"]["result_dir"] = os.path.join(result_dir, bench.name)
            os.makedirs(registry.get_path("result_dir"), exist_ok=True)
            try:
                bench.task.before_evaluation(model=model, dataset=bench.dataset)
                results = bench.task.evaluation(model, bench.loader, cuda_enabled=self.cuda_enabled)
                metrics = bench.task.after_evaluation(val_result=results, split_name=bench.split, epoch=epoch)
            finally:
                registry.mapping["paths"]["result_dir"] = result_dir
            if metrics is not None and is_main_process():
                self.log_metrics(epoch, bench.name, bench.split, metrics)
                self.log_stats({**metrics, "epoch": epoch}, f"val_{bench.name}")

    # ------------------------------------------------------------------ data

    @property
    def dataloaders(self) -> dict:
        """As LAVIS: datasets grouped by split, the training sets concatenated (map-style) or
        chained (webdataset) -- or, with `run.train_dataset_ratios` {name: ratio}, sampled
        from by those ratios."""
        if self._dataloaders is None:
            ratios = self.config.run_cfg.get("train_dataset_ratios", None)
            train_ratios = None
            if ratios is not None:
                names = [n for n, splits in self.datasets.items() if "train" in splits]
                missing, unexpected = set(ratios) - set(names), set(names) - set(ratios)
                if missing or unexpected:
                    raise ValueError(f"run.train_dataset_ratios {dict(ratios)} must name exactly the "
                                     f"training datasets {names}")
                train_ratios = [float(ratios[n]) for n in names]
            by_split = reorg_datasets_by_split(self.datasets)
            train_list = by_split.pop("train", None) if ratios is not None else None
            self.datasets = concat_datasets(by_split)
            if train_list is not None:
                self.datasets["train"] = train_list if len(train_list) > 1 else train_list[0]

            split_names = sorted(self.datasets)
            datasets = [self.datasets[s] for s in split_names]
            collate_fns = [[getattr(d, "collater", None) for d in ds] if isinstance(ds, (list, tuple))
                           else _dropping_skipped(getattr(ds, "collater", None)) for ds in datasets]
            loaders = self.create_loaders(
                datasets=datasets, num_workers=self.config.run_cfg.num_workers,
                batch_sizes=[self.config.run_cfg.batch_size_train if s == "train"
                             else self.config.run_cfg.batch_size_eval for s in split_names],
                is_trains=[s in self.train_splits for s in split_names],
                collate_fns=collate_fns, dataset_ratios=train_ratios)
            self._dataloaders = dict(zip(split_names, loaders))
        return self._dataloaders

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns,
                       dataset_ratios=None):
        """LAVIS's loader construction, except: the CUDA prefetcher only on CUDA; training
        samplers are seeded DistributedSamplers (also for one process) whose epoch the runner
        sets, so the data order is a function of (seed, epoch); a single map-style training
        set is iterated afresh each epoch (LAVIS's IterLoader only for mixtures, which
        sample from several loaders)."""
        def _create_loader(dataset, bsz, is_train, collate_fn, infinite):
            if isinstance(dataset, (ChainDataset, wds.DataPipeline)):
                # webdataset pipelines shard, shuffle and collate themselves
                return iter(DataLoader(dataset, batch_size=bsz, num_workers=num_workers,
                                       pin_memory=self.cuda_enabled))
            sampler = None
            if is_train:
                sampler = DistributedSampler(dataset, shuffle=True, num_replicas=get_world_size(),
                                             rank=get_rank(), seed=int(self.config.run_cfg.seed))
                self._train_samplers.append(sampler)
            elif self.use_distributed and self.use_dist_eval_sampler:
                sampler = DistributedSampler(dataset, shuffle=False, num_replicas=get_world_size(),
                                             rank=get_rank())
            loader = DataLoader(dataset, batch_size=bsz, num_workers=num_workers,
                                pin_memory=self.cuda_enabled, sampler=sampler, collate_fn=collate_fn,
                                drop_last=is_train)
            if self.cuda_enabled:
                loader = PrefetchLoader(loader)
            if is_train and infinite:
                loader = IterLoader(loader, use_distributed=True)  # True: it calls set_epoch
            return loader

        loaders = []
        for dataset, bsz, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):
                loaders.append(MultiIterLoader(
                    loaders=[_create_loader(d, bsz, is_train, collate_fn[i], infinite=True)
                             for i, d in enumerate(dataset)],
                    ratios=dataset_ratios))
            else:
                loaders.append(_create_loader(dataset, bsz, is_train, collate_fn,
                                              infinite=self.infinite_train_loader))
        return loaders

    # ------------------------------------------------------------------ checkpoints

    def trainable_state_dict(self):
        """Trainable parameters only: no frozen ViT / LLM, no buffers, no tied copies. Full
        tensors also when sharded (gathered: then every rank must call this)."""
        model = self.unwrap_dist_model(self.model)
        if sharding.is_sharded(model):
            return sharding.full_trainable_state(model)
        return {n: v.cpu() for n, v in trainable_state(model).items()}

    def optimizer_state_dict(self):
        """The optimizer's state; when sharded, with full tensors keyed by parameter name (gathered on
        rank 0: every rank must call this)."""
        model = self.unwrap_dist_model(self.model)
        if sharding.is_sharded(model):
            return sharding.full_optimizer_state(model, self.optimizer)
        return self.optimizer.state_dict()

    def _save_checkpoint(self, cur_epoch, is_best=False, validated=False):
        """Written by rank 0, atomically; every rank calls it (a sharded model is gathered first)."""
        sharded = sharding.is_sharded(self.unwrap_dist_model(self.model))
        if not (sharded or is_main_process()):
            return
        model_state, optimizer_state = self.trainable_state_dict(), self.optimizer_state_dict()
        if not is_main_process():
            return
        save_obj = {
            "model": model_state,
            "optimizer": optimizer_state,
            "optimizer_layout": "full_state_dict" if sharded else "torch",
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            **self.epoch_record(cur_epoch),
            "iters": (cur_epoch + 1) * (self.iters_per_inner_epoch or len(self.train_loader)),
            "loop": {"run_id": self.run_id, "validated": bool(validated), "best_epoch": self.best_epoch,
                     "best_agg_metric": None if self.best_agg_metric == -math.inf else float(self.best_agg_metric)},
        }
        save_to = os.path.join(self.output_dir, "checkpoint_{}.pth".format("best" if is_best else cur_epoch))
        logging.info("Saving checkpoint at epoch %s to %s.", cur_epoch, save_to)
        save_checkpoint_atomic(save_obj, save_to)

    def load_trained_weights(self, model, state, source):
        """A checkpoint's trainable weights (full tensors) into the model, sharded or not."""
        if sharding.is_sharded(model):
            sharding.load_trained_state(model, state, source)
        else:
            load_trained_state(model, state, source)

    def prepare_resume(self, checkpoint):
        """Hook: put the runner in the checkpoint's state before its weights are loaded."""

    def _reload_best_model(self, model):
        checkpoint_path = os.path.join(self.output_dir, "checkpoint_best.pth")
        logging.info("Loading checkpoint from %s.", checkpoint_path)
        self.load_trained_weights(model, load_checkpoint_file(checkpoint_path)["model"], checkpoint_path)
        return model

    def _load_checkpoint(self, url_or_filename) -> bool:
        """Resume: model (trainable part), optimizer, scaler, epoch and the loop's state (run id,
        best score, whether the epoch was validated). Returns True when the checkpoint's epoch
        must be validated again (its validation did not finish)."""
        checkpoint = load_checkpoint_file(url_or_filename)
        self.prepare_resume(checkpoint)
        model = self.unwrap_dist_model(self.model)
        self.load_trained_weights(model, checkpoint["model"], url_or_filename)
        layout = checkpoint.get("optimizer_layout", "torch")
        if layout != ("full_state_dict" if sharding.is_sharded(model) else "torch"):
            raise ValueError(f"{url_or_filename}: its optimizer state was saved {'with' if layout == 'full_state_dict' else 'without'} "
                             f"run.fsdp; resume it {'with' if layout == 'full_state_dict' else 'without'} run.fsdp "
                             f"(its weights load either way, e.g. as vpg_checkpoint / projector_checkpoint)")
        if layout == "full_state_dict":
            sharding.load_full_optimizer_state(model, self.optimizer, checkpoint["optimizer"])
        else:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.resumed_epoch = int(checkpoint["epoch"])
        loop = checkpoint.get("loop", None)
        if loop is None:
            logging.warning("%s predates the loop state in checkpoints: its best score is unknown, so the "
                            "first epoch after resuming becomes checkpoint_best.pth", url_or_filename)
            revalidate = False
        else:
            self.run_id = loop["run_id"]
            self.best_epoch = int(loop["best_epoch"])
            best = loop["best_agg_metric"]
            self.best_agg_metric = -math.inf if best is None else float(best)
            revalidate = not loop["validated"] and self.validates
        self.start_epoch = self.resumed_epoch + (0 if revalidate else 1)
        self._check_metrics_run_id()
        logging.info("Resume checkpoint from %s (run %s, epoch %d%s; best %s at epoch %d)", url_or_filename,
                     self.run_id, self.resumed_epoch, ", to validate again" if revalidate else "",
                     self.best_agg_metric, self.best_epoch)
        return revalidate

    def _check_metrics_run_id(self):
        """A resumed run appends to metrics.jsonl only where it holds this run's records
        (checked by rank 0, which writes it; every rank raises)."""
        error = None
        if is_main_process():
            path = os.path.join(self.output_dir, METRICS_FILE)
            others = [i for i in run_ids_in(path) if i != self.run_id]
            if others:
                error = (f"{path} holds run(s) {', '.join(others) or '(no run id)'}, but the checkpoint resumed "
                         f"is run {self.run_id}: resume into another run.output_dir or run.job_id")
        error = from_rank0(error)
        if error:
            raise RunDirError(error)

    def _check_resume_fits(self):
        if self.resumed_epoch >= self.max_epoch:
            raise ValueError(f"run.resume_ckpt_path={self.resume_ckpt_path} is epoch {self.resumed_epoch} "
                             f"(0-based) but run.max_epoch={self.max_epoch}: there is nothing to train; "
                             f"raise run.max_epoch to continue the run")
        if self.start_epoch >= self.max_epoch:
            logging.warning("the resumed checkpoint is the last epoch (run.max_epoch=%d), already validated: "
                            "nothing to train, only the test splits run", self.max_epoch)

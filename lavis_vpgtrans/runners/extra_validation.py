"""`run.extra_validation`: more benchmarks validated every epoch beside the run's own validation
splits, each from an evaluation config (its task, datasets and generation settings; its model
section is not used), e.g. toy VQA beside a captioning run (projects/vpgtrans/demo/tiny_recipe_opt.yaml):

    run:
      extra_validation:
        - name: toy_vqa
          cfg_path: tiny_vqa_eval_opt.yaml   # relative to the working directory or the run's config
          split: val                         # optional, as are `run:` and `datasets:` overrides

Each benchmark's metrics are a line of metrics.jsonl (its `name` as the benchmark) and its
result files go to result/<name>/. The entries' keys are checked with the rest of the config
(common/config.py: EXTRA_VALIDATION_KEYS).
"""

import os
from types import SimpleNamespace

import torch
from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry

from lavis_vpgtrans.common.config import PluginConfig


class ExtraValidation:
    """The extra validations of a PortableRunner (runner_base.py): a mixin over LAVIS's RunnerBase."""

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
                self.reshard_after_evaluation()
            if metrics is not None and is_main_process():
                self.log_metrics(epoch, bench.name, bench.split, metrics)
                self.log_stats({**metrics, "epoch": epoch}, f"val_{bench.name}")

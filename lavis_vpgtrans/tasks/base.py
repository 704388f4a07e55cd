"""What our evaluation tasks share on top of LAVIS's BaseTask.

- `build_datasets` keeps each dataset's (resolved) config, so a task can read the ground-truth
  file paths its builder resolved (LAVIS's own tasks download them from hard-coded URLs).
- `evaluation` moves batches to the model's device instead of always to CUDA.
- `warn_if_empty`: a validation whose outputs are all empty (every caption, every answer) is
  logged as a warning naming the epoch, not scored silently as a normal epoch.
- `save_result` is LAVIS's gather-by-files (one file per rank, merged on rank 0), with a
  linear-time de-duplication: LAVIS's list scan is quadratic, hours on VQAv2 val's 214k
  questions.
"""

import json
import logging
import os

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.logger import MetricLogger
from lavis.common.registry import registry
from lavis.datasets.data_utils import apply_to_sample


def eval_splits(cfg):
    """The split names a run evaluates (run_cfg.valid_splits + test_splits)."""
    run_cfg = cfg.run_cfg
    return list(run_cfg.get("valid_splits", []) or []) + list(run_cfg.get("test_splits", []) or [])


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class EvalTaskMixin:
    """Mixed into LAVIS task classes (put it first in the bases)."""

    def build_datasets(self, cfg):
        datasets_config = cfg.datasets_cfg
        if len(datasets_config) == 0:
            raise ValueError("the config has no `datasets` section: an evaluation needs one dataset")
        datasets, self.dataset_configs = {}, {}
        for name in datasets_config:
            builder = registry.get_builder_class(name)
            if builder is None:
                raise KeyError(f"no dataset builder registered as {name!r}")
            builder = builder(datasets_config[name])
            datasets[name] = builder.build_datasets()
            self.dataset_configs[name] = builder.config
        return datasets

    def evaluation(self, model, data_loader, cuda_enabled=True):
        # LAVIS moves every batch to CUDA; we follow the model instead (CPU runs, tests).
        device = model_device(model)
        metric_logger = MetricLogger(delimiter="  ")
        results = []
        for samples in metric_logger.log_every(data_loader, 10, "Evaluation"):
            samples = apply_to_sample(lambda t: t.to(device), samples)
            results.extend(self.valid_step(model=model, samples=samples))
        if is_dist_avail_and_initialized():
            dist.barrier()
        return results

    @staticmethod
    def save_result(result, result_dir, filename, remove_duplicate=""):
        """Writes this rank's results, then rank 0 merges all ranks' files (keeping the first
        result per `remove_duplicate` key: DistributedSampler pads with repeats)."""
        rank_file = os.path.join(result_dir, "%s_rank%d.json" % (filename, get_rank()))
        final_file = os.path.join(result_dir, "%s.json" % filename)
        with open(rank_file, "w") as f:
            json.dump(result, f)
        if is_dist_avail_and_initialized():
            dist.barrier()
        if is_main_process():
            merged, seen = [], set()
            for rank in range(get_world_size()):
                with open(os.path.join(result_dir, "%s_rank%d.json" % (filename, rank))) as f:
                    for res in json.load(f):
                        if remove_duplicate:
                            key = res[remove_duplicate]
                            if key in seen:
                                continue
                            seen.add(key)
                        merged.append(res)
            with open(final_file, "w") as f:
                json.dump(merged, f)
            logging.info("result file saved to %s (%d results)", final_file, len(merged))
        return final_file

    @staticmethod
    def warn_if_empty(result_file, field, what, split_name, epoch) -> bool:
        """Rank 0: warns, naming the epoch, when every output of a validation is empty (e.g. every
        caption: the model ends its text at once); its scores are then not a normal epoch's.
        True when it warned."""
        if not is_main_process():
            return False
        with open(result_file) as f:
            outputs = [str(r.get(field, "")).strip() for r in json.load(f)]
        if outputs and not any(outputs):
            logging.warning("epoch %s: the validation on %r produced nothing: all %d %s are empty (the model "
                            "ends its text at once); its scores are those of empty outputs, not a normal epoch's",
                            epoch, split_name, len(outputs), what)
            return True
        return False

    @staticmethod
    def write_eval_log(split_name, metrics):
        """Appends {split: metrics} to <output_dir>/evaluate.txt, as LAVIS's caption task does."""
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
            f.write(json.dumps({split_name: metrics}) + "\n")

"""The entry points behind train.py and evaluate.py: LAVIS's flow with the plugin loaded.

    parse config -> init torch.distributed (gloo on CPU, nccl on GPU) -> seeds -> logger
    -> task -> datasets -> model -> runner.train() / runner.evaluate()

LAVIS and the plugin are registered before the config is parsed: importing this module runs
the package's __init__ first.
"""

import argparse
import logging
import random
import sys
from datetime import datetime

import numpy as np
import torch

import lavis.tasks as tasks
from lavis.common.dist_utils import get_rank, get_world_size
from lavis.common.logger import setup_logger

from lavis_vpgtrans.common import sharding
from lavis_vpgtrans.common.config import BUILDER_KEY, PluginConfig, check_config, load_config, runner_class
from lavis_vpgtrans.common.dist import from_rank0, init_distributed_mode
from lavis_vpgtrans.datasets.builders import register_builder_plugins
from lavis_vpgtrans.runners.run_record import RunDirError, check_fresh_run_dir, claim_run_dir
from lavis_vpgtrans.runners.runner_base import job_dir_of


def parse_args(argv, description, with_ckpt=False):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the configuration yaml")
    parser.add_argument("--options", nargs="+", default=None,
                        help="override config entries, e.g. model.llm_model=/models/opt-6.7b run.device=cpu")
    if with_ckpt:
        parser.add_argument("--ckpt", default=None,
                            help="a trained checkpoint to evaluate (sets model.finetuned, load_finetuned)")
    return parser.parse_args(argv)


def setup_seeds(cfg):
    seed = int(cfg.run_cfg.seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shards_llm(run_cfg) -> bool:
    """run.fsdp with shard_llm in a run of several processes (model_setup.prepare_model shards it)."""
    fsdp = sharding.ShardingConfig.parse(run_cfg.get("fsdp", None))
    return fsdp is not None and fsdp.shard_llm and get_world_size() > 1


def make_job_id(cfg) -> str:
    """run.job_id if set, else a timestamp agreed by all ranks (they may straddle a second)."""
    return str(from_rank0(cfg.run_cfg.get("job_id", None) or datetime.now().strftime("%Y%m%d%H%M%S")))


def claim_output_dir(cfg, job_id, training):
    """One run per output directory (runners/run_record.py), checked by rank 0 before anything
    is built; every rank raises the same error."""
    error = None
    if get_rank() == 0:
        job_dir = job_dir_of(cfg.run_cfg, job_id)
        try:
            claim_run_dir(job_dir)
            if training and not cfg.run_cfg.get("resume_ckpt_path", None):
                check_fresh_run_dir(job_dir)
        except RunDirError as e:
            error = str(e)
    error = from_rank0(error)
    if error:
        raise RunDirError(error)


def build(argv, description, evaluate):
    args = parse_args(argv, description, with_ckpt=evaluate)
    if evaluate:
        options = list(args.options or []) + ["run.evaluate=True"]
        if args.ckpt:
            options += ["model.load_finetuned=True", f"model.finetuned={args.ckpt}"]
        args.options = options
    # builders of other packages (the toy world's) that the config names, before LAVIS looks them up
    datasets = load_config(args.cfg_path).get("datasets", None) or {}
    register_builder_plugins(set(datasets) | {(e or {}).get(BUILDER_KEY, None) for e in datasets.values()} - {None})
    cfg = PluginConfig(args)
    # typos and unknown registry names fail here, before anything is built (the run keys this
    # module reads count as known)
    check_config(cfg, readers=[sys.modules[__name__]])
    init_distributed_mode(cfg.run_cfg)
    setup_seeds(cfg)
    setup_logger()
    cfg.pretty_print()
    job_id = make_job_id(cfg)
    claim_output_dir(cfg, job_id, training=not evaluate)
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    # run.fsdp sharding the LLM over several processes: ranks but 0 build it without its weights,
    # which the runner's sharding fills from rank 0 (common/sharding.py)
    with sharding.llm_weights_from_rank0(shards_llm(cfg.run_cfg)):
        model = task.build_model(cfg)
    runner_cls = runner_class(cfg.run_cfg)
    runner = runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    logging.info("output dir: %s", runner.output_dir)
    return runner


def train_main(argv=None):
    build(argv, "Train a model with LAVIS's loop (lavis-vpgtrans).", evaluate=False).train()


def evaluate_main(argv=None):
    build(argv, "Evaluate a model with LAVIS's loop (lavis-vpgtrans).", evaluate=True).evaluate(skip_reload=True)

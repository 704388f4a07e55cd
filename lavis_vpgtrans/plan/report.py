"""The plan of a run config, printed: `python -m lavis_vpgtrans.plan` and train.py's first lines."""

import argparse
import logging
import math
import os
import sys
from typing import List, Optional

from lavis_vpgtrans.plan.estimate import (ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, GIB, Setting, card_bytes, flag_config,
                                          make_plan, stages_of, text_tokens)
from lavis_vpgtrans.plan.weights import PlanError

CHECKPOINTING_ON = {"llm": True, "qformer": True}
FSDP_DEFAULTS = {"shard_llm": True, "shard_vit": True}


def load_run_config(cfg_path: str, options: Optional[List[str]] = None):
    """The run config as train.py builds it (LAVIS's Config with the plugin's changes)."""
    from lavis_vpgtrans.common.config import PluginConfig, load_config
    from lavis_vpgtrans.datasets.builders import register_builder_plugins

    register_builder_plugins(load_config(cfg_path).get("datasets", None) or {})
    return PluginConfig(argparse.Namespace(cfg_path=cfg_path, options=options))


def check_arch(cfg) -> None:
    from lavis.common.registry import registry

    from lavis_vpgtrans.models.vl_llm import Blip2VLLLM

    arch = cfg.model_cfg.get("arch", None)
    cls = registry.get_model_class(arch)
    if cls is None or not issubclass(cls, Blip2VLLLM):
        raise PlanError(f"model.arch={arch!r}: the planner plans the VL-LLMs (ViT + Q-Former + projector + LLM), "
                        f"not {cls.__name__ if cls else 'an unregistered class'}")


def setting_of(cfg, gpus: int, on_gpu: bool = True) -> Setting:
    run = cfg.run_cfg
    return Setting(batch=int(run.get("batch_size_train", 1)), gpus=gpus,
                   fsdp=flag_config(run.get("fsdp", None), FSDP_DEFAULTS),
                   checkpointing=flag_config(run.get("activation_checkpointing", None), CHECKPOINTING_ON),
                   amp_on_gpu=on_gpu and bool(run.get("amp", False)), on_gpu=on_gpu,
                   accum=int(run.get("accum_grad_iters", 1)))


MIB = 2 ** 20


def _gib(x: float, unit: int = GIB) -> str:
    return f"{x / unit:8.2f}"


def format_plan(cfg, gpus: int = 1, gpu_gib: Optional[float] = None, title: str = "") -> str:
    """The plan of a run config as text (see estimate.py for what is counted and how)."""
    check_arch(cfg)
    model_cfg = cfg.model_cfg
    on_gpu = str(cfg.run_cfg.get("device", "cuda")) != "cpu"
    setting = setting_of(cfg, gpus, on_gpu)
    stages = stages_of(cfg)
    cache = {}
    plan = make_plan(model_cfg, setting, stages, gpu_gib, cache)
    other_ck = None if setting.checkpointing else CHECKPOINTING_ON
    other = make_plan(model_cfg, Setting(**{**setting.__dict__, "checkpointing": other_ck}), stages, None, cache,
                      alternatives=False)
    info = plan.info
    unit, unit_name = (GIB, "GiB") if plan.worst.peak >= 2 * GIB else (MIB, "MiB")
    accum = int(cfg.run_cfg.get("accum_grad_iters", 1))
    lines = [f"Memory plan{(' of ' + title) if title else ''}: {model_cfg.arch}, LLM {model_cfg.llm_model} "
             f"({info.source})",
             f"per rank: {gpus} {'GPU(s)' if on_gpu else 'CPU process(es) (run.device: cpu)'}{', run.fsdp ' + str(setting.fsdp) if setting.fsdp else (', DDP' if gpus > 1 else '')}"
             f", batch {setting.batch} per GPU (x {accum} accumulation x {gpus} = {setting.batch * accum * gpus}), "
             f"{model_cfg.get('num_query_token', 32)} queries + {text_tokens(model_cfg)} text tokens, "
             f"activation checkpointing {setting.checkpointing or 'off'}"]
    for sp in plan.stages:
        what = "projector trains" if sp.stage == 1 else "VPG + projector" + (" + LoRA" if info.lora_rank_total else "") \
            + " train"
        lines.append(f"stage {sp.stage} ({what}):")
        lines.append(f"  {'part':<44}{'params':>16} {unit_name:>8}  stored as")
        for p in sp.parts:
            lines.append(f"  {p.name:<44}{p.params:>16,} {_gib(p.bytes, unit)}  {p.storage}")
        for name, value in sp.rows.items():
            if name != "activations":
                lines.append(f"  {name:<44}{'':>16} {_gib(value, unit)}")
        lines.append(f"  {'activations (batch ' + str(setting.batch) + ')':<44}{'':>16} {_gib(sp.rows['activations'], unit)}")
        for name, value in sp.activation_detail.items():
            lines.append(f"    {name:<42}{'':>16} {_gib(value * setting.batch, unit)}")
        osp = next(o for o in other.stages if o.stage == sp.stage)
        lines.append(f"  {'  activations with checkpointing ' + ('off' if other_ck is None else 'on'):<44}{'':>16} "
                     f"{_gib(osp.rows['activations'], unit)}")
        lines.append(f"  {'planned peak (tensors), at ' + sp.peak_at:<60} {_gib(sp.peak, unit)}  "
                     f"on the card: x{1 + ALLOCATOR_SLACK:.2f} + {CUDA_CONTEXT_GIB} GiB context = "
                     f"{sp.peak * (1 + ALLOCATOR_SLACK) / GIB + CUDA_CONTEXT_GIB:.2f} GiB")
    if gpu_gib is not None:
        lines += _verdict(plan, setting, gpu_gib, accum, gpus)
    return "\n".join(lines)


def _verdict(plan, setting, gpu_gib, accum, gpus) -> List[str]:
    need = plan.worst.peak * (1 + ALLOCATOR_SLACK) / GIB + CUDA_CONTEXT_GIB
    largest = plan.largest_batch()
    out = [f"verdict for a {gpu_gib:g} GiB GPU:"]
    if plan.fits():
        out.append(f"  FITS: {need:.1f} GiB planned at batch {setting.batch}; the largest batch that fits is {largest}")
    else:
        out.append(f"  DOES NOT FIT: {need:.1f} GiB planned at batch {setting.batch}")
        if largest >= 1:
            keep = math.ceil(setting.batch * accum / largest)
            out.append(f"  the largest batch that fits is {largest}: run.batch_size_train={largest} "
                       f"run.accum_grad_iters={keep} gives an effective batch of {largest * keep * gpus} "
                       f"(the config's: {setting.batch * accum * gpus})")
        else:
            out.append("  no batch fits with these settings")
    if plan.alternatives:
        out.append("  other settings (planned peak at the config's batch on the card, largest batch that fits):")
        for label, peak, batch in plan.alternatives:
            card = peak * (1 + ALLOCATOR_SLACK) / GIB + CUDA_CONTEXT_GIB
            mark = "fits" if peak <= card_bytes(gpu_gib) else "does not fit"
            out.append(f"    {label:<62} {card:7.1f} GiB ({mark}), largest batch {batch}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_vpgtrans.plan",
        description="What a training run of a config holds per GPU (weights, gradients, optimizer state, "
                    "activations), planned from the config without loading a weight, and whether it fits.")
    parser.add_argument("--cfg-path", default=None, help="the training config (as for train.py)")
    parser.add_argument("--options", nargs="+", default=None,
                        help="config overrides as for train.py, e.g. model.llm_quantization.bits=4")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) of the run: DDP, or run.fsdp's shards")
    parser.add_argument("--gpu-gib", type=float, default=None, help="memory of one GPU in GiB: print a verdict")
    parser.add_argument("--fits-table", action="store_true",
                        help="instead: the README's table of what fits where (stage 2 of each target; --cfg-path not needed)")
    args = parser.parse_args(argv)
    if args.fits_table:
        print(fits_table())
        return 0
    if args.gpus < 1:
        parser.error("--gpus must be at least 1")
    if not args.cfg_path:
        parser.error("--cfg-path is required")
    try:
        cfg = load_run_config(args.cfg_path, args.options)
        print(format_plan(cfg, args.gpus, args.gpu_gib, title=args.cfg_path))
    except (PlanError, FileNotFoundError, KeyError) as e:  # (the config's own checks raise the latter two)
        print(f"plan: {e}", file=sys.stderr)
        return 2
    return 0


def log_plan(argv) -> None:
    """train.py's first output, on rank 0: the plan of its config for the GPUs it runs on. Never
    stops a run: a config the planner cannot plan gets one line saying why."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        import torch

        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--cfg-path")
        parser.add_argument("--options", nargs="+", default=None)
        args, _ = parser.parse_known_args(argv)
        if not args.cfg_path:
            return
        gpu_gib = None
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            gpu_gib = torch.cuda.get_device_properties(local).total_memory / GIB
        cfg = load_run_config(args.cfg_path, args.options)
        gpus = int(os.environ.get("WORLD_SIZE", "1"))
        print(format_plan(cfg, gpus, gpu_gib, title=args.cfg_path), flush=True)
    except Exception as e:  # noqa: BLE001  the plan informs, it never stops training
        logging.getLogger(__name__).warning("memory plan not available: %s", e)
        print(f"memory plan not available: {e}", flush=True)


# ---------------------------------------------------------------------------- what fits where

# The README's targets: (label, stage-2 config, overrides)
TABLE_TARGETS = [
    ("OPT-6.7B", "projects/vpgtrans/stage2.yaml", []),
    ("LLaMA-7B", "projects/vpgtrans/scale_up/opt6.7b_to_llama7b_stage2.yaml", []),
    ("Vicuna-7B", "projects/vpgtrans/scale_up/opt6.7b_to_vicuna7b_stage2.yaml", []),
    ("Vicuna-13B", "projects/vpgtrans/scale_up/opt6.7b_to_vicuna7b_stage2.yaml",
     ["model.llm_model=lmsys/vicuna-13b-v1.1"]),
    ("Llama-3-8B", "projects/vpgtrans/scale_up/opt6.7b_to_llama7b_stage2.yaml",
     ["model.arch=blip2_causal_lm", "model.model_type=llama3_8b"]),
    ("Qwen2.5-7B", "projects/vpgtrans/scale_up/opt6.7b_to_llama7b_stage2.yaml",
     ["model.arch=blip2_causal_lm", "model.model_type=qwen2.5_7b"]),
    ("Flan-T5-XXL", "projects/vpgtrans/scale_up/flant5xl_to_flant5xxl_stage2.yaml", []),
]
TABLE_SETTINGS = [
    ("one GPU, LLM {precision}", [], 1, None),
    ("one GPU, 4-bit", ["model.llm_quantization.bits=4"], 1, None),
    ("one GPU, 4-bit + LoRA r=8", ["model.llm_quantization.bits=4", "model.llm_lora.r=8"], 1, None),
    ("DDP on 8, per GPU", [], 8, None),
    ("FSDP on 8, per GPU", [], 8, dict(FSDP_DEFAULTS)),
]
TABLE_CARDS = (24, 40, 80)


def fits_table(repo_root: str = ".") -> str:
    """Markdown: for each target and setting, the largest stage-2 batch per GPU that fits each card
    (planned), the config's batch and the planned peak at it."""
    rows = ["| target | setting | weights + grads + AdamW per GPU (GiB) | activations per sample (GiB) "
            "| peak at the config's batch (GiB on the card) | " + " | ".join(f"{c} GB: largest batch" for c in TABLE_CARDS)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(TABLE_CARDS)]
    for label, cfg_path, options in TABLE_TARGETS:
        for name, extra, gpus, fsdp in TABLE_SETTINGS:
            cfg = load_run_config(os.path.join(repo_root, cfg_path), options + extra)
            setting = setting_of(cfg, gpus)
            setting.fsdp = fsdp
            plan = make_plan(cfg.model_cfg, setting, [2], None, alternatives=False)
            sp = plan.stages[0]
            on_card = sp.peak * (1 + ALLOCATOR_SLACK) / GIB + CUDA_CONTEXT_GIB
            batches = []
            for card in TABLE_CARDS:
                plan.gpu_gib = card
                b = plan.largest_batch()
                batches.append(f"{b} (planned)" if b else "does not fit (planned)")
            rows.append(f"| {label} | {name.format(precision=cfg.model_cfg.llm_precision)} | {sp.fixed / GIB:.1f} "
                        f"| {sp.activations_per_sample / GIB:.3f} | {on_card:.1f} at batch {setting.batch} (planned) | "
                        + " | ".join(batches) + " |")
    return "\n".join(rows)

"""Memory for big targets: the frozen parts sharded with torch FSDP2 (`fully_shard`), and
activation checkpointing.

Under DDP every rank holds the whole frozen LLM (13.5 GB for a 7B target in fp16). With
`run.fsdp` the LLM's transformer blocks (and the ViT's) are each an FSDP unit, sharded over the
ranks at rest and gathered one block at a time in forward; everything else (the trainable
Q-Former + projector, the LLM's embeddings and head, which OPT ties) is the root unit, whose
gradients FSDP reduce-scatters as DDP would all-reduce them. Storage dtypes stay the model's
precision settings (`vit_precision`, `llm_precision`); gradients reduce in fp32.

    run:
      fsdp:                    # or `fsdp: true` for these defaults; absent / false: DDP
        shard_llm: true        # per-block units for the LLM
        shard_vit: true        # per-block units for the ViT
      activation_checkpointing:  # with or without fsdp
        llm: false             # recompute each LLM block in backward (long chat contexts)
        qformer: false         # ... and each Q-Former layer (large batches)

Checkpoints stay trainable-parameters-only files of full tensors (`full_trainable_state`, a
collective: every rank calls it), which load into an unsharded model; common/checkpoint.py's
load_trained_state loads them into a sharded one by the same rules (`copy_full_into`).
"""

from dataclasses import dataclass, fields
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn


# the model methods that run the LLM outside `forward`: FSDP must gather the root unit for them
FORWARD_METHODS = ("generate", "predict_answers")


def _parse_flags(cls, key: str, value):
    """`run.<key>`: None when absent, null or false; the defaults for true; else a mapping of
    the dataclass's boolean fields."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    known = {f.name for f in fields(cls)}
    values = dict(value)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"run.{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    for name, v in values.items():
        if not isinstance(v, bool):
            raise ValueError(f"run.{key}.{name} must be true or false, got {v!r}")
    return cls(**values)


@dataclass(frozen=True)
class ShardingConfig:
    """`run.fsdp`."""

    shard_llm: bool = True
    shard_vit: bool = True

    @classmethod
    def parse(cls, value) -> Optional["ShardingConfig"]:
        return _parse_flags(cls, "fsdp", value)


@dataclass(frozen=True)
class CheckpointingConfig:
    """`run.activation_checkpointing`."""

    llm: bool = True
    qformer: bool = True

    @classmethod
    def parse(cls, value) -> Optional["CheckpointingConfig"]:
        return _parse_flags(cls, "activation_checkpointing", value)


def llm_blocks(llm: nn.Module):
    """The LLM's transformer blocks: the module classes transformers itself keeps whole when it
    splits a model over devices (`_no_split_modules`: OPTDecoderLayer, LlamaDecoderLayer, T5Block)."""
    names = set(getattr(llm, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(llm).__name__} declares no _no_split_modules: cannot find its blocks to shard")
    blocks = [m for m in llm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(llm).__name__}: no module of the classes {sorted(names)}")
    return blocks


def vit_blocks(model: nn.Module):
    return list(getattr(model.visual_encoder, "blocks", []))


def qformer_layers(model: nn.Module):
    return list(model.Qformer.bert.encoder.layer)


# loaded from pretrained files on every rank alike: not broadcast (a 70B LLM would be sent whole)
PRETRAINED_PARTS = ("llm_model.", "visual_encoder.")


def sync_from_rank0(model: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers outside the pretrained LLM and ViT, as DDP
    does when it wraps a model: LAVIS seeds each rank differently, so randomly initialised parts
    (query tokens, a projector without a checkpoint) differ before this."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in named:
        if not name.startswith(PRETRAINED_PARTS):
            dist.broadcast(tensor.data, src=0)


def apply_activation_checkpointing(model: nn.Module, cfg: CheckpointingConfig) -> None:
    """Recompute the LLM's blocks / the Q-Former's layers in backward instead of keeping their
    activations (non-reentrant, RNG state preserved: the same gradients). It acts in train and
    eval mode alike: the frozen LLM stays in eval mode, where transformers' own gradient
    checkpointing is off. Apply it once, before sharding or DDP."""
    from torch.distributed._composable import checkpoint

    if cfg.llm:
        # a training forward must not fill a KV cache: recomputation would append to it again
        # (generate still caches: it passes its generation_config's use_cache)
        model.llm_model.config.use_cache = False
        for block in llm_blocks(model.llm_model):
            checkpoint(block)
    if cfg.qformer:
        for layer in qformer_layers(model):
            checkpoint(layer)


# bitsandbytes' parameter classes of quantised weights (models/kbit.py), by name: not imported here
QUANTIZED_PARAM_CLASSES = ("Params4bit", "Int8Params")


def refuse_unshardable(model: nn.Module) -> None:
    """run.fsdp with a k-bit LLM (llm_quantization) or LoRA adapters on it (llm_lora): refused,
    naming the keys. FSDP2 flattens and shards parameters as plain tensors: bitsandbytes' packed
    weights would lose their quantisation state, and adapters inside sharded blocks are not
    tested. A quantised LLM is what makes a target fit one GPU without sharding."""
    quantized = [n for n, p in model.named_parameters() if type(p).__name__ in QUANTIZED_PARAM_CLASSES]
    adapters = [n for n, _ in model.named_parameters() if ".lora_" in n]
    for keys, what, key in ((quantized, "bitsandbytes-quantised weights", "model.llm_quantization"),
                            (adapters, "LoRA adapters", "model.llm_lora")):
        if keys:
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys) - 3} more)" if len(keys) > 3 else "")
            raise ValueError(f"run.fsdp cannot shard {what} ({shown}): remove run.fsdp (one process, or DDP "
                             f"with torchrun) or {key}")


def shard_model(model: nn.Module, cfg: ShardingConfig, mesh=None) -> nn.Module:
    """Applies `fully_shard` in place (FSDP2 changes the modules' classes, not their names, so
    state-dict keys are unchanged) and returns the model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    refuse_unshardable(model)
    sync_from_rank0(model)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    units = (llm_blocks(model.llm_model) if cfg.shard_llm else []) + (vit_blocks(model) if cfg.shard_vit else [])
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    model.synced_generation = True  # ranks may finish generating at different steps
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def resharded(model: nn.Module) -> nn.Module:
    """The model with every unit's parameters back in their sharded form: the root unit stays
    gathered after a forward without backward (evaluation, generation), and its parameters are
    then not the ones the optimizer holds."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()
    return model


def full_trainable_state(model: nn.Module, also=frozenset()) -> Dict[str, torch.Tensor]:
    """The trainable parameters (and those named in `also`) as full CPU tensors (gathered: every
    rank must call this)."""
    resharded(model)
    return {n: _full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad or n in also}


def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """`value`, a full tensor, into `target` in its dtype; a sharded target (a DTensor) takes its own
    shard of it (a collective: every rank copies the same tensors in the same order)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(target.dtype)
    if isinstance(target, DTensor):
        target.to_local().copy_(distribute_tensor(value, target.device_mesh, target.placements).to_local())
    else:
        target.copy_(value)


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds (its shards, for sharded tensors)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with full CPU tensors keyed by parameter name, on rank 0 (the other
    ranks get {}; every rank must call this). `load_full_optimizer_state` puts it back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(resharded(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    """Rank 0's `state` (from full_optimizer_state) into every rank's shard of the optimizer."""
    set_optimizer_state_dict(resharded(model), optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

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

Host memory: with `run.fsdp` (shard_llm) every rank but rank 0 builds the LLM without its weights
(`llm_weights_from_rank0`, entered by runners/launch.py around the model's build: FrozenLLM.init_llm
then puts the parameters on the meta device, buffers computed, ties kept), and `shard_model` fills
each LLM block from rank 0 just before sharding it, then the LLM's other parts (embeddings, head,
final norm) before the root unit: those ranks hold one full block at a time, never the whole LLM
(benchmarks/fsdp_host_memory.py measures the peak RSS per rank). Sharded on CPU (gloo) under glibc,
`shard_model` fixes malloc's mmap threshold at 1 MiB (`return_freed_host_memory`), so the FSDP
buffers freed in every step go back to the OS rather than staying in the heap.

Checkpoints stay trainable-parameters-only files of full tensors (`full_trainable_state`, a
collective: every rank calls it), which load into an unsharded model; common/checkpoint.py's
load_trained_state loads them into a sharded one by the same rules (`copy_full_into`).
"""

import contextlib
import ctypes
import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn


logger = logging.getLogger(__name__)

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


def _broadcast_from_rank0(tensor: torch.Tensor) -> None:
    """Rank 0's values into `tensor` in place, through the backend's device (NCCL: the GPU)."""
    from lavis_vpgtrans.common.dist import collective_device

    device = collective_device()
    if tensor.device == device:
        dist.broadcast(tensor, src=0)
    else:
        moved = tensor.to(device)
        dist.broadcast(moved, src=0)
        tensor.copy_(moved)


def sync_from_rank0(model: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers outside the pretrained LLM and ViT, as DDP
    does when it wraps a model: LAVIS seeds each rank differently, so randomly initialised parts
    (query tokens, a projector without a checkpoint) differ before this."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in named:
        if not name.startswith(PRETRAINED_PARTS):
            _broadcast_from_rank0(tensor.data)


# ------------------------------------------------------------------ the LLM's weights from rank 0

_defer_llm_weights = False


@contextlib.contextmanager
def llm_weights_from_rank0(active: bool = True):
    """While active, FrozenLLM.init_llm (models/llm.py) on every rank but rank 0 builds the LLM
    without its weights (`llm_weights_deferred`), and `shard_model` must then fill them from rank 0.
    runners/launch.py enters it around the model's build when the run shards the LLM (run.fsdp,
    shard_llm, several processes); outside it every rank loads the LLM's files as before."""
    global _defer_llm_weights
    previous, _defer_llm_weights = _defer_llm_weights, bool(active)
    try:
        yield
    finally:
        _defer_llm_weights = previous


def llm_weights_deferred() -> bool:
    """Whether init_llm is to build the LLM on the meta device here: inside an active
    `llm_weights_from_rank0`, on a rank other than 0."""
    return _defer_llm_weights and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def has_meta_weights(module: nn.Module) -> bool:
    """Whether some parameter or buffer of `module` has no storage (the meta device)."""
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def _match_rank0_llm(llm: nn.Module) -> None:
    """Every rank's LLM takes rank 0's names, shapes and dtypes (one object broadcast). A meta
    parameter takes rank 0's dtype (from_pretrained keeps some modules in fp32, e.g. T5's `wo` in
    fp16: building from the config does not); another name or shape is an error, as rank 0's bytes
    would land in the wrong tensors."""
    from lavis_vpgtrans.common.dist import collective_device

    named = list(llm.named_parameters()) + list(llm.named_buffers())
    mine = [(n, tuple(t.shape), t.dtype) for n, t in named]
    holder = [mine]
    dist.broadcast_object_list(holder, src=0)
    theirs = holder[0]
    same = [x[:2] for x in theirs] == [x[:2] for x in mine]
    agreed = torch.tensor([int(same)], device=collective_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # every rank raises, none waits in a broadcast
    if not same:
        diff = next(((a[:2], b[:2]) for a, b in zip(theirs, mine) if a[:2] != b[:2]), (len(theirs), len(mine)))
        raise ValueError(f"rank {dist.get_rank()} built another LLM than rank 0 (rank 0's, this rank's): {diff}")
    if not agreed.item():
        raise ValueError(f"rank {dist.get_rank()}: another rank built another LLM than rank 0 (its error names it)")
    retyped = {}
    for (name, tensor), (_, _, dtype) in zip(named, theirs):
        if tensor.dtype != dtype:
            if not tensor.is_meta:
                raise ValueError(f"rank {dist.get_rank()}: the LLM's {name} is {tensor.dtype}, rank 0's {dtype}")
            retyped[id(tensor)] = (tensor, nn.Parameter(tensor.to(dtype), requires_grad=tensor.requires_grad))
    for module in llm.modules():  # every module holding it: tied weights stay tied
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in retyped:
                module._parameters[name] = retyped[id(param)][1]


def fill_from_rank0(modules: Iterable[nn.Module], device) -> None:
    """The parameters and buffers that `modules` hold themselves (not their submodules') from
    rank 0: a meta parameter (init_llm's, on the other ranks) is first allocated on `device`, one
    new parameter per shared one (tied weights stay tied). A collective: every rank passes the
    same modules in the same order."""
    modules = list(modules)
    allocated, done = {}, set()
    for module in modules:
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in allocated:
                    allocated[id(param)] = (param, nn.Parameter(torch.empty_like(param, device=device),
                                                                requires_grad=param.requires_grad))
                module._parameters[name] = allocated[id(param)][1]
    for module in modules:
        # buffers included: rank 0's are the loaded ones (persistent buffers come from the files).
        # They are filled in place, so tensors that alias them (LLaMA's original_inv_freq) follow.
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and id(tensor) not in done:
                done.add(id(tensor))
                if tensor.is_meta:
                    raise ValueError(f"{type(module).__name__}: a meta buffer of shape {tuple(tensor.shape)}; "
                                     f"init_llm builds buffers on the host")
                with torch.no_grad():
                    _broadcast_from_rank0(tensor.data)


def _deferred_llm(model: nn.Module) -> bool:
    """Whether some rank built the LLM without its weights (all ranks agree); rank 0 never does."""
    from lavis_vpgtrans.common.dist import collective_device

    llm = getattr(model, "llm_model", None)
    mine = llm is not None and has_meta_weights(llm)
    if mine and dist.get_rank() == 0:
        raise ValueError("rank 0 built the LLM without its weights: it is the rank the others take them from")
    flag = torch.tensor([int(mine)], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
# set by return_freed_host_memory: the mmap threshold this process runs with (None: glibc's own)
host_mmap_threshold: Optional[int] = None


def return_freed_host_memory() -> bool:
    """Sharded on CPU (gloo), FSDP's all-gather buffers are host tensors, allocated and freed per
    block in every step. glibc raises its mmap threshold after each large free, so these buffers
    come from the heap and stay in the RSS once freed: a non-zero rank's step peak climbed back
    towards holding the whole LLM. A fixed 1 MiB threshold (which also turns the dynamic one off)
    maps each large buffer and unmaps it when freed, as MALLOC_MMAP_THRESHOLD_=1048576 would; the
    price is page faults, each such buffer faulted in again every step. Once per process; only on
    glibc, and not over a MALLOC_MMAP_THRESHOLD_ the user set. Returns whether it set the threshold."""
    global host_mmap_threshold
    if host_mmap_threshold is not None:
        return True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no libc.so.6, or no mallopt
        return False
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        return False
    host_mmap_threshold = MMAP_THRESHOLD_BYTES
    logger.info("sharding on CPU: glibc's mmap threshold fixed at %d bytes, so freed FSDP buffers "
                "go back to the OS (lavis_vpgtrans.common.sharding)", MMAP_THRESHOLD_BYTES)
    return True


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
    state-dict keys are unchanged) and returns the model. An LLM that ranks but 0 built without
    weights (`llm_weights_from_rank0`) is filled from rank 0 on the way, block by block."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    refuse_unshardable(model)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    if device.type == "cpu":  # gloo: the all-gathers use host memory (on GPUs, GPU memory)
        return_freed_host_memory()
    sync_from_rank0(model)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    llm_units = llm_blocks(model.llm_model) if cfg.shard_llm else []
    deferred = _deferred_llm(model)  # some rank built the LLM without weights (llm_weights_from_rank0)
    if deferred:
        _match_rank0_llm(model.llm_model)
    filled = set()
    for unit in llm_units:
        if deferred:  # one full block at a time on the ranks that built it empty, sharded at once
            fill_from_rank0(unit.modules(), device)
            filled.update(id(m) for m in unit.modules())
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    if deferred:  # the rest of the LLM (embeddings, head, final norm, rotary buffers): the root unit's
        fill_from_rank0([m for m in model.llm_model.modules() if id(m) not in filled], device)
    for unit in vit_blocks(model) if cfg.shard_vit else []:
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

"""Run under torchrun (gloo, 2 processes) by tests/test_sharding.py: trains a tiny model with the
frozen LLM replicated (DDP) and sharded (FSDP2, lavis_vpgtrans.common.sharding) on the same data
and seed for each "family:checkpointing" spec in argv[2:], and writes what rank 0 measured to the
json file named by argv[1]."""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import load_tiny
import lavis_vpgtrans  # noqa: F401  registers the model classes
from lavis_vpgtrans.common import sharding
from lavis_vpgtrans.common.checkpoint import load_trained_state

ARCH = {"opt": ("blip2_opt_transfer", "tiny_opt_large"), "llama": ("blip2_llama", "tiny_llama"),
        "t5": ("blip2_t5_transfer", "tiny_t5")}


def build(family, seed_offset=0):
    # LAVIS seeds every rank differently: the wrappers must make the ranks agree
    torch.manual_seed(dist.get_rank() + seed_offset)
    name, model_type = ARCH[family]
    return load_tiny(name, model_type, train_vpg=True)


def batches(n, family):
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    out = []
    for _ in range(n):
        s = {"image": torch.randn(2, 3, 32, 32, generator=g), "text_input": ["a red square", "two blue circles"]}
        if family == "t5":
            s["text_output"] = s.pop("text_input")
            s["text_input"] = ["", ""]
        out.append(s)
    return out


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def freed_buffer_returned_kib():
    """How much of a 16 MiB host tensor's memory goes back to the OS when it is freed, after one
    like it was freed before (glibc's dynamic threshold would now keep it in the heap)."""
    torch.ones(4 << 20)  # allocated and freed at once
    buffer = torch.ones(4 << 20)
    held = rss_kib()
    del buffer
    return held - rss_kib()


def train(model, wrapped, data, optimizer=None, first_step=0):
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step, samples in enumerate(data, start=first_step):
        torch.manual_seed(1000 * step + dist.get_rank())  # dropout: the same draws after a resume
        wrapped(samples)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def measure(family, checkpointing):
    rank = dist.get_rank()
    data = batches(4, family)
    result = {}

    ddp_model = build(family)
    result["llm_bytes_replicated"] = sharding.local_bytes(ddp_model.llm_model)
    train(ddp_model, DDP(ddp_model), data)
    replicated = {n: p.detach().clone() for n, p in ddp_model.named_parameters() if p.requires_grad}

    cfg = sharding.ShardingConfig()
    recompute = sharding.CheckpointingConfig(llm=checkpointing, qformer=checkpointing)

    def sharded(model):
        sharding.apply_activation_checkpointing(model, recompute)
        return sharding.shard_model(model, cfg)

    def build_deferred(seed_offset=0):
        # as launch.py builds it for run.fsdp: rank 1's LLM without weights, filled from rank 0
        with sharding.llm_weights_from_rank0():
            return build(family, seed_offset)

    empty = build_deferred()
    built_empty = [None] * dist.get_world_size()
    dist.all_gather_object(built_empty, sharding.has_meta_weights(empty.llm_model))
    result["llm_built_without_weights"] = built_empty
    model = sharded(empty)
    # sharding on CPU fixed glibc's mmap threshold: freed FSDP buffers go back to the OS
    thresholds = [None] * dist.get_world_size()
    dist.all_gather_object(thresholds, sharding.host_mmap_threshold)
    result["host_mmap_threshold"] = thresholds
    result["freed_16mib_returned_kib"] = freed_buffer_returned_kib()
    result["llm_bytes_sharded"] = sharding.local_bytes(model.llm_model)
    # every LLM weight and buffer, gathered, is what from_pretrained loaded (the DDP model's)
    pretrained = dict(ddp_model.llm_model.named_parameters()) | dict(ddp_model.llm_model.named_buffers())
    gathered = {n: sharding._full(t.detach()) for n, t in
                list(model.llm_model.named_parameters()) + list(model.llm_model.named_buffers())}
    result["llm_names_equal"] = sorted(gathered) == sorted(pretrained)
    result["llm_weights_differ"] = [n for n in pretrained if not torch.equal(gathered[n], pretrained[n])]
    result["llm_dtypes_differ"] = [n for n in pretrained if gathered[n].dtype != pretrained[n].dtype]
    ties = [m.llm_model.get_input_embeddings().weight is m.llm_model.get_output_embeddings().weight
            for m in (ddp_model, model)]
    result["ties_kept"] = ties[0] == ties[1]
    del gathered
    # interrupted after 2 steps: checkpoint (full tensors), a new sharded model resumes from it
    optimizer = train(model, model, data[:2])
    state = sharding.full_trainable_state(model)
    optim_state = sharding.full_optimizer_state(model, optimizer)
    resumed = sharded(build_deferred(seed_offset=13))
    load_trained_state(resumed, state, "the interrupted run's weights")  # sharded: each rank its shards
    resumed_optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-3)
    sharding.load_full_optimizer_state(resumed, resumed_optimizer, optim_state)
    train(resumed, resumed, data[2:], resumed_optimizer, first_step=2)
    final = sharding.full_trainable_state(resumed)

    if family == "t5":
        # fp16: from_pretrained keeps T5's `wo` in fp32, a build from the config does not; the
        # ranks built empty take rank 0's dtypes
        name, model_type = ARCH[family]
        loaded = load_tiny(name, model_type, llm_precision="fp16").llm_model
        with sharding.llm_weights_from_rank0():
            half = sharding.shard_model(load_tiny(name, model_type, llm_precision="fp16"), cfg).llm_model
        full = {n: sharding._full(p.detach()) for n, p in half.named_parameters()}
        result["fp16_dtypes"] = sorted({str(p.dtype) for p in loaded.parameters()})
        result["fp16_weights_differ"] = [n for n, p in loaded.named_parameters()
                                         if full[n].dtype != p.dtype or not torch.equal(full[n], p)]

    result["max_abs_diff_vs_ddp"] = max((final[n] - replicated[n]).abs().max().item() for n in replicated)
    result["same_names"] = sorted(final) == sorted(replicated)

    # the gathered weights load into an unsharded model: same captions as the sharded one
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    resumed.eval()
    with torch.no_grad():
        sharded_out = resumed.generate({"image": image}, max_length=6, num_beams=1)
    if rank == 0:
        plain = build(family, seed_offset=21)
        load_trained_state(plain, final, "gathered sharded weights")
        plain.eval()
        with torch.no_grad():
            result["captions_sharded"] = sharded_out
            result["captions_unsharded"] = plain.generate({"image": image}, max_length=6, num_beams=1)
    return result


def main(out_path, specs):
    """specs: "family:checkpointing" (e.g. opt:0 llama:1), one process group for all."""
    dist.init_process_group("gloo")
    results = {}
    for spec in specs:
        family, checkpointing = spec.split(":")
        results[spec] = measure(family, checkpointing == "1")
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

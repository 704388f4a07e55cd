"""GPU memory and step time at the sizes of the paper's OPT-2.7B -> OPT-6.7B transfer: ours vs stock
LAVIS, with and without activation checkpointing, and (several GPUs) with the LLM sharded.

    python benchmarks/gpu_opt_sizes.py [--steps 5] [--batch 8] [--json out.json]          # one GPU
    torchrun --nproc_per_node=N benchmarks/gpu_opt_sizes.py --sharded [--steps 5]          # N GPUs
    python benchmarks/gpu_opt_sizes.py --tiny --device cpu                                 # a smoke run

Nothing is downloaded (the GPU machines reach no hub): random weights at real sizes, written
once into --workdir in the formats the configs read:
  - an OPT-6.7B-architecture LLM (hidden 4096, 32 layers, 50272 rows) as a fp16
    `save_pretrained` directory with the toy OPT tokenizer;
  - EVA ViT-g (1408-d, 39 blocks, 224 px, patch 14) as an EVA-ViT directory
    (models/eva_vit.py), and a bert-base-sized Q-Former initialisation.
Stock LAVIS's Blip2OPT is built with only its download helpers pointed at those files
(models/stock_lavis.py, as tests/test_lavis_equivalence.py does). Each configuration trains
`--steps` steps of the stage-2 trainable set (Q-Former, query tokens, ln_vision, projector) on
random images and captions in LAVIS's precision (fp16 ViT and LLM, autocast) and prints the peak memory allocated on the
device and the mean step time after one warm-up step. With --sharded (torchrun, N GPUs) ours runs
with the LLM and ViT sharded (common/sharding.py) next to the replicated run.
"""

import argparse
import json
import os
import time

import torch

OPT_6_7B = dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                max_position_embeddings=2048)
VIT_G = dict(img_size=224, patch_size=14, embed_dim=1408, depth=39, num_heads=16, mlp_ratio=4.3637, qkv_bias=True)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True)
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def write_parts(workdir, tiny):
    """The LLM, ViT and Q-Former directories at real (or, with `tiny`, toy) sizes; reused if there."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM

    from lavis_vpgtrans.common.paths import resolve_path
    from lavis_vpgtrans.models.eva_vit import build_eva_vit, save_eva_vit_dir

    dirs = {name: os.path.join(workdir, name) for name in ("llm", "vit", "bert")}
    if all(os.path.isdir(d) for d in dirs.values()):
        return dirs
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("toy:opt-large"))
    opt = OPTConfig(vocab_size=50272, word_embed_proj_dim=(TINY_OPT if tiny else OPT_6_7B)["hidden_size"],
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, torch_dtype="float16", **(TINY_OPT if tiny else OPT_6_7B))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        llm = OPTForCausalLM._from_config(opt, torch_dtype=torch.float16)  # random, fp16 from the start
    llm.save_pretrained(dirs["llm"])
    tokenizer.save_pretrained(dirs["llm"])
    del llm
    vit_cfg = TINY_VIT if tiny else VIT_G
    save_eva_vit_dir(build_eva_vit(vit_cfg), vit_cfg, dirs["vit"])
    bert_dir = resolve_path("toy:bert")
    BertForMaskedLM(BertConfig(vocab_size=30522, **(TINY_BERT if tiny else BERT_BASE))).save_pretrained(dirs["bert"])
    AutoTokenizer.from_pretrained(bert_dir).save_pretrained(dirs["bert"])
    return dirs


def build(kind, dirs, img_size, device):
    if kind == "stock":
        from lavis.models.blip2_models.blip2_opt import Blip2OPT

        from lavis_vpgtrans.models.stock_lavis import local_blip2_parts

        with local_blip2_parts(dirs["vit"], dirs["bert"]):
            model = Blip2OPT(img_size=img_size, vit_precision="fp16", opt_model=dirs["llm"], prompt="")
        # LAVIS trains the VPG (its freeze_vit keeps the ViT frozen; the LLM is always frozen)
        return model.to(device)
    from lavis.common.registry import registry

    import lavis_vpgtrans  # noqa: F401  registers the model classes

    cls = registry.get_model_class("blip2_opt_transfer")
    return cls(vit_model=dirs["vit"], img_size=img_size, vit_precision="fp16", qformer_model=dirs["bert"],
               llm_model=dirs["llm"], llm_precision="fp16", train_vpg=True).to(device)


def measure(model, wrapped, img_size, batch, steps, device):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps + 1):
        samples = {"image": torch.randn(batch, 3, img_size, img_size, generator=g).to(device),
                   "text_input": ["a photo of two red squares above a blue circle on a table"] * batch}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16):  # LAVIS's precision (on CPU: the smoke run)
            loss = wrapped(samples)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"trainable_params": sum(p.numel() for p in params), "peak_allocated_bytes": peak,
            "step_s": sum(times[1:]) / steps}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="output/benchmarks/gpu_opt_sizes", help="where the random-weight parts go")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run of this script on CPU")
    p.add_argument("--sharded", action="store_true", help="under torchrun: ours with run.fsdp next to DDP")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch.distributed as dist

    from lavis_vpgtrans.common import sharding

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if args.device == "cuda":
            torch.cuda.set_device(local)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device)
    rank = dist.get_rank() if distributed else 0
    workdir = args.workdir + ("_tiny" if args.tiny else "")
    if rank == 0:  # the others read what rank 0 wrote
        write_parts(workdir, args.tiny)
    if distributed:
        dist.barrier()
    dirs = write_parts(workdir, args.tiny)
    img_size = (TINY_VIT if args.tiny else VIT_G)["img_size"]

    configs = [("stock LAVIS blip2_opt", "stock", None), ("ours", "ours", None),
               ("ours + activation checkpointing", "ours", sharding.CheckpointingConfig())]
    if args.sharded:
        if not distributed:
            raise SystemExit("--sharded: launch with torchrun --nproc_per_node=N (N >= 2)")
        configs.append(("ours, LLM + ViT sharded", "ours", "sharded"))
    results = {}
    for label, kind, extra in configs:
        torch.manual_seed(0)
        model = build(kind, dirs, img_size, device)
        wrapped = model
        if isinstance(extra, sharding.CheckpointingConfig):
            sharding.apply_activation_checkpointing(model, extra)
        if extra == "sharded":
            from torch.distributed.device_mesh import init_device_mesh

            wrapped = sharding.shard_model(model, sharding.ShardingConfig(),
                                           mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
        elif distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        results[label] = measure(model, wrapped, img_size, args.batch, args.steps, device)
        del model, wrapped
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            r = results[label]
            peak = "n/a (CPU)" if r["peak_allocated_bytes"] is None else f"{r['peak_allocated_bytes'] / 2**30:.2f} GiB"
            print(f"{label}: trainable {r['trainable_params'] / 1e6:.1f}M, peak allocated {peak}, "
                  f"step {r['step_s']:.3f} s (batch {args.batch} per rank)", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "world_size": dist.get_world_size() if distributed else 1, "batch": args.batch,
                       "steps": args.steps, "results": results}, f, indent=2)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

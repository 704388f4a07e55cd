"""Per-rank memory and step time with the frozen LLM replicated (DDP) or sharded (FSDP2).

    python benchmarks/fsdp_memory.py [--hidden 1280 --layers 16] [--nproc 2] [--steps 4] [--json out.json]

Builds a random-weight OPT-architecture LLM of about 1.3 GB (fp32: hidden 1280, 16 layers, the toy
zoo's tokenizer) as a `save_pretrained` directory, then runs a `blip2_opt_transfer` model on it
(toy ViT and Q-Former) for a few training steps in `--nproc` gloo processes on CPU, once with
plain DDP and once with `lavis_vpgtrans.common.sharding` (`run.fsdp`), and prints per rank:
  - the LLM's parameter + buffer bytes this rank holds,
  - the resident memory after the steps (freed heap pages returned to the OS first, so it is
    what the process holds), and the peak RSS (ru_maxrss: every rank loads the whole LLM
    before it is sharded, so the load-time peak stays),
  - the mean training step time after one warm-up step.
Figures vary with the machine; run it on an otherwise idle one.
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def build_llm(out_dir, hidden, layers):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from lavis_vpgtrans.toy import zoo

    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve("toy:opt-large"))
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def worker(llm_dir, mode, steps, out_path):
    import torch.distributed as dist
    from lavis.common.registry import registry
    from omegaconf import OmegaConf
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lavis_vpgtrans  # noqa: F401  registers the model classes
    from lavis_vpgtrans.common import sharding

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cls = registry.get_model_class("blip2_opt_transfer")
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny_opt_large")).model,
                          {"llm_model": llm_dir, "train_vpg": True})
    torch.manual_seed(rank)
    model = cls.from_config(cfg)
    if mode == "sharded":
        wrapped = model = sharding.shard_model(model, sharding.ShardingConfig())
    else:
        wrapped = DDP(model)
    llm_bytes = sharding.local_bytes(model.llm_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    model.train()
    times = []
    for _ in range(steps + 1):
        samples = {"image": torch.randn(4, 3, 32, 32, generator=g),
                   "text_input": ["a red square above a blue circle"] * 4}
        start = time.perf_counter()
        wrapped(samples)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the OS: RSS = what is held
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    record = {"rank": rank, "llm_bytes": llm_bytes, "rss_bytes": rss,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "step_s": sum(times[1:]) / steps}
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(records, f)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", nargs=3, metavar=("LLM_DIR", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        worker(args.worker[0], args.worker[1], args.steps, args.worker[2])
        return

    with tempfile.TemporaryDirectory(prefix="fsdp_bench_") as tmp:
        llm_dir = os.path.join(tmp, "llm")
        n_params = build_llm(llm_dir, args.hidden, args.layers)
        print(f"random-weight OPT LLM: {n_params / 1e6:.0f}M parameters, {n_params * 4 / 2**30:.2f} GiB fp32, "
              f"{args.nproc} gloo processes, {args.steps} steps (+1 warm-up), {args.threads} thread(s) each")
        results = {}
        for mode in ("replicated", "sharded"):
            out = os.path.join(tmp, f"{mode}.json")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={args.nproc}", os.path.abspath(__file__), "--steps", str(args.steps),
                            "--threads", str(args.threads), "--worker", llm_dir, mode, out],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            with open(out) as f:
                results[mode] = json.load(f)

    gib = 2**30
    print("\n| LLM | rank | LLM bytes held | RSS after the steps | peak RSS | step time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, records in results.items():
        for r in records:
            print(f"| {mode} | {r['rank']} | {r['llm_bytes'] / gib:.3f} GiB | {r['rss_bytes'] / gib:.2f} GiB "
                  f"| {r['peak_rss_bytes'] / gib:.2f} GiB "
                  f"| {r['step_s']:.2f} s |")
    ratio_bytes = results["sharded"][0]["llm_bytes"] / results["replicated"][0]["llm_bytes"]
    ratio_time = (sum(r["step_s"] for r in results["sharded"]) / sum(r["step_s"] for r in results["replicated"]))
    print(f"\nsharded / replicated: LLM bytes per rank {ratio_bytes:.3f}, step time {ratio_time:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n_params": n_params, "nproc": args.nproc, "results": results,
                       "llm_bytes_ratio": ratio_bytes, "step_time_ratio": ratio_time}, f, indent=2)


if __name__ == "__main__":
    main()

"""Peak host memory per rank when run.fsdp shards the LLM: every rank loading the whole LLM (the
path before, `--modes every_rank_loads`) against ranks but 0 building it without weights and
taking their shards from rank 0 (`--modes from_rank0`: `lavis_vpgtrans.common.sharding.
llm_weights_from_rank0`, what runners/launch.py does for run.fsdp).

    python benchmarks/fsdp_host_memory.py [--hidden 1024 --layers 24 --ffn 4096] [--nproc 2]
        [--modes every_rank_loads from_rank0] [--llm-precision fp32] [--malloc-mmap-threshold 1048576]
        [--steps 1] [--glibc-threshold] [--json out.json]

Builds a random-weight LLM with OPT-350M's blocks (hidden 1024, 24 layers, ffn 4096; the toy zoo's
tokenizer, so a small vocabulary) in fp32 as a `save_pretrained` directory, then in each mode runs
`blip2_opt_transfer` on it (toy ViT and Q-Former; llm_precision `--llm-precision`) in `--nproc` gloo processes
on CPU: build the model, shard it (`sharding.shard_model`), one training step. Per rank it prints
the resident memory after the imports and the peak (VmHWM, the kernel's high-water mark of the
resident set, file-backed pages of the mmapped safetensors included) through build + sharding and
through the step. The modes must end with the same weights: each rank's LLM shards and the trained
parameters are hashed and compared between the modes. On glibc `shard_model` fixes the mmap threshold
at 1 MiB (freed buffers leave the RSS); `--glibc-threshold` keeps glibc's dynamic one, as before, and
`--steps N` times N steps (json: `step_s`, `steps_hwm_kib`, `step_minor_faults`), to compare the two.
Figures vary with the machine, glibc's allocator and the load (printed: `uptime`); not a CI test.
"""

import argparse
import hashlib
import resource
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

MODES = ("every_rank_loads", "from_rank0")


def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def build_llm(out_dir, hidden, layers, ffn):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from lavis_vpgtrans.toy import zoo

    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve("toy:opt-large"))
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=ffn,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0))
    model.save_pretrained(out_dir)  # safetensors, fp32
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def digest(tensors):
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(llm_dir, mode, out_path, precision, steps=1, glibc_threshold=False):
    import torch.distributed as dist
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    import lavis_vpgtrans  # noqa: F401  registers the model classes
    from lavis_vpgtrans.common import sharding

    if glibc_threshold:  # glibc's dynamic mmap threshold, as before shard_model fixed it (for comparison)
        sharding.return_freed_host_memory = lambda: False
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    baseline_kib = status_kib("VmRSS")
    cls = registry.get_model_class("blip2_opt_transfer")
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny_opt_large")).model,
                          {"llm_model": llm_dir, "llm_precision": precision, "train_vpg": True})
    torch.manual_seed(rank)  # as LAVIS seeds ranks: shard_model makes them agree
    with sharding.llm_weights_from_rank0(mode == "from_rank0"):
        model = cls.from_config(cfg)
    built_empty = sharding.has_meta_weights(model.llm_model)
    phases = {"built": (status_kib("VmRSS"), status_kib("VmHWM"))}
    model = sharding.shard_model(model, sharding.ShardingConfig())
    phases["sharded"] = (status_kib("VmRSS"), status_kib("VmHWM"))
    # what is resident now: the mapped safetensors' pages (page cache, shared by the ranks) and the rest
    resident = {"file": status_kib("RssFile"), "anon": status_kib("RssAnon")}
    llm_bytes = sharding.local_bytes(model.llm_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    g = torch.Generator().manual_seed(rank)
    samples = {"image": torch.randn(2, 3, 32, 32, generator=g), "text_input": ["a red square above a blue circle"] * 2}
    step_s, steps_hwm_kib, step_minor_faults = [], [], []
    for step in range(steps):
        torch.manual_seed(1000 * (step + 1) + rank)
        dist.barrier()
        start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = model(samples)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_s.append(time.perf_counter() - start)
        step_minor_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        steps_hwm_kib.append(status_kib("VmHWM"))
        if step == 0:
            peak_kib = steps_hwm_kib[0]
            phases["trained"] = (status_kib("VmRSS"), peak_kib)
    trained = sharding.full_trainable_state(model)  # a collective, after the peak is read
    llm_local = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.llm_model.named_parameters()]
    record = {"rank": rank, "built_without_weights": built_empty, "baseline_rss_kib": baseline_kib,
              "peak_rss_kib": peak_kib, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "llm_bytes": llm_bytes, "precision": precision, "loss": loss.item(),
              "llm_shards_sha256": digest(llm_local),
              "trained_sha256": digest(sorted(trained.items())),
              "phases_rss_hwm_kib": phases, "after_shard_rss_kib": resident,
              "host_mmap_threshold": sharding.host_mmap_threshold, "step_s": step_s,
              "steps_hwm_kib": steps_hwm_kib, "step_minor_faults": step_minor_faults}
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(records, f)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ for the workers (e.g. 1048576): allocations above it are "
                        "mmapped and unmapped when freed, so the RSS follows what is held (what shard_model now sets "
                        "itself on CPU); left to itself glibc raises the threshold as large blocks are freed and "
                        "keeps freed heap pages")
    p.add_argument("--llm-precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="model.llm_precision; the files are fp32, so bf16 / fp16 make from_pretrained convert "
                        "(a copy of its own on every rank that loads) where fp32 maps the files without a copy")
    p.add_argument("--steps", type=int, default=1,
                   help="training steps (the figures' \"step\" peak is through the first; each step's time "
                        "and VmHWM are in the json)")
    p.add_argument("--glibc-threshold", action="store_true",
                   help="keep glibc's dynamic mmap threshold: shard_model does not fix it at 1 MiB "
                        "(sharding.return_freed_host_memory), as before; to compare memory and step times")
    p.add_argument("--worker", nargs=3, metavar=("LLM_DIR", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        worker(*args.worker, args.llm_precision, args.steps, args.glibc_threshold)
        return

    with tempfile.TemporaryDirectory(prefix="fsdp_host_") as tmp:
        llm_dir = os.path.join(tmp, "llm")
        n_params = build_llm(llm_dir, args.hidden, args.layers, args.ffn)
        size = sum(os.path.getsize(os.path.join(llm_dir, f)) for f in os.listdir(llm_dir) if f.endswith(".safetensors"))
        print(f"random-weight OPT LLM: {n_params / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB of fp32 "
              f"safetensors, llm_precision {args.llm_precision}; {args.nproc} gloo processes; "
              f"MALLOC_MMAP_THRESHOLD_="
              f"{args.malloc_mmap_threshold if args.malloc_mmap_threshold is not None else 'unset'}; "
              f"shard_model fixes glibc's mmap threshold: {not args.glibc_threshold}")
        results, loads = {}, {}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if args.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        for mode in args.modes:
            out = os.path.join(tmp, f"{mode}.json")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={args.nproc}", os.path.abspath(__file__),
                            "--llm-precision", args.llm_precision, "--steps", str(args.steps),
                            *(["--glibc-threshold"] if args.glibc_threshold else []), "--worker", llm_dir, mode, out],
                           check=True, env=env)
            loads[mode] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            with open(out) as f:
                results[mode] = json.load(f)

    gib = 2**20  # KiB per GiB
    print("\n| mode | rank | LLM built without weights | RSS after imports | peak RSS through build + shard_model "
          "| peak RSS through one training step | LLM bytes held |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, records in results.items():
        for r in records:
            phases = r["phases_rss_hwm_kib"]
            print(f"| {mode} | {r['rank']} | {r['built_without_weights']} | {r['baseline_rss_kib'] / gib:.2f} GiB "
                  f"| {phases['sharded'][1] / gib:.2f} GiB | {r['peak_rss_kib'] / gib:.2f} GiB "
                  f"| {r['llm_bytes'] / 2**30:.2f} GiB |")
    for mode, records in results.items():
        for r in records:
            print(f"{mode}, rank {r['rank']}: mmap threshold fixed by shard_model: {r['host_mmap_threshold']}; "
                  f"step times " + ", ".join(f"{t:.2f}" for t in r["step_s"]) + " s, minor page faults "
                  + ", ".join(str(n) for n in r["step_minor_faults"]))
    for mode, load in loads.items():
        print(f"uptime after {mode}: {load}")
    summary = {}
    if set(MODES) <= set(results):
        before, after = results["every_rank_loads"], results["from_rank0"]
        for rank in range(1, args.nproc):
            b, a = before[rank], after[rank]
            for phase in ("sharded", "trained"):
                peak_b, peak_a = b["phases_rss_hwm_kib"][phase][1], a["phases_rss_hwm_kib"][phase][1]
                ratio = peak_a / peak_b
                above = (peak_a - a["baseline_rss_kib"]) / (peak_b - b["baseline_rss_kib"])
                summary[f"rank{rank}_{phase}_peak_ratio"] = ratio
                summary[f"rank{rank}_{phase}_above_imports_ratio"] = above
                print(f"rank {rank}, peak through {'build + shard_model' if phase == 'sharded' else 'one step'}: "
                      f"from_rank0 / every_rank_loads = {ratio:.2f} (above the RSS after imports: {above:.2f})")
        same = all(a["llm_shards_sha256"] == b["llm_shards_sha256"] and a["trained_sha256"] == b["trained_sha256"]
                   for a, b in zip(before, after))
        summary["same_weights"] = same
        print(f"the same LLM shards and trained weights after the step in both modes: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n_params": n_params, "nproc": args.nproc, "results": results, "uptime": loads,
                       "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()

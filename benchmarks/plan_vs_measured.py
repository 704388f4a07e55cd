"""The memory plan (python -m lavis_vpgtrans.plan) against the memory one training step actually
allocates on CPU (lavis_vpgtrans/plan/measure.py: every tensor storage from creation to release),
for the toy models and for random-weight OPT-125M (fp32, bf16) and OPT-1.3B (bf16) (their real architectures, built from
their configs; toy ViT and Q-Former), in stages 1 and 2; the toy models also with LoRA, 4-bit, 8-bit and QLoRA, and with a BLIP-2-sized
Q-Former (bert-base, 32 queries, over ViT-g-wide features of 257 image tokens). (OPT-350M is not among them: its word
embeddings are 512 wide, projected to its 1024-wide layers, and the VL-LLMs' projector is built
for config.hidden_size, as LAVIS's blip2_opt does: such a model does not run.)

    python benchmarks/plan_vs_measured.py [--batches 4,16] [--sizes toy,vpg,opt-125m,opt-1.3b] [--out FILE.md]
    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/plan_vs_measured.py --ddp \
        --sizes toy [--out FILE.md]      # per rank of a DDP run (gloo), its gradient buckets included

Prints a markdown table: weights (planned = measured, exactly), gradients, AdamW state, and the
peak of the step (planned / measured). The plan is an upper bound by design: it counts every
gradient alongside every kept activation, while backward frees activations as gradients appear.
"""

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MIB = 2 ** 20


def cases(sizes, work):
    from lavis_vpgtrans.common.paths import resolve_path
    from lavis_vpgtrans.plan.measure import random_llm_dir

    out = []
    if "toy" in sizes:
        out += [("blip2_opt_transfer", "tiny_opt_small", {}, "toy OPT"),
                ("blip2_opt_transfer", "tiny_opt_small", {"llm_precision": "bf16"}, "toy OPT"),
                ("blip2_llama", "tiny_llama", {"llm_precision": "bf16"}, "toy LLaMA"),
                ("blip2_t5_transfer", "tiny_t5", {}, "toy Flan-T5"),
                ("blip2_opt_transfer", "tiny_opt_small", {"llm_lora": {"r": 4}}, "toy OPT, LoRA r=4"),
                ("blip2_opt_transfer", "tiny_opt_small", {"llm_precision": "bf16", "llm_quantization": {"bits": 4}},
                 "toy OPT, 4-bit"),
                ("blip2_llama", "tiny_llama", {"llm_precision": "bf16", "llm_quantization": {"bits": 8}},
                 "toy LLaMA, 8-bit"),
                ("blip2_llama", "tiny_llama", {"llm_precision": "bf16", "llm_quantization": {"bits": 4},
                                               "llm_lora": {"r": 4}}, "toy LLaMA, QLoRA r=4")]
    import torch

    if "vpg" in sizes:
        # the Q-Former at its real size (bert-base, 32 queries) over ViT-g-wide image features
        from lavis_vpgtrans.plan.measure import random_vpg_dirs

        vpg = random_vpg_dirs(os.path.join(work, "vpg"), resolve_path("toy:bert"))
        out.append(("blip2_opt_transfer", "tiny_opt_small", vpg, "toy OPT, BLIP-2-sized Q-Former"))
    for name, precisions in (("opt-125m", ("fp32", "bf16")), ("opt-1.3b", ("bf16",))):
        if name in sizes:
            path = os.path.join(work, name)
            if not os.path.isdir(path):
                dtype = torch.float32 if "fp32" in precisions else torch.bfloat16
                random_llm_dir(f"facebook/{name}", path, resolve_path("toy:opt-small"), dtype=dtype)
            for precision in precisions:
                out.append(("blip2_opt_transfer", "tiny_opt_small",
                            {"llm_model": path, "llm_precision": precision}, f"OPT-{name[4:].upper()} (random)"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="4,16", help="batch sizes (OPT-1.3B: the first only)")
    parser.add_argument("--sizes", default="toy,vpg,opt-125m,opt-1.3b")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--ddp", action="store_true", help="under torchrun: each rank of a DDP run (gloo)")
    args = parser.parse_args(argv)
    rank0 = True
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank0 = dist.get_rank() == 0

    import lavis_vpgtrans  # noqa: F401  registers the models
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_vpgtrans.plan.measure import plan_vs_measured
    from lavis_vpgtrans.toy import zoo

    zoo.ensure_zoo(zoo.default_zoo_dir())
    rows = ["| LLM | precision | stage | batch | weights MiB (planned = measured) | gradients MiB | AdamW MiB "
            "| peak MiB planned | peak MiB measured | planned / measured | above weights + AdamW: planned / measured |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    batches = [int(b) for b in args.batches.split(",")]
    worst = 0.0
    with tempfile.TemporaryDirectory() as work:
        for arch, model_type, overrides, label in cases(args.sizes.split(","), work):
            cls = registry.get_model_class(arch)
            cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)
            for stage, batch in [(st, b) for b in (batches[:1] if "1.3B" in label else batches) for st in (1, 2)]:
                r = plan_vs_measured(arch, cfg, batch, stage, ddp=args.ddp)
                p, m = r["planned"], r["measured"]
                if p["weights"] != m["weights"] or p["gradients"] != m["gradients"] or p["optimizer"] != m["optimizer"]:
                    raise AssertionError(f"{label} stage {stage}: planned {p} != measured {m}")
                ratio = p["peak"] / m["peak"]
                worst = max(worst, abs(ratio - 1))
                # what the batch adds: gradients + activations + transients, the estimated part of the plan
                above = (p["peak"] - p["weights"] - p["optimizer"]) / (m["peak"] - m["weights"] - m["optimizer"])
                row = (f"| {label} | {cfg.llm_precision} | {stage} | {batch} | {m['weights'] / MIB:.2f} "
                       f"| {m['gradients'] / MIB:.2f} | {m['optimizer'] / MIB:.2f} | {p['peak'] / MIB:.1f} "
                       f"| {m['peak'] / MIB:.1f} | {ratio:.3f} | {above:.3f} |")
                if args.ddp:
                    row = row.replace(f"| {label} |", f"| {label}, DDP rank 0 of {dist.get_world_size()} |", 1)
                rows.append(row)
                if rank0:
                    print(row, flush=True)
    table = "\n".join(rows)
    if not rank0:
        return
    print(f"\nlargest deviation of the planned peak from the measured one: {worst:.1%}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + f"\n\nLargest deviation of the planned peak from the measured one: {worst:.1%}\n")


if __name__ == "__main__":
    main()

"""Per-step cost of the non-finite check (issue 22): LAVIS 1.0.2's inner training loop against
ours (common/train_loop.py), on the same model, batch and optimizer, in one process.

    VPGTRANS_TOY_ZOO=... python benchmarks/nonfinite_overhead.py [--steps 100] [--rounds 5] [--model-type tiny_opt_small]
    VPGTRANS_TOY_ZOO=... python -m torch.distributed.run --nproc_per_node=2 benchmarks/nonfinite_overhead.py

Under torchrun the model trains in DDP over gloo (CPU) and the guard all_reduces its flags every
step; rank 0 prints.

Each round runs `--steps` training steps through each loop, the order alternating; printed: the
median step time of each loop over the rounds, the difference, the host reads (Tensor.item /
tolist) per step of each, and the machine's load average before and after (the two are only
comparable on a machine with the same load).
"""

import argparse
import os
import statistics
import sys
import time

import torch


def build(model_type):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class("blip2_opt_transfer")
    cfg = OmegaConf.load(cls.default_config_path(model_type)).model
    model = cls.from_config(cfg)
    model.train()
    size = int(cfg.image_size)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(16, 3, size, size, generator=g),
             "text_input": ["a red square in the top left corner"] * 16}
    return model, batch


def run(loop, model, batch, steps, count_reads=False):
    from lavis.tasks.base_task import BaseTask

    class Sched:
        def step(self, cur_epoch, cur_step):
            pass

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    reads = {"n": 0}
    originals = {}
    if count_reads:
        for name in ("item", "tolist"):
            originals[name] = getattr(torch.Tensor, name)

            def counted(self, *a, _original=originals[name], **k):
                reads["n"] += 1
                return _original(self, *a, **k)

            setattr(torch.Tensor, name, counted)
    try:
        start = time.perf_counter()
        loop(BaseTask(), epoch=0, iters_per_epoch=steps, model=model, data_loader=iter([dict(batch)] * steps),
             optimizer=optimizer, lr_scheduler=Sched(), log_freq=10 ** 9)
        elapsed = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return elapsed / steps, reads["n"] / steps


READ_REPEATS = 1000


def time_reads(model, batch):
    """What replaces LAVIS's `loss.item()` in a step: the guard's read (loss and flags in one host
    read, the gradients checked by the fused kernel), timed on its own."""
    from lavis_vpgtrans.common.finite import NonFiniteGuard

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss = model(dict(batch))["loss"]
    loss.backward()
    guard = NonFiniteGuard()
    out = {}
    for name, read in (("item", lambda: loss.item()), ("guard", lambda: guard.read(loss, optimizer))):
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(READ_REPEATS):
                read()
            rounds.append((time.perf_counter() - start) / READ_REPEATS * 1e6)
        out[name] = statistics.median(rounds)
    optimizer.zero_grad()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model-type", default="tiny_opt_small")
    args = parser.parse_args(argv)

    import lavis_vpgtrans  # noqa: F401
    from lavis_vpgtrans.common.lavis_fixes import LAVIS_TRAIN_INNER_LOOP
    from lavis_vpgtrans.common.train_loop import guarded_inner_loop

    loops = {"LAVIS": LAVIS_TRAIN_INNER_LOOP, "guarded": guarded_inner_loop}
    model, batch = build(args.model_type)
    rank = 0
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        model = DDP(model)
    load_before = os.getloadavg()
    for loop in loops.values():  # warm-up
        run(loop, model, batch, 10)
    times = {name: [] for name in loops}
    for r in range(args.rounds):
        for name in (list(loops) if r % 2 == 0 else list(reversed(loops))):
            times[name].append(run(loops[name], model, batch, args.steps)[0])
    reads = {name: run(loop, model, batch, 10, count_reads=True)[1] for name, loop in loops.items()}
    read_us = time_reads(model, batch)
    load_after = os.getloadavg()

    if rank != 0:
        return 0
    world = os.environ.get("WORLD_SIZE", "1")
    print(f"{world} process(es), model {args.model_type}, {sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable "
          f"parameters, batch 16, torch threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps")
    for name in loops:
        print(f"  {name:8s} median {1e3 * statistics.median(times[name]):.3f} ms/step "
              f"(rounds: {', '.join(f'{1e3 * t:.3f}' for t in times[name])}); host reads per step {reads[name]:g}")
    diff = statistics.median(times["guarded"]) - statistics.median(times["LAVIS"])
    print(f"  overhead {1e3 * diff:+.3f} ms/step ({100 * diff / statistics.median(times['LAVIS']):+.1f}%)")
    print(f"  the read alone (after one backward, {READ_REPEATS} repeats, median of 5): LAVIS's loss.item() "
          f"{read_us['item']:.1f} us, the guard's read {read_us['guard']:.1f} us: +{read_us['guard'] - read_us['item']:.1f} "
          f"us per step")
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    sys.exit(main())

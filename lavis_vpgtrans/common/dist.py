"""torch.distributed setup that works on CPU (gloo) as well as GPU (nccl).

LAVIS's init_distributed_mode hard-codes NCCL and calls torch.cuda.set_device, so it cannot
run on a CPU machine; this is the same logic with the backend chosen by device.
"""

import datetime
import os

import torch
import torch.distributed as dist
from lavis.common.dist_utils import setup_for_distributed


def init_distributed_mode(run_cfg) -> None:
    """Reads torchrun's environment into `run_cfg` (rank, world_size, gpu, distributed,
    dist_backend) and initialises the process group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        run_cfg.rank = int(os.environ["RANK"])
        run_cfg.world_size = int(os.environ["WORLD_SIZE"])
        run_cfg.gpu = int(os.environ.get("LOCAL_RANK", 0))
    else:
        print("Not using distributed mode")
        run_cfg.distributed = False
        return

    run_cfg.distributed = True
    use_cuda = str(run_cfg.get("device", "cuda")).startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("run.device is 'cuda' but no GPU is available; set run.device=cpu")
        torch.cuda.set_device(run_cfg.gpu)
    run_cfg.dist_backend = run_cfg.get("dist_backend", None) or ("nccl" if use_cuda else "gloo")
    dist_url = run_cfg.get("dist_url", "env://")
    print(f"| distributed init (rank {run_cfg.rank}, world {run_cfg.world_size}, "
          f"backend {run_cfg.dist_backend}): {dist_url}", flush=True)
    dist.init_process_group(backend=run_cfg.dist_backend, init_method=dist_url,
                            world_size=run_cfg.world_size, rank=run_cfg.rank,
                            timeout=datetime.timedelta(minutes=int(run_cfg.get("dist_timeout_min", 60))))
    dist.barrier()
    setup_for_distributed(run_cfg.rank == 0)


def collective_device() -> torch.device:
    """The device that tensors in collectives must live on for the current backend."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_rank0(value):
    """Rank 0's `value` on every rank (itself when not distributed): one decision, taken where
    the files are written, that every rank then acts on alike (no rank left in a collective)."""
    if dist.is_available() and dist.is_initialized():
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        value = holder[0]
    return value

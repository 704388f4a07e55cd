"""Fixes to LAVIS 1.0.2 functions that the plugin cannot reach by subclassing.

Each fix replaces one small function and says which bug it removes. Everything else that
LAVIS gets wrong on CPU / single process is fixed in our runner subclass instead.
"""

import torch
import torch.distributed as dist
from lavis.common import logger as lavis_logger
from lavis.common.dist_utils import is_dist_avail_and_initialized
from lavis.tasks.base_task import BaseTask

from lavis_vpgtrans.common.dist import collective_device
from lavis_vpgtrans.common.train_loop import guarded_inner_loop

# LAVIS's own inner training loop, replaced by apply() (kept for the overhead benchmark)
LAVIS_TRAIN_INNER_LOOP = BaseTask._train_inner_loop


def _synchronize_between_processes(self):
    """SmoothedValue.synchronize_between_processes put its tensor on "cuda" unconditionally,
    which fails under gloo on CPU; use the backend's device."""
    if not is_dist_avail_and_initialized():
        return
    t = torch.tensor([self.count, self.total], dtype=torch.float64, device=collective_device())
    dist.barrier()
    dist.all_reduce(t)
    self.count, self.total = int(t[0].item()), t[1].item()


def apply() -> None:
    lavis_logger.SmoothedValue.synchronize_between_processes = _synchronize_between_processes
    # BaseTask._train_inner_loop applied every step, NaN or not (the run trained and saved NaN
    # weights); the guarded loop skips non-finite steps and stops the run after
    # run.max_nonfinite_steps of them in a row (common/train_loop.py). Every task, LAVIS's own
    # (image_text_pretrain) included, trains through it.
    BaseTask._train_inner_loop = guarded_inner_loop

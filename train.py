"""Train with LAVIS's loop and this plugin's models, runners, builders and tasks.

    python -m torch.distributed.run --nproc_per_node=8 train.py --cfg-path projects/vpgtrans/stage1.yaml

Rank 0 first prints the run's memory plan (python -m lavis_vpgtrans.plan) for the GPUs it runs on.
"""

import sys

from lavis_vpgtrans.plan.report import log_plan
from lavis_vpgtrans.runners.launch import train_main

if __name__ == "__main__":
    log_plan(sys.argv[1:])
    train_main()

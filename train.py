"""Train with LAVIS's loop and this plugin's models, runners, builders and tasks.

    python -m torch.distributed.run --nproc_per_node=8 train.py --cfg-path projects/vpgtrans/stage1.yaml
"""

from lavis_vpgtrans.runners.launch import train_main

if __name__ == "__main__":
    train_main()

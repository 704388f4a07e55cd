"""Evaluate a checkpoint with LAVIS's loop and this plugin's models and tasks.

    python evaluate.py --cfg-path projects/vpgtrans/eval/opt/coco_caption.yaml --ckpt output/.../checkpoint_best.pth
"""

from lavis_vpgtrans.runners.launch import evaluate_main

if __name__ == "__main__":
    evaluate_main()

"""A memory plan before launch (issue 25): what a training run of a config holds per rank,
counted from the config without loading a weight.

    python -m lavis_vpgtrans.plan --cfg-path CFG [--options ...] [--gpus N] [--gpu-gib G]

    weights.py    the parts (ViT, Q-Former, projector, LLM, LoRA) built on the meta device, their
                  bytes by precision / quantisation
    known.py      architecture numbers of the hub models the configs name, for planning offline
    estimate.py   gradients, optimizer state, activations per rank; the verdict for a card
    report.py     the printed plan, the CLI, and train.py's log of it
    measure.py    what a training step actually allocates (any device, CPU included), to check it:
                  tests/test_plan.py, benchmarks/plan_vs_measured.py
"""

"""Runs train.py (as `python train.py ARGS`) with a test-only fault injected, for the tests of the
non-finite checks (test_nonfinite.py). Alone or as a torchrun worker:

    NONFINITE_FAULT=vit_nan python tests/nonfinite_driver.py --cfg-path ... --options ...

NONFINITE_FAULT:
  vit_nan     the ViT's output is NaN from the NONFINITE_FROM-th training forward pass on (then in
              every forward pass: a persistent overflow)
  rank1_inf   rank 1's loss is +inf from that forward pass on (its gradients stay finite, so only
              the shared decision can stop rank 0)
NONFINITE_REPORT: a directory where each rank writes rank<r>.txt with the exception that ended its
run ("ok" when train.py returned).
"""

import os
import runpy
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT = os.environ.get("NONFINITE_FAULT", "")
START = int(os.environ.get("NONFINITE_FROM", "3"))


class Trigger:
    """Counts training forward passes (grad enabled); fires from the START-th on, for good."""

    def __init__(self):
        self.count, self.fired = 0, False

    def __call__(self) -> bool:
        if torch.is_grad_enabled():
            self.count += 1
            self.fired |= self.count >= START
        return self.fired


def install() -> None:
    import lavis_vpgtrans  # noqa: F401  (train.py imports it too)
    from lavis_vpgtrans.models.base import Blip2PluginBase
    from lavis_vpgtrans.models.vl_llm import Blip2VLLLM

    trigger = Trigger()
    if FAULT == "vit_nan":
        build = Blip2PluginBase.init_vision_encoder.__func__

        def init_vision_encoder(cls, *args, **kwargs):
            vit, ln = build(cls, *args, **kwargs)
            vit.register_forward_hook(lambda _m, _i, out: out * float("nan") if trigger() else out)
            return vit, ln

        Blip2PluginBase.init_vision_encoder = classmethod(init_vision_encoder)
    elif FAULT == "rank1_inf":
        forward = Blip2VLLLM.forward

        def forward_inf_on_rank1(self, samples):
            out = forward(self, samples)
            if int(os.environ.get("RANK", "0")) == 1 and trigger():
                out = dict(out, loss=out["loss"] + float("inf"), loss_lm=out["loss_lm"] + float("inf"))
            return out

        Blip2VLLLM.forward = forward_inf_on_rank1
    elif FAULT:
        raise ValueError(f"unknown NONFINITE_FAULT {FAULT!r}")


def report(text: str) -> None:
    directory = os.environ.get("NONFINITE_REPORT")
    if directory:
        with open(os.path.join(directory, f"rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    install()
    sys.argv = [os.path.join(REPO, "train.py")] + sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except BaseException as e:
        report(f"{type(e).__name__}: {e}")
        raise
    report("ok")

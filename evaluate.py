"""Evaluate a checkpoint with LAVIS's loop and this plugin's models and tasks.

    python evaluate.py --cfg-path projects/vpgtrans/eval/opt/coco_caption.yaml --ckpt output/.../checkpoint_best.pth

Before the first batch it prints the protocol the run evaluates with: the prompt, beams, new-token
lengths and length penalty the task hands the model (the model's own defaults where the task
hands none), so that a score can be put next to a paper's only when the two match.
"""

import inspect
import logging
from typing import Dict, Optional

from lavis.tasks.captioning import CaptionTask
from lavis.tasks.vqa import VQATask

from lavis_vpgtrans.runners.launch import build


def _default(function, name):
    return inspect.signature(function).parameters[name].default


def protocol(task, model_cfg, model_cls) -> Optional[Dict[str, object]]:
    """The zero-shot protocol of an evaluation: what `task` (a set-up VQA or caption task) passes
    to the model's predict_answers / generate, with the model's defaults for what it does not
    pass (None for a task that generates nothing, e.g. the P-Former's). `model_cfg`: the run's
    model config (its model type's yaml merged with the run's)."""
    if isinstance(task, VQATask):
        method = model_cls.predict_answers
        out = {"kind": "vqa", "prompt": task.prompt or model_cfg.get("vqa_prompt", None),
               "inference_method": task.inference_method}
    elif isinstance(task, CaptionTask):
        method = model_cls.generate
        out = {"kind": "caption", "prompt": model_cfg.get("prompt", "")}
    else:
        return None
    # the tasks pass no length penalty (as LAVIS's): the model's default applies
    length_penalty = getattr(task, "length_penalty", None)
    out.update(num_beams=task.num_beams, max_len=task.max_len, min_len=task.min_len,
               length_penalty=_default(method, "length_penalty") if length_penalty is None else length_penalty)
    return out


def format_protocol(p: Optional[Dict[str, object]], model_cfg) -> str:
    if p is None:
        return f"Protocol: {model_cfg.arch} {model_cfg.get('model_type', '')}, a task without generation"
    what = "VQA: predict_answers" if p["kind"] == "vqa" else "captions: generate"
    lines = [f"Zero-shot protocol ({what} of {model_cfg.arch} {model_cfg.get('model_type', '')}):",
             f"  prompt          {p['prompt']!r}",
             f"  beams           {p['num_beams']}",
             f"  new tokens      max_len {p['max_len']}, min_len {p['min_len']} (min_len counts the prompt's "
             f"tokens too, as LAVIS hands it to generate)",
             f"  length penalty  {p['length_penalty']}"]
    if p["kind"] == "vqa":
        lines.append(f"  answers         {p['inference_method']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    runner = build(argv, "Evaluate a model with LAVIS's loop (lavis-vpgtrans).", evaluate=True)
    model_cfg = runner.config.model_cfg
    text = format_protocol(protocol(runner.task, model_cfg, type(runner.unwrap_dist_model(runner.model))), model_cfg)
    logging.info("%s", text)  # rank 0's console (LAVIS's logger)
    runner.evaluate(skip_reload=True)


if __name__ == "__main__":
    main()

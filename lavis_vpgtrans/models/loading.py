"""A registered model type in eval mode with its eval image processor, for inference outside
LAVIS's runner: the terminal chat, the web demo (chat/) and the HF export (export.py).

    from lavis_vpgtrans.models.loading import load_chat_model   # also lavis_vpgtrans.chat.load_chat_model
    model, vis_processor = load_chat_model("blip2_vicuna", "vl_vicuna7b", llm_model=VICUNA_DIR,
                                           checkpoint="vl-vicuna.pth")

Every model class of the plugin is registered by then: importing any module of lavis_vpgtrans
runs the package's __init__ first.
"""

import logging
from typing import Dict, Sequence

import torch
from lavis.common.registry import registry
from lavis.models import load_preprocess
from omegaconf import OmegaConf


# Model config keys a chat model takes from the run that wrote its checkpoint, unless the
# options set them: the LoRA layers' shape its adapters need, and the chat template (and its
# arguments) it trained its conversations in (blip2_causal_lm).
KEYS_FROM_RUN = ("llm_lora", "chat_template", "chat_template_kwargs")


def checkpoint_model_config(checkpoint: str) -> dict:
    """The `model` config of the run that wrote a training checkpoint (our runner saves its
    config), or {} (a file without a config, e.g. vl-vicuna.pth)."""
    from lavis_vpgtrans.common.checkpoint import load_checkpoint_file
    from lavis_vpgtrans.common.paths import resolve_path

    config = load_checkpoint_file(resolve_path(checkpoint)).get("config", None)
    model = config.get("model", None) if isinstance(config, dict) else None
    return model if isinstance(model, dict) else {}


def checkpoint_llm_lora(checkpoint: str):
    """The `model.llm_lora` of the run that wrote a training checkpoint, or None."""
    return checkpoint_model_config(checkpoint).get("llm_lora", None)


def load_chat_model(arch: str = "blip2_vicuna", model_type: str = "vl_vicuna7b", llm_model: str = None,
                    checkpoint: str = None, device: str = None, options: Sequence[str] = ()):
    """(model in eval mode on `device`, eval image processor) from a registered model type.

    `llm_model`: the local LLM dir (e.g. Vicuna-7B v0 for the released VL-Vicuna);
    `checkpoint`: a trained model's checkpoint (trainable parameters only, e.g. vl-vicuna.pth
    or a stage-3 run's checkpoint_3.pth), replacing the model type's `finetuned`;
    `options`: more model config overrides, "key=value" (e.g. "llm_precision=fp32", or
    "llm_quantization.bits=4" for the LLM in 4-bit).
    A checkpoint of a run with LoRA adapters on the LLM (llm_lora) is loaded with that run's
    llm_lora (from the config the checkpoint holds) unless the options set one; likewise the
    chat template a blip2_causal_lm run trained in (chat_template, chat_template_kwargs).
    """
    cls = registry.get_model_class(arch)
    if cls is None:
        raise KeyError(f"unknown model {arch!r}")
    cfg = OmegaConf.load(cls.default_config_path(model_type))
    overrides: Dict[str, object] = {}
    if llm_model:
        overrides["llm_model"] = llm_model
    if checkpoint:
        overrides.update(load_finetuned=True, finetuned=checkpoint)
    model_cfg = OmegaConf.merge(cfg.model, overrides, OmegaConf.from_dotlist(list(options)))
    if not model_cfg.get("llm_model", None):
        raise ValueError(f"model type {model_type!r} names no LLM: pass the local LLM directory "
                         f"(--llm-model DIR)")
    if checkpoint:
        run = checkpoint_model_config(checkpoint)
        for key in KEYS_FROM_RUN:
            if model_cfg.get(key, None) is None and run.get(key, None):
                logging.getLogger(__name__).info("%s from %s's run config: %s", key, checkpoint, run[key])
                model_cfg[key] = run[key]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = cls.from_config(model_cfg).to(device).eval()
    vis_processors, _ = load_preprocess(cfg.preprocess)
    return model, vis_processors["eval"]

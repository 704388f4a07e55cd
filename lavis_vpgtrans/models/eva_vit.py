"""A local EVA-ViT directory: LAVIS's own VisionTransformer, stored as config.json + safetensors.

    config.json        {"architecture": "eva_vit", "img_size", "patch_size", "embed_dim",
                        "depth", "num_heads", "mlp_ratio", "qkv_bias"}
    model.safetensors  its state dict

A model config's `vit_model` may name such a directory instead of LAVIS's "eva_clip_g" /
"clip_L" (which LAVIS downloads).
"""

import json
import os
from functools import partial

import torch
from lavis.models.blip2_models.blip2 import LayerNorm

from lavis_vpgtrans.common.checkpoint import load_state_with_report

VIT_CONFIG_NAME = "config.json"
VIT_WEIGHTS_NAME = "model.safetensors"


def build_eva_vit(cfg, drop_path_rate=0.0, use_checkpoint=False):
    """LAVIS's EVA VisionTransformer with the sizes in `cfg` (a config.json's dict)."""
    from lavis.models.eva_vit import VisionTransformer

    return VisionTransformer(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg.get("qkv_bias", True), use_mean_pooling=False, drop_path_rate=drop_path_rate,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_checkpoint=use_checkpoint)


def save_eva_vit_dir(visual_encoder, cfg, out_dir: str) -> None:
    """Writes `visual_encoder` (built by build_eva_vit(cfg)) as a directory load_eva_vit_dir reads."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, VIT_CONFIG_NAME), "w") as f:
        json.dump({"architecture": "eva_vit", **cfg}, f, indent=2)
    save_file(visual_encoder.state_dict(), os.path.join(out_dir, VIT_WEIGHTS_NAME))


def load_eva_vit_dir(path: str, img_size: int, drop_path_rate=0.0, use_grad_checkpoint=False, precision="fp16",
                     name: str = None):
    """(visual_encoder, ln_vision) from the directory `path` (`name`: the config value that
    named it, for messages), as LAVIS's init_vision_encoder returns them; every weight must be
    in the file."""
    name = name or path
    config_file = os.path.join(path, VIT_CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"vit_model {name!r}: expected 'eva_clip_g', 'clip_L' or a directory with "
            f"{VIT_CONFIG_NAME} and {VIT_WEIGHTS_NAME}; {config_file} does not exist")
    with open(config_file) as f:
        vit_cfg = json.load(f)
    if vit_cfg["img_size"] != img_size:
        raise ValueError(f"vit_model {name!r} was built for image size {vit_cfg['img_size']}, "
                         f"the model config asks for {img_size}")
    visual_encoder = build_eva_vit(vit_cfg, drop_path_rate, use_grad_checkpoint)
    from safetensors.torch import load_file

    weights_file = os.path.join(path, VIT_WEIGHTS_NAME)
    report = load_state_with_report(visual_encoder, load_file(weights_file), weights_file,
                                    required=list(visual_encoder.state_dict()))
    report.log("vision encoder")
    if precision == "fp16":
        visual_encoder = visual_encoder.half()
    return visual_encoder, LayerNorm(visual_encoder.num_features)

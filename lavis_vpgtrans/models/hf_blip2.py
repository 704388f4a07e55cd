"""BLIP-2 state dicts between LAVIS's layout and transformers' `Blip2ForConditionalGeneration`.

    LAVIS (ours)                                  transformers
    visual_encoder.* (EVA ViT)                    vision_model.embeddings.* / vision_model.encoder.layers.*
    ln_vision.*                                   vision_model.post_layernorm.*
    Qformer.bert.*                                qformer.*
    query_tokens                                  query_tokens
    <projector>.* (opt_proj, t5_proj, ...)        language_projection.*
    (the frozen LLM, not part of a VPG)           language_model.*

The rules were read off transformers' convert_blip_2_original_to_pytorch.py and are checked
numerically against transformers' own Blip2 classes in tests/test_hf_blip2.py.

Two things do not map one to one:
- EVA's attention keeps separate `q_bias` and `v_bias` (the key has no bias); transformers
  stores one `qkv.bias` = cat(q_bias, zeros, v_bias). Going back, the key part must be zero.
- LAVIS's ln_vision uses LayerNorm's default eps 1e-5, transformers' post_layernorm the vision
  config's `layer_norm_eps`, shared with the ViT blocks (1e-6 for EVA). The weights are the
  same; the outputs differ by that eps alone. Going out, the export measures which of the two
  brings its soft prompts closer to ours and keeps that one (export.py choose_vision_eps);
  coming in, our ViT blocks keep 1e-6 and ln_vision 1e-5 whatever the directory says.
"""

import json
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from lavis_vpgtrans.common.checkpoint import CheckpointError, register_dir_reader
from lavis_vpgtrans.models.projector import ARCH_BY_LLM_TYPE, GENERIC_CAUSAL_LM_ARCH, projector_name_of
from lavis_vpgtrans.models.vl_llm import UNUSED_QFORMER_KEYS

logger = logging.getLogger(__name__)

HF_MODEL_TYPE = "blip-2"
LLM_PREFIX = "language_model."
HF_PROJECTOR = "language_projection"

# (LAVIS key, transformers key) templates; {name} parts match what PLACEHOLDERS says and are
# carried over. The ViT's q_bias / v_bias <-> qkv.bias is the one rule that is not a rename.
RENAMES: List[Tuple[str, str]] = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual_encoder.blocks.{i}.norm{n}.{p}", "vision_model.encoder.layers.{i}.layer_norm{n}.{p}"),
    ("visual_encoder.blocks.{i}.attn.qkv.weight", "vision_model.encoder.layers.{i}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{i}.attn.proj.{p}", "vision_model.encoder.layers.{i}.self_attn.projection.{p}"),
    ("visual_encoder.blocks.{i}.mlp.{fc}.{p}", "vision_model.encoder.layers.{i}.mlp.{fc}.{p}"),
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    ("Qformer.bert.encoder.layer.{i}.{att}.self.{rest}", "qformer.encoder.layer.{i}.{att}.attention.{rest}"),
    ("Qformer.bert.encoder.layer.{i}.{att}.output.{rest}", "qformer.encoder.layer.{i}.{att}.output.{rest}"),
    ("Qformer.bert.encoder.layer.{i}.{ffn}.{rest}", "qformer.encoder.layer.{i}.{ffn}.{rest}"),
]
PLACEHOLDERS = {"p": r"weight|bias", "i": r"\d+", "n": r"[12]", "fc": r"fc[12]",
                "att": r"attention|crossattention", "ffn": r"intermediate_query|output_query", "rest": r".+"}
LAVIS_QKV_BIAS = ("visual_encoder.blocks.{i}.attn.q_bias", "visual_encoder.blocks.{i}.attn.v_bias")
HF_QKV_BIAS = "vision_model.encoder.layers.{i}.self_attn.qkv.bias"
# LAVIS keys a VPG export leaves out on purpose: a buffer transformers recomputes, and the
# Q-Former's text side (UNUSED_QFORMER_KEYS), which image-to-text generation never runs.
QFORMER_POSITION_IDS = "Qformer.bert.embeddings.position_ids"


def not_exported(key: str) -> bool:
    return key == QFORMER_POSITION_IDS or bool(UNUSED_QFORMER_KEYS.match(key))


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, rx in PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(pattern + "$")


_LAVIS_TO_HF = [(_compile(lavis), hf) for lavis, hf in RENAMES]
_HF_TO_LAVIS = [(_compile(hf), lavis) for lavis, hf in RENAMES]
_LAVIS_BIAS = re.compile(r"visual_encoder\.blocks\.(?P<i>\d+)\.attn\.(?P<qv>[qv])_bias$")
_HF_BIAS = _compile(HF_QKV_BIAS)


def _rename(key: str, table) -> Optional[str]:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def lavis_to_hf(state: Dict[str, torch.Tensor], projector_name: str, source: str = "model") -> Dict[str, torch.Tensor]:
    """A LAVIS VPG + projector state dict (ViT, ln_vision, Q-Former, query tokens, `projector_name`)
    in transformers' Blip2 names. Any other key (e.g. EVA's layer scale `gamma_1`, which
    transformers' Blip2 cannot represent) is an error naming it."""
    out, biases, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith(projector_name + "."):
            out[HF_PROJECTOR + key[len(projector_name):]] = value
        elif _LAVIS_BIAS.match(key):
            m = _LAVIS_BIAS.match(key)
            biases.setdefault(m["i"], {})[m["qv"]] = value
        elif not_exported(key):
            continue
        else:
            new = _rename(key, _LAVIS_TO_HF)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
    if unknown:
        raise CheckpointError(f"{source}: keys with no place in transformers' Blip2ForConditionalGeneration: "
                              f"{', '.join(sorted(unknown))}")
    for i, qv in sorted(biases.items()):
        if set(qv) != {"q", "v"}:
            missing = LAVIS_QKV_BIAS[0 if "q" not in qv else 1].format(i=i)
            raise CheckpointError(f"{source}: missing key '{missing}' (q_bias and v_bias come in pairs)")
        out[HF_QKV_BIAS.format(i=i)] = torch.cat([qv["q"], torch.zeros_like(qv["q"]), qv["v"]])
    return out


def hf_to_lavis(state: Dict[str, torch.Tensor], projector_name: str, source: str = "model") -> Dict[str, torch.Tensor]:
    """transformers' Blip2 VPG + projector keys (no `language_model.*`) in LAVIS's names, the
    projector under `projector_name`."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(HF_PROJECTOR + "."):
            out[projector_name + key[len(HF_PROJECTOR):]] = value
        elif _HF_BIAS.match(key):
            i = _HF_BIAS.match(key)["i"]
            q, k, v = value.chunk(3)
            if torch.count_nonzero(k):
                raise CheckpointError(
                    f"{source}: '{key}' has a non-zero key bias (max |k| = {k.abs().max().item():.3g}); LAVIS's EVA "
                    f"ViT has only q_bias and v_bias, so this attention cannot be represented")
            out[LAVIS_QKV_BIAS[0].format(i=i)] = q
            out[LAVIS_QKV_BIAS[1].format(i=i)] = v
        else:
            new = _rename(key, _HF_TO_LAVIS)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
    if unknown:
        raise CheckpointError(f"{source}: keys with no LAVIS BLIP-2 equivalent: {', '.join(sorted(unknown))}")
    return out


def is_hf_blip2_dir(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(config)):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") == HF_MODEL_TYPE


def _expected_hf_vpg_keys(config) -> set:
    """The VPG + projector keys transformers' own Blip2 modules have for this config (built on
    the meta device: no memory, no initialisation)."""
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

    with torch.device("meta"):
        vision = Blip2VisionModel(config.vision_config)
        qformer = Blip2QFormerModel(config.qformer_config)
    return ({"vision_model." + k for k in vision.state_dict()} | {"qformer." + k for k in qformer.state_dict()}
            | {"query_tokens", HF_PROJECTOR + ".weight", HF_PROJECTOR + ".bias"})


def _safetensors_files(path: str) -> List[str]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                          f"weights are read; re-save with save_pretrained(safe_serialization=True))")


def read_hf_blip2_dir(path: str) -> Dict:
    """An HF-format BLIP-2 directory (e.g. Salesforce/blip2-opt-2.7b) as a LAVIS checkpoint:
    {"model": VPG + projector in LAVIS names, "metadata": {...}}. The language model's weights
    are never read (the shards are opened lazily and `language_model.*` skipped)."""
    from safetensors import safe_open
    from transformers import Blip2Config

    config = Blip2Config.from_pretrained(path)
    text_type = config.text_config.model_type
    # the projector name of the class the converter and config would pick for this LLM
    projector_name = projector_name_of(ARCH_BY_LLM_TYPE.get(text_type, GENERIC_CAUSAL_LM_ARCH))
    state = {}
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open has keys(), no __iter__)
                if not key.startswith(LLM_PREFIX):
                    state[key] = f.get_tensor(key)
    expected = _expected_hf_vpg_keys(config)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise CheckpointError(f"{path}: missing keys: {', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for a Blip2ForConditionalGeneration: {', '.join(unexpected)}")
    metadata = {"format": "hf-blip2", "text_model_type": text_type,
                "vision_layer_norm_eps": config.vision_config.layer_norm_eps}
    logger.info("%s: HF-format BLIP-2 (%s LLM, projector as %s); its post_layernorm / ViT LayerNorm eps is %g, "
                "LAVIS's ln_vision uses 1e-5 and EVA's blocks 1e-6", path, text_type, projector_name,
                config.vision_config.layer_norm_eps)
    return {"model": hf_to_lavis(state, projector_name, path), "metadata": metadata}


# load_checkpoint_file (vpg_checkpoint, projector_checkpoint, ...) reads such directories
register_dir_reader(is_hf_blip2_dir, read_hf_blip2_dir,
                    f"an HF-format BLIP-2 (expected config.json with model_type {HF_MODEL_TYPE!r})")

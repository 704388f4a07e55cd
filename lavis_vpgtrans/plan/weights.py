"""The model's parts counted exactly without loading a weight: each part is built from its real
config on the meta device by the classes the model uses (LAVIS's EVA / CLIP ViT and BertLMHeadModel,
transformers' LLM classes), then its tensors are summed in the dtypes the model stores them in:

    ViT         vit_precision: fp16 as LAVIS converts it (its Linear / Conv weights; norms, pos_embed
                stay fp32), or the whole local EVA-ViT directory's model in fp16 (models/eva_vit.py)
    ln_vision   fp32
    Q-Former    fp32, without the text-side parts the VL-LLMs drop (models/vl_llm.py)
    projector   fp32
    LLM         llm_precision; T5's `wo` in fp32 when fp16 (transformers' _keep_in_fp32_modules);
                llm_quantization: every nn.Linear but transformers' kept ones in NF4 / FP4 (bitsandbytes
                block size 64, absmax per block: one byte with double quantisation plus an fp32 per
                256 blocks, else fp32) or int8 (one byte per weight plus an fp32 scale per row);
                llm_lora: r x (in + out) fp32 parameters per target module, and with a quantised base
                peft's prepare_model_for_kbit_training puts the other weights in fp32 (QLoRA)
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
from accelerate import init_empty_weights
from torch import nn

from lavis_vpgtrans.common.paths import resolve_path
from lavis_vpgtrans.plan.known import CLIP_VIT_L, EVA_VIT_G, KNOWN_BERT_CONFIGS, KNOWN_LLM_CONFIGS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (Params4bit.blocksize; CUDA and CPU backends alike)
NESTED_BLOCK = 256  # double quantisation: one fp32 absmax per 256 first-level absmax bytes
NF4_CODE_BYTES = 16 * 4  # each layer's quant state holds its 16-value fp32 code
# peft's default LoRA targets by model_type (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
# which models/lora.py uses): read from peft when it is installed
FALLBACK_LORA_TARGETS = {"opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                         "mistral": ["q_proj", "v_proj"], "t5": ["q", "v"]}


class PlanError(ValueError):
    """A config the planner cannot plan: the message names the key and value."""


@dataclass
class Part:
    """One part of the model as a rank stores it (before sharding)."""

    name: str
    params: int
    bytes: int  # parameters + buffers as stored
    storage: str  # how it is stored, for the report
    trainable_params: int = 0  # in the stage planned
    block_bytes: int = 0  # the largest FSDP unit inside it (ViT / LLM block), 0 if none
    blocks_bytes: int = 0  # all its FSDP units together


@dataclass
class LLMInfo:
    """What the activation estimate needs of the LLM."""

    model_type: str
    encoder_decoder: bool
    hidden: int
    layers: int
    decoder_layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated: bool  # gated MLP (LLaMA / Qwen / Mistral / Flan-T5): three f-wide tensors kept, not one
    rms_norm: bool  # RMSNorm computed in fp32 (LLaMA family, T5), not LayerNorm in the compute dtype
    source: str
    lora_targets: List[str] = field(default_factory=list)
    lora_in_widths: List[int] = field(default_factory=list)  # per layer: the distinct inputs of the targets
    lora_r: int = 0
    lora_dropout: float = 0.0
    lora_rank_total: int = 0  # r summed over every adapted linear layer
    lora_in_total: int = 0  # in_features summed over every adapted linear layer
    quant: Optional[dict] = None
    qlora: bool = False
    embed: int = 0  # input-embedding width, the soft prompts' (0: hidden; OPT-350M: 512 under hidden 1024)
    llm_dtype_bytes: int = 2
    inner: int = 0  # T5: heads x d_kv (the attention's width)
    llm_precision: str = "fp16"


def module_bytes(module: nn.Module, dtype_of=None) -> int:
    """Bytes of `module`'s parameters and buffers (each tensor once), stored as `dtype_of(name,
    tensor)` says (default: as they are)."""
    total, seen = 0, set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        dtype = dtype_of(name, t) if dtype_of else t.dtype
        total += t.numel() * torch.empty((), dtype=dtype).element_size()
    return total


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- ViT


def build_vit(model_cfg):
    """(visual encoder on meta, fp16 conversion to apply) as models/base.py builds it."""
    name = model_cfg.get("vit_model", "eva_clip_g")
    img = int(model_cfg.get("image_size", 224))
    # parameters on meta, other tensors (LAVIS's drop-path schedule calls .item()) real
    with init_empty_weights():
        if name == "eva_clip_g":
            from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16

            vit = VisionTransformer(img_size=img, use_mean_pooling=False, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                    **EVA_VIT_G)
            return vit, convert_weights_to_fp16
        if name == "clip_L":
            from lavis.models.clip_vit import VisionTransformer
            from lavis.models.eva_vit import convert_weights_to_fp16

            return (VisionTransformer(input_resolution=img, use_grad_checkpointing=False, **CLIP_VIT_L),
                    convert_weights_to_fp16)
        from lavis_vpgtrans.models.eva_vit import VIT_CONFIG_NAME, build_eva_vit

        config_file = os.path.join(resolve_path(name), VIT_CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise PlanError(f"model.vit_model={name!r}: expected 'eva_clip_g', 'clip_L' or a directory with "
                            f"{VIT_CONFIG_NAME}; {config_file} does not exist")
        with open(config_file) as f:
            return build_eva_vit(json.load(f)), lambda m: m.half()


def vit_part(model_cfg):
    vit, to_fp16 = build_vit(model_cfg)
    precision = model_cfg.get("vit_precision", "fp16")
    if precision not in ("fp16", "fp32"):
        raise PlanError(f"model.vit_precision must be fp16 or fp32, got {precision!r}")
    if precision == "fp16":
        to_fp16(vit)
    blocks = list(getattr(vit, "blocks", None) or getattr(getattr(vit, "transformer", None), "resblocks", []))
    block_bytes = [module_bytes(b) for b in blocks]
    width = vit.num_features
    dims = dict(width=width, depth=len(blocks), heads=_vit_heads(blocks[0]), mlp=_vit_mlp(blocks[0], width),
                tokens=(int(model_cfg.get("image_size", 224)) // _vit_patch(vit)) ** 2 + 1,
                bytes_per_el=2 if precision == "fp16" else 4)
    part = Part("ViT", n_params(vit), module_bytes(vit), f"{precision} (frozen)",
                block_bytes=max(block_bytes, default=0), blocks_bytes=sum(block_bytes))
    return part, dims


def _vit_heads(block) -> int:
    attn = getattr(block, "attn", None)
    return int(getattr(attn, "num_heads", None) or getattr(attn, "num_heads", 1))


def _vit_mlp(block, width) -> int:
    mlp = getattr(block, "mlp", None)
    fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "c_fc", None)
    return fc1.out_features if fc1 is not None else 4 * width


def _vit_patch(vit) -> int:
    embed = getattr(vit, "patch_embed", None)
    conv = embed.proj if embed is not None else vit.conv1
    return conv.kernel_size[0]


# ---------------------------------------------------------------------------- Q-Former


def qformer_parts(model_cfg, vision_width: int):
    """(ln_vision, Q-Former with query tokens, its dims) as models/base.py + vl_llm.py build them."""
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    name = model_cfg.get("qformer_model", "bert-base-uncased")
    path = resolve_path(name)
    if os.path.isdir(path):
        config = BertConfig.from_pretrained(path)
    elif name in KNOWN_BERT_CONFIGS:
        config = BertConfig(**KNOWN_BERT_CONFIGS[name][0])
    else:
        raise PlanError(f"model.qformer_model={name!r}: not a local directory and not one of the known configs "
                        f"{sorted(KNOWN_BERT_CONFIGS)}")
    queries = int(model_cfg.get("num_query_token", 32))
    every = int(model_cfg.get("cross_attention_freq", 2))
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = every
    config.query_length = queries
    with init_empty_weights():
        qformer = BertLMHeadModel(config)
    # the text side the VL-LLMs drop (vl_llm.py: only the queries pass through the Q-Former)
    qformer.cls = None
    qformer.bert.embeddings.word_embeddings = None
    qformer.bert.embeddings.position_embeddings = None
    for layer in qformer.bert.encoder.layer:
        layer.output = None
        layer.intermediate = None
    hidden = config.hidden_size
    n = n_params(qformer) + queries * hidden
    # buffers (position_ids) are int64 and kept
    part = Part("Q-Former", n, module_bytes(qformer) + queries * hidden * 4, "fp32 (+ query tokens)")
    ln = Part("ln_vision", 2 * vision_width, 2 * vision_width * 4, "fp32")
    dims = dict(hidden=hidden, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                intermediate=config.intermediate_size, every=every, queries=queries)
    return ln, part, dims


# ---------------------------------------------------------------------------- LLM


def llm_hf_config(model_cfg):
    """(the LLM's HF config with the model config's `llm_config` overrides, where it came from)."""
    from transformers import AutoConfig

    name = model_cfg.get("llm_model", None)
    if not name:
        raise PlanError("model.llm_model is not set (an HF model id or a local directory)")
    path = resolve_path(str(name))
    if os.path.isdir(path):
        config, source = AutoConfig.from_pretrained(path), f"{path}/config.json"
    elif name in KNOWN_LLM_CONFIGS:
        fields_, where = KNOWN_LLM_CONFIGS[name]
        fields_ = dict(fields_)
        config, source = AutoConfig.for_model(fields_.pop("model_type"), **fields_), f"known config: {where}"
    else:
        raise PlanError(f"model.llm_model={name!r}: not a local directory and not one of the known configs "
                        f"{sorted(KNOWN_LLM_CONFIGS)}; point it at a local HF directory (--options model.llm_model=DIR)")
    for key, value in dict(model_cfg.get("llm_config", None) or {}).items():
        setattr(config, key, value)
    return config, source


def build_llm(config, dtype):
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    with torch.device("meta"):
        if config.is_encoder_decoder:
            return T5ForConditionalGeneration._from_config(config, torch_dtype=dtype)
        return AutoModelForCausalLM.from_config(config, torch_dtype=dtype)


def parse_quantization(model_cfg) -> Optional[dict]:
    """`model.llm_quantization` (models/kbit.py's keys): None, or {bits, double_quant, compute_dtype, skip_modules}."""
    value = model_cfg.get("llm_quantization", None)
    if not value:
        return None
    q = dict(value)
    bits = q.get("bits", None)
    if bits not in (4, 8):
        raise PlanError(f"model.llm_quantization.bits must be 4 or 8, got {bits!r}")
    compute = q.get("compute_dtype", "bf16")
    if compute not in DTYPES:
        raise PlanError(f"model.llm_quantization.compute_dtype must be one of {sorted(DTYPES)}, got {compute!r}")
    return dict(bits=bits, double_quant=bool(q.get("double_quant", True)), compute_dtype=compute,
                quant_type=q.get("quant_type", "nf4"), skip_modules=q.get("skip_modules", None))


def parse_lora(model_cfg) -> Optional[dict]:
    """`model.llm_lora` (models/lora.py's keys): None, or {r, alpha, dropout, target_modules}."""
    value = model_cfg.get("llm_lora", None)
    if value is None or value is False:
        return None
    spec = {} if value is True else dict(value)
    r = spec.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise PlanError(f"model.llm_lora.r must be a positive integer, got {r!r}")
    return dict(r=r, dropout=float(spec.get("dropout", 0.05)), target_modules=spec.get("target_modules", None))


def lora_targets(model_type: str, spec: dict) -> List[str]:
    if spec.get("target_modules"):
        return list(spec["target_modules"])
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:
        defaults = FALLBACK_LORA_TARGETS
    if model_type not in defaults:
        raise PlanError(f"model.llm_lora.target_modules: no default LoRA targets for model_type {model_type!r}; "
                        f"name them")
    return list(defaults[model_type])


def quantized_linear_bytes(out_features: int, in_features: int, bits: int, double_quant: bool = True) -> int:
    """Bytes of a bitsandbytes Linear4bit / Linear8bitLt weight with its quantisation state (no bias)."""
    n = out_features * in_features
    if bits == 8:
        return n + out_features * 4  # int8 weight (CB) + fp32 scale per row (SCB)
    blocks = math.ceil(n / NF4_BLOCK)
    packed = (n + 1) // 2  # two 4-bit values per byte
    if double_quant:
        # absmax quantised to one byte per block + fp32 absmax per 256 of them + the fp32 offset
        absmax = blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 4
    else:
        absmax = blocks * 4
    return packed + absmax + NF4_CODE_BYTES


def _keep_fp32_regex(llm):
    names = getattr(llm, "_keep_in_fp32_modules", None) or []
    return re.compile("|".join(rf"((^|\.){m}($|\.))" for m in names)) if names else None


def llm_part(model_cfg, stage_trains_lora: bool):
    """(LLM part, LoRA part or None, LLMInfo)."""
    config, source = llm_hf_config(model_cfg)
    precision = model_cfg.get("llm_precision", "fp16")
    if precision not in DTYPES:
        raise PlanError(f"model.llm_precision must be one of {sorted(DTYPES)}, got {precision!r}")
    dtype = DTYPES[precision]
    quant = parse_quantization(model_cfg)
    lora = parse_lora(model_cfg)
    llm = build_llm(config, dtype)
    keep32 = _keep_fp32_regex(llm)
    # transformers keeps _keep_in_fp32_modules in fp32 for fp16 weights and for bitsandbytes (its
    # quantizer's use_keep_in_fp32_modules)
    keep32_applies = keep32 is not None and (dtype == torch.float16 or quant is not None)

    quantized = {}  # module name -> Linear
    if quant is not None:
        skip = quant["skip_modules"]
        if skip is None:
            from transformers.integrations.bitsandbytes import get_keys_to_not_convert

            skip = list(get_keys_to_not_convert(llm)) + list(getattr(llm, "_keep_in_fp32_modules", None) or [])
        # replace_with_bnb_linear's rule: a key anywhere in the module's dotted name keeps it
        quantized = {n: m for n, m in llm.named_modules()
                     if isinstance(m, nn.Linear) and not any(k in n for k in skip)}
    qlora = quant is not None and lora is not None

    def dtype_of(name, tensor):
        if not tensor.is_floating_point():
            return tensor.dtype
        if qlora:
            return torch.float32  # prepare_model_for_kbit_training: every non-quantised weight in fp32
        if keep32_applies and keep32.search(name.rsplit(".", 1)[0]):
            return torch.float32
        return tensor.dtype

    quantized_weights = {f"{n}.weight" for n in quantized}
    total, seen = 0, set()
    for name, t in list(llm.named_parameters()) + list(llm.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if name in quantized_weights:
            m = quantized[name[: -len(".weight")]]
            total += quantized_linear_bytes(m.out_features, m.in_features, quant["bits"], quant["double_quant"])
        else:
            total += t.numel() * torch.empty((), dtype=dtype_of(name, t)).element_size()
    params = n_params(llm)
    if quant is None:
        storage = precision + (" (wo in fp32)" if keep32_applies else "")
    else:
        kind = (f"{quant['quant_type'].upper()}{' double-quant' if quant['double_quant'] else ''}"
                if quant["bits"] == 4 else "int8 (LLM.int8)")
        rest = "fp32 (QLoRA)" if qlora else precision
        storage = f"{kind}: {len(quantized)} linear layers; the rest {rest}"
    from lavis_vpgtrans.common.sharding import llm_blocks

    blocks = llm_blocks(llm)
    block_bytes = [_bytes_share(b, total, llm) for b in blocks]
    part = Part("LLM", params, total, storage + " (frozen)", block_bytes=max(block_bytes), blocks_bytes=sum(block_bytes))

    info = _llm_info(config, source)
    lora_part = None
    if lora is not None:
        targets = lora_targets(config.model_type, lora)
        linears = [(n, m) for n, m in llm.named_modules() if isinstance(m, nn.Linear)
                   and any(n == t or n.endswith("." + t) for t in targets)]
        if not linears:
            raise PlanError(f"model.llm_lora.target_modules {targets}: no linear layer of the LLM matches")
        n_lora = sum(lora["r"] * (m.in_features + m.out_features) for _, m in linears)
        lora_part = Part("LoRA", n_lora, n_lora * 4, f"fp32, r={lora['r']} on {','.join(targets)}",
                         trainable_params=n_lora if stage_trains_lora else 0)
        info.lora_targets = targets
        info.lora_r = lora["r"]
        info.lora_dropout = lora["dropout"]
        # per layer, the distinct inputs the adapters keep (q and v read the same normed hidden state)
        per_layer = {}
        for n, m in linears:
            key = re.sub(r"\.(q|k|v|q_proj|k_proj|v_proj)$", ".qkv", n)
            per_layer[key] = m.in_features
        info.lora_in_widths = sorted(per_layer.values())
        info.lora_rank_total = sum(lora["r"] for _ in linears)
        info.lora_in_total = sum(m.in_features for _, m in linears)
    info.quant = quant
    info.qlora = qlora
    info.llm_dtype_bytes = torch.empty((), dtype=dtype).element_size()
    info.llm_precision = precision
    return part, lora_part, info


def _bytes_share(block: nn.Module, total: int, llm: nn.Module) -> int:
    """A block's share of the LLM's stored bytes (by parameter count: quantised blocks shrink alike)."""
    return round(total * n_params(block) / max(1, n_params(llm)))


def _llm_info(config, source) -> LLMInfo:
    if config.is_encoder_decoder:
        return LLMInfo(config.model_type, True, config.d_model, config.num_layers, config.num_decoder_layers,
                       config.num_heads, config.num_heads, config.d_ff, config.vocab_size,
                       gated=bool(getattr(config, "is_gated_act", False)), rms_norm=True, source=source,
                       inner=config.num_heads * config.d_kv)
    heads = config.num_attention_heads
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    return LLMInfo(config.model_type, False, config.hidden_size, config.num_hidden_layers, 0, heads,
                   getattr(config, "num_key_value_heads", None) or heads, ffn, config.vocab_size,
                   gated=config.model_type != "opt", rms_norm=config.model_type != "opt", source=source,
                   embed=getattr(config, "word_embed_proj_dim", None) or 0)


def model_parts(model_cfg, stage: int) -> Dict[str, object]:
    """Every part of the VL-LLM the config builds, counted exactly, with what trains in `stage`
    (1: the projector; 2: projector, Q-Former, query tokens, ln_vision, and LoRA adapters)."""
    vit, vit_dims = vit_part(model_cfg)
    ln, qformer, q_dims = qformer_parts(model_cfg, vit_dims["width"])
    llm, lora, info = llm_part(model_cfg, stage_trains_lora=stage == 2)
    width = info.embed or info.hidden  # the projector maps to the LLM's input embeddings
    projector = Part("projector", q_dims["hidden"] * width + width, (q_dims["hidden"] * width + width) * 4,
                     "fp32 trainable")
    projector.trainable_params = projector.params
    if stage == 2:
        for p in (ln, qformer):
            p.trainable_params = p.params
            p.storage = p.storage + " trainable"
    parts = [vit, ln, qformer, projector, llm] + ([lora] if lora else [])
    return dict(parts=parts, vit_dims=vit_dims, qformer_dims=q_dims, llm=info)

"""LoRA adapters on the frozen LLM with peft: the `llm_lora` model config key.

    model:
      llm_lora:
        r: 8                    # rank
        alpha: 16               # scaling alpha / r
        dropout: 0.05           # on the adapters' input, in training only
        target_modules: null    # default: peft's per-family table (q_proj / v_proj for OPT, LLaMA,
                                # Vicuna, Llama-3, Qwen2 / Qwen3, Mistral; q / v for T5)

The adapters train with the VPG (`train_vpg: true`: VPGTrans stage 2, VL-Vicuna's stage 3),
never in stage 1, the projector warm-up. They are trainable parameters, so training
checkpoints hold them (`...lora_A.default.weight`, `...lora_B.default.weight` under
`llm_model.`) and resume them; `python -m lavis_vpgtrans.export` merges them into the exported
LLM (merge_and_unload). With `llm_quantization` this is QLoRA: the quantised base is prepared
by peft's prepare_model_for_kbit_training (its non-quantised weights, e.g. layer norms and
embeddings, in fp32) before the adapters are added.
"""

import logging
from dataclasses import dataclass, fields
from typing import List, Optional

logger = logging.getLogger(__name__)

# what peft names the adapter's parameters and dropout (LoraLayer's lora_A / lora_B / lora_dropout,
# and lora_embedding_A / _B for embeddings)
LORA_PARAM_MARK = ".lora_"
ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """`model.llm_lora`, checked."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: Optional[tuple] = None

    @classmethod
    def parse(cls, value, where: str = "model.llm_lora") -> Optional["LoraSpec"]:
        """None for an absent / null / empty setting; `true` for the defaults; else the checked spec."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        try:
            values = dict(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a mapping such as {{r: 8}} (or true), got {value!r}") from None
        if not values:
            return None
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {known}")
        r = values.get("r", cls.r)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{where}.r must be a positive integer, got {r!r}")
        dropout = float(values.get("dropout", cls.dropout))
        if not 0 <= dropout < 1:
            raise ValueError(f"{where}.dropout must be in [0, 1), got {dropout!r}")
        values["dropout"] = dropout
        values["alpha"] = float(values.get("alpha", cls.alpha))
        targets = values.get("target_modules")
        if targets is not None:
            if isinstance(targets, str) or not len(targets):
                raise ValueError(f"{where}.target_modules must be a non-empty list of module names, got {targets!r}")
            values["target_modules"] = tuple(str(t) for t in targets)
        return cls(**values)


def default_target_modules(model_type: str, where: str = "model.llm_lora.target_modules") -> List[str]:
    """peft's default LoRA targets for an LLM family (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type not in DEFAULTS:
        raise ValueError(f"{where}: peft has no default LoRA targets for model_type {model_type!r}; "
                         f"name them (e.g. [q_proj, v_proj])")
    return list(DEFAULTS[model_type])


def add_lora(llm, spec: LoraSpec, quantized: bool):
    """`llm` wrapped by peft with LoRA adapters (a PeftModel; the base modules are changed in
    place). A quantised base is prepared for k-bit training first (QLoRA)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    targets = list(spec.target_modules) if spec.target_modules else default_target_modules(llm.config.model_type)
    if quantized:
        # activation checkpointing is run.activation_checkpointing's (the frozen LLM runs in eval
        # mode, where transformers' own gradient checkpointing is off)
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    task = TaskType.SEQ_2_SEQ_LM if llm.config.is_encoder_decoder else TaskType.CAUSAL_LM
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        bias="none", task_type=task)
    # autocast_adapter_dtype (peft's default): adapters in fp32 whatever the base's dtype, as
    # every other trained part
    peft_model = get_peft_model(llm, config, adapter_name=ADAPTER)
    n = sum(p.numel() for n, p in peft_model.named_parameters() if LORA_PARAM_MARK in n)
    logger.info("LoRA on the LLM: r=%d, alpha=%g, dropout=%g, targets %s: %d adapter parameters%s",
                spec.r, spec.alpha, spec.dropout, targets, n, " (QLoRA)" if quantized else "")
    return peft_model


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name (of the LLM or of a model holding it) is a LoRA adapter's."""
    return LORA_PARAM_MARK in name


def dropout_modules(llm):
    """The adapters' dropout modules (trained in train mode while the frozen LLM stays in eval)."""
    return [m for n, m in llm.named_modules() if n.endswith("lora_dropout")]


def merged(llm):
    """The plain transformers model with the adapters merged into its weights (peft's merge_and_unload)."""
    return llm.merge_and_unload()

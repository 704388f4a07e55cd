"""The frozen LLM in 4-bit (NF4 / FP4) or 8-bit (LLM.int8()) with bitsandbytes: the
`llm_quantization` model config key.

    model:
      llm_quantization:
        bits: 4                 # 4 or 8
        quant_type: nf4         # 4-bit: nf4 (QLoRA's NormalFloat) or fp4
        double_quant: true      # 4-bit: quantise the quantisation constants too (~0.4 bit / weight less)
        compute_dtype: bf16     # 4-bit: the dtype its matmuls run in (bf16, fp16, fp32)
        threshold: 6.0          # 8-bit: LLM.int8()'s outlier threshold (0: no fp16 outlier columns)
        skip_modules: null      # module names kept unquantised (default: transformers' choice, below)

Two ways to the same modules, by where the LLM runs:
  - CUDA: transformers' own `from_pretrained(quantization_config=BitsAndBytesConfig(...))`, weights
    quantised as they load onto the current GPU (`from_pretrained_kwargs`);
  - CPU: transformers 4.51.3 refuses a BitsAndBytesConfig without a GPU, although bitsandbytes' own
    `Linear4bit` / `Linear8bitLt` run forward and backward there. The model loads unquantised, its
    nn.Linear layers are replaced by those modules with transformers' `replace_with_bnb_linear`
    (what its bnb quantizer calls on GPUs), and each loaded weight is quantised into them
    (`quantize_in_place`).
Both keep unquantised what transformers keeps: `get_keys_to_not_convert` (the output head, tied
embeddings) plus the model class's `_keep_in_fp32_modules` (T5's `wo`), or `skip_modules`.

The quantised weights are frozen (bitsandbytes' parameters cannot train); gradients flow through
them to the soft prompts. Training checkpoints hold no LLM weight, so they load into an
unquantised model alike.
"""

import logging
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch

from lavis_vpgtrans.common.sharding import QUANTIZED_PARAM_CLASSES

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class QuantizationSpec:
    """`model.llm_quantization`, checked."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    threshold: float = 6.0
    skip_modules: Optional[tuple] = None

    @classmethod
    def parse(cls, value, where: str = "model.llm_quantization") -> Optional["QuantizationSpec"]:
        """None for an absent / null / empty setting; else the checked spec (errors name the key)."""
        if not value:
            return None
        try:
            values = dict(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a mapping such as {{bits: 4}}, got {value!r}") from None
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {known}")
        if values.get("bits") not in (4, 8):
            raise ValueError(f"{where}.bits must be 4 or 8, got {values.get('bits')!r}")
        if values.get("quant_type", "nf4") not in QUANT_TYPES:
            raise ValueError(f"{where}.quant_type must be one of {list(QUANT_TYPES)}, got {values['quant_type']!r}")
        if values.get("compute_dtype", "bf16") not in COMPUTE_DTYPES:
            raise ValueError(f"{where}.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                             f"got {values['compute_dtype']!r}")
        if not isinstance(values.get("double_quant", True), bool):
            raise ValueError(f"{where}.double_quant must be true or false, got {values['double_quant']!r}")
        if values.get("skip_modules") is not None:
            values["skip_modules"] = tuple(str(m) for m in values["skip_modules"])
        if "threshold" in values:
            values["threshold"] = float(values["threshold"])
        return cls(**values)

    def bnb_config(self):
        """transformers' BitsAndBytesConfig for this spec (what from_pretrained gets on a GPU)."""
        from transformers import BitsAndBytesConfig

        skip = list(self.skip_modules) if self.skip_modules is not None else None
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.threshold,
                                      llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
                                  llm_int8_skip_modules=skip)

    def describe(self) -> str:
        if self.bits == 8:
            return f"8-bit (LLM.int8(), outlier threshold {self.threshold:g})"
        return (f"4-bit {self.quant_type.upper()}" + (" with double quantisation" if self.double_quant else "")
                + f", {self.compute_dtype} compute")


def quantized_on_gpu(device: Optional[str] = None) -> bool:
    """Whether the LLM is quantised by transformers on a GPU (True) or by bitsandbytes' modules on
    the CPU: a GPU when there is one, unless `device` says otherwise."""
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available()


def from_pretrained_kwargs(spec: QuantizationSpec, torch_dtype: torch.dtype, device: Optional[str] = None) -> Dict:
    """from_pretrained arguments on a GPU: the BitsAndBytesConfig, and the whole model on the
    current device (bitsandbytes quantises a weight when it moves there; under torchrun each rank's
    own GPU, which the launcher selected)."""
    index = torch.device(device).index if device is not None else None
    if index is None:
        index = torch.cuda.current_device()
    return {"torch_dtype": torch_dtype, "quantization_config": spec.bnb_config(), "device_map": {"": index}}


def modules_to_not_convert(llm, spec: QuantizationSpec) -> List[str]:
    """What transformers' bnb quantizer keeps unquantised (base.HfQuantizer.get_modules_to_not_convert):
    `skip_modules`, or get_keys_to_not_convert (output head, tied embeddings), plus the class's
    _keep_in_fp32_modules."""
    from transformers.integrations import get_keys_to_not_convert

    if spec.skip_modules is not None:
        keep = list(spec.skip_modules)
    else:
        # on a weightless twin: get_keys_to_not_convert deep-copies the model it is given
        with torch.device("meta"):
            twin = type(llm)._from_config(llm.config)
        keep = get_keys_to_not_convert(twin)
    return keep + list(getattr(llm, "_keep_in_fp32_modules", None) or [])


@torch.no_grad()
def quantize_in_place(llm, spec: QuantizationSpec) -> int:
    """Replaces the nn.Linear layers of a loaded (unquantised, CPU) `llm` by bitsandbytes'
    Linear4bit / Linear8bitLt holding its weights quantised, as transformers' GPU path builds
    them; returns how many layers were quantised. Marks the model as transformers does
    (`is_loaded_in_4bit` / `is_loaded_in_8bit`, config.quantization_config): peft reads it."""
    import bitsandbytes as bnb
    from transformers.integrations import replace_with_bnb_linear

    originals = {name: (module.weight.detach(), None if module.bias is None else module.bias.detach())
                 for name, module in llm.named_modules() if isinstance(module, torch.nn.Linear)}
    config = spec.bnb_config()
    # replaced modules are built on the meta device (init_empty_weights): every weight is set below
    replace_with_bnb_linear(llm, modules_to_not_convert=modules_to_not_convert(llm, spec), quantization_config=config)
    count = 0
    for name, module in llm.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        weight, bias = originals[name]
        old = module.weight
        if isinstance(module, bnb.nn.Linear4bit):
            # the parameter's own settings (blocksize, quant type, storage), as transformers' quantizer
            # passes them; .to(device) quantises
            kwargs = {k: v for k, v in old.__dict__.items() if k != "module"}
            new = bnb.nn.Params4bit(weight.to(torch.device("cpu")), requires_grad=False, module=module, **kwargs)
        else:
            new = bnb.nn.Int8Params(weight.to(torch.device("cpu")), requires_grad=False, has_fp16_weights=False)
        module._parameters["weight"] = new.to(weight.device)
        if isinstance(module, bnb.nn.Linear4bit) and not cpu_packable(module):
            # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 inference kernel on the first
            # no-grad forward and fails on layers narrower than its blocks (e.g. the toy LMs' 32-wide
            # ones): those keep the generic kernel
            module.support_avx512bf16_for_cpu = False
        if bias is not None:
            if isinstance(module, bnb.nn.Linear4bit):
                # in the compute dtype already: Linear4bit.forward would cast it in place on first use
                bias = bias.to(COMPUTE_DTYPES[spec.compute_dtype])
            module._parameters["bias"] = torch.nn.Parameter(bias.clone(), requires_grad=False)
        count += 1
    if not count:
        raise ValueError(f"{type(llm).__name__}: no nn.Linear layer to quantise (llm_quantization)")
    setattr(llm, "is_loaded_in_4bit" if spec.bits == 4 else "is_loaded_in_8bit", True)
    llm.config.quantization_config = config
    return count


def cpu_packable(module) -> bool:
    """Whether bitsandbytes' CPU repacking of a Linear4bit fits its shape (rows in blocks of 32,
    each row a whole number of quantisation blocks)."""
    return module.out_features % 32 == 0 and module.in_features % module.weight.blocksize == 0


def quantized_parameter_names(module) -> List[str]:
    """Names of the parameters that hold bitsandbytes-quantised weights."""
    return [n for n, p in module.named_parameters() if type(p).__name__ in QUANTIZED_PARAM_CLASSES]


class _Once(logging.Filter):
    """Passes each distinct message once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _warn_once_per_message(logger_name: str) -> None:
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _Once) for f in log.filters):
        log.addFilter(_Once())


def load_quantized(llm_cls, path: str, torch_dtype: torch.dtype, spec: QuantizationSpec, llm_config: dict,
                   device: Optional[str] = None):
    """`llm_cls.from_pretrained(path)` with its linear layers quantised as `spec` says: by
    transformers on a GPU, by bitsandbytes' modules on the CPU (see the module's doc)."""
    if quantized_on_gpu(device):
        llm = llm_cls.from_pretrained(path, **from_pretrained_kwargs(spec, torch_dtype, device), **llm_config)
        how = "transformers' BitsAndBytesConfig, on the GPU"
    else:
        llm = llm_cls.from_pretrained(path, torch_dtype=torch_dtype, **llm_config)
        count = quantize_in_place(llm, spec)
        how = f"bitsandbytes' modules on the CPU ({count} linear layers)"
    if spec.bits == 8:
        # bitsandbytes logs "inputs will be cast ... to float16" at every 8-bit matmul whose input is
        # not fp16 (each layer of each step with an fp32 / bf16 LLM): once is enough
        _warn_once_per_message("bitsandbytes.autograd._functions")
    kept = [n for n, m in llm.named_modules() if type(m) is torch.nn.Linear]
    logger.info("LLM %s: %s through %s; linear layers kept unquantised: %s", path, spec.describe(), how,
                ", ".join(kept) or "none")
    return llm

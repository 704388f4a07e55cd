"""Model classes registered with LAVIS, and the HF-format BLIP-2 directory reader
(hf_blip2 registers it with common/checkpoint.py)."""

from lavis_vpgtrans.models import hf_blip2  # noqa: F401  load_checkpoint_file reads HF BLIP-2 directories
from lavis_vpgtrans.models.blip2_transfer import Blip2CausalLM, Blip2LLaMA, Blip2OPTTransfer, Blip2T5Transfer
from lavis_vpgtrans.models.blip2_vicuna import Blip2Vicuna
from lavis_vpgtrans.models.vl_llm import Blip2VLLLM

__all__ = ["Blip2VLLLM", "Blip2OPTTransfer", "Blip2T5Transfer", "Blip2LLaMA", "Blip2Vicuna", "Blip2CausalLM"]

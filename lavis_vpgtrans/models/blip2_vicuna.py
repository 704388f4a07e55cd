"""VL-Vicuna: the paper's multimodal chatbot (VPG transferred to Vicuna, then instruction-tuned)."""

from lavis.common.registry import registry

from lavis_vpgtrans.models.blip2_transfer import Blip2LLaMA


@registry.register_model("blip2_vicuna")
@registry.register_model("blip2_vicuna_vpgtrans")
class Blip2Vicuna(Blip2LLaMA):
    """VL-Vicuna: BLIP-2 with a Vicuna LLM, the paper's multimodal chatbot."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "vicuna7b": "models/configs/vicuna/vicuna7b.yaml",
        "vl_vicuna7b": "models/configs/vicuna/vl_vicuna7b.yaml",
        "tiny_vicuna": "models/configs/vicuna/tiny_vicuna.yaml",
    }

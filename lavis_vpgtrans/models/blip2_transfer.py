"""The registered transfer models: thin subclasses of Blip2VLLLM.

Each names its projector as LAVIS and the released VPGTrans checkpoints do, and lists its
model types (default yamls under models/configs/<family>/). Everything else is shared.
"""

from lavis.common.registry import registry

from lavis_vpgtrans.models.chat_template import chat_template_loss
from lavis_vpgtrans.models.vl_llm import Blip2VLLLM


@registry.register_model("blip2_opt_transfer")
class Blip2OPTTransfer(Blip2VLLLM):
    """BLIP-2 with an OPT LLM, as source or target of a VPG transfer.

    >>> from lavis.models import load_model
    >>> model = load_model("blip2_opt_transfer", "opt6.7b")
    """

    projector_name = "opt_proj"
    PRETRAINED_MODEL_CONFIG_DICT = {
        # ViT-L + BLIP-2 stage-1 Q-Former: the paper's exploration models (section 4, 5)
        "vitL_opt125m": "models/configs/opt/vitL_opt125m.yaml",
        "vitL_opt350m": "models/configs/opt/vitL_opt350m.yaml",
        "vitL_opt1.3b": "models/configs/opt/vitL_opt1.3b.yaml",
        "vitL_opt2.7b": "models/configs/opt/vitL_opt2.7b.yaml",
        # ViT-g + BLIP-2 stage-1 Q-Former, random projector (train from scratch)
        "opt2.7b": "models/configs/opt/opt2.7b.yaml",
        "opt6.7b": "models/configs/opt/opt6.7b.yaml",
        # the released BLIP-2 models (VPG + projector): sources of the scale-up transfers
        "pretrain_opt2.7b": "models/configs/opt/pretrain_opt2.7b.yaml",
        "pretrain_opt6.7b": "models/configs/opt/pretrain_opt6.7b.yaml",
        # offline toy zoo
        "tiny_opt_small": "models/configs/opt/tiny_opt_small.yaml",
        "tiny_opt_large": "models/configs/opt/tiny_opt_large.yaml",
    }


@registry.register_model("blip2_t5_transfer")
class Blip2T5Transfer(Blip2VLLLM):
    """BLIP-2 with a Flan-T5 LLM (encoder-decoder; prefix-LM training on text_input/text_output)."""

    projector_name = "t5_proj"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "vitL_flant5base": "models/configs/t5/vitL_flant5base.yaml",
        "vitL_flant5large": "models/configs/t5/vitL_flant5large.yaml",
        "vitL_flant5xl": "models/configs/t5/vitL_flant5xl.yaml",
        "flant5xl": "models/configs/t5/flant5xl.yaml",
        "flant5xxl": "models/configs/t5/flant5xxl.yaml",
        "pretrain_flant5xl": "models/configs/t5/pretrain_flant5xl.yaml",
        "pretrain_flant5xxl": "models/configs/t5/pretrain_flant5xxl.yaml",
        "tiny_t5": "models/configs/t5/tiny_t5.yaml",
    }


@registry.register_model("blip2_llama")
class Blip2LLaMA(Blip2VLLLM):
    """VL-LLaMA: BLIP-2 with a LLaMA LLM (VPG transferred from BLIP-2 OPT-6.7B)."""

    projector_name = "llama_proj"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "llama7b": "models/configs/llama/llama7b.yaml",
        "vl_llama7b": "models/configs/llama/vl_llama7b.yaml",
        "tiny_llama": "models/configs/llama/tiny_llama.yaml",
    }


@registry.register_model("blip2_causal_lm")
class Blip2CausalLM(Blip2VLLLM):
    """BLIP-2 with any decoder-only Hugging Face causal LM (Llama-3, Qwen2.5, Mistral, ...) as
    the target of a VPG transfer; LLaMA-1 / Vicuna keep their own classes (their released
    checkpoints name the projector llama_proj).

    The default yamls inherit the released BLIP-2 OPT-6.7B VPG (the paper's source for
    VL-LLaMA); the projector comes from the converter:

        python -m lavis_vpgtrans.transfer.converter --src facebook/opt-6.7b --tgt Qwen/Qwen2.5-7B \
            --projector blip2_pretrained_opt6.7b.pth --out qwen_proj_init.pth
    """

    projector_name = "llm_proj"
    # LAVIS's BLIP-2 OPT and the VPGTrans LLaMA models end every caption with a newline; the
    # generic class keeps that convention (base models have no chat end token to prefer).
    default_end_sym = "\n"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "llama3_8b": "models/configs/causal_lm/llama3_8b.yaml",
        "qwen2.5_7b": "models/configs/causal_lm/qwen2.5_7b.yaml",
        "mistral_7b": "models/configs/causal_lm/mistral_7b.yaml",
        "tiny_causal_lm": "models/configs/causal_lm/tiny_causal_lm.yaml",
    }

    def forward(self, samples):
        """Conversation samples (own_instruct: [[user, assistant], ...] each) are rendered by the
        tokenizer's own chat template, labels on the answers only (models/chat_template.py)."""
        if "conversation" not in samples:
            return super().forward(samples)
        loss = chat_template_loss(self, samples["image"], samples["conversation"],
                                  max_answer_tokens=self.max_output_txt_len)
        return {"loss": loss, "loss_lm": loss}

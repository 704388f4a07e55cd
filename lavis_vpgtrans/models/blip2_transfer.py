"""The registered transfer models: thin subclasses of Blip2VLLLM.

Each names its projector as LAVIS and the released VPGTrans checkpoints do, and lists its
model types (default yamls under models/configs/<family>/). Everything else is shared.
"""

import logging
import os
from typing import List, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry

from lavis_vpgtrans.common.paths import resolve_path
from lavis_vpgtrans.models.chat_template import (IMAGE_SLOT, ChatTemplateError, chat_template_loss, cut_answer,
                                                 embed_rows, end_of_turn_stop, generation_prompt_tokens)
from lavis_vpgtrans.models.vl_llm import Blip2VLLLM

logger = logging.getLogger(__name__)


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

    # Set by set_chat_template (the `chat_template` / `chat_template_kwargs` / `chat_mode` config keys).
    chat_template_kwargs: dict = {}
    chat_mode: bool = False

    @classmethod
    def from_config(cls, cfg):
        model = super().from_config(cfg)
        model.set_chat_template(cfg.get("chat_template", None), cfg.get("chat_template_kwargs", None))
        # generate() / predict_answers() ask in the chat template too (each caption prompt or
        # formatted question is the user's message), as VL-Vicuna does with conv_template
        model.chat_mode = bool(cfg.get("chat_mode", False))
        if model.chat_mode and not getattr(model.llm_tokenizer, "chat_template", None):
            raise ValueError(f"model.chat_mode is set but {cfg.get('llm_model')}'s tokenizer has no chat template: "
                             f"set model.chat_template (a Jinja template or a file)")
        return model

    def set_chat_template(self, template: Optional[str] = None, kwargs: Optional[dict] = None) -> None:
        """The chat template conversations train and chat in: None keeps the tokenizer's own
        (tokenizer_config.json); a Jinja template, or a file holding one, replaces it (for an LLM
        that ships none). `kwargs` go to every apply_chat_template call (e.g. Qwen3's
        enable_thinking: false), in training and chat alike."""
        if template is not None:
            path = resolve_path(str(template))
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    template = f.read()
            elif "{{" not in str(template) and "{%" not in str(template):
                raise ValueError(f"model.chat_template={str(template)[:80]!r}: neither a file nor a Jinja template")
            self.llm_tokenizer.chat_template = str(template)
        if kwargs is not None and not isinstance(kwargs, dict):
            from omegaconf import DictConfig, OmegaConf

            if not isinstance(kwargs, DictConfig):
                raise ValueError(f"model.chat_template_kwargs must be a mapping, got {kwargs!r}")
            kwargs = OmegaConf.to_container(kwargs)
        self.chat_template_kwargs = dict(kwargs or {})

    def forward(self, samples):
        """Conversation samples (own_instruct: [[user, assistant], ...] each) are rendered by the
        tokenizer's own chat template, labels on the answers only (models/chat_template.py)."""
        if "conversation" not in samples:
            return super().forward(samples)
        loss = chat_template_loss(self, samples["image"], samples["conversation"],
                                  max_answer_tokens=self.max_output_txt_len, **self.chat_template_kwargs)
        return {"loss": loss, "loss_lm": loss}

    # ------------------------------------------------------------------ chat

    def _conversation_row(self, turns: Sequence[Tuple[str, Optional[str]]]) -> List[int]:
        """The generation prompt's ids (IMAGE_SLOT where the soft prompts go): the training
        layout of the same conversation up to the answer (chat_template.generation_prompt_tokens)."""
        return generation_prompt_tokens(self.llm_tokenizer, turns, self.query_tokens.shape[1], IMAGE_SLOT,
                                        **self.chat_template_kwargs)

    @torch.no_grad()
    def generate_conversations(self, image: torch.Tensor, conversations, **gen_kwargs) -> List[str]:
        """The assistant's next answer for each conversation ([(user, assistant), ..., (user, None)],
        one image each) in the tokenizer's chat template, generated until the template's end of
        turn (or the EOS) and cut there; `gen_kwargs` for HF generate (max_new_tokens, ...)."""
        tok = self.llm_tokenizer
        prompts = self.encode_image(image)
        rows = [self._conversation_row(turns) for turns in conversations]
        # Left padding keeps every prompt adjacent to the tokens being generated.
        embeds, mask = embed_rows(self, rows, prompts, left=True)
        stop_ids, stop_text = end_of_turn_stop(tok, **self.chat_template_kwargs)
        stop = {"stopping_criteria": self.stop_on_text(stop_text)} if stop_text else {}
        if self.synced_generation:
            stop["synced_gpus"] = True
        with self.maybe_autocast():
            out = self.llm_model.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=stop_ids,
                                          pad_token_id=tok.pad_token_id, **stop, **gen_kwargs)
        return [cut_answer(tok, row, stop_ids, stop_text) for row in out.tolist()]

    def _generate(self, image, prefixes: List[str], min_length: int = 1, **gen_kwargs) -> List[str]:
        """generate() / predict_answers(): with chat_mode each prefix is the user's message of a
        one-turn conversation in the chat template, and min_length counts new tokens (the prompt is
        embeddings only, as in Blip2Vicuna's conversation mode)."""
        if not self.chat_mode:
            return super()._generate(image, prefixes, min_length=min_length, **gen_kwargs)
        return self.generate_conversations(image, [[(p, None)] for p in prefixes], min_new_tokens=min_length,
                                           **gen_kwargs)

    def rank_answers(self, *args, **kwargs):
        if self.chat_mode:  # the scorer's rows are the caption layout, not the chat template's
            raise ValueError(f"{type(self).__name__}: inference_method 'rank' scores in the caption layout; with "
                             f"chat_mode use inference_method 'generate'")
        return super().rank_answers(*args, **kwargs)

    @torch.no_grad()
    def chat(
        self,
        image: torch.Tensor,
        message: str,
        history: Sequence[Tuple[str, str]] = (),
        max_new_tokens: int = 300,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        min_new_tokens: int = 1,
    ) -> str:
        """The assistant's answer to `message` about `image` (a processed image, (3, H, W) or
        (1, 3, H, W)) after the earlier (user, assistant) turns in `history`, in the tokenizer's
        chat template as the model trained on own_instruct conversations (Blip2Vicuna.chat's
        contract). When the conversation does not fit the LLM's context, the oldest turns after
        the first (which holds the image) are left out, then the answer is allowed fewer tokens."""
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.shape[0] != 1:
            raise ValueError(f"chat takes one image, got a batch of {image.shape[0]}")
        if not getattr(self.llm_tokenizer, "chat_template", None):
            raise ChatTemplateError(f"{self.llm_model_name}'s tokenizer has no chat template: chat with an instruct "
                                    f"model's, or set model.chat_template (a Jinja template or a file)")
        turns = [tuple(t) for t in history] + [(str(message).strip(), None)]
        limit = getattr(self.llm_model.config, "max_position_embeddings", None)
        length = len(self._conversation_row(turns))
        while limit and len(turns) > 2 and length + max_new_tokens > limit:
            logger.info("conversation too long (%d tokens): leaving out turn 2 of %d", length, len(turns))
            del turns[1]
            length = len(self._conversation_row(turns))
        if limit and length + max_new_tokens > limit:
            room = limit - length
            if room < 1:
                raise ChatTemplateError(f"the conversation is {length} tokens (image included), over the LLM's "
                                        f"context of {limit}")
            logger.warning("only %d tokens left in the context: max_new_tokens %d -> %d", room, max_new_tokens, room)
            max_new_tokens, min_new_tokens = room, min(min_new_tokens, room)
        gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                   do_sample=do_sample, repetition_penalty=repetition_penalty, length_penalty=length_penalty)
        if do_sample:
            gen.update(temperature=temperature, top_p=top_p)
        return self.generate_conversations(image.to(self.device), [turns], **gen)[0]

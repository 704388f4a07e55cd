"""One VL-LLM on LAVIS's Blip2Base: the BLIP-2 architecture in which VPGTrans moves the VPG.

    image -> frozen ViT -> ln_vision -> Q-Former (query tokens) -> projector -> frozen LLM

The VPG is ViT + ln_vision + Q-Former + query tokens. The LLM is a stock transformers model
(AutoModelForCausalLM for decoder-only, T5ForConditionalGeneration for Flan-T5) driven through
`inputs_embeds`: the 32 projected query outputs are soft prompts in front of the text.

The LLM side (loading, end of text, BOS, tokenisation of prefix + target, autocast) is
models/llm.py's FrozenLLM; the ViT / Q-Former construction from config is models/base.py's.

Registered subclasses (blip2_transfer.py) only name their projector, end of text and model types.
"""

import logging
import re
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from lavis_vpgtrans.common.checkpoint import (CheckpointError, load_checkpoint_file, load_state_with_report,
                                              load_trained_state)
from lavis_vpgtrans.common.paths import resolve_path
from lavis_vpgtrans.models.base import VIT_DTYPES, Blip2PluginBase
from lavis_vpgtrans.models.kbit import QuantizationSpec
from lavis_vpgtrans.models.llm import CLASS_DEFAULT, FrozenLLM, check_llm_args, pad_rows
from lavis_vpgtrans.models.lora import LoraSpec, is_lora_parameter
from lavis_vpgtrans.models.lora import dropout_modules as lora_dropout_modules
from lavis_vpgtrans.models.pformer_encoder import alignment_loss, load_frozen_pformer
from lavis_vpgtrans.models.projector import known_projector_names
from lavis_vpgtrans.models.scoring import LogLikelihoodScorer

logger = logging.getLogger(__name__)

# max_output_txt_len of a decoder-only model when the config has none (VL-Vicuna's answers).
DEFAULT_MAX_OUTPUT_TXT_LEN = 32
# Parameters that make up the VPG (everything a VPG checkpoint may carry).
VPG_PREFIXES = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens")
# Q-Former parts the VPG owns and trains in joint mode (the ViT stays frozen).
TRAINABLE_VPG_PREFIXES = ("ln_vision.", "Qformer.", "query_tokens")
# Text-side Q-Former parts that a VL-LLM does not use (only the queries pass through the
# Q-Former); BLIP-2 stage-1 checkpoints carry them, and we drop them on load by design.
UNUSED_QFORMER_KEYS = re.compile(
    r"^Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings)\.|"
    r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.)")


class Blip2VLLLM(FrozenLLM, LogLikelihoodScorer, Blip2PluginBase):
    """Base class: subclasses set `projector_name` (the state-dict prefix LAVIS / the released
    checkpoints use, so their files load unchanged) and PRETRAINED_MODEL_CONFIG_DICT."""

    def __init__(
        self,
        vit_model: str = "eva_clip_g",
        img_size: int = 224,
        drop_path_rate: float = 0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        qformer_model: str = "bert-base-uncased",
        num_query_token: int = 32,
        cross_attention_freq: int = 2,
        llm_model: str = None,
        llm_precision: str = "fp16",
        prompt: str = "",
        vqa_prompt: str = "Question: {} Answer:",
        max_txt_len: int = 32,
        max_output_txt_len: Optional[int] = None,
        train_vpg: bool = True,
        pformer_model_type: str = None,
        pformer_checkpoint: str = None,
        pformer_llm_model: str = None,
        align_weight: float = 0.0,
        end_sym=CLASS_DEFAULT,
        label_bos: bool = True,
        llm_config: Optional[dict] = None,
        llm_quantization: Optional[dict] = None,
        llm_lora: Optional[dict] = None,
    ):
        super().__init__()
        if self.projector_name is None:
            raise TypeError(f"{type(self).__name__} must set `projector_name`")
        check_llm_args(type(self).__name__, llm_model, llm_precision)  # before the ViT is built
        QuantizationSpec.parse(llm_quantization), LoraSpec.parse(llm_lora)  # (their errors too)

        self.visual_encoder, self.ln_vision = self.init_vision_encoder(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision)
        self.vit_dtype = VIT_DTYPES[vit_precision]
        self.Qformer, self.query_tokens = self.init_Qformer(
            num_query_token, self.visual_encoder.num_features, cross_attention_freq, qformer_model)
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None

        self.init_llm(llm_model, llm_precision, llm_config, end_sym, label_bos,
                      quantization=llm_quantization, lora=llm_lora)
        self.add_module(self.projector_name,
                        nn.Linear(self.Qformer.config.hidden_size, self.llm_input_width))

        self.prompt = prompt
        self.vqa_prompt = vqa_prompt
        self.max_txt_len = max_txt_len
        # Flan-T5's decoder targets: LAVIS's blip2_t5 cuts them at max_txt_len, as its inputs, so
        # that is the default; decoder-only models use it only for VL-Vicuna's conversation answers.
        if max_output_txt_len is None:
            max_output_txt_len = max_txt_len if self.is_encoder_decoder else DEFAULT_MAX_OUTPUT_TXT_LEN
        self.max_output_txt_len = max_output_txt_len
        # P-Former alignment (off when align_weight is 0): a frozen encoder whose prefix is
        # not trainable, so set_trainable freezes it and training checkpoints leave it out.
        self.align_weight = float(align_weight)
        self.pformer = None
        if self.align_weight > 0:
            # refused unless the P-Former was trained for this llm_model (or for the LLM that
            # pformer_llm_model states is the same one)
            self.pformer = load_frozen_pformer(pformer_model_type, pformer_checkpoint, num_query_token,
                                               llm_width=self.llm_input_width, llm_model=llm_model,
                                               pformer_llm_model=pformer_llm_model)
        self.set_trainable(train_vpg)

    # ------------------------------------------------------------------ freezing

    def set_trainable(self, train_vpg: bool) -> None:
        """Projector only (`train_vpg=False`, stage 1) or jointly with the VPG's Q-Former,
        query tokens and ln_vision (stage 2; stage 3), and then the LLM's LoRA adapters too when
        there are (llm_lora). The ViT and the LLM's own weights never train."""
        self.train_vpg = bool(train_vpg)
        trainable = self.trainable_prefixes()
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(trainable) or (self.train_vpg and self.is_adapter(name))
        if self.llm_lora is not None and not self.train_vpg and not getattr(self, "_told_adapters_wait", False):
            logger.info("llm_lora: the adapters train with the VPG (train_vpg: true), not in this stage")
            self._told_adapters_wait = True
        self.train(self.training)

    @staticmethod
    def is_adapter(name: str) -> bool:
        """A LoRA adapter's parameter of the LLM (llm_lora)."""
        return name.startswith("llm_model.") and is_lora_parameter(name)

    def train(self, mode: bool = True):
        """Frozen parts in eval mode (PluginModel.train); the LLM's LoRA dropout follows `mode`
        while the adapters train."""
        super().train(mode)
        if self.llm_lora is not None:
            for module in lora_dropout_modules(self.llm_model):
                module.train(mode and getattr(self, "train_vpg", False))
        return self

    def load_checkpoint(self, url_or_filename: str):
        """A trained model's checkpoint (PluginModel.load_checkpoint). With llm_lora, a checkpoint
        without any adapter (e.g. stage 2 trained without LoRA, as stage 3's `finetuned`) leaves
        the adapters at their initialisation (B = 0: the LLM unchanged), which is logged; one with
        some adapters must hold them all. Resuming a run (the runner) always needs them all."""
        if self.llm_lora is None:
            return super().load_checkpoint(url_or_filename)
        path = resolve_path(url_or_filename)
        state = load_checkpoint_file(path)["model"]
        fresh = not any(self.is_adapter(k) for k in state)
        if fresh:
            logger.info("%s holds no LoRA adapter: the adapters start from their initialisation", path)
        report = load_trained_state(self, state, path, self.checkpoint_what,
                                    optional=self.is_adapter if fresh else None)
        return report

    def trainable_prefixes(self) -> tuple:
        return (self.projector_name + ".",) + (TRAINABLE_VPG_PREFIXES if self.train_vpg else ())

    def frozen_modules(self) -> List[nn.Module]:
        frozen = [self.visual_encoder, self.llm_model]
        if not self.train_vpg:
            frozen += [self.Qformer, self.ln_vision]
        if self.pformer is not None:
            frozen.append(self.pformer)
        return frozen

    # ------------------------------------------------------------------ checkpoints

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """vpg_checkpoint -> VPG, projector_checkpoint -> projector, then (load_finetuned)
        `finetuned` -> the trainable parameters of a trained model."""
        if cfg.get("vpg_checkpoint", None):
            self.load_vpg(cfg.vpg_checkpoint)
        if cfg.get("projector_checkpoint", None):
            self.load_projector(cfg.projector_checkpoint)
        super().load_checkpoint_from_config(cfg, **kwargs)

    def load_vpg(self, url_or_path: str):
        """Inherit a VPG from a LAVIS BLIP-2 checkpoint (any LLM, or stage 1): Q-Former, query
        tokens, ln_vision, and the ViT if the file has it. The source projector, LLM weights,
        stage-1 heads and the Q-Former's unused text side are dropped by design."""
        path = resolve_path(url_or_path)
        state = load_checkpoint_file(path)["model"]
        has_vit = any(k.startswith("visual_encoder.") for k in state)
        # Parameters only: buffers (the Q-Former's position_ids) are not in trainable-only
        # checkpoints such as our runner's, e.g. a P-Former stage-1 Q-Former.
        required = [k for k, _ in self.named_parameters() if k.startswith(TRAINABLE_VPG_PREFIXES)
                    or (has_vit and k.startswith("visual_encoder."))]
        report = load_state_with_report(
            self, state, path,
            keep=lambda k: k.startswith(VPG_PREFIXES),
            drop=lambda k: bool(UNUSED_QFORMER_KEYS.match(k)),
            required=required)
        report.log("VPG")
        if not has_vit:
            logger.info("  visual_encoder: not in %s, kept from vit_model", path)
        return report

    def load_projector(self, url_or_path: str):
        """Load the projector from a checkpoint that holds exactly one known projector (e.g.
        the converter's output, or a BLIP-2 checkpoint's opt_proj / t5_proj)."""
        path = resolve_path(url_or_path)
        ckpt = load_checkpoint_file(path)
        state = ckpt["model"]
        present = sorted({k.split(".", 1)[0] for k in state} & known_projector_names())
        if self.projector_name in present:
            source = self.projector_name
        elif len(present) == 1:
            source = present[0]
            logger.info("projector: loading %s.* from %s as %s.*", source, path, self.projector_name)
        else:
            raise CheckpointError(
                f"{path}: expected one projector ({self.projector_name} or one of "
                f"{sorted(known_projector_names())}), found {present or 'none'}")
        renamed = {self.projector_name + k[len(source):]: v for k, v in state.items()
                   if k.startswith(source + ".")}
        report = load_state_with_report(
            self, renamed, path,
            required=[k for k in self.state_dict() if k.startswith(self.projector_name + ".")])
        report.log("projector")
        if ckpt.get("metadata"):
            logger.info("  projector metadata: %s", ckpt["metadata"])
        return report

    # ------------------------------------------------------------------ forward

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Images -> soft prompts in the LLM's input-embedding space, (B, num_query, H_llm)."""
        with self.maybe_autocast(self.vit_dtype):
            image_embeds = self.ln_vision(self.visual_encoder(image))
        image_embeds = image_embeds.float()
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        query_output = self.Qformer.bert(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True)
        prompts = self.projector(query_output.last_hidden_state)
        return prompts.to(self.llm_model.get_input_embeddings().weight.dtype)

    def _prefixes_and_targets(self, samples) -> (List[str], List[str]):
        """The samples contract: `text_output` present -> prefix-LM (text_input is the prefix);
        absent -> captioning (the model's prompt is the prefix, text_input the target)."""
        if "text_output" in samples:
            return list(samples["text_input"]), list(samples["text_output"])
        return [self.prompt] * len(samples["text_input"]), list(samples["text_input"])

    def forward(self, samples):
        if "conversation" in samples:
            raise ValueError(f"{type(self).__name__} does not train on conversations (own_instruct): use blip2_vicuna "
                             "with conv_template (VL-Vicuna) or blip2_causal_lm with a chat model's tokenizer")
        prompts = self.encode_image(samples["image"])
        prefixes, targets = self._prefixes_and_targets(samples)
        loss = self.llm_forward(prompts, prefixes, targets)[0].loss
        out = {"loss": loss, "loss_lm": loss}
        if self.pformer is not None:
            if "text_output" in samples:
                raise ValueError("align_weight > 0 needs caption samples: the P-Former's reference prompt "
                                 "is the one that makes the LLM produce the caption, not a prefix-LM answer")
            out["loss_align"] = alignment_loss(prompts, self.pformer.reference_prompts(targets))
            out["loss"] = loss + self.align_weight * out["loss_align"]
        return out

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        samples,
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
    ) -> List[str]:
        """Captions (or continuations of `samples["prompt"]`) for a batch of images, by beam
        search or nucleus sampling; `num_captions` per image, image-major. `max_length` counts
        new tokens; `min_length` counts the prompt's tokens too, as in LAVIS (see _generate)."""
        image = samples["image"]
        prompt = samples.get("prompt", self.prompt)
        prefixes = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * image.shape[0]
        return self._generate(image, prefixes, min_length=min_length, do_sample=use_nucleus_sampling,
                              num_beams=1 if use_nucleus_sampling else num_beams,
                              max_new_tokens=max_length, top_p=top_p,
                              temperature=temperature, repetition_penalty=repetition_penalty,
                              length_penalty=length_penalty, num_return_sequences=num_captions)

    @torch.no_grad()
    def predict_answers(
        self,
        samples,
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        num_ans_candidates: Optional[int] = None,
        answer_list: Optional[List[str]] = None,
        prompt: str = "",
        length_penalty: float = -1,
        **kwargs,
    ) -> List[str]:
        """Open-ended VQA: one answer per question, generated after `prompt` ("Question: {}
        Answer:" by default, from the task's run config or the model's `vqa_prompt`)."""
        if inference_method not in ("generate", "rank"):
            raise ValueError(f"{type(self).__name__}: inference_method must be 'generate' or 'rank', "
                             f"got {inference_method!r}")
        template = prompt or self.vqa_prompt
        questions = samples["text_input"]
        if isinstance(questions, str):
            questions = [questions]
        prefixes = [template.format(q) if "{}" in template else template + q for q in questions]
        if inference_method == "rank":
            # the candidate with the highest log-likelihood after soft prompts + prefix (models/scoring.py)
            return self.rank_answers(samples["image"], prefixes, answer_list, num_ans_candidates)
        return self._generate(samples["image"], prefixes, min_length=min_len, do_sample=False,
                              num_beams=num_beams, max_new_tokens=max_len, length_penalty=length_penalty,
                              num_return_sequences=1)

    def _prefix_rows(self, prefixes: Sequence[str]) -> List[List[int]]:
        """Token ids of decoder-only generation prefixes: BOS as the tokenizer adds it, then the
        prefix (its ids in training, where the target follows), cut at max_txt_len."""
        tok = self.llm_tokenizer
        return [(self.bos_ids + ids)[: self.max_txt_len]
                for ids in tok(list(prefixes), add_special_tokens=False).input_ids]

    def _generate(self, image, prefixes: List[str], min_length: int = 1, **gen_kwargs) -> List[str]:
        """Generates after soft prompts + prefix until the end of text, and cuts the text there.
        `min_length` as LAVIS hands it to HF generate along with the prompt's token ids (BOS
        included; the decoder start token for T5): it counts them, so min_length=1 never
        constrains, and COCO's min_len=8 asks for 7 new tokens after a lone BOS."""
        prompts = self.encode_image(image)
        device = prompts.device
        tok = self.llm_tokenizer
        if self.is_encoder_decoder:
            text_ids, text_mask = pad_rows(self._encoder_rows(prefixes), tok.pad_token_id)
            prompt_tokens = 1
        else:
            # Left padding keeps every prefix adjacent to the tokens being generated.
            text_ids, text_mask = pad_rows(self._prefix_rows(prefixes), tok.pad_token_id, left=True)
            prompt_tokens = text_ids.shape[1]
        text_ids, text_mask = text_ids.to(device), text_mask.to(device)
        embeds = torch.cat([prompts, self.llm_model.get_input_embeddings()(text_ids)], dim=1)
        mask = torch.cat([torch.ones(prompts.shape[:2], dtype=torch.long, device=device), text_mask], dim=1)
        with self.maybe_autocast():
            out = self.llm_model.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=tok.pad_token_id,
                                          min_new_tokens=max(0, min_length - prompt_tokens),
                                          **self._stop_kwargs(), **gen_kwargs)
        return [self.cut_at_end(t) for t in tok.batch_decode(out, skip_special_tokens=True)]

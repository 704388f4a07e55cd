"""One VL-LLM on LAVIS's Blip2Base: the BLIP-2 architecture in which VPGTrans moves the VPG.

    image -> frozen ViT -> ln_vision -> Q-Former (query tokens) -> projector -> frozen LLM

The VPG is ViT + ln_vision + Q-Former + query tokens. The LLM is a stock transformers model
(AutoModelForCausalLM for decoder-only, T5ForConditionalGeneration for Flan-T5) driven through
`inputs_embeds`: the 32 projected query outputs are soft prompts in front of the text.

End of text: every decoder-only training target ends with `end_sym` ("\n" by default, as LAVIS's
BLIP-2 OPT and the VPGTrans OPT / LLaMA / Vicuna checkpoints were trained), generation stops at
it and the decoded text is cut there; Flan-T5 ends at its EOS. BOS is whatever the tokenizer
itself puts in front of a text (OPT's </s>, LLaMA's <s>, nothing for Qwen2), in every path.

Registered subclasses (blip2_transfer.py) only name their projector, end of text and model types.
"""

import contextlib
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList,
                          T5ForConditionalGeneration)

from lavis_vpgtrans.common.checkpoint import (CheckpointError, load_checkpoint_file, load_state_with_report,
                                              load_trained_checkpoint)
from lavis_vpgtrans.models.pformer_encoder import alignment_loss, load_frozen_pformer
from lavis_vpgtrans.models.projector import known_projector_names
from lavis_vpgtrans.toy import zoo

logger = logging.getLogger(__name__)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Parameters that make up the VPG (everything a VPG checkpoint may carry).
VPG_PREFIXES = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens")
# Q-Former parts the VPG owns and trains in joint mode (the ViT stays frozen).
TRAINABLE_VPG_PREFIXES = ("ln_vision.", "Qformer.", "query_tokens")
# Text-side Q-Former parts that a VL-LLM does not use (only the queries pass through the
# Q-Former); BLIP-2 stage-1 checkpoints carry them, and we drop them on load by design.
UNUSED_QFORMER_KEYS = re.compile(
    r"^Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings)\.|"
    r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.)")
# Config overrides LAVIS applies to the frozen LLM, by HF model_type (the `llm_config` key replaces
# them): its blip2_t5 runs Flan-T5's gated feed-forward with exact GELU instead of the tanh
# approximation (`t5_config.dense_act_fn = "gelu"`), and the released BLIP-2 / VPGTrans Flan-T5
# VPGs were trained against that LLM.
LAVIS_LLM_CONFIG = {"t5": {"dense_act_fn": "gelu"}}
# `end_sym` absent from the config: the class's default_end_sym.
CLASS_DEFAULT = object()


def leading_special_ids(tokenizer) -> List[int]:
    """The ids the tokenizer puts in front of every text by its own convention: [BOS] for OPT
    (its </s>) and LLaMA, [] for Qwen2 / Qwen3 or T5."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    raise ValueError(f"{type(tokenizer).__name__}: the ids of 'a' with special tokens ({full}) do not "
                     f"contain those without ({plain})")


def single_token_in_context(tokenizer, text: str) -> Optional[int]:
    """The id of `text` when it is one token after a word or punctuation in every probe (how a
    target's end is tokenized in training), else None (the tokenizer splits or merges it)."""
    ids = set()
    for before in ("a", "a.", "1"):
        head = tokenizer(before, add_special_tokens=False).input_ids
        both = tokenizer(before + text, add_special_tokens=False).input_ids
        if len(both) != len(head) + 1 or both[:len(head)] != head:
            return None
        ids.add(both[-1])
    return ids.pop() if len(ids) == 1 else None


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False):
    """(ids, attention_mask), long tensors (B, longest); zero-width rows give (B, 0), not the
    float tensor a tokenizer returns for a batch of empty texts."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class StopOnText(StoppingCriteria):
    """Marks a row done once its generated text contains `stop`. Works on decoded text, so it
    does not matter how the tokenizer splits "###" ("▁###", "##" + "#", three byte tokens)."""

    def __init__(self, tokenizer, stop: str):
        super().__init__()
        self.tokenizer = tokenizer
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        # With inputs_embeds, input_ids holds only the generated tokens.
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)


class Blip2VLLLM(Blip2Base):
    """Base class: subclasses set `projector_name` and PRETRAINED_MODEL_CONFIG_DICT."""

    PRETRAINED_MODEL_CONFIG_DICT: Dict[str, str] = {}
    # State-dict prefix of the projector; the same as LAVIS / the released checkpoints use,
    # so their files load unchanged.
    projector_name: str = None
    # End of text of a decoder-only LLM when the config has no `end_sym`: a string every
    # training target ends with and generation stops at, or None for the tokenizer's EOS.
    # "\n" is what LAVIS's BLIP-2 OPT and the VPGTrans OPT / LLaMA / Vicuna checkpoints were
    # trained with. An encoder-decoder LLM (Flan-T5, LAVIS's blip2_t5) ends at its EOS.
    default_end_sym: Optional[str] = "\n"

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
        max_output_txt_len: int = 32,
        train_vpg: bool = True,
        pformer_model_type: str = None,
        pformer_checkpoint: str = None,
        align_weight: float = 0.0,
        end_sym=CLASS_DEFAULT,
        label_bos: bool = True,
        llm_config: Optional[dict] = None,
    ):
        super().__init__()
        if self.projector_name is None:
            raise TypeError(f"{type(self).__name__} must set `projector_name`")
        if llm_model is None:
            raise ValueError(f"{type(self).__name__}: `llm_model` (an HF model id or local dir) is required")
        if llm_precision not in DTYPES:
            raise ValueError(f"llm_precision must be one of {sorted(DTYPES)}, got {llm_precision!r}")

        self.visual_encoder, self.ln_vision = self.init_vision_encoder(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision)
        self.Qformer, self.query_tokens = self.init_Qformer(
            num_query_token, self.visual_encoder.num_features, cross_attention_freq, qformer_model)
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None

        llm_path = zoo.resolve(llm_model)
        self.llm_dtype = DTYPES[llm_precision]
        self.llm_tokenizer = AutoTokenizer.from_pretrained(llm_path)
        llm_cfg = AutoConfig.from_pretrained(llm_path)
        self.is_encoder_decoder = llm_cfg.is_encoder_decoder
        llm_cls = T5ForConditionalGeneration if self.is_encoder_decoder else AutoModelForCausalLM
        if llm_config is None:
            llm_config = LAVIS_LLM_CONFIG.get(llm_cfg.model_type, {})
        self.llm_model = llm_cls.from_pretrained(llm_path, torch_dtype=self.llm_dtype, **dict(llm_config))
        if self.llm_tokenizer.pad_token is None:
            # LLaMA / Vicuna ship no pad token; padding is masked out, so any id will do.
            self.llm_tokenizer.pad_token = self.llm_tokenizer.unk_token or self.llm_tokenizer.eos_token
        self._set_end_of_text(end_sym)
        # Prepended to every decoder-only text (training, generation, chat) as the tokenizer does.
        self.bos_ids = [] if self.is_encoder_decoder else leading_special_ids(self.llm_tokenizer)
        # LAVIS's blip2_opt labels every text token but padding and the prompt: with an empty
        # prompt the BOS too (predicted from the last soft prompt).
        self.label_bos = bool(label_bos)

        self.add_module(self.projector_name,
                        nn.Linear(self.Qformer.config.hidden_size, self.llm_model.config.hidden_size))

        self.llm_model_name = llm_model
        self.prompt = prompt
        self.vqa_prompt = vqa_prompt
        self.max_txt_len = max_txt_len
        self.max_output_txt_len = max_output_txt_len
        # P-Former alignment (off when align_weight is 0): a frozen encoder whose prefix is
        # not trainable, so set_trainable freezes it and training checkpoints leave it out.
        self.align_weight = float(align_weight)
        self.pformer = None
        if self.align_weight > 0:
            self.pformer = load_frozen_pformer(pformer_model_type, pformer_checkpoint, num_query_token,
                                               llm_width=self.llm_model.config.hidden_size)
        self.set_trainable(train_vpg)

    # ------------------------------------------------------------------ construction

    @classmethod
    def default_config_path(cls, model_type):
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise KeyError(f"unknown model type {model_type!r} for {cls.__name__}; "
                           f"known: {sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        return os.path.join(PACKAGE_ROOT, cls.PRETRAINED_MODEL_CONFIG_DICT[model_type])

    @classmethod
    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        """LAVIS's ViT-g / ViT-L by name, or a local EVA-ViT directory (config.json + safetensors)."""
        if model_name in ("eva_clip_g", "clip_L"):
            return super().init_vision_encoder(model_name, img_size, drop_path_rate,
                                               use_grad_checkpoint, precision)
        path = zoo.resolve(model_name)
        config_file = os.path.join(path, zoo.VIT_CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"vit_model {model_name!r}: expected 'eva_clip_g', 'clip_L' or a directory with "
                f"{zoo.VIT_CONFIG_NAME} and {zoo.VIT_WEIGHTS_NAME}; {config_file} does not exist")
        with open(config_file) as f:
            vit_cfg = json.load(f)
        if vit_cfg["img_size"] != img_size:
            raise ValueError(f"vit_model {model_name!r} was built for image size {vit_cfg['img_size']}, "
                             f"the model config asks for {img_size}")
        visual_encoder = zoo.build_eva_vit(vit_cfg, drop_path_rate, use_grad_checkpoint)
        from safetensors.torch import load_file

        weights = load_file(os.path.join(path, zoo.VIT_WEIGHTS_NAME))
        report = load_state_with_report(visual_encoder, weights, os.path.join(path, zoo.VIT_WEIGHTS_NAME),
                                        required=list(visual_encoder.state_dict()))
        report.log("vision encoder")
        if precision == "fp16":
            visual_encoder = visual_encoder.half()
        return visual_encoder, LayerNorm(visual_encoder.num_features)

    @classmethod
    def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2, qformer_model="bert-base-uncased"):
        """LAVIS's init_Qformer with the BERT (config + weights) taken from `qformer_model`."""
        path = zoo.resolve(qformer_model)
        encoder_config = BertConfig.from_pretrained(path)
        encoder_config.encoder_width = vision_width
        encoder_config.add_cross_attention = True
        encoder_config.cross_attention_freq = cross_attention_freq
        encoder_config.query_length = num_query_token
        qformer = BertLMHeadModel.from_pretrained(path, config=encoder_config)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, encoder_config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=encoder_config.initializer_range)
        return qformer, query_tokens

    @classmethod
    def init_tokenizer(cls, qformer_model="bert-base-uncased"):
        """The Q-Former's text tokenizer (used by text-side objectives, not by the LM path)."""
        from transformers import BertTokenizer

        tokenizer = BertTokenizer.from_pretrained(zoo.resolve(qformer_model))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    @classmethod
    def from_config(cls, cfg):
        model = cls(
            vit_model=cfg.get("vit_model", "eva_clip_g"),
            img_size=cfg.get("image_size", 224),
            drop_path_rate=cfg.get("drop_path_rate", 0),
            use_grad_checkpoint=cfg.get("use_grad_checkpoint", False),
            vit_precision=cfg.get("vit_precision", "fp16"),
            qformer_model=cfg.get("qformer_model", "bert-base-uncased"),
            num_query_token=cfg.get("num_query_token", 32),
            cross_attention_freq=cfg.get("cross_attention_freq", 2),
            llm_model=cfg.get("llm_model"),
            llm_precision=cfg.get("llm_precision", "fp16"),
            prompt=cfg.get("prompt", ""),
            vqa_prompt=cfg.get("vqa_prompt", "Question: {} Answer:"),
            max_txt_len=cfg.get("max_txt_len", 32),
            max_output_txt_len=cfg.get("max_output_txt_len", 32),
            train_vpg=cfg.get("train_vpg", True),
            pformer_model_type=cfg.get("pformer_model_type", None),
            pformer_checkpoint=cfg.get("pformer_checkpoint", None),
            align_weight=cfg.get("align_weight", 0.0),
            end_sym=cfg.get("end_sym", CLASS_DEFAULT),
            label_bos=cfg.get("label_bos", True),
            llm_config=cfg.get("llm_config", None),
        )
        model.load_checkpoint_from_config(cfg)
        return model

    # ------------------------------------------------------------------ end of text

    def _set_end_of_text(self, end_sym) -> None:
        """`end_sym`: a string, None (the tokenizer's EOS) or CLASS_DEFAULT. Sets `end_sym` and
        `end_token_id`, the id generation stops at (None when end_sym spans several tokens:
        generation then stops on text)."""
        if end_sym is CLASS_DEFAULT:
            end_sym = None if self.is_encoder_decoder else self.default_end_sym
        if end_sym is not None and (not isinstance(end_sym, str) or not end_sym):
            raise ValueError(f"{type(self).__name__}: end_sym must be a non-empty string or null (the "
                             f"tokenizer's EOS), got {end_sym!r}")
        tok = self.llm_tokenizer
        self.end_sym: Optional[str] = end_sym
        if end_sym is None:
            if tok.eos_token_id is None:
                raise ValueError(f"{type(self).__name__}: end_sym is null but the LLM's tokenizer has no EOS "
                                 f"token; set end_sym")
            self.end_token_id: Optional[int] = tok.eos_token_id
        else:
            # As LAVIS (eos_token_id = the "\n" id): one token in context is the generation's EOS.
            self.end_token_id = single_token_in_context(tok, end_sym)
        logger.info("end of text: %r (%s)", end_sym if end_sym is not None else tok.eos_token,
                    f"token {self.end_token_id}" if self.end_token_id is not None else "stop on text")

    def _stop_kwargs(self) -> dict:
        """HF generate arguments that end a sequence at the end of text, however it is tokenized."""
        if self.end_token_id is not None:
            return {"eos_token_id": self.end_token_id}
        tok = self.llm_tokenizer
        return {"eos_token_id": tok.eos_token_id,
                "stopping_criteria": StoppingCriteriaList([StopOnText(tok, self.end_sym)])}

    def cut_at_end(self, text: str) -> str:
        """Generated text up to (not including) the end of text, stripped."""
        if self.end_sym is not None:
            text = text.split(self.end_sym, 1)[0]
        return text.strip()

    # ------------------------------------------------------------------ freezing

    @property
    def projector(self) -> nn.Linear:
        return getattr(self, self.projector_name)

    def set_trainable(self, train_vpg: bool) -> None:
        """Projector only (`train_vpg=False`, stage 1) or jointly with the VPG's Q-Former,
        query tokens and ln_vision (stage 2). The ViT and the LLM never train."""
        self.train_vpg = bool(train_vpg)
        trainable = self.trainable_prefixes()
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(trainable)
        self.train(self.training)

    def trainable_prefixes(self) -> tuple:
        return (self.projector_name + ".",) + (TRAINABLE_VPG_PREFIXES if self.train_vpg else ())

    def frozen_modules(self) -> List[nn.Module]:
        frozen = [self.visual_encoder, self.llm_model]
        if not self.train_vpg:
            frozen += [self.Qformer, self.ln_vision]
        if self.pformer is not None:
            frozen.append(self.pformer)
        return frozen

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout) even when the runner calls train()."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def maybe_autocast(self, dtype=None):
        if self.device.type != "cuda" or self.llm_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype or self.llm_dtype)

    # ------------------------------------------------------------------ checkpoints

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """vpg_checkpoint -> VPG, projector_checkpoint -> projector, then (load_finetuned)
        `finetuned` -> the trainable parameters of a trained model."""
        if cfg.get("vpg_checkpoint", None):
            self.load_vpg(cfg.vpg_checkpoint)
        if cfg.get("projector_checkpoint", None):
            self.load_projector(cfg.projector_checkpoint)
        if cfg.get("load_finetuned", False) and cfg.get("finetuned", None):
            self.load_checkpoint(cfg.finetuned)

    def load_vpg(self, url_or_path: str):
        """Inherit a VPG from a LAVIS BLIP-2 checkpoint (any LLM, or stage 1): Q-Former, query
        tokens, ln_vision, and the ViT if the file has it. The source projector, LLM weights,
        stage-1 heads and the Q-Former's unused text side are dropped by design."""
        path = zoo.resolve(url_or_path)
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
        path = zoo.resolve(url_or_path)
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

    def load_checkpoint(self, url_or_filename: str):
        """Load a trained model's checkpoint (e.g. written by our runner, or vl-vicuna.pth):
        every key must exist in the model with the same shape, and every trainable
        parameter must be in the file. Frozen ViT / LLM weights need not be."""
        return load_trained_checkpoint(self, url_or_filename)

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """What a training checkpoint holds: the trainable parameters, nothing frozen."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ forward

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Images -> soft prompts in the LLM's input-embedding space, (B, num_query, H_llm)."""
        with self.maybe_autocast():
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
        prompts = self.encode_image(samples["image"])
        prefixes, targets = self._prefixes_and_targets(samples)
        with self.maybe_autocast():
            if self.is_encoder_decoder:
                loss = self._seq2seq_loss(prompts, prefixes, targets)
            else:
                loss = self._causal_loss(prompts, prefixes, targets)
        out = {"loss": loss, "loss_lm": loss}
        if self.pformer is not None:
            if "text_output" in samples:
                raise ValueError("align_weight > 0 needs caption samples: the P-Former's reference prompt "
                                 "is the one that makes the LLM produce the caption, not a prefix-LM answer")
            out["loss_align"] = alignment_loss(prompts, self.pformer.reference_prompts(targets))
            out["loss"] = loss + self.align_weight * out["loss_align"]
        return out

    def _causal_loss(self, prompts, prefixes, targets):
        device = prompts.device
        input_ids, text_mask, labels = (t.to(device) for t in self._tokenize_prefix_target(prefixes, targets))
        embeds = torch.cat([prompts, self.llm_model.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([torch.ones(prompts.shape[:2], dtype=torch.long, device=device), text_mask], dim=1)
        full_labels = torch.cat(
            [torch.full(prompts.shape[:2], -100, dtype=torch.long, device=device), labels], dim=1)
        return self.llm_model(inputs_embeds=embeds, attention_mask=mask, labels=full_labels,
                              return_dict=True).loss

    def _tokenize_prefix_target(self, prefixes: Sequence[str], targets: Sequence[str]):
        """(input_ids, attention_mask, labels) of decoder-only training rows, right-padded, as
        LAVIS's blip2_opt builds them:
          - BOS (as the tokenizer adds it) + prefix + " " + target + end_sym (the EOS id when
            end_sym is None), cut at max_txt_len tokens, BOS included (a long target loses its end,
            as in LAVIS);
          - labels on the target and its end; with an empty prefix (caption without prompt) on
            every token, BOS included when label_bos is set.
        The prefix / target boundary comes from the fast tokenizer's character offsets, so a
        word-start token that merges the joining space ("Ġred", "▁red") counts as target."""
        tok = self.llm_tokenizer
        rows, label_rows = [], []
        joined_rows = [(f"{prefix} {target}" if prefix else target) + (self.end_sym or "")
                       for prefix, target in zip(prefixes, targets, strict=True)]
        enc = tok(joined_rows, add_special_tokens=False, return_offsets_mapping=True)  # one batched call
        for prefix, joined, ids, offsets in zip(prefixes, joined_rows, enc["input_ids"], enc["offset_mapping"]):
            ends = [end for _, end in offsets]
            if self.end_sym is None:  # the EOS id, after the text
                ids, ends = ids + [tok.eos_token_id], ends + [len(joined) + 1]
            labels = [i if not prefix or end > len(prefix) else -100 for i, end in zip(ids, ends)]
            bos_labels = self.bos_ids if self.label_bos and not prefix else [-100] * len(self.bos_ids)
            rows.append((self.bos_ids + ids)[: self.max_txt_len])
            label_rows.append((bos_labels + labels)[: self.max_txt_len])
        input_ids, attention_mask = pad_rows(rows, tok.pad_token_id)
        labels, _ = pad_rows(label_rows, -100)
        return input_ids, attention_mask, labels

    def _seq2seq_loss(self, prompts, prefixes, targets):
        """Encoder: soft prompts + prefix; decoder: target (+ end_sym) + EOS, which the tokenizer
        appends, as LAVIS's blip2_t5."""
        device = prompts.device
        tok = self.llm_tokenizer
        enc_ids, enc_mask = (t.to(device) for t in pad_rows(self._encoder_rows(prefixes), tok.pad_token_id))
        dec_ids, dec_mask = (t.to(device) for t in pad_rows(
            tok([t + (self.end_sym or "") for t in targets], truncation=True,
                max_length=self.max_output_txt_len).input_ids, tok.pad_token_id))
        labels = dec_ids.masked_fill(dec_mask == 0, -100)
        embeds = torch.cat([prompts, self.llm_model.get_input_embeddings()(enc_ids)], dim=1)
        mask = torch.cat([torch.ones(prompts.shape[:2], dtype=torch.long, device=device), enc_mask], dim=1)
        return self.llm_model(inputs_embeds=embeds, attention_mask=mask, decoder_attention_mask=dec_mask,
                              labels=labels, return_dict=True).loss

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
        if inference_method != "generate":
            raise ValueError(f"{type(self).__name__} answers by generation; inference_method "
                             f"{inference_method!r} is not supported")
        template = prompt or self.vqa_prompt
        questions = samples["text_input"]
        if isinstance(questions, str):
            questions = [questions]
        prefixes = [template.format(q) if "{}" in template else template + q for q in questions]
        return self._generate(samples["image"], prefixes, min_length=min_len, do_sample=False,
                              num_beams=num_beams, max_new_tokens=max_len, length_penalty=length_penalty,
                              num_return_sequences=1)

    def _encoder_rows(self, prefixes: Sequence[str]) -> List[List[int]]:
        """Token ids of encoder-decoder prefixes, with the tokenizer's own special tokens (T5's
        closing </s>), as LAVIS's blip2_t5 tokenizes them."""
        tok = self.llm_tokenizer
        return tok(list(prefixes), truncation=True, max_length=self.max_txt_len).input_ids

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

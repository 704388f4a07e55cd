"""The frozen language model behind soft prompts: one home for every model class that puts
vectors in front of a frozen LLM's text (the VL-LLMs, vl_llm.py; the P-Former, pformer.py,
which learns its prompts for the very layout stage 2 trains with).

`FrozenLLM` (a mixin) holds:
  - loading: a stock transformers model (AutoModelForCausalLM for decoder-only,
    T5ForConditionalGeneration for Flan-T5) with LAVIS's config overrides, frozen;
  - end of text: every decoder-only training target ends with `end_sym` ("\\n" by default, as
    LAVIS's BLIP-2 OPT and the VPGTrans OPT / LLaMA / Vicuna checkpoints were trained),
    generation stops at it and the decoded text is cut there; Flan-T5 ends at its EOS;
  - BOS: whatever the tokenizer itself puts in front of a text (OPT's </s>, LLaMA's <s>,
    nothing for Qwen2), in every path;
  - the tokenisation of prefix + target and the LLM's loss on soft prompts + text;
  - autocast in the LLM's precision.
"""

import contextlib
import logging
from typing import List, Optional, Sequence

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteriaList,
                          StopStringCriteria, T5ForConditionalGeneration)

from lavis_vpgtrans.common.paths import resolve_path
from lavis_vpgtrans.common.sharding import llm_weights_deferred
from lavis_vpgtrans.models.kbit import QuantizationSpec, load_quantized
from lavis_vpgtrans.models.lora import LoraSpec, add_lora, merged

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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


def check_llm_args(owner: str, llm_model, llm_precision) -> None:
    """Before anything is built: the LLM is named and its precision known."""
    if llm_model is None:
        raise ValueError(f"{owner}: `llm_model` (an HF model id or local dir) is required")
    if llm_precision not in DTYPES:
        raise ValueError(f"llm_precision must be one of {sorted(DTYPES)}, got {llm_precision!r}")


def llm_without_weights(llm_cls, path: str, dtype: torch.dtype, overrides: dict):
    """The model `llm_cls.from_pretrained(path, torch_dtype=dtype, **overrides)` builds, with its
    parameters on the meta device (no memory; tied weights tied) and its buffers computed on the
    host (e.g. rotary inv_freq), in eval mode, with the directory's generation config: what
    common/sharding.py's shard_model fills from rank 0 under run.fsdp."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(path, **overrides)
    with init_empty_weights(include_buffers=False):
        if llm_cls is AutoModelForCausalLM:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        else:
            model = llm_cls._from_config(config, torch_dtype=dtype)
    model.tie_weights()  # again outside: init_empty_weights makes a new parameter of each tied one
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: from_pretrained keeps the one from the model config too
        pass
    return model.eval()


class FrozenLLM:
    """Mixin (first in the bases) for a model with a frozen `llm_model` fed soft prompts."""

    # End of text of a decoder-only LLM when the config has no `end_sym`: a string every
    # training target ends with and generation stops at, or None for the tokenizer's EOS.
    # An encoder-decoder LLM (Flan-T5, LAVIS's blip2_t5) ends at its EOS.
    default_end_sym: Optional[str] = "\n"
    # Set by common.sharding.shard_model: every rank runs generate's decoding steps until all
    # ranks are done (transformers' synced_gpus), as each step gathers the sharded LLM.
    synced_generation: bool = False
    # Set by init_llm from `llm_quantization` / `llm_lora` (models/kbit.py, models/lora.py).
    llm_quantization: Optional[QuantizationSpec] = None
    llm_lora: Optional[LoraSpec] = None

    def init_llm(self, llm_model: str, llm_precision: str = "fp16", llm_config: Optional[dict] = None,
                 end_sym=CLASS_DEFAULT, label_bos: bool = True, quantization: Optional[dict] = None,
                 lora: Optional[dict] = None) -> None:
        """Loads the LLM and its tokenizer, frozen, and sets the end of text and BOS.
        `llm_config`: overrides of the LLM's config (default: LAVIS's, LAVIS_LLM_CONFIG).
        `label_bos`: LAVIS's blip2_opt labels every text token but padding and the prompt,
        so with an empty prompt the BOS too (predicted from the last soft prompt)."""
        check_llm_args(type(self).__name__, llm_model, llm_precision)
        path = resolve_path(llm_model)
        self.llm_model_name = llm_model
        self.llm_dtype = DTYPES[llm_precision]
        self.llm_tokenizer = AutoTokenizer.from_pretrained(path)
        llm_cfg = AutoConfig.from_pretrained(path)
        self.is_encoder_decoder = llm_cfg.is_encoder_decoder
        llm_cls = T5ForConditionalGeneration if self.is_encoder_decoder else AutoModelForCausalLM
        if llm_config is None:
            llm_config = LAVIS_LLM_CONFIG.get(llm_cfg.model_type, {})
        # k-bit (models/kbit.py) and LoRA (models/lora.py): checked before anything loads
        self.llm_quantization = QuantizationSpec.parse(quantization)
        self.llm_lora = LoraSpec.parse(lora)
        if self.llm_quantization is None and self.llm_lora is None and llm_weights_deferred():
            # run.fsdp on a rank but 0: the module tree without weights; shard_model fills its
            # shards from rank 0 (common/sharding.py), so the whole LLM never sits in this host's RAM
            self.llm_model = llm_without_weights(llm_cls, path, self.llm_dtype, dict(llm_config))
        elif self.llm_quantization is None:
            self.llm_model = llm_cls.from_pretrained(path, torch_dtype=self.llm_dtype, **dict(llm_config))
        else:
            self.llm_model = load_quantized(llm_cls, path, self.llm_dtype, self.llm_quantization, dict(llm_config))
        for param in self.llm_model.parameters():
            param.requires_grad = False
        if self.llm_lora is not None:
            # a PeftModel: forward / generate / config / get_input_embeddings as the model's own.
            # Its random init on a forked RNG: the parts built after it (the projector) start as
            # without LoRA, so runs with and without adapters compare from the same start
            with torch.random.fork_rng(devices=[]):
                self.llm_model = add_lora(self.llm_model, self.llm_lora, quantized=self.llm_quantization is not None)
            for param in self.llm_model.parameters():
                param.requires_grad = False  # the model's set_trainable decides when the adapters train
        if self.llm_tokenizer.pad_token is None:
            # LLaMA / Vicuna ship no pad token; padding is masked out, so any id will do.
            self.llm_tokenizer.pad_token = self.llm_tokenizer.unk_token or self.llm_tokenizer.eos_token
        self._stop_criteria = {}  # stop_on_text's, built on first use
        self._set_end_of_text(end_sym)
        # Prepended to every decoder-only text (training, generation, chat) as the tokenizer does.
        self.bos_ids = [] if self.is_encoder_decoder else leading_special_ids(self.llm_tokenizer)
        self.label_bos = bool(label_bos)

    def merge_lora(self) -> None:
        """The adapters merged into the LLM's weights (peft's merge_and_unload): afterwards
        `llm_model` is the plain transformers model, which generates as the adapted one did
        (the export does this before writing the LLM). A quantised LLM is refused: its merged
        weights would be rounded again."""
        if self.llm_lora is None:
            return
        if self.llm_quantization is not None:
            raise ValueError(f"{type(self).__name__}: LoRA adapters are merged into an unquantised LLM only "
                             f"(llm_quantization: {self.llm_quantization.describe()}): load it without "
                             f"llm_quantization, then merge")
        self.llm_model = merged(self.llm_model)
        self.llm_lora = None

    @property
    def llm_input_width(self) -> int:
        """The width of the LLM's input embeddings, which soft prompts must have: the hidden size,
        except where the LLM projects its embeddings in (OPT-350M: 512-wide embeddings, hidden 1024)."""
        return self.llm_model.get_input_embeddings().embedding_dim

    def maybe_autocast(self, dtype=None):
        """Autocast in `dtype` (default: the LLM's precision) on the model's device, CUDA or CPU,
        unless it is fp32: the ops of fp16 / bf16 weights run in that precision, the numerically
        sensitive ones (softmax, layer norm, losses) in fp32, as in LAVIS's blip2 models."""
        dtype = dtype or self.llm_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

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

    def generation_end(self) -> dict:
        """How generation ends, as transformers generate() arguments: at the end-of-text token
        (`end_token_id`: e.g. the "\\n" LAVIS trains OPT with, or the tokenizer's EOS); when the
        end of text spans several tokens (e.g. "\\n" for Qwen's tokenizer), at the EOS or on the
        text (`stop_strings`; our own generation passes the criterion stop_on_text builds for it)."""
        if self.end_token_id is not None:
            return {"eos_token_id": self.end_token_id}
        return {"eos_token_id": self.llm_tokenizer.eos_token_id, "stop_strings": self.end_sym}

    def _stop_kwargs(self) -> dict:
        """HF generate arguments that end a sequence at the end of text, however it is tokenized
        (and, for a sharded LLM, keep the ranks stepping together)."""
        end = self.generation_end()
        if self.synced_generation:
            end["synced_gpus"] = True
        stop = end.pop("stop_strings", None)
        if stop is not None:
            end["stopping_criteria"] = self.stop_on_text(stop)
        return end

    def stop_on_text(self, text: str) -> StoppingCriteriaList:
        """Ends a row at the token that completes `text` in its generated text, however the
        tokenizer splits it ("###" as "▁###", "##" + "#" or three byte tokens) and whatever that
        token carries after it (".\\n", "\\n\\n"): transformers' StopStringCriteria, which reads only
        the last len(text) tokens at each step. The caller cuts the text there (cut_at_end).

        Built once per model and text, not at every generate() call as generate(stop_strings=...,
        tokenizer=...) builds it: it preprocesses the whole vocabulary, and transformers' cache of
        that misses for fast tokenizers (their get_vocab() order changes from call to call):
        1.3 s per call for Qwen3's 151k tokens (benchmarks/stop_on_text.py)."""
        if text not in self._stop_criteria:  # (not keyed by len(tokenizer): that costs 19 ms for LLaMA's)
            self._stop_criteria[text] = StopStringCriteria(self.llm_tokenizer, text)
        return StoppingCriteriaList([self._stop_criteria[text]])

    def cut_at_end(self, text: str) -> str:
        """Generated text up to (not including) the end of text, stripped."""
        if self.end_sym is not None:
            text = text.split(self.end_sym, 1)[0]
        return text.strip()

    # ------------------------------------------------------------------ text + soft prompts

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

    def _encoder_rows(self, prefixes: Sequence[str]) -> List[List[int]]:
        """Token ids of encoder-decoder prefixes, with the tokenizer's own special tokens (T5's
        closing </s>), as LAVIS's blip2_t5 tokenizes them."""
        return self.llm_tokenizer(list(prefixes), truncation=True, max_length=self.max_txt_len).input_ids

    def llm_forward(self, prompts: torch.Tensor, prefixes: Sequence[str], targets: Sequence[str]):
        """The frozen LLM on soft prompts + prefix, scored on the target (with its end of text):
          - decoder-only: [prompts] BOS prefix target end_sym (_tokenize_prefix_target);
          - encoder-decoder: encoder [prompts] prefix (+ EOS), decoder target (+ end_sym) + EOS,
            cut at max_output_txt_len (default: max_txt_len, where LAVIS's blip2_t5 cuts them).
        Returns (the HF output: loss, logits; labels aligned with the logits' positions, -100
        where nothing is scored)."""
        device = prompts.device
        tok = self.llm_tokenizer
        embed = self.llm_model.get_input_embeddings()
        prompts = prompts.to(embed.weight.dtype)
        prompt_mask = torch.ones(prompts.shape[:2], dtype=torch.long, device=device)
        with self.maybe_autocast():
            if self.is_encoder_decoder:
                text_ids, text_mask = (t.to(device) for t in pad_rows(self._encoder_rows(prefixes), tok.pad_token_id))
                dec_ids, dec_mask = (t.to(device) for t in pad_rows(
                    tok([t + (self.end_sym or "") for t in targets], truncation=True,
                        max_length=self.max_output_txt_len).input_ids, tok.pad_token_id))
                labels = dec_ids.masked_fill(dec_mask == 0, -100)
                extra = {"decoder_attention_mask": dec_mask}
            else:
                text_ids, text_mask, text_labels = (
                    t.to(device) for t in self._tokenize_prefix_target(prefixes, targets))
                labels = torch.cat([torch.full(prompts.shape[:2], -100, dtype=torch.long, device=device),
                                    text_labels], dim=1)
                extra = {}
            out = self.llm_model(inputs_embeds=torch.cat([prompts, embed(text_ids)], dim=1),
                                 attention_mask=torch.cat([prompt_mask, text_mask], dim=1),
                                 labels=labels, return_dict=True, **extra)
        return out, labels

"""The P-Former's encoder: text -> the fixed-length soft prompt a frozen LLM needs to produce it.

    sentence -> BERT -> [CLS] (H) -> Linear -> N x W (N = the Q-Former's query count,
    W = its width) -> Linear -> N x H_llm

The output has the shape of projector(Q-Former(image)), so in BLIP-2 stages 1 and 2 it is the
target of the alignment loss (P-Former paper, eq. 6). Its length N never depends on the text.

This module holds no LLM: the training model (pformer.py) adds the frozen LLM and the losses;
the stage-1 / stage-2 models hold a frozen copy of this encoder only (`load_frozen_pformer`).
"""

import logging
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

from lavis_vpgtrans.common.checkpoint import load_checkpoint_file, load_state_with_report
from lavis_vpgtrans.common.paths import resolve_path

logger = logging.getLogger(__name__)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The registered `pformer` model's types (one per LLM: a P-Former is trained for one LLM).
# Stage-1 / stage-2 configs name one of these as `pformer_model_type`.
PFORMER_MODEL_TYPES = {
    "opt2.7b": "models/configs/pformer/opt2.7b.yaml",
    "opt6.7b": "models/configs/pformer/opt6.7b.yaml",
    "flant5xl": "models/configs/pformer/flant5xl.yaml",
    "flant5xxl": "models/configs/pformer/flant5xxl.yaml",
    "llama7b": "models/configs/pformer/llama7b.yaml",
    "vicuna7b": "models/configs/pformer/vicuna7b.yaml",
    # offline toy zoo
    "tiny_opt_small": "models/configs/pformer/tiny_opt_small.yaml",
    "tiny_opt_large": "models/configs/pformer/tiny_opt_large.yaml",
    "tiny_t5": "models/configs/pformer/tiny_t5.yaml",
    "tiny_llama": "models/configs/pformer/tiny_llama.yaml",
}

# Prefix of the encoder's parameters inside the `pformer` training model (and so in its
# training checkpoints).
ENCODER_PREFIX = "encoder."


def pformer_config(model_type: str):
    """The `model` section of a P-Former model type's default yaml."""
    if model_type not in PFORMER_MODEL_TYPES:
        raise KeyError(f"unknown P-Former model type {model_type!r}; known: {sorted(PFORMER_MODEL_TYPES)}")
    return OmegaConf.load(os.path.join(PACKAGE_ROOT, PFORMER_MODEL_TYPES[model_type])).model


def llm_hidden_size(llm_model: str) -> int:
    """Hidden size of an LLM from its config alone (no weights are read)."""
    return AutoConfig.from_pretrained(resolve_path(llm_model)).hidden_size


class PFormerEncoder(nn.Module):
    def __init__(
        self,
        bert_model: str,
        num_query_token: int,
        llm_width: int,
        prompt_width: Optional[int] = None,
        max_txt_len: int = 32,
        load_bert_weights: bool = True,
    ):
        """`bert_model`: an HF id or local dir (or "toy:bert"); its weights initialise the
        encoder unless `load_bert_weights` is False (a trained P-Former's checkpoint follows)."""
        super().__init__()
        path = resolve_path(bert_model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if load_bert_weights:
            self.bert = BertModel.from_pretrained(path, add_pooling_layer=False)
        else:
            self.bert = BertModel(BertConfig.from_pretrained(path), add_pooling_layer=False)
        hidden = self.bert.config.hidden_size
        self.num_query_token = num_query_token
        self.prompt_width = prompt_width or hidden
        self.max_txt_len = max_txt_len
        self.prompt_proj = nn.Linear(hidden, num_query_token * self.prompt_width)
        self.llm_proj = nn.Linear(self.prompt_width, llm_width)

    @property
    def llm_width(self) -> int:
        return self.llm_proj.out_features

    def tokenize(self, texts: List[str]):
        return self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_txt_len,
                              return_tensors="pt").to(self.llm_proj.weight.device)

    def embed_cls(self, tokens) -> torch.Tensor:
        """The [CLS] state, (B, H): the sentence embedding (SimCSE's representation)."""
        out = self.bert(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, return_dict=True)
        return out.last_hidden_state[:, 0]

    def prompts_from_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """(B, H) -> (B, N, H_llm)."""
        prompt = self.prompt_proj(cls).view(cls.shape[0], self.num_query_token, self.prompt_width)
        return self.llm_proj(prompt)

    def forward(self, texts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (prompts (B, N, H_llm), [CLS] (B, H))."""
        cls = self.embed_cls(self.tokenize(texts))
        return self.prompts_from_cls(cls), cls

    @torch.no_grad()
    def reference_prompts(self, texts: List[str]) -> torch.Tensor:
        """The alignment target for a batch of captions. Needs eval mode: with dropout on, the
        targets would be noise around the reference prompt (a defect of the authors' code)."""
        if self.training:
            raise RuntimeError("the frozen P-Former must be in eval mode when it produces alignment targets")
        return self(texts)[0]


def load_frozen_pformer(model_type: str, checkpoint: str, num_query_token: int,
                        llm_width: Optional[int] = None) -> PFormerEncoder:
    """A trained P-Former encoder for alignment: architecture from the model type's yaml,
    weights from `checkpoint` (a `pformer` training checkpoint). Frozen and in eval mode.

    `num_query_token` and `llm_width` (when known: stage 2 has an LLM, stage 1 has not) must
    match the P-Former's, since its prompts are compared element-wise with the model's.
    """
    if not model_type:
        raise ValueError("alignment needs `pformer_model_type` (a `pformer` model type, e.g. opt2.7b)")
    if not checkpoint:
        raise ValueError("alignment needs `pformer_checkpoint`: the trained P-Former (an untrained "
                         "one gives meaningless targets); train it with projects/pformer/stage0.yaml")
    cfg = pformer_config(model_type)
    width = llm_width or llm_hidden_size(cfg.llm_model)
    if cfg.num_query_token != num_query_token:
        raise ValueError(f"P-Former {model_type!r} predicts {cfg.num_query_token} prompt vectors, "
                         f"the model has {num_query_token} query tokens")
    encoder = PFormerEncoder(cfg.bert_model, cfg.num_query_token, width, cfg.get("prompt_width", None),
                             cfg.get("max_txt_len", 32), load_bert_weights=False)
    path = resolve_path(checkpoint)
    ckpt = load_checkpoint_file(path)
    state = ckpt["model"]
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        state = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    trained_for = ((ckpt.get("config") or {}).get("model") or {}).get("llm_model")
    if trained_for and trained_for != cfg.llm_model:
        logger.warning("P-Former checkpoint %s was trained with llm_model=%s, model type %r names %s",
                       path, trained_for, model_type, cfg.llm_model)
    load_state_with_report(encoder, state, path,
                           required=[n for n, _ in encoder.named_parameters()]).log("frozen P-Former")
    for param in encoder.parameters():
        param.requires_grad = False
    return encoder.eval()


def alignment_loss(prompts: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L_align = MSE(projector(Q-Former(image)), P-Former(caption)), in fp32."""
    if prompts.shape != reference.shape:
        raise ValueError(f"prompts {tuple(prompts.shape)} and P-Former prompts {tuple(reference.shape)} differ")
    return F.mse_loss(prompts.float(), reference.float())

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
import re
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

from lavis_vpgtrans.common.checkpoint import CheckpointError, load_checkpoint_file, load_state_with_report
from lavis_vpgtrans.common.paths import PACKAGE_ROOT, resolve_path

logger = logging.getLogger(__name__)


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


def recorded_llm(ckpt: dict) -> Optional[str]:
    """The LLM a P-Former checkpoint was trained for, as its stage-0 run configured it: the run
    config that the runner saves in every checkpoint ("config", with the model type's defaults
    merged in) holds it as `model.llm_model`. None when the file does not record it."""
    config = ckpt.get("config") or {}
    model = config.get("model") if isinstance(config, dict) else None
    llm = model.get("llm_model") if isinstance(model, dict) else None
    return llm if isinstance(llm, str) and llm.strip() else None


# An HF hub cache snapshot directory: .../models--<org>--<name>/snapshots/<revision>
_HF_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+$")
# "toy:opt-small" and other "<scheme>:" names (common/paths.py), but not URLs
_SCHEME_NAME = re.compile(r"^[a-z][a-z0-9_]+:(?!//)")

LLM_NAME_RULE = ("LLM names are compared as configured, after normalisation only: surrounding spaces, "
                 "trailing '/', '.' and '..' segments, symlinks of local directories that exist here, and "
                 "HF-cache snapshot directories (read as their hub id); '<scheme>:' names (toy:...) are "
                 "compared as written. The weights are not compared")


def normalise_llm_name(name: str) -> str:
    """The key two LLM names are compared by (LLM_NAME_RULE): a hub id or '<scheme>:' name as
    written, a local directory that exists as its real path, an HF-cache snapshot as its hub id."""
    name = str(name).strip()
    if not name or (_SCHEME_NAME.match(name) and not os.path.exists(name)):
        return name
    name = os.path.realpath(name) if os.path.exists(name) else os.path.normpath(name)
    snapshot = _HF_SNAPSHOT.search(name.replace(os.sep, "/"))
    return f"{snapshot['org']}/{snapshot['name']}" if snapshot else name


def check_pformer_llm(path: str, recorded: Optional[str], model_llm: str, model_llm_is: str,
                      pformer_llm_model: Optional[str] = None) -> None:
    """Refuses a P-Former trained for another LLM than the model's: its targets are the prompts
    *that* LLM understands, and a same-width LLM (LLaMA-7B's P-Former for Vicuna-7B) would load
    without any shape error. `recorded`: the checkpoint's record (recorded_llm); `model_llm`: the
    LLM of the model being built, `model_llm_is` says where it comes from. `pformer_llm_model`
    (config key of the same name) states which LLM the P-Former was trained for when that name
    differs from the model's but is the same LLM (e.g. a local copy at another path): the record
    must then match it instead of the model's LLM."""
    way_out = ("if it is the same LLM (e.g. a local copy at another path), say so with "
               "model.pformer_llm_model: {!r}")
    if recorded is None:
        # Refused rather than accepted with a warning: accepting is the silent failure this check
        # exists for (a same-width LLM's P-Former loads and gives wrong targets for a whole run; a
        # warning scrolls by in a long log), and the way out is one explicit config line.
        if pformer_llm_model:
            logger.warning("P-Former checkpoint %s does not record the LLM it was trained for: taken to be %r "
                           "as model.pformer_llm_model states (this model's LLM: %r, %s)",
                           path, pformer_llm_model, model_llm, model_llm_is)
            return
        raise CheckpointError(
            f"P-Former checkpoint {path} does not record the LLM it was trained for (no model.llm_model in "
            f"its saved run config: it was not written by a stage-0 run of this plugin); this model is built "
            f"for LLM {model_llm!r} ({model_llm_is}). Retrain it with projects/pformer/stage0.yaml and "
            f"model.llm_model={model_llm}, or, if it was trained for that LLM, "
            f"say so with model.pformer_llm_model: {model_llm!r}")
    if pformer_llm_model:
        if normalise_llm_name(recorded) != normalise_llm_name(pformer_llm_model):
            raise CheckpointError(
                f"P-Former checkpoint {path} was trained for LLM {recorded!r}, not for {pformer_llm_model!r} "
                f"as model.pformer_llm_model states (this model's LLM: {model_llm!r}, {model_llm_is}). "
                f"{LLM_NAME_RULE}. Use a P-Former trained for the model's LLM, or "
                + way_out.format(recorded))
        if normalise_llm_name(recorded) != normalise_llm_name(model_llm):
            logger.info("P-Former checkpoint %s, trained for LLM %r, accepted for this model's LLM %r (%s): "
                        "model.pformer_llm_model states they are the same LLM", path, recorded, model_llm,
                        model_llm_is)
        return
    if normalise_llm_name(recorded) != normalise_llm_name(model_llm):
        raise CheckpointError(
            f"P-Former checkpoint {path} was trained for LLM {recorded!r}, but this model is built for LLM "
            f"{model_llm!r} ({model_llm_is}): a P-Former's targets are the prompts of the LLM it was trained "
            f"with. {LLM_NAME_RULE}. Use a P-Former trained for {model_llm!r} (projects/pformer/stage0.yaml "
            f"with model.llm_model={model_llm}), or " + way_out.format(recorded))


def load_frozen_pformer(model_type: str, checkpoint: str, num_query_token: int,
                        llm_width: Optional[int] = None, llm_model: Optional[str] = None,
                        pformer_llm_model: Optional[str] = None) -> PFormerEncoder:
    """A trained P-Former encoder for alignment: architecture from the model type's yaml,
    weights from `checkpoint` (a `pformer` training checkpoint). Frozen and in eval mode.

    `num_query_token` and `llm_width` (when known: stage 2 has an LLM, stage 1 has not) must
    match the P-Former's, since its prompts are compared element-wise with the model's.
    The checkpoint must have been trained for the model's LLM (check_pformer_llm): `llm_model`
    (stage 2: the model's own; None, stage 1: the model type's `llm_model`, the LLM whose width
    the stage-1 projector takes), or the LLM `pformer_llm_model` names as the same one.
    """
    if not model_type:
        raise ValueError("alignment needs `pformer_model_type` (a `pformer` model type, e.g. opt2.7b)")
    if not checkpoint:
        raise ValueError("alignment needs `pformer_checkpoint`: the trained P-Former (an untrained "
                         "one gives meaningless targets); train it with projects/pformer/stage0.yaml")
    cfg = pformer_config(model_type)
    if cfg.num_query_token != num_query_token:
        raise ValueError(f"P-Former {model_type!r} predicts {cfg.num_query_token} prompt vectors, "
                         f"the model has {num_query_token} query tokens")
    path = resolve_path(checkpoint)
    ckpt = load_checkpoint_file(path)
    if llm_model is None:
        llm_model, model_llm_is = cfg.llm_model, f"the llm_model of pformer_model_type {model_type!r}"
    else:
        model_llm_is = "its llm_model"
    check_pformer_llm(path, recorded_llm(ckpt), llm_model, model_llm_is, pformer_llm_model)
    width = llm_width or llm_hidden_size(cfg.llm_model)
    encoder = PFormerEncoder(cfg.bert_model, cfg.num_query_token, width, cfg.get("prompt_width", None),
                             cfg.get("max_txt_len", 32), load_bert_weights=False)
    state = ckpt["model"]
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        state = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
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

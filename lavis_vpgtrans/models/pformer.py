"""P-Former pre-training (stage 0 of the P-Former paper): text only, for one frozen LLM.

    loss = L_recon + contrastive_weight * L_contrast + vocab_weight * L_vocab     (paper eq. 5)

- L_recon: the frozen LLM, given the predicted prompt, regenerates the sentence. The prompt
  meets the LLM exactly as the VL-LLM's projected queries do in stage 2 (Blip2VLLLM's
  tokenisation): decoder-only, prompt + sentence + EOS with cross-entropy on the sentence and
  EOS; Flan-T5, prompt (+ the empty text prompt's EOS) into the encoder, sentence decoded.
- L_contrast: SimCSE on [CLS]: two passes of the same batch with dropout on are positives,
  the batch's other sentences negatives (InfoNCE, temperature 0.05).
- L_vocab: each prompt vector is pulled toward its nearest LLM input embedding (argmin of
  the L2 distance, computed in chunks; MSE to the detached embedding).
"""

import logging
from typing import Dict, List

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, T5ForConditionalGeneration

from lavis_vpgtrans.common.checkpoint import load_trained_checkpoint
from lavis_vpgtrans.models.pformer_encoder import PFORMER_MODEL_TYPES, PFormerEncoder
from lavis_vpgtrans.models.vl_llm import CLASS_DEFAULT, DTYPES, Blip2VLLLM, leading_special_ids
from lavis_vpgtrans.toy import zoo

logger = logging.getLogger(__name__)

# Elements of one chunk of the (prompt vectors x vocabulary) distance matrix: 2^24 floats,
# 64 MB, whatever the vocabulary size.
DISTANCE_CHUNK_ELEMENTS = 1 << 24


def load_frozen_llm(llm_model: str, llm_precision: str):
    """(tokenizer, model, is_encoder_decoder) of a stock transformers LLM, frozen, in eval mode."""
    if llm_precision not in DTYPES:
        raise ValueError(f"llm_precision must be one of {sorted(DTYPES)}, got {llm_precision!r}")
    path = zoo.resolve(llm_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    is_encoder_decoder = AutoConfig.from_pretrained(path).is_encoder_decoder
    llm_cls = T5ForConditionalGeneration if is_encoder_decoder else AutoModelForCausalLM
    model = llm_cls.from_pretrained(path, torch_dtype=DTYPES[llm_precision])
    if tokenizer.pad_token is None:
        # LLaMA / Vicuna ship no pad token; padding is masked out, so any id will do.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    for param in model.parameters():
        param.requires_grad = False
    return tokenizer, model.eval(), is_encoder_decoder


def nearest_embedding_ids(vectors: torch.Tensor, table: torch.Tensor,
                          chunk_elements: int = DISTANCE_CHUNK_ELEMENTS) -> torch.Tensor:
    """Index of the nearest row of `table` (V, D) for each of `vectors` (M, D), by L2 distance.
    ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 does not change the argmin."""
    with torch.no_grad():
        table = table.float()
        sq_norms = (table * table).sum(1)
        rows = max(1, chunk_elements // table.shape[0])
        ids = [(sq_norms - 2.0 * (chunk.float() @ table.T)).argmin(1) for chunk in vectors.split(rows)]
    return torch.cat(ids)


def simcse_loss(view1: torch.Tensor, view2: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over the batch: view1[i] must pick view2[i] among all view2 (cosine / temperature)."""
    sim = F.normalize(view1.float(), dim=-1) @ F.normalize(view2.float(), dim=-1).T / temperature
    return F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))


@registry.register_model("pformer")
class PFormer(BaseModel):
    """P-Former = BERT encoder -> [CLS] -> N x W prompt -> LLM width, trained against a frozen LLM.

    >>> from lavis.models import load_model
    >>> model = load_model("pformer", "tiny_opt_small")
    """

    PRETRAINED_MODEL_CONFIG_DICT = PFORMER_MODEL_TYPES
    # Model-type yamls are looked up in this package (LAVIS's own looks in lavis/).
    default_config_path = Blip2VLLLM.__dict__["default_config_path"]

    # The VL-LLM's own tokenisation and autocast, so that the prompts are learned for the input
    # layout the LLM sees in stage 2. They read llm_tokenizer, max_txt_len, llm_dtype, bos_ids,
    # label_bos and end_sym.
    _tokenize_prefix_target = Blip2VLLLM._tokenize_prefix_target
    maybe_autocast = Blip2VLLLM.maybe_autocast
    _set_end_of_text = Blip2VLLLM._set_end_of_text
    default_end_sym = Blip2VLLLM.default_end_sym

    def __init__(
        self,
        bert_model: str = "bert-base-uncased",
        llm_model: str = None,
        llm_precision: str = "fp16",
        num_query_token: int = 32,
        prompt_width: int = None,
        max_txt_len: int = 32,
        temperature: float = 0.05,
        contrastive_weight: float = 1.0,
        vocab_weight: float = 1.0,
    ):
        super().__init__()
        if llm_model is None:
            raise ValueError("pformer: `llm_model` (the LLM the prompts are for) is required")
        self.llm_tokenizer, self.llm_model, self.is_encoder_decoder = load_frozen_llm(llm_model, llm_precision)
        self.llm_dtype = DTYPES[llm_precision]
        # The sentence ends and BOS as stage 2 lays out a caption for this LLM: the reference
        # prompt is the one that makes the LLM produce the caption the way stage 2 trains it.
        self._set_end_of_text(CLASS_DEFAULT)
        self.bos_ids = [] if self.is_encoder_decoder else leading_special_ids(self.llm_tokenizer)
        self.label_bos = True
        self.encoder = PFormerEncoder(bert_model, num_query_token, self.llm_model.config.hidden_size,
                                      prompt_width, max_txt_len)
        self.llm_model_name = llm_model
        self.max_txt_len = max_txt_len
        self.temperature = temperature
        self.contrastive_weight = contrastive_weight
        self.vocab_weight = vocab_weight

    @classmethod
    def from_config(cls, cfg):
        model = cls(
            bert_model=cfg.get("bert_model", "bert-base-uncased"),
            llm_model=cfg.get("llm_model"),
            llm_precision=cfg.get("llm_precision", "fp16"),
            num_query_token=cfg.get("num_query_token", 32),
            prompt_width=cfg.get("prompt_width", None),
            max_txt_len=cfg.get("max_txt_len", 32),
            temperature=cfg.get("temperature", 0.05),
            contrastive_weight=cfg.get("contrastive_weight", 1.0),
            vocab_weight=cfg.get("vocab_weight", 1.0),
        )
        if cfg.get("load_finetuned", False) and cfg.get("finetuned", None):
            model.load_checkpoint(cfg.finetuned)
        return model

    def train(self, mode: bool = True):
        """The LLM stays in eval mode (no dropout) even when the runner calls train()."""
        super().train(mode)
        self.llm_model.eval()
        return self

    def load_checkpoint(self, url_or_filename: str):
        """A trained P-Former (a training checkpoint: the encoder's parameters)."""
        return load_trained_checkpoint(self, url_or_filename, "P-Former checkpoint")

    # ------------------------------------------------------------------ losses

    def forward(self, samples) -> Dict[str, torch.Tensor]:
        texts = list(samples["text_input"])
        cls, cls_view2 = self.contrastive_views(self.encoder.tokenize(texts))
        prompts = self.encoder.prompts_from_cls(cls)
        loss_recon = self.reconstruct(prompts, texts)[0]
        loss_contrast = simcse_loss(cls, cls_view2, self.temperature)
        loss_vocab = self.vocab_loss(prompts)
        loss = loss_recon + self.contrastive_weight * loss_contrast + self.vocab_weight * loss_vocab
        return {"loss": loss, "loss_recon": loss_recon, "loss_contrast": loss_contrast, "loss_vocab": loss_vocab}

    def contrastive_views(self, tokens):
        """Two [CLS] embeddings of the same sentences; in training mode BERT's dropout makes
        them two different views (SimCSE). In eval mode they coincide."""
        return self.encoder.embed_cls(tokens), self.encoder.embed_cls(tokens)

    def vocab_loss(self, prompts: torch.Tensor) -> torch.Tensor:
        table = self.llm_model.get_input_embeddings().weight
        flat = prompts.reshape(-1, prompts.shape[-1])
        nearest = table[nearest_embedding_ids(flat, table)].detach()
        return F.mse_loss(flat.float(), nearest.float())

    def reconstruct(self, prompts: torch.Tensor, texts: List[str]):
        """(loss, logits, labels) of the frozen LLM regenerating `texts` from `prompts`;
        logits[:, t] predicts labels[:, t] (-100 where not a sentence token)."""
        device = prompts.device
        embed = self.llm_model.get_input_embeddings()
        prompts = prompts.to(embed.weight.dtype)
        prompt_mask = torch.ones(prompts.shape[:2], dtype=torch.long, device=device)
        with self.maybe_autocast():
            if self.is_encoder_decoder:
                tok = self.llm_tokenizer
                enc = tok([""] * len(texts), return_tensors="pt").to(device)
                dec = tok(texts, padding="longest", truncation=True, max_length=self.max_txt_len,
                          return_tensors="pt").to(device)
                labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
                out = self.llm_model(inputs_embeds=torch.cat([prompts, embed(enc.input_ids)], dim=1),
                                     attention_mask=torch.cat([prompt_mask, enc.attention_mask], dim=1),
                                     decoder_attention_mask=dec.attention_mask, labels=labels, return_dict=True)
                return out.loss, out.logits, labels
            input_ids, text_mask, labels = (t.to(device) for t in
                                            self._tokenize_prefix_target([""] * len(texts), texts))
            labels = torch.cat([torch.full(prompts.shape[:2], -100, dtype=torch.long, device=device), labels], 1)
            out = self.llm_model(inputs_embeds=torch.cat([prompts, embed(input_ids)], dim=1),
                                 attention_mask=torch.cat([prompt_mask, text_mask], dim=1),
                                 labels=labels, return_dict=True)
            return out.loss, out.logits[:, :-1], labels[:, 1:]

    @torch.no_grad()
    def reconstruction_counts(self, samples) -> Dict[str, float]:
        """Teacher-forced reconstruction of `text_input` from the predicted prompts: correct
        argmax tokens, scored tokens and summed token NLL (for held-out evaluation)."""
        texts = list(samples["text_input"])
        prompts = self.encoder(texts)[0]
        _, logits, labels = self.reconstruct(prompts, texts)
        scored = labels != -100
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        return {"correct": float((logits.argmax(-1).eq(labels) & scored).sum()),
                "total": float(scored.sum()), "nll": float(nll)}

"""P-Former pre-training (stage 0 of the P-Former paper): text only, for one frozen LLM.

    loss = L_recon + contrastive_weight * L_contrast + vocab_weight * L_vocab     (paper eq. 5)

- L_recon: the frozen LLM, given the predicted prompt, regenerates the sentence. The prompt
  meets the LLM exactly as the VL-LLM's projected queries do in stage 2 (the same FrozenLLM,
  models/llm.py: loading, BOS, end of text, tokenisation): decoder-only, prompt + BOS +
  sentence + end of text, scored on all but the prompt; Flan-T5, prompt (+ the empty text
  prompt's EOS) into the encoder, sentence decoded.
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

from lavis_vpgtrans.models.base import PluginModel
from lavis_vpgtrans.models.llm import FrozenLLM
from lavis_vpgtrans.models.pformer_encoder import PFORMER_MODEL_TYPES, PFormerEncoder

logger = logging.getLogger(__name__)

# Elements of one chunk of the (prompt vectors x vocabulary) distance matrix: 2^24 floats,
# 64 MB, whatever the vocabulary size.
DISTANCE_CHUNK_ELEMENTS = 1 << 24


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
class PFormer(FrozenLLM, PluginModel, BaseModel):
    """P-Former = BERT encoder -> [CLS] -> N x W prompt -> LLM width, trained against a frozen LLM.

    >>> from lavis.models import load_model
    >>> model = load_model("pformer", "tiny_opt_small")
    """

    PRETRAINED_MODEL_CONFIG_DICT = PFORMER_MODEL_TYPES
    checkpoint_what = "P-Former checkpoint"

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
        # Loaded, ended and laid out as stage 2 does for this LLM (the class defaults of end of
        # text, BOS labels and LAVIS's config overrides): the reference prompt is the one that
        # makes the LLM produce the caption the way stage 2 trains it.
        self.init_llm(llm_model, llm_precision)
        self.encoder = PFormerEncoder(bert_model, num_query_token, self.llm_input_width,
                                      prompt_width, max_txt_len)
        self.max_txt_len = max_txt_len
        self.max_output_txt_len = max_txt_len  # Flan-T5's decoder: the sentence, as many tokens
        self.temperature = temperature
        self.contrastive_weight = contrastive_weight
        self.vocab_weight = vocab_weight

    def frozen_modules(self):
        return [self.llm_model]

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
        out, labels = self.llm_forward(prompts, [""] * len(texts), texts)
        if self.is_encoder_decoder:
            return out.loss, out.logits, labels
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

"""BLIP-2 stage 1 (Q-Former pre-training: ITC + ITM + ITG) with the P-Former alignment loss:

    loss = ITC + ITM + ITG + align_weight * MSE(llm_proj(Q-Former(image)), P-Former(caption))

(P-Former paper eq. 8, align_weight = omega_1 = 10). `llm_proj` maps the queries to the LLM
width the P-Former was trained for; stage 2 can start its projector from it
(`projector_checkpoint`), and its VPG from the Q-Former (`vpg_checkpoint`).

LAVIS's Blip2Qformer objectives on our Blip2PluginBase (models/base.py) with three changes: the
BERT, tokenizer and ViT come from config (LAVIS hard-codes downloads of bert-base-uncased and
EVA ViT-g), the forward runs without a process group (LAVIS calls dist.get_rank() unguarded)
and reuses the query pass for the alignment, and the frozen ViT and P-Former stay in eval mode
whatever the runner does.
"""

import logging
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.base_model import all_gather_with_grad, concat_all_gather

from lavis_vpgtrans.models.base import Blip2PluginBase
from lavis_vpgtrans.models.pformer_encoder import alignment_loss, load_frozen_pformer

logger = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@registry.register_model("blip2_qformer_pformer")
class Blip2QformerPFormer(Blip2PluginBase):
    """BLIP-2 stage 1 with P-Former alignment (`align_weight: 0` is plain BLIP-2 stage 1).

    >>> from lavis.models import load_model
    >>> model = load_model("blip2_qformer_pformer", "tiny_opt_small")
    """

    # The projector's state-dict prefix: stage 2 (load_projector) finds it by this name.
    projector_name = "llm_proj"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "opt2.7b": "models/configs/pformer/stage1_opt2.7b.yaml",
        "flant5xl": "models/configs/pformer/stage1_flant5xl.yaml",
        "tiny_opt_small": "models/configs/pformer/stage1_tiny_opt_small.yaml",
        "tiny_t5": "models/configs/pformer/stage1_tiny_t5.yaml",
        "tiny_llama": "models/configs/pformer/stage1_tiny_llama.yaml",
    }

    def __init__(
        self,
        vit_model: str = "eva_clip_g",
        img_size: int = 224,
        drop_path_rate: float = 0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        freeze_vit: bool = True,
        qformer_model: str = "bert-base-uncased",
        num_query_token: int = 32,
        cross_attention_freq: int = 2,
        embed_dim: int = 256,
        max_txt_len: int = 32,
        pformer_model_type: str = None,
        pformer_checkpoint: str = None,
        pformer_llm_model: str = None,
        align_weight: float = 10.0,
    ):
        super().__init__()
        self.tokenizer = self.init_tokenizer(qformer_model)
        self.visual_encoder, self.ln_vision = self.init_vision_encoder(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision)
        self.freeze_vit = freeze_vit
        if freeze_vit:
            for param in self.visual_encoder.parameters():
                param.requires_grad = False
        self.Qformer, self.query_tokens = self.init_Qformer(
            num_query_token, self.visual_encoder.num_features, cross_attention_freq, qformer_model)
        # transformers >= 4.3x loads on the meta device and leaves LAVIS's tied decoder bias
        # there (untied from cls.predictions.bias, which holds BERT's weights): re-tie it
        # around the resize for [DEC].
        head = self.Qformer.cls.predictions
        head.decoder.bias = head.bias
        self.Qformer.resize_token_embeddings(len(self.tokenizer))
        head.bias = head.decoder.bias
        # As LAVIS: the query branch's feed-forward starts as a copy of the text branch's.
        state_dict = self.Qformer.state_dict()
        for name, param in self.Qformer.named_parameters():
            if "_query" in name:
                param.data.copy_(state_dict[name.replace("_query", "")])
        hidden = self.Qformer.config.hidden_size
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.max_txt_len = max_txt_len

        self.align_weight = float(align_weight)
        self.pformer = None
        if self.align_weight > 0:
            # Frozen, in eval mode, never in training checkpoints (requires_grad is False). Refused
            # unless trained for the LLM of pformer_model_type (this model's llm_proj targets it),
            # or for the LLM that pformer_llm_model states is the same one.
            self.pformer = load_frozen_pformer(pformer_model_type, pformer_checkpoint, num_query_token,
                                               pformer_llm_model=pformer_llm_model)
            self.add_module(self.projector_name, nn.Linear(hidden, self.pformer.llm_width))

    # ------------------------------------------------------------------ freezing

    def frozen_modules(self) -> List[nn.Module]:
        frozen = [self.visual_encoder] if self.freeze_vit else []
        return frozen + ([self.pformer] if self.pformer is not None else [])

    # ------------------------------------------------------------------ forward

    def forward(self, samples) -> Dict[str, torch.Tensor]:
        image, text = samples["image"], list(samples["text_input"])
        image_embeds = self.ln_vision(self.visual_encoder(image)).float()
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                         encoder_attention_mask=image_atts, use_cache=True, return_dict=True)
        text_tokens = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.max_txt_len,
                                     return_tensors="pt").to(image.device)

        loss_itc, sim_i2t, sim_t2i = self._itc(query_output, text_tokens)
        loss_itm = self._itm(image_embeds, text_tokens, sim_i2t, sim_t2i)
        loss_lm = self._itg(query_output, text_tokens)
        out = {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm}
        loss = loss_itc + loss_itm + loss_lm
        if self.pformer is not None:
            prompts = self.projector(query_output.last_hidden_state)
            out["loss_align"] = alignment_loss(prompts, self.pformer.reference_prompts(text))
            loss = loss + self.align_weight * out["loss_align"]
        return {"loss": loss, **out}

    def _itc(self, query_output, text_tokens):
        """Image-text contrastive: best query per text, in-batch (all-gathered) negatives."""
        image_feats = F.normalize(self.vision_proj(query_output.last_hidden_state), dim=-1)
        text_output = self.Qformer.bert(text_tokens.input_ids, attention_mask=text_tokens.attention_mask,
                                        return_dict=True)
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)
        image_feats_all = concat_all_gather(image_feats)  # (B * world, Q, D)
        text_feat_all = concat_all_gather(text_feat)  # (B * world, D)
        sim_i2t = torch.einsum("bqd,td->btq", image_feats, text_feat_all).max(-1)[0] / self.temp
        sim_t2i = torch.einsum("bd,tqd->btq", text_feat, image_feats_all).max(-1)[0] / self.temp
        bs = image_feats.shape[0]
        targets = torch.arange(_rank() * bs, _rank() * bs + bs, device=image_feats.device)
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
        return loss, sim_i2t, sim_t2i

    def _itm(self, image_embeds, text_tokens, sim_i2t, sim_t2i):
        """Image-text matching on (pos, pos), (neg image, text), (image, neg text) with hard
        negatives sampled by ITC similarity."""
        rank, bs, device = _rank(), image_embeds.shape[0], image_embeds.device
        text_ids_world = concat_all_gather(text_tokens.input_ids)
        text_atts_world = concat_all_gather(text_tokens.attention_mask)
        image_embeds_world = all_gather_with_grad(image_embeds) if dist.is_initialized() else image_embeds
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i, dim=1) + 1e-4
            weights_t2i[:, rank * bs: rank * bs + bs].fill_diagonal_(0)
            weights_i2t = F.softmax(sim_i2t, dim=1) + 1e-4
            weights_i2t[:, rank * bs: rank * bs + bs].fill_diagonal_(0)
            neg_images = torch.multinomial(weights_t2i, 1).squeeze(1)
            neg_texts = torch.multinomial(weights_i2t, 1).squeeze(1)
        image_embeds_neg = image_embeds_world[neg_images]
        text_ids_all = torch.cat([text_tokens.input_ids, text_tokens.input_ids, text_ids_world[neg_texts]])
        text_atts_all = torch.cat([text_tokens.attention_mask, text_tokens.attention_mask,
                                   text_atts_world[neg_texts]])
        query_tokens_itm = self.query_tokens.expand(text_ids_all.shape[0], -1, -1)
        query_atts_itm = torch.ones(query_tokens_itm.shape[:-1], dtype=torch.long, device=device)
        image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds])
        output_itm = self.Qformer.bert(
            text_ids_all, query_embeds=query_tokens_itm,
            attention_mask=torch.cat([query_atts_itm, text_atts_all], dim=1),
            encoder_hidden_states=image_embeds_all,
            encoder_attention_mask=torch.ones(image_embeds_all.shape[:-1], dtype=torch.long, device=device),
            return_dict=True)
        logits = self.itm_head(output_itm.last_hidden_state[:, : query_tokens_itm.shape[1], :]).mean(dim=1)
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(device)
        return F.cross_entropy(logits, itm_labels)

    def _itg(self, query_output, text_tokens):
        """Image-grounded text generation: the text decoded with the queries' cached keys/values."""
        decoder_input_ids = text_tokens.input_ids.clone()
        decoder_input_ids[:, 0] = self.tokenizer.bos_token_id
        labels = decoder_input_ids.masked_fill(decoder_input_ids == self.tokenizer.pad_token_id, -100)
        query_atts = torch.ones(query_output.last_hidden_state.shape[:-1], dtype=torch.long,
                                device=decoder_input_ids.device)
        lm_output = self.Qformer(decoder_input_ids,
                                 attention_mask=torch.cat([query_atts, text_tokens.attention_mask], dim=1),
                                 past_key_values=query_output.past_key_values, return_dict=True, labels=labels)
        return lm_output.loss

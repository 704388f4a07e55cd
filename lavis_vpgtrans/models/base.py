"""What every model class of this plugin shares on top of LAVIS's BaseModel / Blip2Base.

`PluginModel` (a mixin, first in the bases):
  - model-type yamls are looked up in this package (LAVIS's own look in lavis/);
  - `from_config` passes each constructor parameter the config key of its name (LAVIS's
    `image_size` for `img_size`), the constructor's default when the key is absent, then
    loads the checkpoints the config names; `config_keys()` lists those keys for the
    config check (common/config.py);
  - frozen parts (`frozen_modules()`) stay in eval mode, no dropout, whatever the runner does;
  - training checkpoints are the trainable parameters only and load back strictly.

`Blip2PluginBase` is LAVIS's Blip2Base with its parts built from config: the ViT (LAVIS's by
name, or a local EVA-ViT directory) and the Q-Former's BERT and tokenizer from
`qformer_model` (LAVIS hard-codes downloads of bert-base-uncased and EVA ViT-g).
"""

import inspect
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

from lavis_vpgtrans.common.checkpoint import load_trained_checkpoint, trainable_state
from lavis_vpgtrans.common.paths import PACKAGE_ROOT, resolve_path
from lavis_vpgtrans.models.eva_vit import load_eva_vit_dir

# ViTs LAVIS builds (and downloads) by name; any other vit_model is a local EVA-ViT directory.
LAVIS_VITS = ("eva_clip_g", "clip_L")
VIT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # vit_precision values


class PluginModel:
    """Mixin for a LAVIS model class: put it before BaseModel / Blip2Base in the bases."""

    PRETRAINED_MODEL_CONFIG_DICT: Dict[str, str] = {}
    # Constructor parameters whose config key has another name.
    CONFIG_KEY_OF = {"img_size": "image_size"}
    # How the load report names what load_checkpoint reads.
    checkpoint_what = "checkpoint"

    @classmethod
    def default_config_path(cls, model_type):
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise KeyError(f"unknown model type {model_type!r} for {cls.__name__}; "
                           f"known: {sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        return os.path.join(PACKAGE_ROOT, cls.PRETRAINED_MODEL_CONFIG_DICT[model_type])

    @classmethod
    def config_keys(cls) -> Dict[str, str]:
        """{model-config key: constructor parameter} for every parameter of the constructor."""
        params = list(inspect.signature(cls.__init__).parameters)[1:]
        return {cls.CONFIG_KEY_OF.get(p, p): p for p in params}

    @classmethod
    def from_config(cls, cfg):
        model = cls(**{param: cfg[key] for key, param in cls.config_keys().items() if key in cfg})
        model.load_checkpoint_from_config(cfg)
        return model

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """(load_finetuned) `finetuned` -> the trainable parameters of a trained model."""
        if cfg.get("load_finetuned", False) and cfg.get("finetuned", None):
            self.load_checkpoint(cfg.finetuned)

    def load_checkpoint(self, url_or_filename: str):
        """A trained model's checkpoint (our runner's, or e.g. vl-vicuna.pth): every key must
        exist in the model with the same shape, and every trainable parameter must be in the
        file. Frozen weights (ViT, LLM) need not be."""
        return load_trained_checkpoint(self, url_or_filename, self.checkpoint_what)

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """What a training checkpoint holds: the trainable parameters, nothing frozen."""
        return trainable_state(self)

    def frozen_modules(self) -> List[nn.Module]:
        return []

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout) even when the runner calls train()."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self


class Blip2PluginBase(PluginModel, Blip2Base):
    """Blip2Base whose ViT, Q-Former and tokenizer come from config."""

    # State-dict prefix of the projector (the Q-Former -> LLM linear layer), if the model has one.
    projector_name: Optional[str] = None

    @property
    def projector(self) -> Optional[nn.Linear]:
        return getattr(self, self.projector_name, None) if self.projector_name else None

    @classmethod
    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        """LAVIS's ViT-g / ViT-L by name, or a local EVA-ViT directory (models/eva_vit.py)."""
        if precision not in VIT_DTYPES:
            # LAVIS converts the ViT to fp16 or leaves it in fp32; anything else would silently be fp32
            raise ValueError(f"vit_precision must be one of {sorted(VIT_DTYPES)}, got {precision!r}")
        if model_name in LAVIS_VITS:
            return super().init_vision_encoder(model_name, img_size, drop_path_rate, use_grad_checkpoint, precision)
        return load_eva_vit_dir(resolve_path(model_name), img_size, drop_path_rate, use_grad_checkpoint, precision,
                                name=model_name)

    @classmethod
    def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2, qformer_model="bert-base-uncased"):
        """LAVIS's init_Qformer with the BERT (config + weights) taken from `qformer_model`."""
        path = resolve_path(qformer_model)
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

        tokenizer = BertTokenizer.from_pretrained(resolve_path(qformer_model))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

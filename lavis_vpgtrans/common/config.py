"""LAVIS's Config, with command-line model selection that works and config inheritance."""

import os

from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf

BASE_KEY = "base"


def load_config(path: str):
    """A yaml config; a top-level `base: <path>` (relative to this file) names a config this
    one extends: the base is loaded first and this file's entries override it. Baselines and
    variants of a recipe are written as their differences only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config not found: {path}")
    cfg = OmegaConf.load(path)
    base = cfg.pop(BASE_KEY, None)
    if base is None:
        return cfg
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(os.path.abspath(path)), base)
    return OmegaConf.merge(load_config(base_path), cfg)


class PluginConfig(Config):
    """LAVIS's Config with two changes:

    - `--options model.model_type=X` (or model.arch=Y) also picks the default model yaml;
      LAVIS looks the override up as kwargs["model.model_type"], a key the parsed options
      never have, so the config file's model_type always won;
    - config files may extend a base config (`base: ../vpgtrans.yaml`).
    """

    def __init__(self, args):
        self.config = {}
        self.args = args
        registry.register("configuration", self)
        user_config = self._build_opt_list(self.args.options)
        config = load_config(self.args.cfg_path)
        self.config = OmegaConf.merge(
            self.build_runner_config(config),
            self.build_model_config(config, **user_config),
            self.build_dataset_config(config),
            user_config)

    @staticmethod
    def build_model_config(config, **kwargs):
        user_model = kwargs.get("model", None) or {}
        overrides = {k: user_model[k] for k in ("arch", "model_type") if k in user_model}
        if overrides:
            config = OmegaConf.merge(config, {"model": overrides})
        return Config.build_model_config(config)

"""LAVIS's Config, with command-line model selection that works."""

from lavis.common.config import Config
from omegaconf import OmegaConf


class PluginConfig(Config):
    """`--options model.model_type=X` (or model.arch=Y) now also picks the default model yaml.

    LAVIS looks the override up as kwargs["model.model_type"], a key the parsed options never
    have, so the yaml of the config file's model_type was always used.
    """

    @staticmethod
    def build_model_config(config, **kwargs):
        user_model = kwargs.get("model", None) or {}
        overrides = {k: user_model[k] for k in ("arch", "model_type") if k in user_model}
        if overrides:
            config = OmegaConf.merge(config, {"model": overrides})
        return Config.build_model_config(config)

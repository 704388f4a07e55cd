"""Small helpers shared by the tests."""


def load_tiny(name, model_type, **overrides):
    """A registered model from its default yaml, with config overrides (e.g. train_vpg)."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class(name)
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)
    return cls.from_config(cfg)

"""Which state-dict prefix holds a model's projector (the Q-Former -> LLM linear layer).

Our classes declare it as the class attribute `projector_name`; LAVIS's own BLIP-2 classes
predate that, so their names are listed here. Checkpoints of both are read by these names,
never by guessing from substrings.
"""

from lavis.common.registry import registry

LAVIS_PROJECTOR_NAMES = {"blip2_opt": "opt_proj", "blip2_t5": "t5_proj"}
# The model class for an LLM by its HF config's model_type: families with a class of their own
# keep it (their released checkpoints name the projector after it); any other decoder-only
# causal LM gets the generic class.
ARCH_BY_LLM_TYPE = {"opt": "blip2_opt_transfer", "t5": "blip2_t5_transfer", "llama": "blip2_llama"}
GENERIC_CAUSAL_LM_ARCH = "blip2_causal_lm"


def projector_name_of(arch: str) -> str:
    """The projector prefix of a registered model architecture, e.g. 'blip2_llama' -> 'llama_proj'."""
    if arch in LAVIS_PROJECTOR_NAMES:
        return LAVIS_PROJECTOR_NAMES[arch]
    cls = registry.get_model_class(arch)
    if cls is None:
        raise KeyError(f"unknown model architecture {arch!r}; registered: {sorted(registry.list_models())}")
    name = getattr(cls, "projector_name", None)
    if name is None:
        raise KeyError(f"model architecture {arch!r} has no projector")
    return name


def known_projector_names() -> set:
    """Every projector prefix a registered BLIP-2-style model uses."""
    names = set(LAVIS_PROJECTOR_NAMES.values())
    for arch in registry.list_models():
        name = getattr(registry.get_model_class(arch), "projector_name", None)
        if name:
            names.add(name)
    return names

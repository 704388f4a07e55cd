"""The memory plan (lavis_vpgtrans/plan/): its weights are the built model's, byte for byte; its
totals are checked against the memory a training step actually allocates; the CLI's verdict."""

import pytest
import torch

from helpers import load_tiny

TOY_MODELS = [
    ("blip2_opt_transfer", "tiny_opt_small", {}),
    ("blip2_opt_transfer", "tiny_opt_small", {"llm_precision": "bf16", "vit_precision": "fp16"}),
    ("blip2_llama", "tiny_llama", {"llm_precision": "bf16"}),
    ("blip2_t5_transfer", "tiny_t5", {"llm_precision": "fp16"}),  # T5's wo stays fp32
]


def _stored_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _model_cfg(arch, model_type, overrides):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class(arch)
    return OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)


@pytest.mark.parametrize("arch,model_type,overrides", TOY_MODELS)
def test_weights_equal_the_built_models(plugin, arch, model_type, overrides):
    """Every part's parameter count and stored bytes, planned on the meta device, equal the model's."""
    from lavis_vpgtrans.plan.weights import model_parts

    parts = {p.name: p for p in model_parts(_model_cfg(arch, model_type, overrides), stage=2)["parts"]}
    model = load_tiny(arch, model_type, **overrides)
    built = {"ViT": model.visual_encoder, "ln_vision": model.ln_vision, "projector": model.projector,
             "LLM": model.llm_model}
    for name, module in built.items():
        assert parts[name].params == sum(p.numel() for p in module.parameters()), name
        assert parts[name].bytes == _stored_bytes(module), name
    queries = model.query_tokens.numel()
    assert parts["Q-Former"].params == sum(p.numel() for p in model.Qformer.parameters()) + queries
    assert parts["Q-Former"].bytes == _stored_bytes(model.Qformer) + queries * 4
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.trainable_params for p in parts.values()) == trainable


@pytest.mark.parametrize("bits,double_quant", [(4, True), (4, False), (8, None)])
def test_quantized_linear_bytes_equal_bitsandbytes(bits, double_quant):
    """A bitsandbytes Linear4bit (NF4, block 64, with / without double quantisation) or
    Linear8bitLt, quantised on CPU: its weight and quantisation state take what the plan says."""
    bnb = pytest.importorskip("bitsandbytes")
    from lavis_vpgtrans.plan.weights import quantized_linear_bytes

    out_f, in_f = 1000, 384  # not a multiple of 64 * 256: the last blocks are partial
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=double_quant, quant_type="nf4")
        layer.weight.data = layer.weight.data.to(torch.bfloat16)
        layer = layer.to("cpu")  # quantises
        state = layer.weight.quant_state
        tensors = [layer.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.offset]  # (state2.code is one table shared by all layers)
    else:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False).to("cpu")
        tensors = [layer.weight.data, layer.weight.SCB]
    assert sum(t.untyped_storage().nbytes() for t in tensors) == quantized_linear_bytes(out_f, in_f, bits, double_quant)

"""The released configs' precisions (fp16 ViT, fp16 / bf16 LLM) run on CPU: forward, backward and
generate for OPT, LLaMA and Flan-T5, with the loss near the fp32 model's."""

import pytest
import torch

FAMILIES = {"opt": ("blip2_opt_transfer", "tiny_opt_large"), "llama": ("blip2_llama", "tiny_llama"),
            "t5": ("blip2_t5_transfer", "tiny_t5")}
# (vit_precision, llm_precision): the released BLIP-2 OPT / LLaMA configs (fp16, fp16), Flan-T5's
# LLM in bf16 next to the fp16 ViT, and a bf16 LLM next to an fp32 ViT
PRECISIONS = [("fp16", "fp16"), ("fp16", "bf16"), ("fp32", "bf16")]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def samples(family):
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a red square at the top left", "two blue circles"]
    if family == "t5":
        return {"image": image, "text_input": ["", ""], "text_output": texts}
    return {"image": image, "text_input": texts}


def build(family, vit_precision, llm_precision):
    from helpers import load_tiny

    torch.manual_seed(0)
    name, model_type = FAMILIES[family]
    return load_tiny(name, model_type, vit_precision=vit_precision, llm_precision=llm_precision, train_vpg=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("vit_precision, llm_precision", PRECISIONS)
def test_low_precision_forward_backward_generate_on_cpu(plugin, family, vit_precision, llm_precision):
    reference = build(family, "fp32", "fp32").eval()
    model = build(family, vit_precision, llm_precision)
    assert model.llm_model.get_input_embeddings().weight.dtype == DTYPES[llm_precision]
    assert next(model.visual_encoder.parameters()).dtype == DTYPES[vit_precision]
    with torch.no_grad():
        expected = reference(samples(family))["loss"].item()
        got = model.eval()(samples(family))["loss"].item()
    assert got == pytest.approx(expected, rel=0.05)  # bf16 keeps ~3 significant digits

    model.train()
    model(samples(family))["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # the trained part stays fp32
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    with torch.no_grad():
        captions = model.eval().generate({"image": samples(family)["image"]}, max_length=6, num_beams=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_a_vit_precision_lavis_does_not_convert_to_is_an_error(plugin):
    with pytest.raises(ValueError, match="vit_precision must be one of \\['fp16', 'fp32'\\], got 'bf16'"):
        build("opt", "bf16", "bf16")

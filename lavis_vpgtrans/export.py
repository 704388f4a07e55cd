"""Export a trained VL-LLM as a transformers `Blip2ForConditionalGeneration`.

    python -m lavis_vpgtrans.export --model-arch blip2_opt_transfer --model-type opt6.7b \\
        --options llm_model=/models/opt-6.7b --checkpoint output/stage2/checkpoint_9.pth --out blip2-vpgtrans-opt6.7b

writes config.json, generation_config.json, safetensors weights (ViT, Q-Former, query tokens,
projector, LLM) and a Blip2Processor (BlipImageProcessor with the model's image size and
LAVIS's normalisation, the LLM's tokenizer). Plain transformers then runs it:

    model = Blip2ForConditionalGeneration.from_pretrained(out)
    processor = Blip2Processor.from_pretrained(out)
    ids = model.generate(**processor(images=image, text="", return_tensors="pt"), num_beams=5, max_new_tokens=30)
    caption = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

The language model stops at our model's end-of-text token (eos_token_id in text_config and
generation_config.json), so the call above generates as our `generate()` does by default.
An end of text of several tokens (e.g. "\\n" for Qwen's tokenizer) is written as
generation_config.stop_strings, which Blip2's generate() does not read by itself: pass
`stop_strings=model.generation_config.stop_strings, tokenizer=processor.tokenizer`, or, to save
its set-up at every call (0.9-1.0 s for Llama-3's and Qwen3's vocabularies: transformers' cache
of it misses), build `StopStringCriteria(processor.tokenizer, model.generation_config.stop_strings)`
once and pass it in `stopping_criteria`, as our models do (models/llm.py stop_on_text).
VL-Vicuna in conversation mode does not fit the layout and is refused. LoRA adapters on the
LLM (llm_lora) are merged into its weights (peft's merge_and_unload); the LLM is exported
unquantised (a model loaded with llm_quantization is refused; the command line loads it without).

What the layout cannot hold, measured at every export. transformers' Blip2VisionModel has one
LayerNorm eps (vision_config.layer_norm_eps) for the ViT blocks' norms and for post_layernorm
(LAVIS's ln_vision); EVA's blocks use 1e-6, ln_vision LayerNorm's default 1e-5. No weights make
up for it (the eps acts through each token's variance), so captions are not promised identical.
The export computes the soft prompts (the language projection's output) of the exported modules
under each of the two eps and those of our model on a probe batch (--probe-images, or 8 seeded
synthetic images: noise, gradients, flat colours, through the model's eval image processor), in
fp32, keeps the eps with the smaller largest difference, prints that difference and records it
in config.json (`vpgtrans_export`). Measured (largest |difference| with the eps kept, the other
eps in brackets; soft prompts of magnitude 1.5-4):
  - the demo world's pre-trained toy ViT (features of variance 18-85): the blocks' 1e-6 is kept,
    6e-7 to 1e-6 (ln_vision's 1e-5: 2e-5 to 4e-4). (EVA ViT-g is not measured: no weights here.)
  - the test zoo's random toy ViT (a few tokens of variance ~1e-3), fresh, trained or perturbed:
    either eps, 1e-6 to 2e-5 (the other 4e-6 to 6e-5); a perturbed, briefly trained model loaded
    by plain transformers gives our greedy and beam-5 generations for 16 images and 4 prompts
    (tests/test_hf_blip2.py);
  - a ViT with features of variance ~1e-6 (the test ViT's residual stream scaled by 1e-3):
    ln_vision's 1e-5 is kept, 0.009 (0.106): too large to promise the same captions.
Float rounding is 6e-7 to 1.2e-6 of each figure (what is left with our LayerNorms at the exported eps).

Image tokens: transformers' current BLIP-2 convention puts `num_query_tokens` "<image>" tokens
in the text and scatters the soft prompts over them. That needs an embedding row for "<image>";
an LLM without a spare row (LLaMA-7B, Vicuna, the toy LMs) must grow its vocabulary, and the new
row's logit then enters every softmax: the exported LLM is no longer the trained one and beam
scores change (captions still agreed on 32 toy images, but nothing guarantees it). The legacy
layout (no image_token_index, the processor without num_query_tokens) concatenates the soft
prompts in front of the text embeddings, exactly as our models do, needs no new row, and
transformers 4.51.3 runs it (with a deprecation warning): we export that.
"""

import argparse
import logging
import os
import shutil
import tempfile

import torch

logger = logging.getLogger(__name__)


def blip2_config(model):
    """transformers' Blip2Config describing `model`'s ViT, Q-Former, query tokens and LLM."""
    from transformers import Blip2Config

    vit, block = model.visual_encoder, model.visual_encoder.blocks[0]
    qf = model.Qformer.config
    return Blip2Config(
        vision_config=dict(
            hidden_size=vit.num_features, intermediate_size=block.mlp.fc1.out_features,
            num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads,
            image_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
            # one eps for the blocks and post_layernorm in transformers: the blocks' (EVA: 1e-6)
            # here; export_hf_blip2 measures whether ln_vision's (1e-5) comes closer (choose_vision_eps)
            layer_norm_eps=block.norm1.eps, qkv_bias=block.attn.q_bias is not None),
        qformer_config=dict(
            hidden_size=qf.hidden_size, num_hidden_layers=qf.num_hidden_layers,
            num_attention_heads=qf.num_attention_heads, intermediate_size=qf.intermediate_size,
            hidden_act=qf.hidden_act, hidden_dropout_prob=qf.hidden_dropout_prob,
            attention_probs_dropout_prob=qf.attention_probs_dropout_prob,
            max_position_embeddings=qf.max_position_embeddings, initializer_range=qf.initializer_range,
            layer_norm_eps=qf.layer_norm_eps, vocab_size=qf.vocab_size, pad_token_id=qf.pad_token_id,
            position_embedding_type=qf.position_embedding_type,
            cross_attention_frequency=qf.cross_attention_freq, encoder_hidden_size=qf.encoder_width),
        text_config=model.llm_model.config.to_dict(),
        num_query_tokens=model.query_tokens.shape[1])


def image_processor_from_lavis(vis_processor):
    """transformers' BlipImageProcessor doing what LAVIS's eval processor does: resize to a
    square (bicubic), scale to [0, 1], normalise with its mean / std."""
    from torchvision import transforms as T
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    steps = {type(t): t for t in vis_processor.transform.transforms}
    resize, norm = steps.get(T.Resize), steps.get(T.Normalize)
    if resize is None or norm is None or set(steps) != {T.Resize, T.ToTensor, T.Normalize}:
        raise ValueError(f"cannot express the image processor {vis_processor.transform} as a BlipImageProcessor")
    if resize.interpolation != T.InterpolationMode.BICUBIC:
        raise ValueError(f"image processor resizes with {resize.interpolation}, BlipImageProcessor here with bicubic")
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    return BlipImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                              image_mean=list(norm.mean), image_std=list(norm.std))


def hf_vpg_state_dict(model):
    """`model`'s VPG and projector under Blip2ForConditionalGeneration's names (no copies but
    the ViT's qkv biases)."""
    from lavis_vpgtrans.models.hf_blip2 import lavis_to_hf
    from lavis_vpgtrans.models.vl_llm import VPG_PREFIXES

    vpg = {k: v for k, v in model.state_dict().items()
           if k.startswith(VPG_PREFIXES + (model.projector_name + ".",))}
    return lavis_to_hf(vpg, model.projector_name, type(model).__name__)


def hf_state_dict(model):
    """`model`'s weights under Blip2ForConditionalGeneration's names."""
    state = hf_vpg_state_dict(model)
    state.update({"language_model." + k: v for k, v in model.llm_model.state_dict().items()})
    return state


# ---------------------------------------------------------------------------- the eps the layout shares

N_PROBE_IMAGES = 8


def probe_images(vis_processor, paths=None, n: int = N_PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """The probe batch the export measures itself on: the images at `paths`, or `n` seeded
    synthetic ones (uniform noise, smooth colour gradients, flat colours in turn), through the
    model's eval image processor."""
    import numpy as np
    from PIL import Image

    if paths:
        images = [Image.open(p).convert("RGB") for p in paths]
    else:
        rng = np.random.default_rng(seed)
        side = 64
        ramp = np.linspace(0.0, 1.0, side)
        images = []
        for i in range(n):
            if i % 3 == 0:
                pixels = rng.integers(0, 256, (side, side, 3))
            elif i % 3 == 1:
                start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
                along = ramp[:, None] if i % 2 else ramp[None, :]
                pixels = start + (end - start) * (along[..., None] * np.ones((side, side, 1)))
            else:
                pixels = np.broadcast_to(rng.integers(0, 256, 3), (side, side, 3))
            images.append(Image.fromarray(np.asarray(pixels, dtype=np.uint8)))
    return torch.stack([vis_processor(im) for im in images])


def _vit_in_fp32(model):
    """Context manager: the model's ViT in fp32 for the measurement, then back in its own
    precision (fp16 / bf16 -> fp32 -> fp16 / bf16 is exact)."""
    import contextlib

    @contextlib.contextmanager
    def manager():
        vit = model.visual_encoder
        dtype, vit_dtype = next(vit.parameters()).dtype, model.vit_dtype
        vit.float()
        model.vit_dtype = torch.float32
        try:
            yield
        finally:
            vit.to(dtype)
            model.vit_dtype = vit_dtype

    return manager()


@torch.no_grad()
def soft_prompt_differences(model, config, pixel_values, eps_values):
    """({eps: largest |soft prompt of transformers' Blip2 modules - ours|}, largest |soft prompt|)
    on `pixel_values`, with vision_config.layer_norm_eps = eps, everything in fp32: the ViT,
    ln_vision, Q-Former and projector of `model` in our code (encode_image), and the same
    tensors loaded into transformers' Blip2VisionModel, Blip2QFormerModel and the language
    projection."""
    import copy

    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

    def module_from(cls, cfg, prefix, state):
        with torch.device("meta"):
            module = cls(cfg)
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True, assign=True)
        return module.eval()

    seen = []
    hook = model.projector.register_forward_hook(lambda module, args, out: seen.append(out.float()))
    try:
        with _vit_in_fp32(model):
            pixel_values = pixel_values.to(model.device, torch.float32)
            model.encode_image(pixel_values)
            ours = seen[-1]
            state = {k: v.float() for k, v in hf_vpg_state_dict(model).items()}
            qformer = module_from(Blip2QFormerModel, config.qformer_config, "qformer.", state)
            differences = {}
            for eps in eps_values:
                vision_config = copy.deepcopy(config.vision_config)
                vision_config.layer_norm_eps = eps
                vision = module_from(Blip2VisionModel, vision_config, "vision_model.", state)
                image_embeds = vision(pixel_values=pixel_values).last_hidden_state
                query = qformer(query_embeds=state["query_tokens"].expand(pixel_values.shape[0], -1, -1),
                                encoder_hidden_states=image_embeds, return_dict=True).last_hidden_state
                theirs = torch.nn.functional.linear(query, state["language_projection.weight"],
                                                    state["language_projection.bias"])
                differences[eps] = (theirs - ours).abs().max().item()
    finally:
        hook.remove()
    return differences, ours.abs().max().item()


def choose_vision_eps(model, config, pixel_values) -> dict:
    """Sets config.vision_config.layer_norm_eps to whichever of the ViT blocks' eps and
    ln_vision's gives the export's soft prompts closer to ours on `pixel_values` (the blocks'
    on a tie) and returns the measurement, as recorded in config.json."""
    blocks_eps, ln_eps = model.visual_encoder.blocks[0].norm1.eps, model.ln_vision.eps
    candidates = list(dict.fromkeys([blocks_eps, ln_eps]))
    differences, largest = soft_prompt_differences(model, config, pixel_values, candidates)
    chosen = min(candidates, key=lambda eps: differences[eps])  # min keeps the first of equals
    config.vision_config.layer_norm_eps = chosen
    return {"vision_layer_norm_eps": chosen, "vit_blocks_eps": blocks_eps, "ln_vision_eps": ln_eps,
            "soft_prompt_max_abs_diff": differences[chosen],
            "soft_prompt_max_abs_diff_by_eps": {repr(eps): d for eps, d in differences.items()},
            "soft_prompt_max_abs": largest, "probe_images": int(pixel_values.shape[0])}


def recorded_measurement(out: str) -> dict:
    """The measurement an export recorded in its config.json."""
    from transformers import Blip2Config

    return Blip2Config.from_pretrained(out).vpgtrans_export


def describe_measurement(m: dict) -> str:
    other = ", ".join(f"{d:.3g} with {eps}" for eps, d in m["soft_prompt_max_abs_diff_by_eps"].items()
                      if float(eps) != m["vision_layer_norm_eps"])
    which = ("the ViT blocks' eps" if m["vision_layer_norm_eps"] == m["vit_blocks_eps"] else "ln_vision's eps")
    return (f"soft prompts of the export vs ours on {m['probe_images']} probe images (fp32): largest |difference| "
            f"{m['soft_prompt_max_abs_diff']:.3g} (largest |soft prompt| {m['soft_prompt_max_abs']:.3g}) with "
            f"vision layer_norm_eps {m['vision_layer_norm_eps']:g}, {which}" + (f"; {other}" if other else ""))


def export_hf_blip2(model, vis_processor, out: str, overwrite: bool = False, probe_paths=None) -> str:
    """Writes `model` (a Blip2VLLLM) as an HF BLIP-2 directory at `out`, atomically:
    everything goes to a temporary sibling directory that replaces `out` only when complete.
    The vision eps is chosen on a probe batch (`probe_paths`: image files; default synthetic,
    probe_images) and the measurement recorded in config.json as `vpgtrans_export`."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

    if getattr(model, "conv_template", None) is not None:
        # VL-Vicuna's chat puts the soft prompts inside a conversation ("###Human: <Img>...</Img>"):
        # the legacy BLIP-2 layout has them only in front of the text
        raise ValueError(f"{type(model).__name__} is in conversation mode (conv_template set); only models that "
                         f"put the soft prompts in front of the text are exported")
    if getattr(model, "llm_quantization", None) is not None:
        raise ValueError(f"{type(model).__name__}: its LLM is quantised ({model.llm_quantization.describe()}); the "
                         f"export writes the LLM unquantised: load the model without llm_quantization")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if getattr(model, "llm_lora", None) is not None:
        # the exported LLM is a plain transformers model: the adapters go into its weights
        logger.info("merging the LLM's LoRA adapters into its weights (merge_and_unload)")
        model.merge_lora()
    config = blip2_config(model)
    measurement = choose_vision_eps(model, config, probe_images(vis_processor, probe_paths))
    config.vpgtrans_export = measurement
    (logger.warning if measurement["soft_prompt_max_abs_diff"] > 1e-3 * measurement["soft_prompt_max_abs"]
     else logger.info)("%s", describe_measurement(measurement))
    tok = model.llm_tokenizer
    # transformers 4.51.3's Blip2 generate() runs the language model's generate, whose defaults
    # come from text_config (not generation_config.json): the end of text goes there, as in
    # HF's own Salesforce/blip2-opt-* configs (eos_token_id 50118 = "\n"). stop_strings cannot:
    # generation_config.json records them, the caller passes them (see the module docstring).
    end = model.generation_end()  # models/llm.py: as our own generate() ends
    config.text_config.eos_token_id = end["eos_token_id"]
    config.text_config.pad_token_id = tok.pad_token_id
    generation = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **end)
    with torch.device("meta"):  # no memory, no random init: every weight is assigned below
        hf = Blip2ForConditionalGeneration(config)
    result = hf.load_state_dict(hf_state_dict(model), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"exported state does not fit Blip2ForConditionalGeneration: missing "
                           f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    hf.generation_config = generation

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export_", dir=os.path.dirname(out))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # padding as in our models (saved with the tokenizer): a decoder-only LLM's batched prompts
        # are left-padded so that each ends where generation starts; T5's encoder input is right-padded
        tokenizer = AutoTokenizer.from_pretrained(tmp, padding_side="right" if model.is_encoder_decoder else "left")
        Blip2Processor(image_processor_from_lavis(vis_processor), tokenizer).save_pretrained(tmp)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".export_old_", dir=os.path.dirname(out))
            os.rename(out, os.path.join(old, "previous"))
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    logger.info("wrote %s (Blip2ForConditionalGeneration, %s LLM)", out, config.text_config.model_type)
    return out


def main(argv=None):
    from lavis_vpgtrans.models.loading import load_chat_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-arch", required=True, help="registered model, e.g. blip2_opt_transfer")
    parser.add_argument("--model-type", required=True, help="its model type, e.g. opt6.7b or tiny_opt_small")
    parser.add_argument("--options", nargs="+", default=[], help="model config overrides, key=value "
                                                                 "(e.g. llm_model=/models/opt-6.7b)")
    parser.add_argument("--checkpoint", default=None, help="trained checkpoint (our runner's checkpoint_N.pth)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--probe-images", nargs="+", default=None,
                        help="images to measure the export's soft prompts against ours on (default: "
                             f"{N_PROBE_IMAGES} synthetic ones)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    # the LLM unquantised whatever the checkpoint's run used (its weights are exported); the
    # run's LoRA adapters, if any, come from the checkpoint's config (load_chat_model)
    model, vis_processor = load_chat_model(args.model_arch, args.model_type, checkpoint=args.checkpoint,
                                           device="cpu", options=[*args.options, "llm_quantization=null"])
    out = export_hf_blip2(model, vis_processor, args.out, overwrite=args.overwrite, probe_paths=args.probe_images)
    print(describe_measurement(recorded_measurement(out)))
    print(out)


if __name__ == "__main__":
    main()

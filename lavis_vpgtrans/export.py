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
generation_config.json); the call above gives the caption our `generate()` gives by default.
An end of text of several tokens (e.g. "\\n" for Qwen's tokenizer) is written as
generation_config.stop_strings, which Blip2's generate() does not read by itself: pass
`stop_strings=model.generation_config.stop_strings, tokenizer=processor.tokenizer`.
OPT, LLaMA and Flan-T5 models round-trip exactly (tests/test_hf_blip2.py); VL-Vicuna in
conversation mode does not fit the layout and is refused.

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
            # is used, ln_vision's 1e-5 is not representable (see hf_blip2's docstring)
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


def hf_state_dict(model):
    """`model`'s weights under Blip2ForConditionalGeneration's names."""
    from lavis_vpgtrans.models.hf_blip2 import lavis_to_hf
    from lavis_vpgtrans.models.vl_llm import VPG_PREFIXES

    vpg = {k: v for k, v in model.state_dict().items()
           if k.startswith(VPG_PREFIXES + (model.projector_name + ".",))}
    state = lavis_to_hf(vpg, model.projector_name, type(model).__name__)
    state.update({"language_model." + k: v for k, v in model.llm_model.state_dict().items()})
    return state


def export_hf_blip2(model, vis_processor, out: str, overwrite: bool = False) -> str:
    """Writes `model` (a Blip2VLLLM) as an HF BLIP-2 directory at `out`, atomically:
    everything goes to a temporary sibling directory that replaces `out` only when complete."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

    if getattr(model, "conv_template", None) is not None:
        # VL-Vicuna's chat puts the soft prompts inside a conversation ("###Human: <Img>...</Img>"):
        # the legacy BLIP-2 layout has them only in front of the text
        raise ValueError(f"{type(model).__name__} is in conversation mode (conv_template set); only models that "
                         f"put the soft prompts in front of the text are exported")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    config = blip2_config(model)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    model, vis_processor = load_chat_model(args.model_arch, args.model_type, checkpoint=args.checkpoint,
                                           device="cpu", options=args.options)
    print(export_hf_blip2(model, vis_processor, args.out, overwrite=args.overwrite))


if __name__ == "__main__":
    main()

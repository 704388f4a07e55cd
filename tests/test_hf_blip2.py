"""HF-format BLIP-2 in and out, checked against transformers' own Blip2ForConditionalGeneration.

In: a tiny Blip2ForConditionalGeneration (toy zoo sizes, random VPG) saved with save_pretrained
is a VPG + projector source for blip2_opt_transfer; its soft prompts equal HF's own.
Out: `python -m lavis_vpgtrans.export` writes a trained model that plain transformers loads and
that captions as our model does; what the layout cannot hold (one LayerNorm eps for the ViT
blocks and ln_vision) is measured by the export, which keeps the better eps and prints the
soft prompts' largest difference.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import load_tiny

N_IMAGES = 8
N_CAPTION_IMAGES = 16


def hf_soft_prompts(hf, pixel_values):
    """transformers' own path: vision_model -> qformer(query tokens) -> language_projection."""
    image_embeds = hf.vision_model(pixel_values=pixel_values).last_hidden_state
    query = hf.qformer(query_embeds=hf.query_tokens.expand(pixel_values.shape[0], -1, -1),
                       encoder_hidden_states=image_embeds, return_dict=True).last_hidden_state
    return hf.language_projection(query)


def val_images(toy_zoo, n):
    """The first `n` toy val images (PIL) and their pixel values from LAVIS's own eval processor."""
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    with open(os.path.join(toy_zoo, "data", "annotations", "caption_val.json")) as f:
        names = sorted({a["image"] for a in json.load(f)})[:n]
    pil = [Image.open(os.path.join(toy_zoo, "data", "images", n)).convert("RGB") for n in names]
    processor = BlipImageEvalProcessor(image_size=32)
    return pil, torch.stack([processor(im) for im in pil]), processor


@pytest.fixture(scope="module")
def images(toy_zoo):
    return val_images(toy_zoo, N_IMAGES)


@pytest.fixture(scope="module")
def hf_dir(toy_zoo, tmp_path_factory):
    """A Blip2ForConditionalGeneration with the toy zoo's sizes, random VPG and projector, the
    toy OPT as its LLM, saved sharded (with an index json) as large checkpoints are."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTForCausalLM

    from lavis_vpgtrans.toy import zoo

    with open(os.path.join(toy_zoo, "bert", "config.json")) as f:
        bert = json.load(f)
    vit = zoo.TOY_VIT
    opt = OPTForCausalLM.from_pretrained(os.path.join(toy_zoo, "opt-small"))
    config = Blip2Config(
        vision_config=dict(hidden_size=vit["embed_dim"], intermediate_size=int(vit["embed_dim"] * vit["mlp_ratio"]),
                           num_hidden_layers=vit["depth"], num_attention_heads=vit["num_heads"],
                           image_size=vit["img_size"], patch_size=vit["patch_size"], layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=bert["hidden_size"], num_hidden_layers=bert["num_hidden_layers"],
                            num_attention_heads=bert["num_attention_heads"],
                            intermediate_size=bert["intermediate_size"], vocab_size=bert["vocab_size"],
                            max_position_embeddings=bert["max_position_embeddings"],
                            cross_attention_frequency=2, encoder_hidden_size=vit["embed_dim"]),
        text_config=opt.config.to_dict(), num_query_tokens=8)
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.language_model.load_state_dict(opt.state_dict())
        for name, p in hf.named_parameters():
            if name.startswith("language_model."):
                continue
            if name.endswith("self_attn.qkv.bias"):  # EVA layout: q and v biases, no key bias
                q, k, v = p.chunk(3)
                q.normal_(std=0.1)
                k.zero_()
                v.normal_(std=0.1)
            else:  # off the init values (LayerNorm ones / zeros) so every tensor is tested
                p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("hf_blip2") / "blip2"
    hf.save_pretrained(out, max_shard_size="200KB")
    assert os.path.isfile(out / "model.safetensors.index.json")
    return str(out), hf


def assert_same_generation(model, hf, processor, pil, pixel_values):
    """Our generate() and transformers' on the same pixels: captions, then continuations of
    prompts of different lengths (padded in a batch), greedy and beam 5. Returns our texts and
    how many of transformers' outputs stopped at the end of text."""
    end_sym = model.end_sym if model.end_sym is not None else processor.tokenizer.eos_token
    # an end of text of several tokens is in generation_config.json, which Blip2's generate() leaves to the caller
    stop_strings = hf.generation_config.stop_strings
    stop = {"stop_strings": stop_strings, "tokenizer": processor.tokenizer} if stop_strings else {}
    texts, stopped = [], 0
    for prompt_set in (["", ""], ["a photo of", "there is a", "two shapes:", "Question: what is it? Answer:"]):
        prompt = [prompt_set[i % len(prompt_set)] for i in range(len(pil))]
        inputs = processor(images=pil, text=prompt, return_tensors="pt", padding=True)
        for num_beams in (1, 5):
            ours = model.generate({"image": pixel_values, "prompt": prompt}, num_beams=num_beams,
                                  max_length=20, min_length=1)
            ids = hf.generate(pixel_values=pixel_values, input_ids=inputs.input_ids,
                              attention_mask=inputs.attention_mask, num_beams=num_beams, max_new_tokens=20,
                              **stop)
            if hf.config.use_decoder_only_language_model:  # the output starts with the prompt's ids
                ids = ids[:, inputs.input_ids.shape[1]:]
            # as our models do: the new text up to the end-of-text token the generation stopped at
            raw = processor.batch_decode(ids, skip_special_tokens=True)
            theirs = [t.split(end_sym)[0].strip() for t in raw]
            assert theirs == ours, (prompt_set, num_beams)
            texts += ours
            if model.end_sym is None:  # the EOS token
                stopped += int((ids == processor.tokenizer.eos_token_id).any(1).sum())
            else:
                stopped += sum(end_sym in t for t in raw)
    return texts, stopped


def ours_from(path):
    return load_tiny("blip2_opt_transfer", "tiny_opt_small", vpg_checkpoint=path, projector_checkpoint=path).eval()


# ---------------------------------------------------------------------------- HF -> LAVIS


def test_hf_blip2_dir_is_a_vpg_and_projector_source(plugin, hf_dir, images):
    path, hf = hf_dir
    model = ours_from(path)
    _, pixel_values, _ = images
    with torch.no_grad():
        theirs = hf_soft_prompts(hf, pixel_values)
        ours = model.encode_image(pixel_values)
        # ln_vision's eps (LayerNorm default 1e-5) vs post_layernorm's (the config's 1e-6) is
        # the only difference: measured 8e-7 here (soft prompts of max |x| ~1.3)
        assert (ours - theirs).abs().max().item() < 1e-5
        model.ln_vision.eps = hf.vision_model.post_layernorm.eps
        assert (model.encode_image(pixel_values) - theirs).abs().max().item() < 1e-5
        # the LLM is the model's own, never taken from the BLIP-2 directory
        assert model.opt_proj.weight.equal(hf.language_projection.weight)


def test_every_key_maps_between_the_two_real_models(plugin, hf_dir):
    """The VPG + projector keys of transformers' Blip2 and of our model map onto each other,
    both ways, with nothing left over."""
    from lavis_vpgtrans.models.hf_blip2 import hf_to_lavis, lavis_to_hf
    from lavis_vpgtrans.models.vl_llm import UNUSED_QFORMER_KEYS, VPG_PREFIXES

    _, hf = hf_dir
    model = load_tiny("blip2_opt_transfer", "tiny_opt_small")
    ours = {k: v for k, v in model.state_dict().items()
            if k.startswith(VPG_PREFIXES + ("opt_proj.",)) and not UNUSED_QFORMER_KEYS.match(k)
            and k != "Qformer.bert.embeddings.position_ids"}
    theirs = {k: v for k, v in hf.state_dict().items() if not k.startswith("language_model.")}
    assert set(hf_to_lavis(theirs, "opt_proj")) == set(ours)
    assert set(lavis_to_hf(ours, "opt_proj")) == set(theirs)
    for key, value in lavis_to_hf(ours, "opt_proj").items():
        assert value.shape == theirs[key].shape, key


def test_renaming_rules(plugin, hf_dir):
    from lavis_vpgtrans.models.hf_blip2 import hf_to_lavis, lavis_to_hf

    _, hf = hf_dir
    sd = hf.state_dict()
    lavis = hf_to_lavis({k: v for k, v in sd.items() if not k.startswith("language_model.")}, "opt_proj")
    qkv_bias = sd["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    q, k, v = qkv_bias.chunk(3)
    assert k.count_nonzero() == 0 and q.count_nonzero() > 0 and v.count_nonzero() > 0
    assert lavis["visual_encoder.blocks.1.attn.q_bias"].equal(q)
    assert lavis["visual_encoder.blocks.1.attn.v_bias"].equal(v)
    expected = {  # LAVIS name: transformers name
        "ln_vision.weight": "vision_model.post_layernorm.weight",
        "ln_vision.bias": "vision_model.post_layernorm.bias",
        "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
        "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
        "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual_encoder.blocks.1.norm1.bias": "vision_model.encoder.layers.1.layer_norm1.bias",
        "visual_encoder.blocks.0.norm2.weight": "vision_model.encoder.layers.0.layer_norm2.weight",
        "visual_encoder.blocks.1.attn.qkv.weight": "vision_model.encoder.layers.1.self_attn.qkv.weight",
        "visual_encoder.blocks.0.attn.proj.bias": "vision_model.encoder.layers.0.self_attn.projection.bias",
        "visual_encoder.blocks.1.mlp.fc2.weight": "vision_model.encoder.layers.1.mlp.fc2.weight",
        "Qformer.bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
        "Qformer.bert.encoder.layer.0.attention.self.query.weight":
            "qformer.encoder.layer.0.attention.attention.query.weight",
        "Qformer.bert.encoder.layer.0.crossattention.self.key.bias":
            "qformer.encoder.layer.0.crossattention.attention.key.bias",
        "Qformer.bert.encoder.layer.1.attention.output.LayerNorm.weight":
            "qformer.encoder.layer.1.attention.output.LayerNorm.weight",
        "Qformer.bert.encoder.layer.1.output_query.dense.weight": "qformer.encoder.layer.1.output_query.dense.weight",
        "query_tokens": "query_tokens",
        "opt_proj.weight": "language_projection.weight",
    }
    for ours, theirs in expected.items():
        assert lavis[ours].equal(sd[theirs]), ours
    back = lavis_to_hf(lavis, "opt_proj")
    assert set(back) == set(sd) - {k for k in sd if k.startswith("language_model.")}
    assert all(back[k].equal(sd[k]) for k in back)


def test_bad_hf_files_give_errors_naming_the_key(plugin, hf_dir, tmp_path):
    from lavis_vpgtrans.common.checkpoint import CheckpointError, load_checkpoint_file
    from lavis_vpgtrans.models.hf_blip2 import lavis_to_hf

    path, hf = hf_dir

    def broken_dir(name, edit):
        """A copy of the HF directory (config + VPG weights) with `edit` applied to its state."""
        state = {k: v.clone() for k, v in hf.state_dict().items() if not k.startswith("language_model.")}
        edit(state)
        out = tmp_path / name
        out.mkdir()
        shutil.copy(os.path.join(path, "config.json"), out)
        save_file(state, str(out / "model.safetensors"))
        return str(out)

    key = "vision_model.encoder.layers.0.self_attn.qkv.bias"
    bad = broken_dir("k_bias", lambda state: state[key].__setitem__(48 + 3, 0.5))  # one element of the key part
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: '{key}' has a non-zero key bias")):
        load_checkpoint_file(bad)
    missing = "qformer.encoder.layer.1.output_query.dense.weight"
    bad = broken_dir("missing", lambda state: state.pop(missing))
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: missing keys: {missing}")):
        load_checkpoint_file(bad)
    with pytest.raises(CheckpointError, match="not an HF-format BLIP-2"):
        load_checkpoint_file(os.path.join(os.environ["VPGTRANS_TOY_ZOO"], "opt-small"))
    # the other way: what transformers' Blip2 cannot hold
    with pytest.raises(CheckpointError, match=r"visual_encoder\.blocks\.0\.gamma_1"):
        lavis_to_hf({"visual_encoder.blocks.0.gamma_1": torch.ones(48)}, "opt_proj")
    with pytest.raises(CheckpointError, match=r"missing key 'visual_encoder\.blocks\.0\.attn\.v_bias'"):
        lavis_to_hf({"visual_encoder.blocks.0.attn.q_bias": torch.ones(48)}, "opt_proj")


# ---------------------------------------------------------------------------- LAVIS -> HF


def train_briefly(model, processor):
    """A few optimizer steps on toy captions (8 batches of 8): captions that depend on the image."""
    from lavis_vpgtrans.toy import zoo

    root = zoo.resolve("toy:data")
    with open(os.path.join(root, "annotations", "caption_train.json")) as f:
        ann = json.load(f)[:64]
    pixels = torch.stack([processor(Image.open(os.path.join(root, "images", a["image"])).convert("RGB"))
                          for a in ann])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(8):
        batch = slice(8 * step, 8 * step + 8)
        loss = model({"image": pixels[batch], "text_input": [a["caption"] for a in ann[batch]]})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(plugin, images, tmp_path_factory):
    """blip2_opt_transfer after a few optimizer steps on toy captions, and its checkpoint."""
    torch.manual_seed(0)
    model = train_briefly(load_tiny("blip2_opt_transfer", "tiny_opt_small"), images[2])
    ckpt = tmp_path_factory.mktemp("trained") / "checkpoint.pth"
    torch.save({"model": model.trainable_state_dict()}, ckpt)
    return model, str(ckpt)


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "lavis_vpgtrans.export", *args], capture_output=True, text=True,
                          env=dict(os.environ), cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The CLI's export of the trained checkpoint, loaded with plain transformers."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    _, ckpt = trained
    out = str(tmp_path_factory.mktemp("export") / "blip2-toy")
    result = run_export("--model-arch", "blip2_opt_transfer", "--model-type", "tiny_opt_small",
                        "--checkpoint", ckpt, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
            "processor_config.json", "tokenizer_config.json"} <= set(os.listdir(out))
    # it prints what it measured (and records it in config.json)
    assert re.search(r"soft prompts of the export vs ours on 8 probe images \(fp32\): largest \|difference\| "
                     r"[0-9.e-]+ .* with vision layer_norm_eps", result.stdout), result.stdout
    return out, Blip2ForConditionalGeneration.from_pretrained(out).eval(), Blip2Processor.from_pretrained(out)


def layer_norm_eps_set(model, eps):
    """Our ViT blocks' and ln_vision's LayerNorms, all at `eps` (as transformers' Blip2 has them)."""
    import contextlib

    @contextlib.contextmanager
    def manager():
        norms = [model.ln_vision] + [n for b in model.visual_encoder.blocks for n in (b.norm1, b.norm2)]
        saved = [n.eps for n in norms]
        for n in norms:
            n.eps = eps
        try:
            yield
        finally:
            for n, e in zip(norms, saved):
                n.eps = e

    return manager()


def test_export_round_trip_captions(trained, exported, images):
    model, _ = trained
    _, hf, processor = exported
    pil, pixel_values, _ = images
    inputs = processor(images=pil, text=[""] * len(pil), return_tensors="pt")
    # the exported BlipImageProcessor does what LAVIS's eval processor does
    assert (inputs.pixel_values - pixel_values).abs().max().item() < 1e-5
    with torch.no_grad():
        theirs = hf_soft_prompts(hf, pixel_values)
        # the layout's one LayerNorm eps for the ViT blocks (ours 1e-6) and post_layernorm (our
        # ln_vision's 1e-5) is the one difference: measured 2.8e-5 (soft prompts of max |x| ~1.8)
        assert (model.encode_image(pixel_values) - theirs).abs().max().item() < 1e-4
        with layer_norm_eps_set(model, hf.config.vision_config.layer_norm_eps):
            assert (model.encode_image(pixel_values) - theirs).abs().max().item() < 2e-6
    texts, stopped = assert_same_generation(model, hf, processor, pil, pixel_values)
    assert all(texts[:len(pil)]) and len(set(texts)) > 2 and stopped > 0, (texts, stopped)
    assert hf.config.text_config.eos_token_id == hf.generation_config.eos_token_id


def test_exported_dir_loads_back_as_a_vpg_source(trained, exported, images):
    """LAVIS -> HF -> LAVIS is the identity on the VPG and projector."""
    model, _ = trained
    out, _, _ = exported
    back = ours_from(out)
    mine = model.state_dict()
    for key, value in back.state_dict().items():
        if key.startswith(("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens", "opt_proj.")):
            assert value.equal(mine[key]), key


def test_export_refuses_an_existing_dir_and_encoder_decoders(trained, exported, images, tmp_path, capsys):
    from lavis_vpgtrans.export import export_hf_blip2, main

    model, _ = trained
    out, _, _ = exported
    with pytest.raises(SystemExit):  # before loading anything
        main(["--model-arch", "blip2_opt_transfer", "--model-type", "tiny_opt_small", "--out", out])
    assert "--overwrite" in capsys.readouterr().err
    _, _, processor = images
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_hf_blip2(model, processor, str(target))
    export_hf_blip2(model, processor, str(target), overwrite=True)
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export")]
    # VL-Vicuna's chat puts the soft prompts inside the conversation: not a BLIP-2 layout
    with pytest.raises(ValueError, match="conversation mode"):
        export_hf_blip2(load_tiny("blip2_vicuna", "tiny_vl_vicuna"), processor, str(tmp_path / "vicuna"))
    assert not (tmp_path / "vicuna").exists()


# ---------------------------------------------------------------------------- what the layout cannot hold


def perturbed_model(seed=0, vit_stream_scale=1.0):
    """blip2_opt_transfer with every VPG and projector weight moved off its initial value (so no
    LayerNorm is the identity, no bias zero), and optionally the ViT's residual stream scaled by
    `vit_stream_scale` (its patch / class / position embeddings and every block's output
    projections): a ViT whose features have a tiny variance."""
    torch.manual_seed(seed)
    model = load_tiny("blip2_opt_transfer", "tiny_opt_small").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens", "opt_proj.")):
                p.add_(0.05 * torch.randn_like(p))
        vit = model.visual_encoder
        stream = [vit.cls_token, vit.pos_embed, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias]
        for b in vit.blocks:
            stream += [b.attn.proj.weight, b.attn.proj.bias, b.mlp.fc2.weight, b.mlp.fc2.bias]
        for t in stream:
            t.mul_(vit_stream_scale)
    return model


def export_and_reload(model, vis_processor, out):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from lavis_vpgtrans.export import export_hf_blip2, recorded_measurement

    out = export_hf_blip2(model, vis_processor, str(out))
    return (Blip2ForConditionalGeneration.from_pretrained(out).eval(), Blip2Processor.from_pretrained(out),
            recorded_measurement(out))


def test_perturbed_export_captions_as_ours(plugin, toy_zoo, tmp_path):
    """Issue 23: a model off its initial weights (perturbed, then trained briefly), exported and
    loaded by plain transformers, gives our greedy and beam-5 captions of 16 images, and says
    how far its soft prompts are from ours (the layout's one LayerNorm eps for the ViT blocks and
    ln_vision is the one thing it cannot hold)."""
    pil, pixel_values, vis_processor = val_images(toy_zoo, N_CAPTION_IMAGES)
    model = train_briefly(perturbed_model(), vis_processor)
    hf, processor, measured = export_and_reload(model, vis_processor, tmp_path / "perturbed")
    # the eps that came closer on the probe batch (here ln_vision's: 2e-5 with the blocks' 1e-6)
    by_eps = {float(eps): d for eps, d in measured["soft_prompt_max_abs_diff_by_eps"].items()}
    assert measured["vision_layer_norm_eps"] == hf.config.vision_config.layer_norm_eps == min(by_eps, key=by_eps.get)
    assert measured["soft_prompt_max_abs_diff"] < 1e-4 * measured["soft_prompt_max_abs"]
    with torch.no_grad():
        assert (model.encode_image(pixel_values) - hf_soft_prompts(hf, pixel_values)).abs().max().item() < 1e-4
    # captions (the test zoo's toy models say much the same for every image) and continuations of
    # four prompts, greedy and beam 5: 64 generations each way
    texts, stopped = assert_same_generation(model, hf, processor, pil, pixel_values)
    assert len(texts) == 4 * N_CAPTION_IMAGES and len(set(texts)) > 2 and stopped > 0, (texts, stopped)


def test_export_keeps_the_eps_that_comes_closer_and_says_how_close(plugin, toy_zoo, tmp_path):
    """A ViT whose features have a variance of ~1e-6: there the eps matters, and ln_vision's
    (1e-5) comes closer than the blocks' (1e-6) the layout used to take. The export keeps it and
    records the difference that plain transformers' model then shows on the probe batch."""
    from lavis_vpgtrans.export import probe_images

    _, _, vis_processor = val_images(toy_zoo, 1)
    model = perturbed_model(vit_stream_scale=1e-3)
    hf, _, measured = export_and_reload(model, vis_processor, tmp_path / "small_variance")
    by_eps = {float(eps): d for eps, d in measured["soft_prompt_max_abs_diff_by_eps"].items()}
    assert set(by_eps) == {1e-6, 1e-5}
    assert measured["vision_layer_norm_eps"] == hf.config.vision_config.layer_norm_eps == 1e-5
    assert by_eps[1e-5] < by_eps[1e-6] / 5  # measured 0.0086 vs 0.106
    probe = probe_images(vis_processor)
    with torch.no_grad():
        reloaded = (model.encode_image(probe) - hf_soft_prompts(hf, probe)).abs().max().item()
        assert reloaded == pytest.approx(measured["soft_prompt_max_abs_diff"], rel=1e-3)
        # explained: with our LayerNorms at the exported eps, ours equal theirs
        with layer_norm_eps_set(model, 1e-5):
            assert (model.encode_image(probe) - hf_soft_prompts(hf, probe)).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch, model_type, options", [
    ("blip2_t5_transfer", "tiny_t5", {}),
    ("blip2_llama", "tiny_llama", {"end_sym": "top right"})])
def test_untrained_export_round_trip(plugin, images, tmp_path, arch, model_type, options):
    """An encoder-decoder (Flan-T5 layout, with LAVIS's exact-GELU override) round-trips too, and
    so does LLaMA (no spare vocabulary row, SentencePiece) with an end of text of several tokens
    (stop_strings; a phrase the toy LMs say often, so that generation does stop on it)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from lavis_vpgtrans.export import export_hf_blip2

    pil, pixel_values, vis_processor = images
    torch.manual_seed(0)
    model = load_tiny(arch, model_type, **options).eval()
    out = export_hf_blip2(model, vis_processor, str(tmp_path / model_type))
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    assert hf.config.use_decoder_only_language_model == (not model.is_encoder_decoder)
    assert (model.end_token_id is None) == bool(options), "the multi-token case must be one"
    with torch.no_grad():
        assert (model.encode_image(pixel_values) - hf_soft_prompts(hf, pixel_values)).abs().max().item() < 1e-4
    texts, stopped = assert_same_generation(model, hf, processor, pil, pixel_values)
    assert len(set(texts)) > 2 and stopped > 0, (texts, stopped)

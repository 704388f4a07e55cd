"""The registered VL-LLMs on the tiny zoo: loading, training, generation, freezing."""

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import load_tiny as load

TINY_TYPES = {
    "blip2_opt_transfer": ["tiny_opt_small", "tiny_opt_large"],
    "blip2_t5_transfer": ["tiny_t5"],
    "blip2_llama": ["tiny_llama"],
    "blip2_vicuna": ["tiny_vicuna"],
    "blip2_vicuna_vpgtrans": ["tiny_vicuna"],
    "blip2_causal_lm": ["tiny_causal_lm"],
}
FAMILIES = {"opt": ("blip2_opt_transfer", "tiny_opt_small", "opt_proj"),
            "llama": ("blip2_llama", "tiny_llama", "llama_proj"),
            "t5": ("blip2_t5_transfer", "tiny_t5", "t5_proj")}


@pytest.fixture(scope="module")
def caption_batches(plugin):
    from lavis.common.registry import registry

    train = registry.get_builder_class("toy_caption")().build_datasets()["train"]
    loader = DataLoader(train, batch_size=8, shuffle=False, collate_fn=train.collater)
    return [batch for _, batch in zip(range(2), loader)]


@pytest.mark.parametrize("name,model_type", [(n, t) for n, ts in TINY_TYPES.items() for t in ts])
def test_load_model_by_name(plugin, name, model_type):
    from lavis.models import load_model

    model = load_model(name, model_type)
    assert type(model).__name__.startswith("Blip2")
    assert model.projector.out_features == model.llm_model.get_input_embeddings().embedding_dim


def test_a_target_whose_embeddings_are_narrower_than_its_hidden_size(plugin, toy_zoo, tmp_path):
    """OPT-350M's word embeddings are 512 wide under a hidden size of 1024 (project_in / project_out):
    the projector maps to the embeddings' width, where the soft prompts enter (a projector to the
    hidden size failed: "Expected size 1024 but got size 512"). A random OPT of that shape here."""
    import os

    from transformers import AutoConfig, AutoTokenizer, OPTForCausalLM

    source = os.path.join(toy_zoo, "opt-small")
    config = AutoConfig.from_pretrained(source)
    config.update({"hidden_size": 2 * config.hidden_size, "ffn_dim": 2 * config.ffn_dim,
                   "word_embed_proj_dim": config.hidden_size, "do_layer_norm_before": False})
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "opt")
    model = load("blip2_opt_transfer", "tiny_opt_small", llm_model=str(tmp_path / "opt"))
    assert model.projector.out_features == config.word_embed_proj_dim != config.hidden_size
    images = torch.randn(2, 3, 32, 32)
    loss = model({"image": images, "text_input": ["a red square", "a blue circle"]})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.projector.weight.grad.abs().sum() > 0
    assert len(model.generate({"image": images}, num_beams=1, max_length=3)) == 2


def test_every_registered_name_has_a_tiny_type(plugin):
    from lavis.common.registry import registry

    from lavis_vpgtrans.models import Blip2VLLLM

    vl_llms = {n for n in registry.list_models() if issubclass(registry.get_model_class(n), Blip2VLLLM)}
    assert vl_llms == set(TINY_TYPES)


# The generic class's model types for current open LLMs: hub id and the dtype it ships in.
CAUSAL_LM_TYPES = {"llama3_8b": ("meta-llama/Meta-Llama-3-8B", "bf16"),
                   "qwen2.5_7b": ("Qwen/Qwen2.5-7B", "bf16"),
                   "mistral_7b": ("mistralai/Mistral-7B-v0.1", "bf16")}


def test_generic_causal_lm_model_types(plugin):
    import os

    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class("blip2_causal_lm")
    assert cls.projector_name == "llm_proj" and cls.default_end_sym == "\n"
    assert set(CAUSAL_LM_TYPES) < set(cls.PRETRAINED_MODEL_CONFIG_DICT)
    assert not any(os.path.isabs(p) for p in cls.PRETRAINED_MODEL_CONFIG_DICT.values())
    released_opt67 = OmegaConf.load(registry.get_model_class("blip2_opt_transfer").default_config_path(
        "pretrain_opt6.7b")).model.vpg_checkpoint
    for model_type, (hub_id, precision) in CAUSAL_LM_TYPES.items():
        cfg = OmegaConf.load(cls.default_config_path(model_type)).model
        assert (cfg.arch, cfg.model_type, cfg.llm_model, cfg.llm_precision) == (
            "blip2_causal_lm", model_type, hub_id, precision)
        # the VPG of the released BLIP-2 OPT-6.7B; the projector comes from the converter
        assert cfg.vpg_checkpoint == released_opt67 and cfg.projector_checkpoint is None
        assert cfg.end_sym == "\n"
    # LLaMA-1 / Vicuna keep their own classes and names
    assert "llama7b" not in cls.PRETRAINED_MODEL_CONFIG_DICT
    assert registry.get_model_class("blip2_llama").projector_name == "llama_proj"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_lowers_the_loss(plugin, family, caption_batches):
    name, model_type, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = load(name, model_type)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    batch = caption_batches[0]

    def loss():
        return model(batch)["loss"]

    with torch.no_grad():
        model.eval()
        before = loss().item()
        model.train()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        model.eval()
        after = loss().item()
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_and_predict_answers(plugin, family, caption_batches):
    name, model_type, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = load(name, model_type).eval()
    images = caption_batches[0]["image"][:3]

    beams = model.generate({"image": images}, num_beams=3, max_length=6)
    assert len(beams) == 3 and all(isinstance(c, str) for c in beams)
    sampled = model.generate({"image": images}, use_nucleus_sampling=True, max_length=6, num_captions=2)
    assert len(sampled) == 6 and all(isinstance(c, str) for c in sampled)
    beams_again = model.generate({"image": images}, num_beams=3, max_length=6)
    assert beams_again == beams  # beam search is deterministic

    questions = ["what color is the circle?", "how many shapes are there?", "is there a red square?"]
    answers = model.predict_answers({"image": images, "text_input": questions}, num_beams=2, max_len=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="rank"):
        model.predict_answers({"image": images, "text_input": questions}, inference_method="rank")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("train_vpg", [False, True])
def test_freeze_modes(plugin, family, train_vpg):
    name, model_type, projector = FAMILIES[family]
    model = load(name, model_type, train_vpg=train_vpg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    projector_keys = {f"{projector}.weight", f"{projector}.bias"}
    if not train_vpg:
        assert trainable == projector_keys
    else:
        vpg = {n for n, _ in model.named_parameters()
               if n.startswith(("Qformer.", "ln_vision.")) or n == "query_tokens"}
        assert trainable == projector_keys | vpg
        assert "query_tokens" in trainable and "ln_vision.weight" in trainable
        assert any(n.startswith("Qformer.bert.encoder.layer.0.crossattention.") for n in trainable)
    assert not any(n.startswith(("visual_encoder.", "llm_model.")) for n in trainable)

    model.train()  # what LAVIS's runner calls every epoch
    assert not model.visual_encoder.training and not model.llm_model.training
    assert model.Qformer.training == train_vpg
    assert model.projector.training


def test_eva_vit_directory_round_trip_and_errors(plugin, tmp_path):
    from lavis_vpgtrans.models.eva_vit import build_eva_vit, load_eva_vit_dir, save_eva_vit_dir

    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True)
    torch.manual_seed(0)
    vit = build_eva_vit(cfg).eval()
    save_eva_vit_dir(vit, cfg, str(tmp_path / "vit"))
    loaded, ln_vision = load_eva_vit_dir(str(tmp_path / "vit"), 32, precision="fp32", name="my-vit")
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(image), vit(image), rtol=0, atol=0)
    assert ln_vision.normalized_shape == (48,)
    with pytest.raises(ValueError, match="vit_model 'my-vit' was built for image size 32, the model config asks "
                                         "for 224"):
        load_eva_vit_dir(str(tmp_path / "vit"), 224, name="my-vit")
    with pytest.raises(FileNotFoundError, match="vit_model 'other': expected 'eva_clip_g', 'clip_L' or a directory"):
        load_eva_vit_dir(str(tmp_path), 32, name="other")

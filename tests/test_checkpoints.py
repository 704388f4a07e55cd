"""VPG inheritance, projector loading and trained-checkpoint loading: reports and errors."""

import logging

import pytest
import torch

from helpers import load_tiny as load


class Payload:
    """An arbitrary pickled object, which a safe loader must refuse."""


@pytest.fixture(scope="module")
def opt_model(plugin):
    return load("blip2_opt_transfer", "tiny_opt_small")


def blip2_stage1_like(model):
    """A LAVIS BLIP-2 checkpoint as the real ones look: the VPG, the source LLM's projector,
    stage-1 heads and the Q-Former's text side (which a VL-LLM drops)."""
    state = {k: v.clone() + 1.0 for k, v in model.state_dict().items()
             if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    hidden = model.Qformer.config.hidden_size
    state["Qformer.cls.predictions.bias"] = torch.zeros(10)
    state["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(10, hidden)
    state["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(4, hidden)
    state["vision_proj.weight"] = torch.zeros(4, hidden)
    state["opt_proj.weight"] = torch.zeros(7, hidden)
    state["opt_proj.bias"] = torch.zeros(7)
    return state


def test_vpg_inheritance_loads_the_vpg_and_reports_what_it_drops(tmp_path, plugin, caplog):
    model = load("blip2_llama", "tiny_llama")
    source = blip2_stage1_like(model)
    path = tmp_path / "blip2_source.pth"
    torch.save({"model": source}, path)
    projector_before = model.projector.weight.clone()

    with caplog.at_level(logging.INFO):
        report = model.load_vpg(str(path))

    assert torch.equal(model.query_tokens, source["query_tokens"])
    assert torch.equal(model.ln_vision.weight, source["ln_vision.weight"])
    assert torch.equal(model.projector.weight, projector_before)  # llama_proj untouched
    assert "opt_proj.weight" in report.dropped and "vision_proj.weight" in report.dropped
    assert "Qformer.cls.predictions.bias" in report.dropped
    assert "Qformer.bert.encoder.layer.0.intermediate.dense.weight" in report.dropped
    assert not report.missing and not report.unexpected
    assert "dropped by design" in caplog.text and "kept from vit_model" in caplog.text


def test_vpg_checkpoint_with_missing_qformer_key_fails_naming_it(tmp_path, plugin, opt_model):
    source = blip2_stage1_like(opt_model)
    del source["query_tokens"]
    torch.save({"model": source}, tmp_path / "ckpt.pth")
    from lavis_vpgtrans.common.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="missing keys: query_tokens"):
        opt_model.load_vpg(str(tmp_path / "ckpt.pth"))


def test_shape_mismatch_fails_naming_key_and_shapes(tmp_path, plugin, opt_model):
    from lavis_vpgtrans.common.checkpoint import CheckpointError

    state = dict(opt_model.trainable_state_dict())
    state["opt_proj.weight"] = torch.zeros(3, 5)
    torch.save({"model": state}, tmp_path / "bad_shape.pth")
    with pytest.raises(CheckpointError, match=r"'opt_proj.weight'.*\(3, 5\).*\(32, 64\)"):
        opt_model.load_checkpoint(str(tmp_path / "bad_shape.pth"))


def test_trained_checkpoint_round_trip_and_missing_key(tmp_path, plugin):
    from lavis_vpgtrans.common.checkpoint import CheckpointError

    trained = load("blip2_opt_transfer", "tiny_opt_small")
    with torch.no_grad():
        trained.projector.weight.add_(1.0)
    state = trained.trainable_state_dict()
    assert all(not k.startswith(("visual_encoder.", "llm_model.")) for k in state)
    torch.save({"model": state}, tmp_path / "trained.pth")

    fresh = load("blip2_opt_transfer", "tiny_opt_small")
    fresh.load_checkpoint(str(tmp_path / "trained.pth"))
    assert torch.equal(fresh.projector.weight, trained.projector.weight)

    del state["query_tokens"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys: query_tokens"):
        fresh.load_checkpoint(str(tmp_path / "partial.pth"))

    state["not_a_param"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys.*not_a_param"):
        fresh.load_checkpoint(str(tmp_path / "extra.pth"))


def test_projector_checkpoint_is_found_by_projector_name(tmp_path, plugin):
    model = load("blip2_llama", "tiny_llama")
    hidden_in, hidden_out = model.projector.in_features, model.projector.out_features
    weight, bias = torch.randn(hidden_out, hidden_in), torch.randn(hidden_out)
    torch.save({"model": {"opt_proj.weight": weight, "opt_proj.bias": bias}}, tmp_path / "proj.pth")
    model.load_projector(str(tmp_path / "proj.pth"))  # a single known projector: renamed
    assert torch.equal(model.projector.weight, weight) and torch.equal(model.projector.bias, bias)

    from lavis_vpgtrans.common.checkpoint import CheckpointError

    torch.save({"model": {"opt_proj.weight": weight, "opt_proj.bias": bias,
                          "t5_proj.weight": weight, "t5_proj.bias": bias}}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"found \['opt_proj', 't5_proj'\]"):
        model.load_projector(str(tmp_path / "two.pth"))


def test_pickled_objects_are_refused(tmp_path, plugin, opt_model):
    from lavis_vpgtrans.common.checkpoint import CheckpointError

    torch.save({"model": {}, "payload": Payload()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        opt_model.load_checkpoint(str(tmp_path / "pickle.pth"))


def vpgtrans_release_layout(model, num_layers=32):
    """A checkpoint as the official VPGTrans runner saves vl-llama.pth / vl-vicuna.pth: LAVIS's
    {"model", "optimizer", "config", "scaler", "epoch"} with model = state_dict() minus frozen
    parameters, so persistent buffers stay: with its transformers-4.28 LLaMA (attribute
    `llama_model`) the rotary inv_freq of every layer, and the Q-Former's position_ids."""
    state = {k: v.clone() + 0.5 for k, v in model.trainable_state_dict().items()}
    position_ids = model.state_dict()["Qformer.bert.embeddings.position_ids"]
    state["Qformer.bert.embeddings.position_ids"] = position_ids.clone()
    head_dim = model.llm_model.config.hidden_size // model.llm_model.config.num_attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(num_layers):
        state[f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
            "config": {"model": {"arch": "blip2_vicuna", "end_sym": "###"}, "run": {"max_epoch": 5}},
            "scaler": {"scale": 65536.0}, "epoch": 4}


@pytest.mark.parametrize("name,model_type", [("blip2_llama", "tiny_llama"), ("blip2_vicuna", "tiny_vl_vicuna")])
def test_released_vpgtrans_layout_loads_and_reports_the_dropped_llm_buffers(tmp_path, plugin, caplog, name,
                                                                           model_type):
    """Issue 12: vl-llama.pth / vl-vicuna.pth failed with `unexpected keys not in the model:
    llama_model.model.layers.0.self_attn.rotary_emb.inv_freq, ...`."""
    source = load(name, model_type)
    ckpt = vpgtrans_release_layout(source)
    path = tmp_path / "vl-release.pth"
    torch.save(ckpt, path)
    buffers = sorted(k for k in ckpt["model"] if k.startswith("llama_model."))

    with caplog.at_level(logging.INFO):
        model = load(name, model_type, finetuned=str(path), load_finetuned=True)
    for key, value in source.trainable_state_dict().items():
        assert torch.equal(model.state_dict()[key], value + 0.5), key
    assert "dropped by design" in caplog.text and buffers[0] in caplog.text
    llm_before = {k: v.clone() for k, v in model.llm_model.state_dict().items()}

    report = model.load_checkpoint(str(path))
    assert sorted(report.dropped) == buffers and len(buffers) == 32
    assert not report.missing and not report.unexpected
    assert "Qformer.bert.embeddings.position_ids" in report.loaded
    assert all(torch.equal(v, llm_before[k]) for k, v in model.llm_model.state_dict().items())

    # only the frozen LLM's rotary buffers are dropped by design: anything else is still an error
    from lavis_vpgtrans.common.checkpoint import CheckpointError

    for stray in ("llama_model.model.layers.0.self_attn.q_proj.weight", "llama_model.model.layers.0.bias",
                  "Qformer.bert.embeddings.rotary_emb.inv_freq"):
        bad = dict(ckpt, model={**ckpt["model"], stray: torch.zeros(1)})
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match="unexpected keys.*" + stray.replace(".", r"\.")):
            model.load_checkpoint(str(tmp_path / "bad.pth"))

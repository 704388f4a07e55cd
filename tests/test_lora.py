"""LoRA adapters on the LLM (llm_lora, models/lora.py, peft): training through the runner train.py
builds changes only the adapters and the VPG, resumes bit-exactly, the export merges the
adapters (captions through plain transformers identical to the unmerged model's, in fp32), the
chat loader reads them from a checkpoint, and QLoRA (4-bit LLM + LoRA) runs VL-Vicuna's stage 3."""

import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION_CFG = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_caption_opt.yaml")
INSTRUCT_CFG = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_vicuna_instruct.yaml")
LORA = ["model.llm_lora.r=4", "model.llm_lora.alpha=8", "model.llm_lora.dropout=0.1"]
# two one-step inner epochs (a checkpoint after each), no validation
TWO_STEPS = ["run.iters_per_inner_epoch=1", "run.max_iters=2", "run.batch_size_train=4", "run.warmup_steps=1",
             "run.valid_splits=[]", "run.test_splits=[]"]
VPG = ("opt_proj.", "Qformer.", "query_tokens", "ln_vision.")


def build_runner(cfg, out, *options):
    from lavis_vpgtrans.runners.launch import build

    return build(["--cfg-path", cfg, "--options", f"run.output_dir={out}", "run.job_id=job", *TWO_STEPS, *options],
                 "test", evaluate=False)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def checkpoint(job, n):
    return torch.load(job / f"checkpoint_{n}.pth", weights_only=True)


def write_caption_config(tmp, toy_zoo, n=8):
    """Your-own-data captions (projects/own_data/caption_json.yaml) on the tiny OPT with LoRA: the
    first `n` toy captions, epoch-based (each epoch is seeded, so a resumed epoch repeats exactly;
    an iteration-based run resumes with its data stream restarted)."""
    import json

    import yaml

    with open(os.path.join(toy_zoo, "data", "annotations", "caption_train.json")) as f:
        records = json.load(f)[:n]
    with open(tmp / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in records)
    proc = {"name": "blip_image_eval", "image_size": 32}
    files = {"storage": "train.jsonl"}
    config = {
        "base": os.path.join(REPO, "projects", "own_data", "caption_json.yaml"),
        "model": {"model_type": "tiny_opt_small", "llm_lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "datasets": {"own_caption": {"data_root": str(tmp), "vis_processor": {"train": proc, "eval": proc},
                                     "build_info": {"annotations": {"train": files, "val": files},
                                                    "images": {"storage": os.path.join(toy_zoo, "data", "images")}}}},
        "run": {"max_epoch": 2, "batch_size_train": 4, "num_workers": 0, "warmup_steps": 1, "init_lr": 1e-3,
                "amp": False, "valid_splits": [], "test_splits": [], "device": "cpu", "distributed": False},
    }
    with open(tmp / "lora.yaml", "w") as f:
        yaml.safe_dump(config, f)
    return str(tmp / "lora.yaml")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, plugin, toy_zoo):
    """Stage-2 training of the toy OPT VL-LLM with LoRA through the runner train.py builds: two
    epochs of two steps, and the same run resumed after the first epoch."""
    from lavis_vpgtrans.runners.launch import build

    out = tmp_path_factory.mktemp("lora")
    cfg = write_caption_config(out, toy_zoo)

    def runner(name, *options):
        return build(["--cfg-path", cfg, "--options", f"run.output_dir={out / name}", "run.job_id=job", *options],
                     "test", evaluate=False)

    full = runner("full")
    model = full.unwrap_dist_model(full.model)
    before = params(model)
    full.train()
    runner("resumed", f"run.resume_ckpt_path={out}/full/job/checkpoint_0.pth").train()
    return {"model": model, "before": before, "after": params(model), "job": out / "full" / "job",
            "resumed_job": out / "resumed" / "job"}


def test_training_changes_only_the_adapters_and_the_vpg(lora_run):
    model, before, after = lora_run["model"], lora_run["before"], lora_run["after"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    # peft's default targets for OPT: q_proj and v_proj of both layers, lora_A and lora_B each
    assert len(adapters) == 2 * 2 * 2 and all(".self_attn.q_proj." in n or ".self_attn.v_proj." in n for n in adapters)
    assert trainable == adapters | {n for n in before if n.startswith(VPG)}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable  # every adapter moved (lora_A too: B is no longer 0 at step 2), nothing frozen
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in adapters)
    assert set(checkpoint(lora_run["job"], 1)["model"]) == trainable  # saved with the trainable parameters


def test_adapters_resume_bit_exactly(lora_run):
    full, resumed = checkpoint(lora_run["job"], 1), checkpoint(lora_run["resumed_job"], 1)
    assert resumed["epoch"] == 1 and set(full["model"]) == set(resumed["model"])
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for key, value in full["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["exp_avg"], value["exp_avg"]), key
    # and the second step moved the adapters from where the first left them
    first = checkpoint(lora_run["job"], 0)["model"]
    assert any(not torch.equal(first[k], v) for k, v in full["model"].items() if ".lora_B." in k)


@pytest.fixture(scope="module")
def perturbed(lora_run, tmp_path_factory):
    """The run's last checkpoint (its config too) with the adapters' B pushed far from 0, so that
    they change the captions."""
    ckpt = checkpoint(lora_run["job"], 1)
    gen = torch.Generator().manual_seed(0)
    ckpt["model"] = {k: v + 0.5 * torch.randn(v.shape, generator=gen) if ".lora_B." in k else v
                     for k, v in ckpt["model"].items()}
    path = tmp_path_factory.mktemp("perturbed") / "checkpoint.pth"
    torch.save(ckpt, path)
    return str(path)


def test_export_merges_the_adapters_captions_as_the_unmerged_model(perturbed, tmp_path, toy_zoo):
    """`python -m lavis_vpgtrans.export` on a LoRA checkpoint: plain transformers' Blip2 generates
    what our unmerged model does (greedy and beam 5, captions and prompted), in fp32."""
    from test_hf_blip2 import assert_same_generation, layer_norm_eps_set, val_images
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from lavis_vpgtrans import export
    from lavis_vpgtrans.models.loading import load_chat_model

    out = str(tmp_path / "blip2-lora")
    export.main(["--model-arch", "blip2_opt_transfer", "--model-type", "tiny_opt_small", "--checkpoint", perturbed,
                 "--out", out])
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    assert not any("lora" in k for k in hf.state_dict())

    ours, _ = load_chat_model("blip2_opt_transfer", "tiny_opt_small", checkpoint=perturbed, device="cpu")
    assert ours.llm_lora is not None and ours.llm_lora.r == 4  # from the checkpoint's run config
    loaded = dict(ours.named_parameters())
    for key, value in torch.load(perturbed, weights_only=True)["model"].items():
        assert torch.equal(loaded[key].detach(), value), key
    pil, pixel_values, _ = val_images(toy_zoo, 8)
    # the layout's one ViT LayerNorm eps (export.py's doc) set in ours too: what is left is the LLM
    with layer_norm_eps_set(ours, hf.config.vision_config.layer_norm_eps), torch.no_grad():
        texts, _ = assert_same_generation(ours, hf, processor, pil, pixel_values)
        with ours.llm_model.disable_adapter():
            plain = ours.generate({"image": pixel_values}, num_beams=1, max_length=20)
    assert plain != texts[:len(pil)]  # the adapters do change the captions


def test_a_checkpoint_without_adapters_starts_them_fresh_stage_1_leaves_them_frozen(plugin, tmp_path):
    from helpers import load_tiny

    from lavis_vpgtrans.common.checkpoint import CheckpointError

    torch.manual_seed(0)
    stage2 = load_tiny("blip2_t5_transfer", "tiny_t5")
    torch.save({"model": stage2.trainable_state_dict()}, tmp_path / "no_lora.pth")
    model = load_tiny("blip2_t5_transfer", "tiny_t5", llm_lora=True, load_finetuned=True,
                      finetuned=str(tmp_path / "no_lora.pth"))
    samples = {"image": torch.randn(2, 3, 32, 32), "text_input": ["", ""], "text_output": ["a red square", "two"]}
    with torch.no_grad():  # fresh adapters (B = 0) leave the LLM as it was
        assert model.eval()(samples)["loss"].item() == stage2.eval()(samples)["loss"].item()
    adapters = [n for n, p in model.named_parameters() if model.is_adapter(n)]
    # peft's default targets for T5: q and v of every attention (encoder self, decoder self and cross)
    assert adapters and {n.split(".lora_")[0].rsplit(".", 1)[1] for n in adapters} == {"q", "v"}
    assert all(dict(model.named_parameters())[n].requires_grad for n in adapters)
    # one adapter in the file: then all must be
    state = model.trainable_state_dict()
    del state[adapters[0]]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys: " + adapters[0].replace(".", r"\.")):
        model.load_checkpoint(str(tmp_path / "partial.pth"))
    model.set_trainable(train_vpg=False)  # stage 1: the projector alone
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"t5_proj.weight", "t5_proj.bias"}


@pytest.mark.parametrize("value, message", [
    ({"r": 0}, r"model\.llm_lora\.r must be a positive integer, got 0"),
    ({"r": 4, "rank": 8}, r"model\.llm_lora: unknown key\(s\) \['rank'\]"),
    ({"target_modules": "q_proj"}, r"model\.llm_lora\.target_modules must be a non-empty list"),
    ({"dropout": 1.5}, r"model\.llm_lora\.dropout must be in \[0, 1\)"),
])
def test_bad_settings_are_named(value, message, plugin):
    from lavis_vpgtrans.models.lora import LoraSpec

    with pytest.raises(ValueError, match=message):
        LoraSpec.parse(value)


def test_qlora_stage3_vl_vicuna_trains_and_chats(plugin, tmp_path):
    """VL-Vicuna's instruction tuning with the LLM in 4-bit and LoRA on it, then the chat loader
    on its checkpoint (adapters from the run's config, the LLM in 4-bit again)."""
    import bitsandbytes as bnb

    from lavis_vpgtrans.models.loading import load_chat_model

    runner = build_runner(INSTRUCT_CFG, tmp_path, *LORA, "model.llm_quantization.bits=4", "run.batch_size_train=2")
    model = runner.unwrap_dist_model(runner.model)
    assert isinstance(model.llm_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    before = params(model)
    runner.train()
    after = params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and any(".lora_" in n for n in changed)
    assert not any(n.startswith("llm_model.") and ".lora_" not in n for n in changed)
    job = tmp_path / "job"
    assert set(checkpoint(job, 1)["model"]) == trainable

    chat, _ = load_chat_model("blip2_vicuna", "tiny_vl_vicuna", checkpoint=str(job / "checkpoint_1.pth"),
                              device="cpu", options=["llm_quantization.bits=4"])
    assert chat.llm_quantization.bits == 4 and chat.llm_lora.r == 4
    answer = chat.chat(torch.randn(3, 32, 32), "What is in the picture?", max_new_tokens=4)
    assert isinstance(answer, str)


def test_qlora_under_ddp_with_activation_checkpointing_and_its_checkpoint_loads_unquantised(plugin, tmp_path):
    """train.py under torchrun, 2 gloo processes (DDP): the 4-bit OPT with LoRA, activation
    checkpointing on; stage 1 then stage 2. The checkpoint loads into an unquantised LoRA model."""
    import subprocess
    import sys

    from lavis_vpgtrans.models.loading import load_chat_model

    recipe = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_recipe_opt.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(REPO, "train.py"),
         "--cfg-path", recipe, "--options", f"run.output_dir={tmp_path}", "run.job_id=job", "run.distributed=True",
         "run.iters_per_inner_epoch=1", "run.max_iters=2", "run.warmup_epochs=1", "run.warmup_steps=1",
         "run.batch_size_train=4", "run.valid_splits=[]", "run.extra_validation=[]", "run.activation_checkpointing=true",
         "model.llm_quantization.bits=4", "model.llm_lora.r=4"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = checkpoint(tmp_path / "job", 0)["model"], checkpoint(tmp_path / "job", 1)["model"]
    # stage 1 trains the projector alone: adapters a stage-1 checkpoint may hold are still at init (B = 0)
    assert "opt_proj.weight" in first and all(not v.any() for k, v in first.items() if ".lora_B." in k)
    assert any(".lora_B." in k for k in last) and any(k.startswith("Qformer.") for k in last)
    model, _ = load_chat_model("blip2_opt_transfer", "tiny_opt_large", checkpoint=str(tmp_path / "job" / "checkpoint_1.pth"),
                               device="cpu")
    assert model.llm_quantization is None and model.llm_lora.r == 4
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k].detach(), v) for k, v in last.items())

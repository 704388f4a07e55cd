"""The two-stage VPGTrans runner: stage semantics, learning rates, resume, torchrun."""

import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_CFG = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_recipe_opt.yaml")
# Small and fast: 20 iterations per epoch, no per-epoch validation.
FAST = ["run.batch_size_train=64", "run.valid_splits=[]", "run.extra_validation=[]", "run.max_epoch=3"]


def build_runner(tmp_path, *options):
    from lavis_vpgtrans.runners.launch import build

    return build(["--cfg-path", RECIPE_CFG, "--options", f"run.output_dir={tmp_path}",
                  "run.job_id=job", *FAST, *options], "test", evaluate=False)


def snapshot(model, prefix):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def changed(before, model):
    params = dict(model.named_parameters())
    return {n for n, v in before.items() if not torch.equal(v, params[n].detach())}


def test_stage1_trains_only_the_projector_at_5x_lr_then_stage2_trains_the_vpg(tmp_path, plugin):
    runner = build_runner(tmp_path)
    model = runner.unwrap_dist_model(runner.model)
    init_lr, min_lr = runner.init_lr, runner.min_lr

    vpg, proj, frozen = snapshot(model, "Qformer."), snapshot(model, "opt_proj."), snapshot(model, "llm_model.")
    runner.train_epoch(0)
    assert runner.stage == 1
    assert changed(proj, model) == set(proj)  # projector weight and bias moved
    assert not changed(vpg, model) and not changed(frozen, model)
    assert all(g["lr"] == pytest.approx(5 * init_lr) for g in runner.optimizer.param_groups)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(proj)

    vpg = snapshot(model, "Qformer.")
    runner.train_epoch(1)  # stage 2, its first epoch: linear warm-up to init_lr
    assert runner.stage == 2
    assert changed(vpg, model)
    assert not changed(frozen, model)
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(init_lr)
    runner.train_epoch(2)  # cosine over the 2 stage-2 epochs: halfway at its second epoch
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(
        (init_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * 1 / 2)) + min_lr)


def test_resume_after_the_switch_matches_an_uninterrupted_run(tmp_path, plugin):
    full = build_runner(tmp_path / "full")
    full.train()
    job = os.path.join(tmp_path, "full", "job")
    after_switch = torch.load(os.path.join(job, "checkpoint_1.pth"), weights_only=True)
    assert after_switch["stage"] == 2 and after_switch["epoch"] == 1

    resumed = build_runner(tmp_path / "resumed", f"run.resume_ckpt_path={job}/checkpoint_1.pth")
    resumed.train()
    final_full = torch.load(os.path.join(job, "checkpoint_2.pth"), weights_only=True)["model"]
    final_resumed = torch.load(os.path.join(tmp_path, "resumed", "job", "checkpoint_2.pth"),
                               weights_only=True)["model"]
    assert set(final_full) == set(final_resumed)
    assert any(k.startswith("Qformer.") for k in final_full)
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=1e-5, atol=1e-6)
    # and the resumed run did train: epoch 2 moved the weights away from the checkpoint
    assert not torch.equal(final_resumed["opt_proj.weight"], after_switch["model"]["opt_proj.weight"])


def test_runner_refuses_another_lavis_version(plugin):
    from lavis_vpgtrans.runners.runner_base import LAVIS_VERSION, require_lavis

    require_lavis()  # the installed one
    with pytest.raises(RuntimeError, match=r"salesforce-lavis 1\.1\.0 is installed.*salesforce-lavis==1\.0\.2"):
        require_lavis("1.1.0")
    assert LAVIS_VERSION == "1.0.2"


def test_resume_without_stage_is_refused(tmp_path, plugin):
    runner = build_runner(tmp_path)
    model = runner.unwrap_dist_model(runner.model)
    torch.save({"model": model.trainable_state_dict(), "optimizer": {}, "epoch": 0},
               tmp_path / "no_stage.pth")
    with pytest.raises(KeyError, match="stage"):
        runner._load_checkpoint(str(tmp_path / "no_stage.pth"))


def test_full_recipe_under_torchrun_gloo(tmp_path, toy_zoo):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(REPO, "train.py"),
         "--cfg-path", RECIPE_CFG, "--options", f"run.output_dir={tmp_path}", "run.job_id=job",
         "run.batch_size_train=32", "run.max_epoch=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "VPGTrans stage 1" in proc.stderr and "VPGTrans stage 2" in proc.stderr
    import json

    from lavis_vpgtrans.analysis.speedup import load_run

    # the runner logs epochs and stages; the analysis counts paper epochs from the run's config
    lines = [json.loads(l) for l in open(os.path.join(tmp_path, "job", "metrics.jsonl"))]
    assert [(r["epoch"], r["stage"], r["benchmark"]) for r in lines] == [
        (0, 1, "toy_caption"), (0, 1, "toy_vqa"), (1, 2, "toy_caption"), (1, 2, "toy_vqa")]
    assert not any("paper_epoch" in r for r in lines)
    records = load_run(os.path.join(tmp_path, "job")).records
    assert [(r.epoch, r.stage, r.paper_epoch, r.benchmark) for r in records] == [
        (0, 1, 1, "toy_caption"), (0, 1, 1, "toy_vqa"), (1, 2, 2, "toy_caption"), (1, 2, 2, "toy_vqa")]
    assert all("agg_metrics" in r["metrics"] for r in lines)


def test_iteration_based_mixture_of_caption_json_and_webdataset_shards(tmp_path, plugin):
    from lavis_vpgtrans.runners.launch import build

    cfg = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_mixture_opt.yaml")
    runner = build(["--cfg-path", cfg, "--options", f"run.output_dir={tmp_path}", "run.job_id=job",
                    "run.valid_splits=[]"], "test", evaluate=False)
    loader = runner.train_loader
    # both sources feed the stream: caption-json batches carry image_id, shard batches do not
    sources = {"image_id" in next(loader) for _ in range(12)}
    assert sources == {True, False}
    assert runner.max_epoch == 3

    runner.train()
    import json

    stats = [json.loads(l) for l in open(os.path.join(tmp_path, "job", "log.txt")) if l.startswith('{"train_')]
    assert len(stats) == 3 and all(float(s["train_loss"]) > 0 for s in stats)
    ckpt = torch.load(os.path.join(tmp_path, "job", "checkpoint_2.pth"), weights_only=True)
    assert ckpt["stage"] == 2 and any(k.startswith("Qformer.") for k in ckpt["model"])


def test_mixture_ratios_must_name_the_training_datasets(tmp_path, plugin):
    from lavis_vpgtrans.runners.launch import build

    cfg = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_mixture_opt.yaml")
    runner = build(["--cfg-path", cfg, "--options", f"run.output_dir={tmp_path}", "run.job_id=job",
                    "run.train_dataset_ratios={toy_caption: 1, coco: 3}"], "test", evaluate=False)
    with pytest.raises(ValueError, match="train_dataset_ratios"):
        runner.dataloaders

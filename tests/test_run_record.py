"""A run's record can be trusted (issue 13): kill -9 and resume, one run per output directory,
run ids in metrics.jsonl, checked config keys, the end of a resumed run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "projects", "vpgtrans", "demo")
CAPTION_CFG = os.path.join(DEMO, "tiny_caption_opt.yaml")
# 2 epochs of 8 iterations, validated on toy captions every epoch, no test split
FAST = ["run.batch_size_train=32", "run.max_epoch=2", "run.test_splits=[]", "run.log_freq=100"]


def train_argv(out, *options):
    return [sys.executable, os.path.join(REPO, "train.py"), "--cfg-path", CAPTION_CFG, "--options",
            f"run.output_dir={out}", "run.job_id=run", *FAST, *options]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def metrics(job_dir):
    with open(os.path.join(job_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_kill9_during_validation_then_resume_keeps_metrics_and_the_true_best(tmp_path, toy_zoo):
    job = tmp_path / "run"
    first = subprocess.Popen(train_argv(tmp_path), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    # checkpoint_1.pth appears right after epoch 1's training, before its validation
    wait_for(lambda: (job / "checkpoint_1.pth").exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = metrics(job)
    assert [r["epoch"] for r in before] == [0], "the kill was meant to land in epoch 1's validation"
    ckpt = torch.load(job / "checkpoint_1.pth", weights_only=True)
    assert ckpt["loop"]["validated"] is False
    assert ckpt["loop"]["best_epoch"] == 0
    assert ckpt["loop"]["best_agg_metric"] == pytest.approx(before[0]["metrics"]["agg_metrics"])

    # the interrupted epoch's best score is known to the resumed run: a best that beats every
    # epoch of this run must survive it (before: best_agg_metric restarted at -inf)
    sentinel = dict(ckpt, loop={**ckpt["loop"], "best_agg_metric": 1e6, "best_epoch": 0})
    torch.save(sentinel, job / "checkpoint_1.pth")
    best_before = torch.load(job / "checkpoint_best.pth", weights_only=True)

    proc = subprocess.run(train_argv(tmp_path, f"run.resume_ckpt_path={job / 'checkpoint_1.pth'}"),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "validating it" in proc.stderr and "Start training epoch" not in proc.stderr
    after = metrics(job)
    # epoch 1 validated on resume: metrics.jsonl has every epoch, all from one run
    assert [r["epoch"] for r in after] == [0, 1]
    assert len({r["run_id"] for r in after}) == 1
    best_after = torch.load(job / "checkpoint_best.pth", weights_only=True)
    assert best_after["epoch"] == 0  # epoch 1 did not beat the restored best
    for key in best_before["model"]:
        assert torch.equal(best_after["model"][key], best_before["model"][key])
    final = torch.load(job / "checkpoint_1.pth", weights_only=True)
    assert final["loop"]["validated"] is True and final["loop"]["best_agg_metric"] == 1e6
    # the weights validated are the killed run's epoch-1 weights
    for key in ckpt["model"]:
        assert torch.equal(final["model"][key], ckpt["model"][key])

    # resuming a finished run into a smaller max_epoch is an error, not a silent exit 0
    from lavis_vpgtrans.runners.launch import build

    runner = build(["--cfg-path", CAPTION_CFG, "--options", f"run.output_dir={tmp_path}", "run.job_id=again",
                    *FAST, f"run.resume_ckpt_path={job / 'checkpoint_1.pth'}", "run.max_epoch=1"],
                   "test", evaluate=False)
    with pytest.raises(ValueError, match=r"is epoch 1 \(0-based\) but run.max_epoch=1: there is nothing to train"):
        runner.train()

    # nor does a resumed run append to another run's metrics.jsonl
    from lavis_vpgtrans.runners.run_record import RunDirError

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text(json.dumps({**after[0], "run_id": "other-1234"}) + "\n")
    runner = build(["--cfg-path", CAPTION_CFG, "--options", f"run.output_dir={tmp_path}", "run.job_id=other",
                    *FAST, f"run.resume_ckpt_path={job / 'checkpoint_1.pth'}"], "test", evaluate=False)
    with pytest.raises(RunDirError, match=rf"holds run\(s\) other-1234, but the checkpoint resumed is run "
                                          rf"{after[0]['run_id']}"):
        runner.train()


def test_a_second_run_into_the_same_directory_is_refused_naming_the_first(tmp_path, toy_zoo):
    from lavis_vpgtrans.runners.launch import build
    from lavis_vpgtrans.runners.run_record import RunDirError

    first = subprocess.Popen(train_argv(tmp_path, "run.max_epoch=50"), cwd=tmp_path, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "run" / "run.lock"
        wait_for(lambda: lock.exists() and str(first.pid) in lock.read_text(), first)
        with pytest.raises(RunDirError, match=rf"is in use by another run \(pid {first.pid} on .*train.py"):
            build(["--cfg-path", CAPTION_CFG, "--options", f"run.output_dir={tmp_path}", "run.job_id=run", *FAST],
                  "test", evaluate=False)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed, its lock is gone with it; but what it left is an earlier run's, not a fresh start
    (tmp_path / "run" / "checkpoint_0.pth").write_bytes(b"")
    with pytest.raises(RunDirError, match=r"already holds an earlier run \(checkpoint_0.pth\): resume it"):
        build(["--cfg-path", CAPTION_CFG, "--options", f"run.output_dir={tmp_path}", "run.job_id=run", *FAST],
              "test", evaluate=False)


def test_metrics_of_two_runs_in_one_file_are_refused(tmp_path):
    from lavis_vpgtrans.analysis.speedup import LogError, load_run

    line = {"epoch": 0, "paper_epoch": 1, "stage": 2, "benchmark": "coco_caption", "split": "val",
            "metrics": {"agg_metrics": 0.5}}
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({**line, "run_id": "run-aaaa"}) + "\n")
        f.write(json.dumps({**line, "run_id": "run-aaaa", "epoch": 1, "paper_epoch": 2}) + "\n")
        f.write(json.dumps({**line, "run_id": "run-bbbb"}) + "\n")
    with pytest.raises(LogError, match=r"2 different runs \(run-aaaa from line 1, run-bbbb from line 3\)"):
        load_run(str(tmp_path))
    # one run's file (a resumed run re-validating an epoch writes it twice): read, later line wins
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2] + [lines[2].replace("bbbb", "aaaa")]) + "\n")
    run = load_run(str(tmp_path))
    assert [r.run_id for r in run.records] == ["run-aaaa"] * 3


def test_a_hole_in_a_runs_epochs_is_reported(tmp_path):
    from lavis_vpgtrans.analysis.speedup import MissingEpochWarning, load_run

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for epoch in (0, 1, 3):
            f.write(json.dumps({"run_id": "run-aaaa", "epoch": epoch, "paper_epoch": epoch + 1, "stage": 2,
                                "benchmark": "coco_caption", "split": "val", "metrics": {"agg_metrics": 0.5}}) + "\n")
    with pytest.warns(MissingEpochWarning, match=r"coco_caption has no record of epoch\(s\) 2 between epochs 0 and 3"):
        load_run(str(tmp_path))


def checked(*options, cfg_path=CAPTION_CFG):
    import argparse

    from lavis_vpgtrans.common.config import PluginConfig, check_config

    check_config(PluginConfig(argparse.Namespace(cfg_path=cfg_path, options=list(options))))


@pytest.mark.parametrize("option, message", [
    ("model.vpg_chekpoint=x.pth", r"unknown config key 'model.vpg_chekpoint'; did you mean 'vpg_checkpoint'\?"),
    ("run.warmup_epoch=1", r"unknown config key 'run.warmup_epoch'; did you mean 'warmup_epochs'\?"),
    ("datasets.toy_caption.vis_procesor={}", r"'datasets.toy_caption.vis_procesor'; did you mean 'vis_processor'\?"),
    ("run.lr_sched=linear_warmup_cosin_lr", r"run.lr_sched='linear_warmup_cosin_lr' is not registered; "
                                          r"did you mean 'linear_warmup_cosine_lr'\?"),
    ("run.runner=runner_vpgtrans_bse", r"run.runner='runner_vpgtrans_bse' is not registered; did you mean "
                                       r"'runner_vpgtrans_base'\?"),
    ("model.arch=blip2_opt_tranfer", r"model.arch='blip2_opt_tranfer' is not registered; did you mean "
                                     r"'blip2_opt_transfer'\?"),
    ("run.task=vpgtrans_captionig", r"run.task='vpgtrans_captionig' is not registered; did you mean "
                                    r"'vpgtrans_captioning'\?"),
    # run.extra_validation entries: their keys, their run overrides, their dataset names
    ("run.extra_validation=[{name: vqa, cfg_path: x.yaml, spilt: val}]",
     r"'run.extra_validation\[0\].spilt'; did you mean 'split'\?"),
    ("run.extra_validation=[{name: vqa, cfg_path: x.yaml, run: {num_beam: 1}}]",
     r"'run.extra_validation\[0\].run.num_beam'; did you mean 'num_beams'\?"),
    ("run.extra_validation=[{name: vqa, cfg_path: x.yaml, datasets: {toy_vq: {}}}]",
     r"run.extra_validation\[0\].datasets.toy_vq='toy_vq' is not registered; did you mean 'toy_vqa'\?"),
])
def test_a_typo_in_a_config_key_or_registry_name_is_an_error_naming_it(plugin, option, message):
    from lavis_vpgtrans.common.config import ConfigKeyError

    with pytest.raises(ConfigKeyError, match=message):
        checked(option)


def test_config_checks_pass_the_real_keys_and_have_an_escape_hatch(plugin):
    checked()  # the demo config as it is
    # the recipe runner's own keys are known where that runner is used
    checked("run.warmup_epochs=1", "run.warmup_lr_scale=5", cfg_path=os.path.join(DEMO, "tiny_recipe_opt.yaml"))
    checked("model.my_option=3", "run.unchecked_keys=[model.my_option]")


def test_a_typo_fails_train_py_before_anything_is_built(plugin, tmp_path):
    from lavis_vpgtrans.runners.launch import build
    from lavis_vpgtrans.common.config import ConfigKeyError

    with pytest.raises(ConfigKeyError, match="model.vpg_chekpoint"):
        build(["--cfg-path", CAPTION_CFG, "--options", f"run.output_dir={tmp_path}", "model.vpg_chekpoint=x"],
              "test", evaluate=False)
    assert not os.path.exists(tmp_path / "run")


def toy_train_set(tmp_path, records=None, *options):
    """The toy caption training set, its annotations replaced by `records` (if given)."""
    import argparse

    import lavis.tasks as tasks

    from lavis_vpgtrans.common.config import PluginConfig

    opts = list(options)
    if records is not None:
        path = tmp_path / "ann.json"
        path.write_text(records if isinstance(records, str) else json.dumps(records))
        opts.append(f"datasets.toy_caption.build_info.annotations.train.storage={path}")
    cfg = PluginConfig(argparse.Namespace(cfg_path=CAPTION_CFG, options=opts))
    return tasks.setup_task(cfg).build_datasets(cfg)["toy_caption"]["train"]


def test_data_errors_name_the_file_and_the_record(tmp_path, plugin):
    from lavis_vpgtrans.datasets.checked import DataError

    good = toy_train_set(tmp_path)
    record = dict(good.annotation[0])
    image = os.path.join(good.vis_root, record["image"])

    with pytest.raises(DataError, match=rf"{tmp_path}/ann.json: not valid JSON: Expecting ',' delimiter \(line 1,"):
        toy_train_set(tmp_path, json.dumps([record, record]).replace("}, {", "} {"))

    bad = toy_train_set(tmp_path, [record, {**record, "caption": None}])
    assert bad[0]["text_input"]
    with pytest.raises(DataError, match=rf"record 1 of {tmp_path}/ann.json \(image {image}\): .*\"caption\": null"):
        bad[1]

    # a truncated JPEG: an error (LAVIS loads it silently), or skipped and counted on request
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(image, "rb").read()[:-200])
    records = [record, {**record, "image": str(truncated)}, record]
    with pytest.raises(DataError, match=rf"record 1 of .*ann.json \(image {truncated}\): .*: image cannot be read "
                                        r"\(OSError: image file is truncated"):
        toy_train_set(tmp_path, records)[1]
    missing = {**record, "image": str(tmp_path / "missing.jpg")}
    skipping = toy_train_set(tmp_path, records + [missing], "run.skip_bad_samples=True")
    batch = skipping.collater([skipping[i] for i in range(4)])
    assert batch["image"].shape[0] == 2
    assert skipping.take_skipped() == 2 and skipping.take_skipped() == 0


def test_a_training_epoch_skips_and_reports_unreadable_images(tmp_path, plugin, caplog):
    from lavis_vpgtrans.runners.launch import build

    good = toy_train_set(tmp_path)
    record = dict(good.annotation[0], image=os.path.join(good.vis_root, good.annotation[0]["image"]))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(record["image"], "rb").read()[:-200])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([record, {**record, "image": str(truncated)}, record, record]))
    runner = build(["--cfg-path", CAPTION_CFG, "--options", f"run.output_dir={tmp_path}", "run.job_id=run",
                    f"datasets.toy_caption.build_info.annotations.train.storage={ann}", "run.skip_bad_samples=True",
                    "run.batch_size_train=2", "run.valid_splits=[]", "run.test_splits=[]"], "test", evaluate=False)
    with caplog.at_level("WARNING"):
        runner.train()
    assert f"image {truncated}" in caplog.text
    assert "epoch 0: 1 unreadable training image(s) skipped" in caplog.text


def test_a_missing_llm_directory_is_named(plugin, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"model.llm_model={tmp_path}/opt-6.7b: no such directory"):
        checked(f"model.llm_model={tmp_path}/opt-6.7b")


def test_a_checkpoint_write_killed_midway_leaves_no_temporary_for_good(tmp_path):
    from lavis_vpgtrans.common.checkpoint import save_checkpoint_atomic

    dead = tmp_path / ".tmp_2147483647_abc.pth"  # above any pid_max: that writer is gone
    live = tmp_path / f".tmp_{os.getpid()}_def.pth"  # a write in progress in a live process
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    save_checkpoint_atomic({"model": {"w": torch.ones(2)}}, str(tmp_path / "checkpoint_0.pth"))
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "checkpoint_0.pth"]
    assert torch.equal(torch.load(tmp_path / "checkpoint_0.pth", weights_only=True)["model"]["w"], torch.ones(2))


def test_the_converter_never_overwrites_its_input_nor_an_existing_out(tmp_path, capsys):
    from lavis_vpgtrans.transfer.converter import main

    projector = tmp_path / "blip2_opt.pth"
    torch.save({"model": {"opt_proj.weight": torch.ones(4, 3), "opt_proj.bias": torch.zeros(4)}}, projector)
    original = projector.read_bytes()
    # the refusals come before the LLMs are read: these directories do not even exist
    argv = ["--src", str(tmp_path / "no-src"), "--tgt", str(tmp_path / "no-tgt"), "--projector", str(projector)]

    for extra in ([], ["--overwrite"]):
        assert main(argv + ["--out", str(projector), *extra]) == 2
        assert "is the input --projector; the converter never overwrites its input" in capsys.readouterr().err
        assert projector.read_bytes() == original
    link = tmp_path / "link.pth"
    link.symlink_to(projector)
    assert main(argv + ["--out", str(link), "--overwrite"]) == 2
    assert "never overwrites its input" in capsys.readouterr().err

    existing = tmp_path / "init.pth"
    existing.write_bytes(b"an earlier result")
    assert main(argv + ["--out", str(existing)]) == 2
    assert f"--out {existing} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert existing.read_bytes() == b"an earlier result"

    assert main(argv + ["--out", str(existing / "under_a_file.pth")]) == 2
    assert "its directory cannot be written" in capsys.readouterr().err
    # with --overwrite the checks pass and the run goes on to read the (missing) LLMs
    assert main(argv + ["--out", str(existing), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "model directory not found" in err and "--out" not in err

"""A run that goes wrong stops and says so (issue 22): non-finite losses, weights and checkpoints.

In-process: the training loop's guard on a toy model (skipped steps are not applied, the limit
stops the run naming the step and the loss term, gradient accumulation, non-finite gradients of a
finite loss, the hints, no host read added per step); the empty-validation warning. Through
train.py (tests/nonfinite_driver.py injects the test-only faults): a diverging lr, a NaN ViT
output, one rank's non-finite loss under torchrun with gloo.
"""

import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION_CFG = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_caption_opt.yaml")
DRIVER = os.path.join(REPO, "tests", "nonfinite_driver.py")
# one epoch of 40 iterations, validated on the toy captions, no test split
FAST = ["run.batch_size_train=32", "run.max_epoch=1", "run.test_splits=[]", "run.log_freq=100",
        "run.caption_metrics=[Bleu,CIDEr]"]
NAN = float("nan")


# --------------------------------------------------------------------------- the loop, in process


class Toy(nn.Module):
    """loss = mean((W x)^2) * scale (+ sqrt(z * sum W)); a batch's `scale` / `z` inject NaN / an
    infinite gradient of a finite loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projector = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, samples):
        loss = self.projector(samples["x"]).pow(2).mean() * samples["scale"]
        if "z" in samples:
            loss = loss + torch.sqrt(samples["z"] * self.projector.weight.abs().sum())
        return {"loss": loss, "loss_lm": loss}


class Snapshots:
    """An lr 'scheduler' that records the weights at the start of every iteration."""

    def __init__(self, model):
        self.model, self.weights = model, []

    def step(self, cur_epoch, cur_step):
        self.weights.append(self.model.projector.weight.detach().clone())


def batches(scales, z=None):
    out = []
    for i, s in enumerate(scales):
        b = {"x": torch.randn(4, 3, generator=torch.Generator().manual_seed(i)), "scale": torch.tensor(float(s))}
        if z is not None:
            b["z"] = torch.tensor(float(z[i]))
        out.append(b)
    return out


def train(scales, task=None, accum=1, z=None, model=None, scaler=None):
    from lavis.tasks.base_task import BaseTask

    import lavis_vpgtrans  # noqa: F401  installs the guarded loop

    model = model or Toy()
    task = task or BaseTask()
    sched = Snapshots(model)
    data = batches(scales, z)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    error, stats = None, None
    try:
        stats = task._train_inner_loop(epoch=0, iters_per_epoch=len(data), model=model, data_loader=iter(data),
                                       optimizer=optimizer, lr_scheduler=sched, log_freq=1000,
                                       accum_grad_iters=accum, scaler=scaler)
    except Exception as e:  # noqa: BLE001  returned for the test to check
        error = e
    sched.step(None, None)  # the weights after the last iteration
    applied = [not torch.equal(a, b) for a, b in zip(sched.weights, sched.weights[1:])]
    return applied, error, stats, model


def test_skipped_steps_are_not_applied_and_training_goes_on(plugin, caplog):
    applied, error, stats, _ = train([1, 1, NAN, NAN, 1, 1])
    assert error is None
    assert applied == [True, True, False, False, True, True]
    # the average loss is over the applied steps only (LAVIS's was nan)
    assert stats["loss"] != "nan"
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 2 and "step 2 (epoch 0, iteration 2 of 6)" in skipped[0]
    assert "(1 of run.max_nonfinite_steps=3 in a row)" in skipped[0]
    assert "loss_lm (LM)" in skipped[0]


def test_the_limit_stops_the_run_naming_the_steps_and_the_loss_term(plugin):
    from lavis_vpgtrans.common.finite import NonFiniteLossError

    applied, error, _, _ = train([1, 1, NAN, NAN, NAN, 1, 1])
    assert isinstance(error, NonFiniteLossError)
    msg = str(error)
    assert "non-finite for 3 consecutive steps (run.max_nonfinite_steps=3)" in msg
    assert "from step 2 (epoch 0, iteration 2 of 7) to step 4 (epoch 0, iteration 4 of 7)" in msg
    assert "none of them was applied" in msg and "loss_lm (LM)" in msg
    assert applied[:4] == [True, True, False, False]  # it stopped in iteration 4, which was not applied


def test_run_max_nonfinite_steps_sets_the_limit(plugin):
    from lavis.tasks.base_task import BaseTask

    from lavis_vpgtrans.common.finite import NonFiniteGuard, NonFiniteLossError

    task = BaseTask()
    task.nonfinite_guard = NonFiniteGuard(max_steps=1)
    _, error, _, _ = train([1, NAN, 1], task=task)
    assert isinstance(error, NonFiniteLossError) and "from step 1 (epoch 0, iteration 1 of 3) to step 1" in str(error)
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 1"):
        NonFiniteGuard(0)


def test_a_nonfinite_micro_batch_skips_its_accumulation_window(plugin):
    applied, error, _, _ = train([1, 1, NAN, 1, 1, 1], accum=2)
    assert error is None
    # steps at iterations 1, 3, 5; the window of iterations 2-3 holds the NaN
    assert applied == [False, True, False, False, False, True]


def test_infinite_gradients_of_a_finite_loss_skip_the_step(plugin, caplog):
    applied, error, _, _ = train([1, 1, 1], z=[1, 0, 1])  # d sqrt(x)/dx at 0 is inf
    assert error is None and applied == [True, False, True]
    assert any("the gradients were non-finite, the loss finite" in r.getMessage() for r in caplog.records)


def test_gradscaler_skipped_steps_count_the_same_way(plugin, caplog):
    """With amp (GradScaler; CUDA in a real run, its CPU twin here), a step the scaler finds
    non-finite gradients in is skipped and counted like a non-finite loss."""
    from lavis_vpgtrans.common.finite import NonFiniteLossError

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    applied, error, _, _ = train([1, 1, 1, 1], z=[1, 0, 1, 1], scaler=scaler)
    assert error is None and applied == [True, False, True, True]
    assert scaler.get_scale() < 2.0 ** 10  # lowered after the overflow, as GradScaler does
    assert any("GradScaler found non-finite gradients" in r.getMessage() for r in caplog.records)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    applied, error, _, _ = train([1, 1, 1, 1, 1], z=[1, 0, 0, 0, 1], scaler=scaler)
    assert isinstance(error, NonFiniteLossError) and "from step 1 (epoch 0, iteration 1 of 5) to step 3" in str(error)
    assert applied[:3] == [True, False, False]


def test_hints_name_a_checkpoint_that_was_loaded_non_finite_and_a_frozen_weight(plugin):
    model = Toy()
    with torch.no_grad():
        model.projector.bias[1] = NAN  # as if loaded so, before any step
    _, error, _, _ = train([1, 1, 1, 1], model=model)
    assert "before this run applied any step ('projector.bias'): a loaded checkpoint holds non-finite" in str(error)
    model = Toy()
    with torch.no_grad():
        model.frozen.weight[0, 0] = float("inf")
    model.forward = lambda s, m=model: {"loss": m.projector(m.frozen(s["x"])).pow(2).mean()}
    _, error, _, _ = train([1, 1, 1, 1], model=model)
    assert "a frozen weight is non-finite ('frozen.weight')" in str(error)


def test_the_check_adds_no_host_read_per_step(plugin, monkeypatch):
    """LAVIS's loop reads the loss to the host once per step (loss.item()); ours reads the loss and
    the flags in that one read: on a GPU, no host-device synchronisation is added."""
    from lavis.tasks.base_task import BaseTask

    from lavis_vpgtrans.common import lavis_fixes

    reads = {"n": 0}
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def count(loop):
        model, data = Toy(), batches([1] * 10)
        optimizer = torch.optim.SGD(model.projector.parameters(), lr=0.1)
        reads["n"] = 0
        loop(BaseTask(), epoch=0, iters_per_epoch=10, model=model, data_loader=iter(data), optimizer=optimizer,
             lr_scheduler=Snapshots(model), log_freq=1000)
        return reads["n"]

    from lavis_vpgtrans.common.train_loop import guarded_inner_loop

    monkeypatch.setattr(BaseTask, "_train_inner_loop", lavis_fixes.LAVIS_TRAIN_INNER_LOOP)
    assert count(guarded_inner_loop) == count(lavis_fixes.LAVIS_TRAIN_INNER_LOOP)


# --------------------------------------------------------------------------- checkpoints and states


def test_nonfinite_keys_walk_nested_states_in_order():
    from lavis_vpgtrans.common.checkpoint import check_finite_state
    from lavis_vpgtrans.common.finite import first_nonfinite, nonfinite_keys

    state = {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, NAN]), "n": torch.tensor([3])},
             "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("-inf")]), "step": torch.tensor(2.0)}}}}
    assert nonfinite_keys(state) == ["model.b", "optimizer.state.0.exp_avg"]
    assert first_nonfinite({"x": torch.zeros(3)}) is None
    with pytest.raises(Exception, match=r"ck.pth: checkpoint holds non-finite values \(NaN or inf\) in 'model.b' "
                                        r"\(and 1 more tensor\(s\)\): refused"):
        check_finite_state(state, "ck.pth")


def test_a_state_with_nan_is_refused_at_load_naming_the_file_and_the_key(tmp_path):
    """load_state_with_report: every model load (vpg_checkpoint, projector_checkpoint, finetuned and
    so export --checkpoint, pformer_checkpoint, the resumed weights) goes through it."""
    from lavis_vpgtrans.common.checkpoint import CheckpointError, load_state_with_report

    module = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = {"weight": torch.ones(2, 2), "bias": torch.tensor([0.0, float("inf")])}
    with pytest.raises(CheckpointError, match=r"ck.pth: checkpoint holds non-finite values \(NaN or inf\) in 'bias'"):
        load_state_with_report(module, state, "ck.pth")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())  # nothing loaded
    # what a load drops by design is not its business
    load_state_with_report(module, {**state, "bias": torch.zeros(2), "unused": torch.tensor([NAN])}, "ck.pth",
                           drop=lambda k: k == "unused")


def test_a_checkpoint_with_nan_is_never_written(tmp_path):
    from lavis_vpgtrans.common.checkpoint import NonFiniteCheckpointError, save_checkpoint_atomic

    path = tmp_path / "checkpoint_best.pth"
    save_checkpoint_atomic({"model": {"w": torch.ones(2)}, "epoch": 0}, str(path))
    before = digest(path)
    for bad in ({"model": {"w": torch.tensor([1.0, NAN])}},
                {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}}):
        with pytest.raises(NonFiniteCheckpointError, match=r"checkpoint_best.pth: .*not written"):
            save_checkpoint_atomic(bad, str(path))
        assert digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_best.pth"]  # no temporary left


def test_the_converter_refuses_a_nan_projector_naming_the_key(tmp_path, toy_zoo, capsys):
    from lavis_vpgtrans.transfer.converter import main

    weight = torch.randn(32, 16)
    weight[5, 2] = NAN
    proj = tmp_path / "proj.pth"
    torch.save({"model": {"opt_proj.weight": weight, "opt_proj.bias": torch.zeros(32)}}, proj)
    small, large = (os.path.join(toy_zoo, name) for name in ("opt-small", "opt-large"))
    code = main(["--src", small, "--tgt", large, "--projector", str(proj), "--out", str(tmp_path / "o.pth"),
                 "--src-arch", "blip2_opt", "--tgt-arch", "blip2_opt"])
    err = capsys.readouterr().err
    assert code == 2 and f"{proj}: the source projector holds non-finite values" in err and "'opt_proj.weight'" in err
    assert not os.path.exists(tmp_path / "o.pth")


# --------------------------------------------------------------------------- validation that produces nothing


def test_a_validation_whose_captions_are_all_empty_is_a_warning_naming_the_epoch(plugin, tmp_path, caplog):
    from lavis.common.registry import registry

    from lavis_vpgtrans.tasks.captioning import VPGTransCaptionTask
    from lavis_vpgtrans.tasks.vqa import VPGTransGQATask, VPGTransVQATask

    registry.mapping["paths"]["result_dir"] = str(tmp_path)
    task = VPGTransCaptionTask(num_beams=1, max_len=5, min_len=1, evaluate=False, report_metric=False)
    task.after_evaluation([{"caption": "", "image_id": i} for i in range(4)], "val", 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("epoch 3: the validation on 'val' produced nothing: all 4 captions are empty" in w for w in warnings)
    caplog.clear()
    task.after_evaluation([{"caption": "" if i else "a cat", "image_id": i} for i in range(4)], "val", 4)
    assert not [r for r in caplog.records if "produced nothing" in r.getMessage()]

    for cls, field in ((VPGTransVQATask, "answer"), (VPGTransGQATask, "pred_ans")):
        path = tmp_path / f"{field}.json"
        path.write_text(__import__("json").dumps([{"question_id": i, field: " "} for i in range(3)]))
        assert cls.answer_field == field
        assert cls.warn_if_empty(str(path), cls.answer_field, "answers", "val", 7)
    assert "epoch 7: the validation on 'val' produced nothing: all 3 answers are empty" in caplog.text


# --------------------------------------------------------------------------- through train.py


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def train_py(out, job, *options, driver=False, fault_env=None, torchrun=False):
    script = DRIVER if driver else os.path.join(REPO, "train.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    argv = launcher + [script, "--cfg-path", CAPTION_CFG, "--options", f"run.output_dir={out}", f"run.job_id={job}",
                       *FAST, *options]
    return subprocess.run(argv, cwd=out, env=env(**(fault_env or {})), capture_output=True, text=True, timeout=600)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_every_checkpoint_finite(directory):
    from lavis_vpgtrans.common.finite import nonfinite_keys

    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".pth"):
                path = os.path.join(root, name)
                found.append(path)
                assert nonfinite_keys(torch.load(path, weights_only=True)) == [], path
    return found


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, toy_zoo):
    """One finished epoch: checkpoint_0.pth and checkpoint_best.pth."""
    out = tmp_path_factory.mktemp("nonfinite")
    proc = train_py(out, "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, out / "run"


def test_a_nan_projector_checkpoint_is_refused_at_load_naming_the_key(good_run, tmp_path):
    _, job = good_run
    state = torch.load(job / "checkpoint_0.pth", weights_only=True)["model"]
    projector = {k: v.clone() for k, v in state.items() if k.startswith("opt_proj.")}
    projector["opt_proj.bias"][3] = NAN
    path = tmp_path / "nan_projector.pth"
    torch.save({"model": projector}, path)
    proc = train_py(tmp_path, "nanproj", f"model.projector_checkpoint={path}")
    assert proc.returncode != 0
    assert f"{path}: checkpoint holds non-finite values (NaN or inf) in 'opt_proj.bias': refused" in proc.stderr, \
        proc.stderr[-4000:]
    assert not (tmp_path / "nanproj").exists() or not list((tmp_path / "nanproj").glob("*.pth"))

    # a resumed checkpoint: its optimizer state too
    resumed = torch.load(job / "checkpoint_0.pth", weights_only=True)
    first = next(iter(resumed["optimizer"]["state"]))
    resumed["optimizer"]["state"][first]["exp_avg"].view(-1)[0] = float("inf")
    bad = tmp_path / "bad_resume.pth"
    torch.save(resumed, bad)
    proc = train_py(tmp_path, "badresume", f"run.resume_ckpt_path={bad}", "run.max_epoch=2")
    assert proc.returncode != 0
    assert f"{bad}: checkpoint holds non-finite values (NaN or inf) in 'optimizer.state.{first}.exp_avg'" in proc.stderr, \
        proc.stderr[-4000:]


def test_vpg_checkpoint_and_the_exports_checkpoint_with_nan_are_refused(good_run, tmp_path, plugin):
    from helpers import load_tiny

    from lavis_vpgtrans.common.checkpoint import NonFiniteCheckpointError
    from lavis_vpgtrans.export import main as export_main

    _, job = good_run
    ckpt = torch.load(job / "checkpoint_0.pth", weights_only=True)
    ckpt["model"]["Qformer.bert.encoder.layer.0.attention.self.query.weight"][0, 0] = NAN
    path = tmp_path / "nan.pth"
    torch.save(ckpt, path)
    model = load_tiny("blip2_opt_transfer", "tiny_opt_small")
    with pytest.raises(NonFiniteCheckpointError, match=rf"{path}: checkpoint holds non-finite values \(NaN or inf\) "
                                                       r"in 'Qformer.bert.encoder.layer.0.attention.self.query.weight'"):
        model.load_vpg(str(path))
    with pytest.raises(NonFiniteCheckpointError, match="'Qformer.bert.encoder.layer.0.attention.self.query.weight'"):
        export_main(["--model-arch", "blip2_opt_transfer", "--model-type", "tiny_opt_small", "--checkpoint", str(path),
                     "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_a_diverging_lr_stops_and_keeps_the_last_good_checkpoint(good_run):
    out, job = good_run
    before = {name: digest(job / name) for name in ("checkpoint_0.pth", "checkpoint_best.pth")}
    proc = train_py(out, "run", f"run.resume_ckpt_path={job / 'checkpoint_0.pth'}", "run.max_epoch=2",
                    "run.init_lr=1e8", "run.max_nonfinite_steps=2")
    assert proc.returncode != 0
    err = proc.stderr
    assert "NonFiniteLossError: training stopped" in err
    skipped = [int(s) for s in re.findall(r"non-finite loss at step (\d+) \(epoch 1", err)]
    stop = re.search(r"from step (\d+) \(epoch 1, iteration \d+ of 40\) to step (\d+) \(epoch 1", err)
    assert skipped and stop, err[-4000:]
    # stopped within run.max_nonfinite_steps (2) steps of the first non-finite loss, naming the term
    assert "non-finite for 2 consecutive steps (run.max_nonfinite_steps=2)" in err
    assert int(stop.group(1)) == skipped[0] and int(stop.group(2)) == skipped[0] + 1
    assert re.search(r"At step \d+ .*non-finite loss term\(s\): loss_lm \(LM\)", err)
    assert "lower the lr" in err
    # nothing written: the last good checkpoint and the best are the ones from before
    assert sorted(p.name for p in job.glob("*.pth")) == ["checkpoint_0.pth", "checkpoint_best.pth"]
    assert {name: digest(job / name) for name in before} == before
    assert_every_checkpoint_finite(out)

    # and resuming from the last good checkpoint works
    proc = train_py(out, "run", f"run.resume_ckpt_path={job / 'checkpoint_0.pth'}", "run.max_epoch=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (job / "checkpoint_1.pth").exists()
    assert_every_checkpoint_finite(out)


def test_a_nan_vit_output_gives_the_fp16_hint(tmp_path, toy_zoo):
    proc = train_py(tmp_path, "vit", "model.vit_precision=fp16", driver=True,
                    fault_env={"NONFINITE_FAULT": "vit_nan", "NONFINITE_FROM": "3"})
    assert proc.returncode != 0
    assert re.search(r"NonFiniteLossError: .*from step 2 \(epoch 0, iteration 2 of 40\) to step 4 .*"
                     r"the ViT's output was non-finite: fp16 ViT overflowed: set `model.vit_precision: fp32`",
                     proc.stderr), proc.stderr[-4000:]
    assert assert_every_checkpoint_finite(tmp_path) == []  # stopped in epoch 0: nothing written


def test_torchrun_a_nonfinite_loss_on_one_rank_stops_both(tmp_path, toy_zoo):
    """Rank 1's loss is +inf, its gradients finite: rank 0 sees nothing wrong itself and stops on
    the shared flag, in the same step."""
    report = tmp_path / "report"
    report.mkdir()
    proc = train_py(tmp_path, "tr", "run.batch_size_train=16", driver=True, torchrun=True,
                    fault_env={"NONFINITE_FAULT": "rank1_inf", "NONFINITE_FROM": "3",
                               "NONFINITE_REPORT": str(report)})
    assert proc.returncode != 0
    rank0, rank1 = ((report / f"rank{r}.txt").read_text() for r in (0, 1))
    for text in (rank0, rank1):
        assert text.startswith("NonFiniteLossError: training stopped"), text
        assert "from step 2 (epoch 0, iteration 2 of 40) to step 4 (epoch 0, iteration 4 of 40)" in text
    assert "non-finite on rank(s) 1 (this is rank 0, finite here" in rank0
    assert "non-finite loss term(s): loss_lm (LM)" in rank1
    assert assert_every_checkpoint_finite(tmp_path) == []

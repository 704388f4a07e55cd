"""FSDP2 sharding of the frozen parts (lavis_vpgtrans.common.sharding): 2 gloo processes, the same
data and seed as DDP; and activation checkpointing in one process."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RECIPE_CFG = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_recipe_opt.yaml")


def train_py(out, *options):
    """The two-stage recipe (1 warm-up + 1 joint epoch) through train.py on 2 gloo processes."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(REPO, "train.py"), "--cfg-path", RECIPE_CFG, "--options", f"run.output_dir={out}",
         "run.job_id=job", "run.batch_size_train=32", "run.max_epoch=2", "run.extra_validation=[]", *options],
        cwd=out, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    held = [int(line.split("holds ")[1].split()[0]) for line in proc.stderr.splitlines()
            if "this rank holds" in line]
    return os.path.join(out, "job"), held, proc.stderr


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory, toy_zoo):
    ddp_dir, ddp_held, _ = train_py(tmp_path_factory.mktemp("ddp"), "run.valid_splits=[]")
    # sharded and with activation checkpointing (it recomputes with the same dropout draws)
    fsdp_dir, fsdp_held, fsdp_log = train_py(tmp_path_factory.mktemp("fsdp"), "run.fsdp=true",
                                             "run.activation_checkpointing=true")
    assert "run.activation_checkpointing: CheckpointingConfig(llm=True, qformer=True)" in fsdp_log
    resumed_dir, _, _ = train_py(tmp_path_factory.mktemp("resumed"), "run.fsdp=true", "run.valid_splits=[]",
                              f"run.resume_ckpt_path={os.path.join(fsdp_dir, 'checkpoint_0.pth')}")
    return dict(ddp=ddp_dir, fsdp=fsdp_dir, resumed=resumed_dir, ddp_held=ddp_held, fsdp_held=fsdp_held)


def test_train_py_with_the_llm_sharded_trains_as_ddp(recipe_runs):
    # rank 0 logs what it holds (LAVIS logs INFO on rank 0 only): half of the LLM
    assert recipe_runs["ddp_held"] and recipe_runs["fsdp_held"]
    assert max(recipe_runs["fsdp_held"]) / min(recipe_runs["ddp_held"]) == pytest.approx(0.5, abs=0.01)
    # stage 1 (projector) then stage 2 (VPG + projector), validation and the best checkpoint
    # between: the same weights as the DDP run on the same data and seed
    ddp, fsdp = weights(os.path.join(recipe_runs["ddp"], "checkpoint_1.pth")), \
        weights(os.path.join(recipe_runs["fsdp"], "checkpoint_1.pth"))
    assert fsdp.keys() == ddp.keys() and len(fsdp) > 2
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert os.path.isfile(os.path.join(recipe_runs["fsdp"], "checkpoint_best.pth"))


def test_a_sharded_run_resumes_exactly_and_its_checkpoint_loads_unsharded(recipe_runs, plugin):
    from helpers import load_tiny
    from lavis_vpgtrans.common.checkpoint import load_trained_state

    final = weights(os.path.join(recipe_runs["fsdp"], "checkpoint_1.pth"))
    resumed = weights(os.path.join(recipe_runs["resumed"], "checkpoint_1.pth"))
    assert resumed.keys() == final.keys()
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    model = load_tiny("blip2_opt_transfer", "tiny_opt_large", train_vpg=True)
    load_trained_state(model, final, "the sharded run's checkpoint")
    for name, param in model.named_parameters():
        if name in final:
            assert torch.equal(param.detach(), final[name])


def test_resuming_a_sharded_checkpoint_without_fsdp_is_refused(recipe_runs, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--cfg-path", RECIPE_CFG, "--options",
         f"run.output_dir={tmp_path}", "run.job_id=job", "run.max_epoch=2", "run.extra_validation=[]",
         f"run.resume_ckpt_path={os.path.join(recipe_runs['fsdp'], 'checkpoint_0.pth')}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "saved with run.fsdp; resume it with run.fsdp" in proc.stderr


# family : LLM + Q-Former activation checkpointing (OPT without: the train.py runs above)
SPECS = ["llama:1", "t5:0"]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory, toy_zoo):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(HERE, "sharding_worker.py"), str(out), *SPECS],
        cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("spec", SPECS)
def test_sharded_llm_trains_as_ddp_resumes_and_loads_unsharded(worker_results, spec):
    result = worker_results[spec]
    # rank 1 built the LLM without weights (run.fsdp's host memory), rank 0 loaded it; after
    # sharding, every gathered weight and buffer is the one from_pretrained loads, ties kept
    assert result["llm_built_without_weights"] == [False, True]
    assert result["llm_names_equal"] and result["ties_kept"]
    assert result["llm_weights_differ"] == [] and result["llm_dtypes_differ"] == []
    if spec.startswith("t5"):  # in fp16, with T5's `wo` kept in fp32 by from_pretrained
        assert result["fp16_dtypes"] == ["torch.float16", "torch.float32"]
        assert result["fp16_weights_differ"] == []
    # sharded on CPU under glibc: a fixed 1 MiB mmap threshold on both ranks (unless the user set
    # one), so a freed large buffer leaves the RSS (glibc's dynamic threshold keeps it in the heap)
    if platform.libc_ver()[0] == "glibc":
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            assert result["host_mmap_threshold"] == [1 << 20, 1 << 20]
        assert result["freed_16mib_returned_kib"] >= 15 << 10, result["freed_16mib_returned_kib"]
    # each rank holds half of the LLM (OPT ties its head to the embeddings: counted once)
    assert result["llm_bytes_sharded"] / result["llm_bytes_replicated"] == pytest.approx(0.5, abs=0.01)
    # 2 steps, a checkpoint of full tensors, a new sharded model resumed from it, 2 more steps:
    # the DDP run's weights (same data, same seed)
    assert result["same_names"]
    assert result["max_abs_diff_vs_ddp"] <= 1e-4
    # the gathered weights in an unsharded model caption as the sharded one does
    assert result["captions_sharded"] == result["captions_unsharded"]


def _saved_bytes_and_grads(model, samples):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(samples)["loss"]
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_keeps_fewer_activations_and_the_same_gradients(plugin):
    from helpers import load_tiny
    from lavis_vpgtrans.common.sharding import CheckpointingConfig, apply_activation_checkpointing

    samples = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
               "text_input": ["a red square", "two blue circles", "a green triangle", "one yellow circle"]}
    torch.manual_seed(0)
    plain = load_tiny("blip2_opt_transfer", "tiny_opt_large", train_vpg=True).train()
    torch.manual_seed(0)
    ckpt = load_tiny("blip2_opt_transfer", "tiny_opt_large", train_vpg=True).train()
    apply_activation_checkpointing(ckpt, CheckpointingConfig(llm=True, qformer=True))
    plain_bytes, plain_grads = _saved_bytes_and_grads(plain, samples)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(ckpt, samples)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        # summation order may differ in the recomputation: float32 rounding, not other dropout draws
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_settings_are_checked():
    from omegaconf import OmegaConf

    from lavis_vpgtrans.common.sharding import CheckpointingConfig, ShardingConfig

    assert CheckpointingConfig.parse({"qformer": False}) == CheckpointingConfig(llm=True, qformer=False)
    assert ShardingConfig.parse(None) is None and ShardingConfig.parse(False) is None
    assert ShardingConfig.parse(True) == ShardingConfig()
    cfg = ShardingConfig.parse(OmegaConf.create({"shard_vit": False}))
    assert cfg.shard_llm and not cfg.shard_vit
    with pytest.raises(ValueError, match="shard_lm"):
        ShardingConfig.parse(OmegaConf.create({"shard_lm": True}))
    with pytest.raises(ValueError, match="run.fsdp.shard_vit must be true or false"):
        ShardingConfig.parse(OmegaConf.create({"shard_vit": "yes"}))

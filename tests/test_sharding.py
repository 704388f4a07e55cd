"""FSDP2 sharding of the frozen parts (lavis_vpgtrans.common.sharding): 2 gloo processes, the same
data and seed as DDP; and activation checkpointing in one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


SPECS = ["opt:0", "llama:1", "t5:0"]  # family : LLM + Q-Former activation checkpointing


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
    from lavis_vpgtrans.common.sharding import ShardingConfig, apply_activation_checkpointing

    samples = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
               "text_input": ["a red square", "two blue circles", "a green triangle", "one yellow circle"]}
    torch.manual_seed(0)
    plain = load_tiny("blip2_opt_transfer", "tiny_opt_large", train_vpg=True).train()
    torch.manual_seed(0)
    ckpt = load_tiny("blip2_opt_transfer", "tiny_opt_large", train_vpg=True).train()
    apply_activation_checkpointing(ckpt, ShardingConfig(llm_activation_checkpointing=True,
                                                        qformer_activation_checkpointing=True))
    plain_bytes, plain_grads = _saved_bytes_and_grads(plain, samples)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(ckpt, samples)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_settings_are_checked():
    from omegaconf import OmegaConf

    from lavis_vpgtrans.common.sharding import ShardingConfig

    assert ShardingConfig.from_run_config(OmegaConf.create({})) is None
    assert ShardingConfig.from_run_config(OmegaConf.create({"fsdp": True})) == ShardingConfig()
    cfg = ShardingConfig.from_run_config(OmegaConf.create({"fsdp": {"shard_vit": False}}))
    assert cfg.shard_llm and not cfg.shard_vit
    with pytest.raises(ValueError, match="shard_lm"):
        ShardingConfig.from_run_config(OmegaConf.create({"fsdp": {"shard_lm": True}}))
    with pytest.raises(ValueError, match="run.fsdp.shard_vit must be true or false"):
        ShardingConfig.from_run_config(OmegaConf.create({"fsdp": {"shard_vit": "yes"}}))

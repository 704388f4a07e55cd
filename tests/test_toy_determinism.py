"""The toy world is the same on every machine: with pinned CPU kernels (common/kernels.py)
the same seed and profile give the same zoo, byte for byte, whatever kernels the machine
would pick by itself. Two kernel selections on this machine stand in for two machines (an
AVX-512 one and an AVX2-only one), each build in its own process, as kernels are chosen when a
process starts."""

import hashlib
import json
import os
import subprocess
import sys

import torch

from lavis_vpgtrans.common import kernels
from lavis_vpgtrans.toy import zoo

# The demo profile's code paths (document LM pre-training, ViT pre-training, opt-large grown
# from opt-small, the LLaMA related to opt-small, the source split) with a few steps each.
BUILD = """
import dataclasses, sys
from lavis_vpgtrans.common import kernels
from lavis_vpgtrans.toy import zoo
reduced = dataclasses.replace(zoo.PROFILES["demo"], lm_steps=6, lm_warmup_steps=2, vit_steps=3,
                              lm_documents=64, n_val=8)
print(kernels.describe())
zoo.build_zoo(sys.argv[1], seed=int(sys.argv[2]), profile=reduced)
"""
# What an AVX2 machine without AVX-512 picks by itself: torch's AVX2 kernels, MKL's AVX2
# path, oneDNN up to AVX2, glibc without AVX-512; and 2 threads in the caller.
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD",
                "OMP_NUM_THREADS": "2"}


def digests(root):
    """relative path -> sha256 of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def build_all(builds):
    """name -> (out dir, seed, env): the builds run side by side, each in its own process;
    returns name -> the kernel line it printed."""
    procs = {name: subprocess.Popen([sys.executable, "-c", BUILD, out, str(seed)], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, (out, seed, env) in builds.items()}
    lines = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} build failed:\n{output[-3000:]}"
        lines[name] = next(line for line in output.splitlines() if line.startswith("CPU kernels"))
    return lines


def test_pinned_kernels_same_world_under_two_kernel_selections(tmp_path):
    native = dict(os.environ)
    avx2_machine = dict(os.environ, **AVX2_MACHINE)
    builds = {"pinned native": (str(tmp_path / "a"), 3, kernels.pinned_env(native)),
              "pinned avx2 machine": (str(tmp_path / "b"), 3, kernels.pinned_env(avx2_machine)),
              "unpinned native": (str(tmp_path / "c"), 3, native),
              "pinned native, another seed": (str(tmp_path / "d"), 4, kernels.pinned_env(native))}
    lines = build_all(builds)
    assert lines["pinned native"].startswith("CPU kernels pinned: torch AVX2, MKL_CBWR=AVX2, oneDNN off, 1 thread")
    assert lines["pinned avx2 machine"] == lines["pinned native"]
    assert "not pinned" in lines["unpinned native"]

    a, b, c, d = (digests(tmp_path / name) for name in "abcd")
    assert len(a) > 100 and {"opt-small/model.safetensors", "opt-large/model.safetensors", "llama/model.safetensors",
                             "eva-vit/model.safetensors", "opt-small/tokenizer.json",
                             "data/lm_text.txt"} <= set(a)
    assert sorted(a) == sorted(b)
    differing = sorted(path for path in a if a[path] != b[path])
    assert differing == [], differing
    # the digests see the kernel choice: this machine's own (AVX-512) kernels give other weights
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert c["opt-small/model.safetensors"] != a["opt-small/model.safetensors"]
    assert c["data/annotations/caption_train.json"] == a["data/annotations/caption_train.json"]
    # and another seed another world
    assert d["opt-small/model.safetensors"] != a["opt-small/model.safetensors"]
    assert d["data/annotations/caption_train.json"] != a["data/annotations/caption_train.json"]


def test_pinned_env_keeps_other_settings():
    env = kernels.pinned_env({"GLIBC_TUNABLES": "glibc.malloc.check=3:glibc.cpu.hwcaps=-AVX2", "PATH": "/bin"},
                             threads=2)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.check=3:glibc.cpu.hwcaps={kernels.LIBM_MASK}"
    assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "2" and env[kernels.PIN_FLAG] == "1"
    assert "AVX2" in env["NPY_DISABLE_CPU_FEATURES"].split() or not env["NPY_DISABLE_CPU_FEATURES"]


def test_session_zoo_was_built_pinned(toy_zoo):
    """The test session is not pinned; ensure_zoo built its zoo in a pinned child process."""
    assert not kernels.is_pinned()
    with open(os.path.join(toy_zoo, zoo.KERNELS_NAME)) as f:
        assert f.read().startswith("CPU kernels pinned: torch AVX2")


def test_pinned_demo_run_same_under_two_kernel_selections(toy_zoo, tmp_path):
    """A demo run (train.py on the demo's TFS config, one epoch, validation with generation and
    CIDEr / VQA scoring) under the two kernel selections: the same weights, captions and scores."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = dict(os.environ, VPGTRANS_TOY_ZOO=toy_zoo)
    procs = {}
    for name, machine in (("native", base), ("avx2", dict(base, **AVX2_MACHINE))):
        argv = [sys.executable, "train.py", "--cfg-path", "projects/vpgtrans/demo/experiment/tfs.yaml", "--options",
                f"run.output_dir={tmp_path / name}", "run.job_id=run", "run.max_epoch=1"]
        procs[name] = subprocess.Popen(argv, cwd=repo, env=kernels.pinned_env(machine), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{output[-3000:]}"

    def outcome(name):
        run = tmp_path / name / "run"
        state = torch.load(run / "checkpoint_0.pth", map_location="cpu", weights_only=True)["model"]
        with open(run / "metrics.jsonl") as f:
            metrics = [json.loads(line)["metrics"] for line in f]
        return state, (run / "result" / "val_epoch0.json").read_text(), metrics

    (a, captions_a, metrics_a), (b, captions_b, metrics_b) = outcome("native"), outcome("avx2")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert captions_a == captions_b and metrics_a == metrics_b
    assert {"CIDEr", "acc"} <= {key for m in metrics_a for key in m}

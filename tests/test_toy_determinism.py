"""The toy world is deterministic: the same seed and profile give the same zoo, byte for byte,
whatever thread count the building process runs with (zoo.deterministic_build)."""

import dataclasses
import hashlib
import os

import torch

from lavis_vpgtrans.toy import zoo


def digests(root):
    """relative path -> sha256 of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_same_seed_same_zoo_bit_for_bit(tmp_path):
    # the demo profile's code paths (document LM pre-training, ViT pre-training, opt-large
    # grown from opt-small, the LLaMA related to opt-small, the source split) with a few
    # steps each, to stay fast
    reduced = dataclasses.replace(zoo.PROFILES["demo"], lm_steps=6, lm_warmup_steps=2, vit_steps=3,
                                  lm_documents=64, n_val=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the build pins its own thread count
        zoo.build_zoo(str(tmp_path / "a"), seed=3, profile=reduced)
        torch.set_num_threads(1)
        zoo.build_zoo(str(tmp_path / "b"), seed=3, profile=reduced)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the caller's settings are restored
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(a) > 100 and {"opt-small/model.safetensors", "opt-large/model.safetensors", "llama/model.safetensors",
                             "eva-vit/model.safetensors", "opt-small/tokenizer.json",
                             "data/lm_text.txt"} <= set(a)
    assert sorted(a) == sorted(b)
    differing = sorted(path for path in a if a[path] != b[path])
    assert differing == [], differing
    # another seed gives another world (the digests can tell worlds apart)
    zoo.build_zoo(str(tmp_path / "c"), seed=4, profile=reduced)
    c = digests(tmp_path / "c")
    assert c["opt-small/model.safetensors"] != a["opt-small/model.safetensors"]
    assert c["data/annotations/caption_train.json"] != a["data/annotations/caption_train.json"]

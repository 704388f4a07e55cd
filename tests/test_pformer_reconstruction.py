"""The acceptance test of issue 21: a trained P-Former's own prompts make the frozen toy LLM
reproduce held-out sentences' content words -- on the demo world (its figures; skipped
without it) and, in every run, on a toy LLaMA the test pre-trains itself. (Its own file so
that pytest-xdist runs it beside the reduced demo of test_pformer_demo.py.)"""

import json
import os
import subprocess
import sys

import pytest

from lavis_vpgtrans.toy.zoo import zoo_profile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_world() -> str:
    """The demo profile's world, if built: $VPGTRANS_DEMO_ZOO, else the cache's toy_zoo_demo
    (conftest points $VPGTRANS_TOY_ZOO at the test profile's zoo)."""
    cache = os.environ.get("VPGTRANS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lavis_vpgtrans"))
    return os.environ.get("VPGTRANS_DEMO_ZOO") or os.path.join(cache, "toy_zoo_demo")


# The demo's own figures: this needs the demo world (~200 s to build) and costs ~2 CPU-minutes, so
# it runs when asked for with VPGTRANS_DEMO_ZOO=DIR (not whenever a machine happens to have the
# world in its cache: the suite's time must not depend on that);
# test_pformer_prompts_carry_content_words_ci below runs everywhere. The test profile's LMs do not
# follow soft prompts (prompts optimised per sentence reach only 0.45-0.61 content-word accuracy
# on them); the demo world's LLaMA does (1.00).
@pytest.mark.skipif(not os.environ.get("VPGTRANS_DEMO_ZOO") or zoo_profile(demo_world()) != "demo",
                    reason="runs on the demo world when asked: VPGTRANS_DEMO_ZOO=DIR (python -m "
                           "lavis_vpgtrans.toy.zoo --profile demo --out DIR, or ~/.cache/lavis_vpgtrans/toy_zoo_demo)")
def test_pformer_prompts_carry_their_sentences_content_words(tmp_path, monkeypatch):
    """Issue 21's acceptance: the demo's stage-0 P-Former (stage0.yaml through train.py:
    L_recon + SimCSE + L_vocab, 5 epochs, ~925 steps on 5,891 training sentences) makes the
    frozen toy LLaMA reproduce held-out val sentences' content words (colour, shape, position)
    clearly better from the sentence's own prompts than from another sentence's.

    Measured on the first caption of 160 val images (demo world, ZOO_VERSION 9, pinned kernels;
    the same figures as the demo's stage-0 table):
      teacher-forced content-word accuracy 0.862 own vs 0.467 another sentence's
      (all tokens 0.909 vs 0.700); greedy content-word accuracy 0.854 vs 0.367.
    """
    from lavis_vpgtrans.demo.prompt_reconstruction import PromptedLM, reconstruction
    from lavis_vpgtrans.common import kernels
    from lavis_vpgtrans.demo.pformer import held_out_sentences
    from lavis_vpgtrans.models.pformer_encoder import load_frozen_pformer

    root = demo_world()
    run_dir = tmp_path / "stage0"
    env = kernels.pinned_env(dict(os.environ, VPGTRANS_TOY_ZOO=root))  # the figures on any AVX2 machine
    subprocess.run([sys.executable, "train.py", "--cfg-path",
                    os.path.join("projects", "pformer", "demo", "experiment", "stage0.yaml"), "--options",
                    f"run.output_dir={run_dir}", "run.job_id=run"],
                   cwd=REPO_ROOT, env=env, check=True, timeout=900, capture_output=True)
    monkeypatch.setenv("VPGTRANS_TOY_ZOO", root)
    encoder = load_frozen_pformer("tiny_llama", str(run_dir / "run" / "checkpoint_4.pth"), 8)
    result = reconstruction(encoder, PromptedLM("toy:llama"), held_out_sentences(root))
    own, other = result["own"], result["other"]
    assert result["sentences"] == 160
    assert own["content_acc"] >= 0.8 and own["content_acc"] - other["content_acc"] >= 0.3, result
    assert own["greedy_content_acc"] >= 0.8 and own["greedy_content_acc"] - other["greedy_content_acc"] >= 0.3, result


# A toy LLaMA that follows soft prompts, built by the test in a pinned process (the figures
# below on any x86-64 machine with AVX2): the zoo's toy LLaMA (its config and tokenizer) from a
# fresh initialisation, pre-trained on documents of the toy world -- a terse scene description,
# a caption of that scene, a question about it -- as the demo profile's LLaMA is (1,250 steps on
# 6,000 documents there; 300 steps on 2,000 here, 17 s). On single sentences, as the test
# profile's LMs are pre-trained, an LM has no reason to read its context, and soft prompts
# barely steer it.
PROMPT_FOLLOWING_LM = """
import os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast
from lavis_vpgtrans.toy import world, zoo

source, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = LlamaTokenizerFast.from_pretrained(source)
with zoo.deterministic_build():
    torch.manual_seed(20)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(source))
    zoo.pretrain_lm(model, tokenizer, None, steps=steps, batch_size=32, lr=2e-3, seed=10, warmup_steps=50,
                    clip_norm=1.0, documents=world.corpus_documents(2000, seed=3, questions_per_doc=1))
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""
PROMPT_LM_STEPS = 300
CI_STAGE0_EPOCHS = 10  # stage0.yaml's 5 epochs are ~920 steps on the demo world's text; here 45 steps an epoch


def demo_bert(zoo_dir: str, out: str) -> str:
    """The demo profile's toy BERT, which its P-Former starts from (the same bytes as the demo
    world's bert/: the zoo's recipe with the demo's initializer range), from the test zoo's
    WordPiece vocabulary (the same in both profiles)."""
    import shutil

    import torch
    from transformers import BertConfig, BertForMaskedLM

    from lavis_vpgtrans.toy.zoo import PROFILES

    source = os.path.join(zoo_dir, "bert")
    os.makedirs(out, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(source, name), out)
    config = BertConfig.from_pretrained(source, initializer_range=PROFILES["demo"].qformer_init_range)
    torch.manual_seed(40)  # the zoo's seed + 40
    BertForMaskedLM(config).save_pretrained(out)
    return out


def carries_content(result) -> bool:
    """The acceptance criterion: own prompts clearly above another sentence's, teacher-forced and
    greedy, on content words."""
    own, other = result["own"], result["other"]
    return (own["content_acc"] >= 0.6 and own["content_acc"] - other["content_acc"] >= 0.2
            and own["greedy_content_acc"] >= 0.6 and own["greedy_content_acc"] - other["greedy_content_acc"] >= 0.3)


def test_pformer_prompts_carry_content_words_ci(toy_zoo, tmp_path):
    """Issue 21's acceptance on any machine, in about a minute of CPU (the demo-world test above
    needs the demo world): the demo's stage 0 (stage0.yaml through train.py: L_recon + SimCSE +
    L_vocab, its lr and schedule, 10 epochs = 450 steps on the 1,458 train and source captions
    of the test world that are not val / test captions) trains a P-Former from the demo's toy
    BERT for a toy LLaMA that follows soft prompts (PROMPT_FOLLOWING_LM). Its own prompts make
    the frozen LLaMA reproduce held-out sentences' content words (colour, shape, position)
    clearly better than another sentence's prompts.

    Measured on the first caption of the test world's 32 val and 32 test images (ZOO_VERSION 9,
    pinned kernels): teacher-forced content-word accuracy 0.707 own vs 0.441 another sentence's
    (all tokens 0.849 vs 0.664); greedy content-word accuracy 0.711 vs 0.318. About 62 s of CPU
    (the LM 21 s, stage 0 37 s, the measurements 4 s), 66 s wall on 2 cores at load 1.
    The check fails where the prompts carry no content:
      - an untrained P-Former (asserted below): 0.436 vs 0.434, greedy 0.029 vs 0.023;
      - the same stage 0 for the test profile's LLaMA (pre-trained on single sentences: it does not
        read its context): 0.482 vs 0.434, greedy 0.445 vs 0.295.
    The budget is what the margin needs: with 8 stage-0 epochs it passes narrowly (0.670 vs 0.451,
    greedy 0.689 vs 0.307); with an LM pre-trained on batches of 16 documents instead of 32 it
    fails (0.621 vs 0.430, greedy 0.611 vs 0.303).
    """
    from lavis_vpgtrans.common import kernels
    from lavis_vpgtrans.demo.prompt_reconstruction import PromptedLM, reconstruction
    from lavis_vpgtrans.models.pformer_encoder import PFormerEncoder, load_frozen_pformer

    env = kernels.pinned_env(dict(os.environ, VPGTRANS_TOY_ZOO=toy_zoo))
    lm_dir, bert_dir, run_dir = str(tmp_path / "llama"), demo_bert(toy_zoo, str(tmp_path / "bert")), tmp_path / "stage0"
    subprocess.run([sys.executable, "-c", PROMPT_FOLLOWING_LM, os.path.join(toy_zoo, "llama"), lm_dir,
                    str(PROMPT_LM_STEPS)], cwd=REPO_ROOT, env=env, check=True, timeout=600, capture_output=True)
    proc = subprocess.run([sys.executable, "train.py", "--cfg-path",
                           os.path.join("projects", "pformer", "demo", "experiment", "stage0.yaml"), "--options",
                           f"run.output_dir={run_dir}", "run.job_id=run", f"run.max_epoch={CI_STAGE0_EPOCHS}",
                           f"model.llm_model={lm_dir}", f"model.bert_model={bert_dir}"],
                          cwd=REPO_ROOT, env=env, timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    held_out = []
    for split in ("val", "test"):  # stage 0 drops every val / test caption from its training text
        with open(os.path.join(toy_zoo, "data", "annotations", f"caption_{split}.json")) as f:
            held_out += [r["caption"][0] for r in json.load(f)]
    lm = PromptedLM(lm_dir)
    encoder = load_frozen_pformer("tiny_llama", str(run_dir / "run" / f"checkpoint_{CI_STAGE0_EPOCHS - 1}.pth"), 8,
                                  llm_model=lm_dir)
    result = reconstruction(encoder, lm, held_out)
    assert result["sentences"] == 64
    assert carries_content(result), result

    # the same measurement of an untrained P-Former: own and another sentence's prompts alike
    import torch

    torch.manual_seed(0)
    untrained = reconstruction(PFormerEncoder(bert_dir, 8, lm.llm_model.config.hidden_size, max_txt_len=48).eval(),
                               lm, held_out)
    assert not carries_content(untrained), untrained
    assert abs(untrained["own"]["content_acc"] - untrained["other"]["content_acc"]) < 0.05, untrained

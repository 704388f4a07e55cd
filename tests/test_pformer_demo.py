"""The P-Former demo (python -m lavis_vpgtrans.demo pformer), reduced, through its real
train.py subprocesses. The acceptance test of issue 21 (a trained P-Former's prompts carry
their sentence's content words) is in test_pformer_reconstruction.py."""

import json
import os
import subprocess
import sys

import pytest

from lavis_vpgtrans.toy.zoo import zoo_profile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def epoch_metrics(run_dir, benchmark, metric):
    with open(os.path.join(run_dir, "run", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["epoch"]: r["metrics"][metric] for r in records if r["benchmark"] == benchmark}


def test_reduced_pformer_demo_end_to_end(toy_zoo, tmp_path):
    out = tmp_path / "pformer_demo"
    cmd = [sys.executable, "-m", "lavis_vpgtrans.demo", "pformer", "--out", str(out), "--zoo", toy_zoo,
           "--profile", zoo_profile(toy_zoo), "--seeds", "5", "--epochs", "2", "--stage1-epochs", "1",
           "--stage0-epochs", "1", "--stage0-few-epochs", "1", "--scarce-images", "8"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("CPU kernels pinned", "Stage 2 (toy LLaMA)", "Paired differences", "Stage 0: do the P-Former",
                 "Alignment against the LM loss", "Goal (with P-Former ahead of without at the scarce budget",
                 "Goal (the gain smaller at the plentiful budget", "Goal (more pre-training sentences",
                 "Total wall time"):
        assert line in proc.stdout, line

    results = json.loads((out / "results.json").read_text())
    scores = results["seeds"]["5"]
    assert {b: set(arms) for b, arms in scores.items()} == {"scarce": {"without", "with", "with_few"},
                                                            "plentiful": {"without", "with"}}
    # every figure is the run's own metrics.jsonl: last / best / mean over the 2 epochs
    caption = {}
    for budget, arms in scores.items():
        for arm, benches in arms.items():
            run_dir = out / "seed5" / budget / arm
            for bench, metric in (("toy_caption", "CIDEr"), ("toy_vqa", "agg_metrics")):
                logged = epoch_metrics(run_dir, bench, metric)
                assert sorted(logged) == [0, 1]
                assert benches[bench]["last"] == logged[1]
                assert benches[bench]["best"] == max(logged.values())
                assert benches[bench]["mean"] == pytest.approx(sum(logged.values()) / 2)
            caption[budget, arm] = epoch_metrics(run_dir, "toy_caption", "CIDEr")[1]
    # the claims are the paired differences of those figures
    claims = results["claims"]
    gain = caption["scarce", "with"] - caption["scarce", "without"]
    assert claims["scarce_gain/toy_caption"]["per_seed"]["5"] == pytest.approx(gain)
    assert claims["gap_shrinks/toy_caption"]["per_seed"]["5"] == pytest.approx(
        gain - (caption["plentiful", "with"] - caption["plentiful", "without"]))
    assert claims["more_sentences/toy_caption"]["per_seed"]["5"] == pytest.approx(
        caption["scarce", "with"] - caption["scarce", "with_few"])
    assert claims["scarce_gain/toy_caption"]["met"] == (gain > 0)
    # stage 0 and stage 1 are shared by the seeds; the aligned runs use the P-Former, the others none
    log = (out / "seed5" / "scarce" / "with_few" / "run" / "log.txt").read_text()
    assert str(out / "shared" / "stage0_few" / "run" / "checkpoint_0.pth") in log
    assert str(out / "shared" / "scarce" / "stage1_with_few" / "run" / "checkpoint_0.pth") in log
    assert '"align_weight": 0.0' in (out / "seed5" / "plentiful" / "without" / "run" / "log.txt").read_text()
    # the scarce budget: the first 8 images of the training split, all their captions
    scarce = json.loads(open(results["budgets"]["scarce"]).read())
    assert len({r["image"] for r in scarce}) == 8 and len(scarce) == 40
    # the diagnostics: the P-Formers measured on held-out sentences, L_align read from the logs
    for name in ("stage0", "stage0_few"):
        rec = results["stage0"][name]["reconstruction"]
        assert 0 <= rec["own"]["content_acc"] <= 1 and 0 <= rec["other"]["greedy_content_acc"] <= 1
    few_sentences, all_sentences = (results["stage0"][n]["sentences"] for n in ("stage0_few", "stage0"))
    assert 0 < few_sentences < all_sentences
    align = results["alignment_losses"]["seed5/scarce/with"]["epochs"]
    assert len(align) == 2 and all(e["loss_align"] > 0 and e["loss_lm"] > 0 for e in align)
    assert "shared/scarce/stage1_with" in results["alignment_losses"]
    assert (out / "convergence.png").is_file() and "Goal (" in (out / "results.md").read_text()

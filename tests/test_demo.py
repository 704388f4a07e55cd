"""The offline demo (python -m lavis_vpgtrans.demo), reduced to a few epochs on the session's
toy zoo, end to end through its real subprocesses: train.py, the runner, the converter CLI
and the speed-up analysis."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lavis_vpgtrans.toy import world
from lavis_vpgtrans.toy import zoo
from lavis_vpgtrans.toy.zoo import (TOY_VIT, build_eva_vit, ensure_zoo, lm_text, pretrain_lm, pretrain_vit,
                                   related_embeddings, resolve, zoo_profile)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(*args, timeout=1500):
    return subprocess.run([sys.executable, "-m", "lavis_vpgtrans.demo", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def captions_of(metrics_file, benchmark="toy_caption", metric="CIDEr"):
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["epoch"], r["stage"], r["metrics"][metric]) for r in records if r["benchmark"] == benchmark]


def test_reduced_demo_end_to_end(toy_zoo, tmp_path):
    out = tmp_path / "demo"
    proc = run_demo("--out", str(out), "--zoo", toy_zoo, "--profile", zoo_profile(toy_zoo), "--seeds", "3",
                    "--epochs", "2", "--source-epochs", "1", "--stage1-epochs", "1", "--warmup-epochs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout
    for line in ("Table 3 in miniature", "Table 2 in miniature", "Word-embedding converter", "Goal (VPGTrans",
                 "Total wall time", "[seed3] VPGTrans:", "[seed3] converter opt-small -> LLaMA",
                 "Attribute F1", "The warm-up's learning rate", "Converter's share across families",
                 "Validation noise",
                 "CPU kernels pinned"):
        assert line in stdout, line

    results = json.loads((out / "results.json").read_text())
    seed = results["seeds"]["3"]
    root = out / "seed3"
    # Table 3: p is TFS's best caption CIDEr as its own log has it
    tfs = captions_of(root / "tfs" / "run" / "metrics.jsonl")
    assert len(tfs) == 2 and all(stage == 2 for _, stage, _ in tfs)
    table3 = seed["opt-large"]["tables"][0]
    rows = {row["run"]: row["cells"] for row in table3["rows"]}
    assert set(rows) == {"VPGTrans", "VPG inherit", "VPGTrans w/o converter init"}
    assert rows["VPGTrans"]["toy_caption"]["p"] == pytest.approx(max(score for _, _, score in tfs))
    # the speed-up, recomputed from the two logs: paper epochs, stage 1 = epoch 1, strictly above p
    vt = captions_of(root / "vpgtrans" / "run" / "metrics.jsonl")
    p = max(score for _, _, score in tfs)
    e_base = 1 + next(epoch for epoch, _, score in tfs if score == p)
    e_run = next((1 + epoch for epoch, _, score in vt if score > p), None)
    cell = rows["VPGTrans"]["toy_caption"]
    assert (cell["e_baseline"], cell["e_run"]) == (e_base, e_run)
    assert cell["speedup"] == (None if e_run is None else pytest.approx(e_base / e_run))
    assert results["goal"]["speedup_per_seed"]["3"] == cell["speedup"]
    assert results["goal"]["tfs_best_at_last_epoch"]["3"] == (e_base == 2)
    assert set(rows["VPGTrans"]) == {"toy_caption", "toy_vqa"}
    # Table 5 (VPGTrans vs VPG inherit) and the cross-family table
    assert len(seed["opt-large"]["tables"]) == 2
    assert [row["run"] for row in seed["llama"]["tables"][0]["rows"]] == [
        "VPGTrans opt-small->LLaMA", "VPGTrans opt-small->LLaMA w/o converter init"]
    # VPGTrans: epoch 0 is the projector warm-up (stage 1), then joint training
    vpgtrans = captions_of(root / "vpgtrans" / "run" / "metrics.jsonl")
    assert [stage for _, stage, _ in vpgtrans] == [1, 2]
    # the warm-up table's runs are stage 1 throughout
    warmup = captions_of(root / "warmup_converter" / "run" / "metrics.jsonl")
    assert [stage for _, stage, _ in warmup] == [1, 1]
    assert set(seed["warmup"]) == {"converter init", "random init"}
    # the warm-up lr runs: the converter's projector at 1x, 5x (the table's run) and 10x lr, and how far
    # the first warm-up epoch moved it
    assert set(seed["warmup_lr"]) == {"1", "5", "10"}
    assert seed["warmup_lr"]["5"]["caption"] == seed["warmup"]["converter init"]
    moved = {k: v["movement"]["relative_change"] for k, v in seed["warmup_lr"].items()}
    assert 0 < moved["1"] < moved["10"], moved
    # every run's best / last / mean over epochs
    assert seed["scores"]["vpgtrans"]["toy_caption"]["last"] == vpgtrans[-1][2]
    assert seed["scores"]["vpgtrans"]["toy_caption"]["mean"] == pytest.approx(sum(c for _, _, c in vpgtrans) / 2)
    # what the captions say about the scene, against the shuffled baseline
    attrs = seed["attributes"]["vpgtrans"]
    assert attrs["n_images"] == seed["n_val"] and set(attrs["f1"]) >= {"shape", "color", "cell", "object"}
    assert set(seed["attributes"]) >= {"tfs", "vpgtrans", "cross_vpgtrans", "cross_vpgtrans_no_converter", "source"}
    # one seed's validation noise on the claimed differences; the warm-up's is the epoch-1 gap of the table
    intervals = seed["image_intervals"]
    assert len(intervals) == 4 and all(v["n_images"] == seed["n_val"] for v in intervals.values())
    gap = intervals["warm-up epoch 1: converter init - random init"]
    assert gap["diff"] == pytest.approx(seed["warmup"]["converter init"]["1"] - seed["warmup"]["random init"]["1"],
                                        abs=1e-6)
    assert gap["ci95"][0] <= gap["diff"] <= gap["ci95"][1]
    assert seed["warmup"]["converter init"] == {"1": warmup[0][2], "2": warmup[1][2]}
    # converter quality, read from the converter's own output
    assert set(seed["converters"]) == {"opt-large", "llama"}
    assert seed["converters"]["opt-large"]["same_tokenizer"] is True
    assert seed["converters"]["llama"]["same_tokenizer"] is False
    assert -1.0 <= seed["converters"]["llama"]["held_out_mean_cosine"] <= 1.0
    # one source for all seeds, trained on the world's source split (not the transfers' train split)
    assert set(results["timings_s"]["job_walls"]) >= {"source", "seed3/vpgtrans", "seed3/convert_llama"}
    assert "annotations/caption_source.json" in (out / "source" / "run" / "log.txt").read_text()
    from PIL import Image

    with Image.open(out / "convergence.png") as image:
        assert image.width > 400 and image.height > 200
    assert (root / "analysis" / "opt-large" / "convergence.png").is_file()
    assert "Table 5" in (out / "results.md").read_text()
    # the tables made again from the finished runs, without training: the same figures
    again = run_demo("--out", str(out), "--zoo", toy_zoo, "--profile", zoo_profile(toy_zoo), "--seeds", "3",
                     "--epochs", "2", "--source-epochs", "1", "--stage1-epochs", "1", "--warmup-epochs", "2",
                     "--analyse-only")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(r"training \d+ jobs", again.stdout) is None and "--analyse-only" in again.stdout
    redone = json.loads((out / "results.json").read_text())
    assert redone["seeds"] == results["seeds"] and redone["goal"] == results["goal"]
    assert redone["timings_s"]["total"] == results["timings_s"]["total"]
    # a second run into the same directory is refused, the first one's results stay
    from lavis_vpgtrans.demo.cli import main

    with pytest.raises(SystemExit, match="holds an earlier run"):
        main(["--out", str(out), "--zoo", toy_zoo, "--profile", zoo_profile(toy_zoo), "--seeds", "3"])
    assert (root / "tfs" / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("args, message", [
    (["--epochs", "1"], "--epochs must be at least 2"),
    (["--seeds", "0", "0"], "--seeds repeats a seed"),
    (["--profile", "huge"], "--profile 'huge'"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_demo_rejects_bad_arguments(tmp_path, args, message):
    from lavis_vpgtrans.demo.cli import main

    with pytest.raises(SystemExit, match=message):
        main(["--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_zoo_of_another_profile_is_refused_not_deleted(tmp_path):
    root = tmp_path / "zoo"
    root.mkdir()
    (root / "ZOO_VERSION").write_text(zoo._stamp("demo"))
    (root / "keep.txt").write_text("x")
    assert zoo_profile(str(root)) == "demo"
    with pytest.raises(ValueError, match="'demo' profile, not 'test'"):
        ensure_zoo(str(root), profile="test")
    assert (root / "keep.txt").is_file()


def test_an_outdated_zoo_is_rebuilt_in_the_profile_its_stamp_names(tmp_path):
    """A `toy:` path (profile None) over an outdated demo zoo rebuilds the demo world, not the
    test one."""
    stamps = {"1": "test", "1 demo 0123456789ab": "demo", "1 huge 0123456789ab": None}
    for i, (stamp, profile) in enumerate(stamps.items()):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "ZOO_VERSION").write_text(stamp)
        assert zoo.zoo_profile(str(tmp_path / str(i))) is None  # outdated
        assert zoo._stamped_profile(str(tmp_path / str(i))) == profile
    assert zoo._stamped_profile(str(tmp_path / "absent")) is None


def test_a_directory_that_is_not_a_zoo_is_refused_not_deleted(tmp_path):
    (tmp_path / "data.txt").write_text("precious")
    with pytest.raises(ValueError, match="holds no toy zoo"):
        ensure_zoo(str(tmp_path), profile="demo")
    assert (tmp_path / "data.txt").read_text() == "precious"


def test_vit_pretraining_learns_the_scenes():
    """The demo profile's ViT pre-training: every patch token classifies its grid cell x that
    cell's colour x shape."""
    torch.set_num_threads(1)
    cfg = dict(TOY_VIT)
    torch.manual_seed(0)
    vit = build_eva_vit(cfg)
    first = pretrain_vit(vit, cfg, steps=1, n_scenes=64, batch_size=32)
    last = pretrain_vit(vit, cfg, steps=80, n_scenes=64, batch_size=32)
    assert last < 0.5 * first
    assert not vit.training


def test_pretrained_vit_patch_tokens_carry_their_position_and_content():
    """As a real ViT's patch features do, the toy ViT's say where they are: a linear probe on
    held-out scenes reads back a patch token's grid cell, and the shape in that cell. (Trained on
    cell content pooled by fixed patch indices, it read the cell back at 0.30, chance 0.25: the VL
    models then named the right colours at the wrong places.)"""
    import random

    from lavis.processors.blip_processors import BlipImageEvalProcessor

    torch.set_num_threads(1)
    cfg = dict(TOY_VIT)
    torch.manual_seed(0)
    vit = build_eva_vit(cfg)
    pretrain_vit(vit, cfg, steps=150, n_scenes=600, seed=0)
    rng = random.Random(1)
    scenes = [world.sample_scene(rng) for _ in range(300)]
    transform = BlipImageEvalProcessor(image_size=cfg["img_size"])
    with torch.no_grad():
        patches = vit(torch.stack([transform(world.render(s)) for s in scenes]))[:, 1:]  # (N, 16, D)
    grid = cfg["img_size"] // cfg["patch_size"]
    cell_names = [next(n for n, (c, r) in world.CELLS.items() if (c, r) == (col * 2 // grid, row * 2 // grid))
                  for row in range(grid) for col in range(grid)]
    cells = torch.tensor([sorted(world.CELLS).index(name) for name in cell_names]).repeat(len(scenes))
    shapes = torch.tensor([next((1 + world.SHAPES.index(t.shape) for t in s if t.cell == name), 0)
                           for s in scenes for name in cell_names])

    def probe_accuracy(features, labels, classes):
        n = len(features) * 2 // 3  # fit on two thirds of the scenes, score on the rest
        mean, std = features[:n].mean(0), features[:n].std(0) + 1e-6
        x = (features - mean) / std
        head = torch.nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(head(x[:n]), labels[:n])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float((head(x[n:]).argmax(1) == labels[n:]).float().mean())

    features = patches.reshape(-1, patches.shape[-1])
    assert probe_accuracy(features, cells, len(world.CELLS)) > 0.9
    assert probe_accuracy(features, shapes, 1 + len(world.SHAPES)) > 0.9


def test_corpus_documents_put_the_caption_after_the_description():
    docs = world.corpus_documents(5, seed=1, questions_per_doc=1)
    assert len(docs) == 5
    for description, caption, question in docs:
        assert description.count(",") == len(world.CELLS) - 1
        assert question.startswith("Question: ") and " Answer: " in question
        assert caption and not caption.startswith("Question")
    assert world.corpus_documents(5, seed=1) == docs


def test_document_pretraining_lowers_the_lm_loss():
    """The demo profile's LM pre-training on multi-sentence documents (each sentence closed by
    EOS, one sequence per document), with warm-up and clipping."""
    from transformers import AutoTokenizer, OPTForCausalLM

    torch.set_num_threads(1)
    path = resolve("toy:opt-small")
    model, tokenizer = OPTForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    docs = world.corpus_documents(64, seed=5)
    steps = []
    last = pretrain_lm(model, tokenizer, sentences=None, steps=30, batch_size=8, lr=3e-3, documents=docs,
                       warmup_steps=5, clip_norm=1.0, on_step=steps.append)
    assert steps == list(range(1, 31))
    # the loss on one whole document, before and after
    fresh = OPTForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tokenizer(lm_text(docs[0])).input_ids + [tokenizer.eos_token_id]])
    with torch.no_grad():
        before = fresh(input_ids=ids, labels=ids).loss.item()
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < before and last < before
    assert not model.training
    with pytest.raises(ValueError, match="decoder-only"):
        from transformers import T5ForConditionalGeneration

        pretrain_lm(T5ForConditionalGeneration.from_pretrained(resolve("toy:t5")), tokenizer, None, steps=1,
                    documents=docs)


def test_lm_text_ends_every_line_with_a_newline_the_tokenizers_keep():
    """Decoder-only LMs learn the released models' end of text: a caption line ends with "\\n"."""
    from transformers import AutoTokenizer

    text = lm_text(["a red circle at the top left", "Question: how many shapes are there? Answer: 1"])
    assert text == "a red circle at the top left\nQuestion: how many shapes are there? Answer: 1\n"
    for name, newline in (("opt-small", "\u010a"), ("llama", "<0x0A>")):  # GPT-2's byte for \n; LLaMA's byte fallback
        tokenizer = AutoTokenizer.from_pretrained(resolve(f"toy:{name}"))
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
        assert tokens.count(newline) == 2 and tokens[-1] == newline, (name, tokens)
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_related_embeddings_are_a_linear_map_of_the_narrow_ones():
    torch.manual_seed(0)
    narrow = torch.randn(60, 8) * 0.02
    wide = related_embeddings(narrow, 12, seed=1)
    assert wide.shape == (60, 12)
    fit = torch.linalg.lstsq(narrow, wide).solution
    assert torch.allclose(narrow @ fit, wide, atol=1e-6)
    assert wide.std().item() == pytest.approx(narrow.std().item(), rel=0.2)
    assert not torch.equal(wide, related_embeddings(narrow, 12, seed=2))
    with pytest.raises(ValueError, match="8-d to 4-d"):
        related_embeddings(narrow, 4, seed=1)


def test_source_split_adds_images_and_leaves_the_other_splits_alone(tmp_path):
    world.write_dataset(str(tmp_path / "a"), n_train=4, n_val=2, n_test=2, seed=1)
    world.write_dataset(str(tmp_path / "b"), n_train=4, n_val=2, n_test=2, seed=1, n_source=3)
    for name in ("caption_train.json", "caption_val.json", "vqa_test.json"):
        assert (tmp_path / "a" / "annotations" / name).read_text() == (tmp_path / "b" / "annotations" / name).read_text()
    source = json.loads((tmp_path / "b" / "annotations" / "caption_source.json").read_text())
    train = json.loads((tmp_path / "b" / "annotations" / "caption_train.json").read_text())
    assert len(source) == 3 * 5 and all(isinstance(e["caption"], str) for e in source)
    assert not {e["image"] for e in source} & {e["image"] for e in train}
    assert not (tmp_path / "a" / "annotations" / "caption_source.json").exists()


def test_job_failure_names_the_job_and_stops_the_others(tmp_path):
    from lavis_vpgtrans.demo.jobs import JobFailed, run_jobs
    from lavis_vpgtrans.demo.plan import Job

    slow = Job(key="s/slow", label="slow", argv=[sys.executable, "-c", "import time; time.sleep(60)"],
               out_dir=str(tmp_path / "slow"), epochs=1)
    bad = Job(key="s/bad", label="bad", argv=[sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
              out_dir=str(tmp_path / "bad"), epochs=1)
    after = Job(key="s/after", label="after", argv=[sys.executable, "-c", "pass"], out_dir=str(tmp_path / "after"),
                epochs=1, deps=("s/bad",))
    with pytest.raises(JobFailed, match=r"s/bad \(bad\) failed with exit code 3(.|\n)*boom"):
        run_jobs([slow, bad, after], dict(os.environ), max_parallel=2)
    assert not (tmp_path / "after").exists()  # never started
    with pytest.raises(ValueError, match="s/after -> s/missing"):
        run_jobs([Job(key="s/after", label="x", argv=["true"], out_dir=str(tmp_path), epochs=1,
                      deps=("s/missing",))], dict(os.environ), max_parallel=1)


def test_goal_and_summary_mark_a_baseline_still_improving():
    from lavis_vpgtrans.demo.cli import goal, goal_text, summary_markdown

    def table(speedup, e_base, e_run):
        cell = {"metric": "CIDEr", "p": 1.0, "e_baseline": e_base, "e_run": e_run, "run_best": 1.2,
                "speedup": speedup}
        return [{"title": "Table 3", "baseline": "TFS", "benchmarks": ["toy_caption"],
                 "rows": [{"run": "VPGTrans", "cells": {"toy_caption": cell}}], "missing": []}]

    results = {0: {"opt-large": {"tables": table(2.5, 5, 2)}, "best": {}, "scores": {}, "converters": {}},
               1: {"opt-large": {"tables": table(None, 10, None)}, "best": {}, "scores": {}, "converters": {}}}
    outcome = goal(results, epochs=10)
    assert outcome["speedup_per_seed"] == {"0": 2.5, "1": None}
    assert outcome["tfs_best_at_last_epoch"] == {"0": False, "1": True}
    assert outcome["met"] is False and outcome["met_on_mean"] is False  # mean 1.25: "never" counts 0
    assert goal_text(outcome).startswith("Goal (VPGTrans speed-up >= 2 on caption CIDEr): NOT met (worst: seed 1, 0.0)")
    assert goal({0: results[0]}, epochs=10)["met"] is True
    text = summary_markdown(results, cross_family=False, epochs=10)
    # mean ± sd [min, max] over the seeds, n/a without a VQA comparison, then each seed as the paper prints it
    assert "| VPGTrans | 1.2 ± 1.8 [0.0, 2.5] | n/a | 2.5 / -* |" in text


def test_further_goals_on_the_mean_and_on_every_seed():
    from lavis_vpgtrans.demo.cli import further_goals, goal_text

    def seed(converter_init, random_init, cross_speedup, top1):
        cross = {"rows": [{"run": "VPGTrans opt-small->LLaMA", "cells": {"toy_caption": {"speedup": cross_speedup}}}]}
        return {"warmup": {"converter init": {"1": converter_init}, "random init": {"1": random_init}},
                "llama": {"tables": [cross]}, "converters": {"opt-large": {"held_out_top1_nn_accuracy": top1}}}

    good = further_goals({0: seed(2.5, 2.0, 1.8, 1.0)})
    assert {name: g["met"] for name, g in good.items()} == {"warmup": True, "cross_family": True, "converter": True}
    mixed = further_goals({0: seed(2.5, 2.0, 1.8, 1.0), 1: seed(2.0, 2.1, None, 0.4)})
    assert not any(g["met"] for g in mixed.values())
    # the warm-up lead holds on the mean (+0.2) but not on seed 1; the cross-family speed-up not even there
    assert mixed["warmup"]["met_on_mean"] and not mixed["cross_family"]["met_on_mean"]
    assert goal_text(mixed["warmup"]).startswith(
        "Goal (converter init ahead of random init after warm-up epoch 1, caption CIDEr difference > 0): met on the "
        "mean, NOT on every seed (worst: seed 1, -0.100)")
    assert goal_text(mixed["cross_family"]).endswith("per seed: 0: 1.8, 1: 0.0")


def test_eval_questions_per_image_asks_each_type_equally_and_keeps_the_scenes(tmp_path):
    """The demo world asks one question per validation scene, the four types taking turns; the
    scenes, captions and training questions are those of the full world."""
    import collections

    from lavis_vpgtrans.toy import world

    full, one = tmp_path / "full", tmp_path / "one"
    world.write_dataset(str(full), n_val=40, seed=1)
    world.write_dataset(str(one), n_val=40, seed=1, eval_questions_per_image=1)
    for name in ("caption_val.json", "caption_train.json", "vqa_train.json"):
        assert (full / "annotations" / name).read_text() == (one / "annotations" / name).read_text(), name
    asked = json.loads((one / "annotations" / "vqa_val_annotations.json").read_text())["annotations"]
    every = json.loads((full / "annotations" / "vqa_val_annotations.json").read_text())["annotations"]
    assert len(asked) == 40 and len(every) == 160
    assert collections.Counter(a["answer_type"] for a in asked) == {"other": 20, "number": 10, "yes/no": 10}
    # each kept question is one of its image's four, with its answer
    by_image = collections.defaultdict(set)
    for a in every:
        by_image[a["image_id"]].add(a["multiple_choice_answer"])
    assert all(a["multiple_choice_answer"] in by_image[a["image_id"]] for a in asked)


def test_per_image_cider_averages_to_the_corpus_score(tmp_path):
    """The demo's per-image CIDEr (for paired intervals) averages to the corpus CIDEr that the
    caption task reports through pycocoevalcap; a paired interval of a run against itself is 0."""
    import random

    from lavis_vpgtrans.demo.stats import paired_image_interval, per_image_cider
    from lavis_vpgtrans.tasks.captioning import load_caption_results, load_coco_gt, score_captions
    from lavis_vpgtrans.toy import world

    world.write_dataset(str(tmp_path), n_train=4, n_val=60, n_test=2, seed=2)
    gt = str(tmp_path / "annotations" / "caption_val_gt.json")
    refs, _ = load_coco_gt(gt)
    rng = random.Random(0)
    # a "model" that sometimes names the right scene, sometimes another one's
    pool = [caps[0] for caps in refs.values()]
    preds = [{"image_id": i, "caption": caps[1] if rng.random() < 0.5 else rng.choice(pool)} for i, caps in refs.items()]
    result = tmp_path / "val_epoch0.json"
    result.write_text(json.dumps(preds))
    per_image = per_image_cider(str(result), gt)
    corpus = score_captions(refs, load_caption_results(str(result)), metrics_to_run=["CIDEr"])["CIDEr"]
    assert sorted(per_image) == sorted(refs)
    assert sum(per_image.values()) / len(per_image) == pytest.approx(corpus, rel=1e-9)
    same = paired_image_interval(str(result), str(result), gt)
    assert same["n_images"] == 60 and same["diff"] == 0 and same["half_width"] == 0

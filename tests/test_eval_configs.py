"""Every zero-shot eval config runs through evaluate.py on a tiny model and the synthetic
benchmarks, and prints the real metric; the benchmark builders read the real file layouts."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ("coco_caption", "nocaps", "vqav2", "okvqa", "gqa")
CAPTION_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
TINY = {"opt": ("blip2_opt_transfer", "tiny_opt_small"), "t5": ("blip2_t5_transfer", "tiny_t5"),
        "llama": ("blip2_llama", "tiny_llama")}


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory, plugin):
    from lavis_vpgtrans.toy.benchmarks import write_benchmarks

    # Small: the point is every code path, not statistics.
    return write_benchmarks(str(tmp_path_factory.mktemp("benchmarks")), n_coco=6, n_nocaps=6, n_gqa=4)


def eval_options(bench, root, out_dir, family):
    arch, model_type = TINY[family]
    ds = f"vpgtrans_{bench}"
    return [f"model.arch={arch}", f"model.model_type={model_type}", f"datasets.{ds}.data_root={root}",
            f"datasets.{ds}.vis_processor.eval.image_size=32", "run.device=cpu", "run.num_workers=0",
            f"run.output_dir={out_dir}", "run.job_id=eval"]


def logged_metrics(out_dir):
    lines = [json.loads(line) for line in open(os.path.join(out_dir, "eval", "evaluate.txt"))]
    assert len(lines) == 1
    (split, metrics), = lines[0].items()
    return split, metrics


def check_metrics(bench, split, metrics, out_dir, root):
    from lavis_vpgtrans.tasks.vqa import vqa_accuracy

    result_dir = os.path.join(out_dir, "eval", "result")
    if bench in ("coco_caption", "nocaps"):
        assert CAPTION_KEYS <= set(metrics) and "SPICE" not in metrics
        assert all(0.0 <= metrics[k] <= 10.0 for k in CAPTION_KEYS)
        if bench == "nocaps":
            assert {"CIDEr_in-domain", "CIDEr_near-domain", "CIDEr_out-domain"} <= set(metrics)
    elif bench == "gqa":
        assert set(metrics) == {"acc", "agg_metrics"} and 0.0 <= metrics["acc"] <= 100.0
    else:
        # The logged accuracy is VQAEval's on the saved result file.
        names = {"vqav2": ("coco/annotations/v2_mscoco_val2014_annotations.json",
                           "coco/annotations/v2_OpenEnded_mscoco_val2014_questions.json"),
                 "okvqa": ("okvqa/annotations/mscoco_val2014_annotations.json",
                           "okvqa/annotations/OpenEnded_mscoco_val2014_questions.json")}[bench]
        result = os.path.join(result_dir, f"{split}_vqa_result.json")
        subset_file = os.path.join(out_dir, "eval", f"{split}_question_subset.json")
        subset = json.load(open(subset_file)) if os.path.exists(subset_file) else None
        again = vqa_accuracy(os.path.join(root, names[0]), os.path.join(root, names[1]), result, subset)
        assert metrics["acc"] == again["acc"] and 0.0 <= metrics["acc"] <= 100.0


# --------------------------------------------------------------------------- builders


def test_benchmark_builders_read_the_synthetic_layout(bench_root):
    from lavis.common.registry import registry
    from lavis.datasets.builders.base_dataset_builder import load_dataset_config

    sizes = {}
    for bench in BENCHMARKS:
        cls = registry.get_builder_class(f"vpgtrans_{bench}")
        cfg = load_dataset_config(cls.default_config_path())
        cfg.data_root = bench_root
        cfg.vis_processor.eval.image_size = 32
        datasets = cls(cfg).build_datasets()
        for split, dataset in datasets.items():
            batch = dataset.collater([dataset[0], dataset[1]])
            assert tuple(batch["image"].shape) == (2, 3, 32, 32)
            sizes[bench, split] = len(dataset)
        if bench in ("coco_caption", "nocaps"):
            # Dataset image ids are the ground truth's ids.
            for split, dataset in datasets.items():
                gt = json.load(open(cfg.build_info.annotations[split].coco_gt))
                ids = {int(dataset[i]["image_id"]) for i in range(len(dataset))}
                assert ids == {img["id"] for img in gt["images"]}
                if bench == "nocaps":
                    assert {img["domain"] for img in gt["images"]} == {"in-domain", "near-domain", "out-domain"}
    assert sizes == {("coco_caption", "val"): 2, ("coco_caption", "test"): 4, ("nocaps", "val"): 6,
                     ("vqav2", "val"): 24, ("okvqa", "test"): 12, ("gqa", "val"): 12}

    # VQAv2 gold answers are normalised as the official files are ("2", not "two").
    anns = json.load(open(os.path.join(bench_root, "coco/annotations/v2_mscoco_val2014_annotations.json")))
    assert all(a["multiple_choice_answer"] not in ("one", "two", "three") for a in anns["annotations"])


def test_missing_benchmark_file_names_path_and_source(tmp_path, plugin):
    from lavis.common.registry import registry
    from lavis.datasets.builders.base_dataset_builder import load_dataset_config

    cls = registry.get_builder_class("vpgtrans_nocaps")
    cfg = load_dataset_config(cls.default_config_path())
    cfg.data_root = str(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        cls(cfg).build_datasets()
    message = str(err.value)
    assert os.path.join(str(tmp_path), "nocaps/annotations/nocaps_val.json") in message
    assert "nocaps.org" in message and "data_root" in message


def test_eval_configs_have_no_machine_paths_and_the_paper_settings():
    import yaml

    for family, prompt in (("opt", "Question: {} Answer:"), ("t5", "Question: {} Short answer:"),
                           ("llama", "Question: {} Answer:")):
        for bench in BENCHMARKS:
            path = os.path.join(REPO, "projects/vpgtrans/eval", family, f"{bench}.yaml")
            text = open(path).read()
            assert "/export/" not in text and "/home/" not in text and "/root/" not in text
            cfg = yaml.safe_load(text)
            run = cfg["run"]
            if bench in ("coco_caption", "nocaps"):
                assert (run["task"], run["num_beams"], run["max_len"], run["min_len"]) == (
                    "vpgtrans_captioning", 5, 30, 8)
                assert cfg["model"]["prompt"] == "a photo of"
            else:
                assert (run["num_beams"], run["max_len"], run["min_len"], run["prompt"]) == (5, 10, 1, prompt)
                assert run["inference_method"] == "generate"
            assert run["task"] == {"gqa": "vpgtrans_gqa", "coco_caption": "vpgtrans_captioning",
                                   "nocaps": "vpgtrans_captioning"}.get(bench, "vpgtrans_vqa")


# --------------------------------------------------------------------------- evaluate.py


# eval_all.sh runs one evaluate.py process per benchmark; two of them keep the test short
# (the other OPT configs run in-process below).
WRAPPER_BENCHMARKS = ("nocaps", "gqa")


def test_eval_all_one_command(bench_root, tmp_path):
    """run_scripts/eval_all.sh: `python evaluate.py` per benchmark (subprocesses), then a table."""
    import torch
    from lavis.models import load_model

    # A checkpoint of trained parameters, as the runner writes it (trainable parameters only).
    model = load_model("blip2_opt_transfer", "tiny_opt_small")
    ckpt = tmp_path / "checkpoint_best.pth"
    torch.save({"model": model.trainable_state_dict()}, ckpt)
    out = tmp_path / "opt"
    cmd = ["bash", os.path.join(REPO, "run_scripts/eval_all.sh"), str(ckpt), "blip2_opt_transfer", "tiny_opt_small",
           "--data-root", bench_root, "--out", str(out), "--image-size", "32",
           "--benchmarks", " ".join(WRAPPER_BENCHMARKS), "--", "run.device=cpu", "run.num_workers=0"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(
        open(out / f"{b}.log").read()[-3000:] for b in WRAPPER_BENCHMARKS if (out / f"{b}.log").exists())
    table = proc.stdout
    for bench in WRAPPER_BENCHMARKS:
        split, metrics = logged_metrics(str(out / bench))
        check_metrics(bench, split, metrics, str(out / bench), bench_root)
    assert "n/a (needs Stanford CoreNLP)" in table
    assert f"checkpoint from {ckpt}" in open(out / "gqa.log").read()
    summary = json.load(open(out / "summary.json"))
    assert summary["gqa"]["metrics"]["acc"] == logged_metrics(str(out / "gqa"))[1]["acc"]
    nocaps = summary["nocaps"]["metrics"]
    for label, key in (("CIDEr", "CIDEr"), ("CIDEr out-domain", "CIDEr_out-domain")):
        line = [ln for ln in table.splitlines() if ln.startswith("nocaps") and f" {label} " in ln][0]
        assert line.split()[-1] == "%.2f" % (100 * nocaps[key])

    # A benchmark whose files are missing fails the command, names the file, shows in the table.
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = cmd[:cmd.index("--data-root")] + ["--data-root", str(empty), "--out", str(tmp_path / "failing"),
                                            "--benchmarks", "gqa", "--", "run.device=cpu"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 1 and "failed: gqa" in proc.stderr
    assert "no result" in proc.stdout and "gqa/annotations/testdev_balanced_questions.json" in proc.stderr


OTHER_CONFIGS = ([("opt", b) for b in BENCHMARKS if b not in WRAPPER_BENCHMARKS]
                 + [(family, b) for family in ("t5", "llama") for b in BENCHMARKS])


@pytest.mark.parametrize("family,bench", OTHER_CONFIGS)
def test_eval_config_through_evaluate_main(family, bench, bench_root, tmp_path):
    """The other families' configs, through evaluate.py's main in this process (the same code
    path as `python evaluate.py`, without paying the import of LAVIS ten more times)."""
    from lavis_vpgtrans.runners.launch import evaluate_main

    out = str(tmp_path / bench)
    options = eval_options(bench, bench_root, out, family)
    if bench == "okvqa":
        options.append("run.apply_lemmatizer=False")  # en_core_web_sm is not installable offline
    if bench == "vqav2":
        options.append("run.question_subset=10")
    evaluate_main(["--cfg-path", os.path.join(REPO, "projects/vpgtrans/eval", family, f"{bench}.yaml"),
                   "--options", *options])
    split, metrics = logged_metrics(out)
    check_metrics(bench, split, metrics, out, bench_root)
    if bench == "vqav2":
        subset = json.load(open(os.path.join(out, "eval", "val_question_subset.json")))
        results = json.load(open(os.path.join(out, "eval", "result", "val_vqa_result.json")))
        assert len(subset) == 10 and sorted(r["question_id"] for r in results) == subset


def test_vicuna_uses_the_llama_configs(bench_root, tmp_path):
    from lavis_vpgtrans.runners.launch import evaluate_main

    out = str(tmp_path / "gqa")
    options = eval_options("gqa", bench_root, out, "llama")[2:] + ["model.arch=blip2_vicuna",
                                                                  "model.model_type=tiny_vicuna"]
    evaluate_main(["--cfg-path", os.path.join(REPO, "projects/vpgtrans/eval/llama/gqa.yaml"), "--options", *options])
    check_metrics("gqa", *logged_metrics(out), out, bench_root)


def test_okvqa_lemmatizer_without_spacy_model_is_a_clear_error(bench_root, tmp_path):
    spacy = pytest.importorskip("spacy")
    if spacy.util.is_package("en_core_web_sm"):
        pytest.skip("en_core_web_sm is installed")
    from lavis_vpgtrans.runners.launch import evaluate_main

    out = str(tmp_path / "okvqa")
    with pytest.raises(RuntimeError, match="python -m spacy download en_core_web_sm"):
        evaluate_main(["--cfg-path", os.path.join(REPO, "projects/vpgtrans/eval/opt/okvqa.yaml"),
                       "--options", *eval_options("okvqa", bench_root, out, "opt")])

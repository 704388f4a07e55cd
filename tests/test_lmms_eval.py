"""Our models in lmms-eval (lavis_vpgtrans/lmms/).

In this environment (no lmms-eval): the adapter behind the lmms-eval model classes, on the tiny
zoo models: batched generate_until equals unbatched for prompts of different lengths, and
loglikelihood equals a direct computation with the transformers LLM.

In the tools environment (scripts/setup_tools_env.sh builds .venv/tools): lmms-eval's own
CLI runs the local task YAMLs (projects/lmms_eval/tasks/) over the toy world's VQA val split, no
hub: the generation task's answers and accuracy equal evaluate.py's on the same questions and
model, and the multiple-choice task's choices equal evaluate.py's run.inference_method=rank.
Skipped when that environment is absent, unless VPGTRANS_REQUIRE_TOOLS is set (CI builds it).
"""

import glob
import json
import os
import random
import subprocess
from types import SimpleNamespace

import pytest

from helpers import wait_for_tools_env
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LMMS_PYTHON = os.path.join(REPO, ".venv", "tools", "bin", "python")
TASKS = os.path.join(REPO, "projects", "lmms_eval", "tasks", "vpgtrans_vqa")
# Prompts of different lengths (in tokens), so that a batch pads them
QUESTIONS = ["what color is the circle?", "how many squares are there at the top?",
             "is there a triangle?", "what shape is at the bottom right of the image?"]


@pytest.fixture(scope="module", params=[("blip2_opt_transfer", "tiny_opt_small"), ("blip2_t5_transfer", "tiny_t5")],
                ids=["opt", "t5"])
def adapter(request, plugin):
    from lavis_vpgtrans.lmms.adapter import VPGTransAdapter
    from lavis_vpgtrans.toy import world

    arch, model_type = request.param
    lmm = VPGTransAdapter(arch=arch, model_type=model_type, device="cpu", batch_size=len(QUESTIONS), prompt="vqa")
    rng = random.Random(1)
    lmm.task_dict = {"toy": {"val": [{"image": world.render(world.sample_scene(rng)), "question": q}
                                     for q in QUESTIONS]}}
    return lmm


def requests(kind_args, n):
    """lmms-eval Instances' args: (context, <kind_args(i)>, doc_to_visual, doc_id, task, split)."""
    return [SimpleNamespace(args=(QUESTIONS[i], kind_args(i), lambda doc: [doc["image"]], i, "toy", "val"))
            for i in range(n)]


def test_batched_generate_until_equals_unbatched(adapter):
    gen = {"max_new_tokens": 6, "num_beams": 3, "length_penalty": -1, "until": ["\n\n"]}
    reqs = requests(lambda i: dict(gen), len(QUESTIONS))
    batched = adapter.generate_until(reqs)
    adapter.batch_size_per_gpu = 1
    try:
        one_by_one = adapter.generate_until(reqs)
    finally:
        adapter.batch_size_per_gpu = len(QUESTIONS)
    lengths = {len(adapter.model.llm_tokenizer(adapter.prefix(q)).input_ids) for q in QUESTIONS}
    assert len(lengths) == len(QUESTIONS)  # every prompt pads differently in the batch
    assert batched == one_by_one and all(isinstance(t, str) for t in batched)
    # per-request generation arguments: a different max_new_tokens is its own batch, and `until` cuts
    mixed = adapter.generate_until(requests(lambda i: dict(gen, max_new_tokens=6 if i % 2 else 1), len(QUESTIONS)))
    assert mixed[1::2] == batched[1::2]
    # (one token: a word with its leading space, which the decoded text loses)
    assert all(len(adapter.model.llm_tokenizer(" " + t, add_special_tokens=False).input_ids) <= 1 for t in mixed[::2])


def test_loglikelihood_equals_a_direct_computation(adapter):
    from test_scoring import direct_logprob

    continuations = [" red", " 2", " yes", " green square"]
    reqs = requests(lambda i: continuations[i], len(QUESTIONS))
    adapter.score_end_of_text = False
    losses = adapter.loglikelihood(reqs)  # lmms-eval's convention by default: -log P
    model = adapter.model
    images = adapter._images([(r.args[2], "toy", "val", r.args[3]) for r in reqs])
    with torch.no_grad():
        prompts = model.encode_image(images)
        want = [direct_logprob(model, prompts[i:i + 1], adapter.prefix(QUESTIONS[i]), continuations[i], False)
                for i in range(len(reqs))]
    diff = max(abs(-loss - w) for (loss, _), (w, _) in zip(losses, want))
    print(f"{type(model).__name__} lmms loglikelihood vs direct: max abs diff {diff:.2e}")
    assert diff < 1e-4 and [g for _, g in losses] == [g for _, g in want]
    adapter.loglikelihood_sign = 1.0  # loglikelihood_as=logprob
    try:
        assert [lp for lp, _ in adapter.loglikelihood(reqs)] == [-loss for loss, _ in losses]
    finally:
        adapter.loglikelihood_sign = -1.0
    if not model.is_encoder_decoder:
        with pytest.raises(ValueError, match="target_delimiter"):
            adapter.loglikelihood(requests(lambda i: "red", 1))


# --------------------------------------------------------------------------- lmms-eval's CLI


def lmms_env_or_skip():
    wait_for_tools_env()
    if os.path.exists(LMMS_PYTHON):
        return LMMS_PYTHON
    if os.environ.get("VPGTRANS_REQUIRE_TOOLS"):
        pytest.fail(f"VPGTRANS_REQUIRE_TOOLS is set but {LMMS_PYTHON} is missing: run scripts/setup_tools_env.sh")
    pytest.skip("the tools environment with lmms-eval is not built (scripts/setup_tools_env.sh)")


def our_evaluate(tmp_path, ckpt, inference_method):
    """evaluate.py's main in this process on the toy world's VQA val split, with the protocol the
    task YAMLs hold; returns ({question_id: answer}, accuracy)."""
    from lavis_vpgtrans.runners.launch import evaluate_main

    out = str(tmp_path / f"evaluate_{inference_method}")
    evaluate_main(["--cfg-path", os.path.join(REPO, "projects/vpgtrans/demo/tiny_vqa_eval_opt.yaml"), "--ckpt", ckpt,
                   "--options",
                   "model.model_type=tiny_opt_small", "run.batch_size_train=32", "run.num_beams=5", "run.max_len=10", "run.min_len=1",
                   f"run.inference_method={inference_method}", f"run.output_dir={out}", "run.job_id=eval"])
    results = json.load(open(os.path.join(out, "eval", "result", "val_vqa_result.json")))
    (metrics,) = [json.loads(line)["val"] for line in open(os.path.join(out, "eval", "evaluate.txt"))]
    return {r["question_id"]: r["answer"] for r in results}, metrics["acc"]


def test_lmms_eval_cli_on_local_tasks(toy_zoo, tmp_path):
    python = lmms_env_or_skip()
    import yaml
    from lavis.models import load_model

    from lavis_vpgtrans.lmms.docs import write_vqa_docs

    # one model for both harnesses: a checkpoint of its trained (here: randomly initialised) parameters
    ckpt = str(tmp_path / "checkpoint.pth")
    torch.save({"model": load_model("blip2_opt_transfer", "tiny_opt_small").trainable_state_dict()}, ckpt)

    data = os.path.join(os.environ["VPGTRANS_TOY_ZOO"], "data")
    docs = str(tmp_path / "vqa_val.jsonl")
    n = write_vqa_docs(data, "annotations/vqa_val.json", "annotations/vqa_val_questions.json",
                       "annotations/vqa_val_annotations.json", "annotations/answer_list.json", "images", docs)
    question_ids = [json.loads(line)["question_id"] for line in open(docs)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for kind in ("gen", "mc"):  # the repo's task YAMLs, pointed at these documents
        with open(tasks / f"toy_vqa_{kind}.yaml", "w") as f:
            yaml.safe_dump({"include": os.path.join(TASKS, f"vpgtrans_vqa_{kind}.yaml"), "task": f"toy_vqa_{kind}",
                            "dataset_kwargs": {"data_files": {"val": docs}}}, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, "-m", "lmms_eval", "--model", "vpgtrans_opt",
           "--model_args", f"model_type=tiny_opt_small,checkpoint={ckpt},prompt=vqa,score_end_of_text=true",
           "--tasks", "toy_vqa_gen,toy_vqa_mc", "--include_path", str(tasks), "--device", "cpu",
           "--batch_size", "16", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "toy_vqa_gen" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]

    def samples(task):
        (path,) = glob.glob(str(tmp_path / "out" / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        return {question_ids[s["doc_id"]]: s for s in map(json.loads, open(path))}

    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "*_results.json"), recursive=True)
    results = json.load(open(results_file))["results"]

    # (1) generation: the same answers and the same official VQA accuracy as evaluate.py
    answers, accuracy = our_evaluate(tmp_path, ckpt, "generate")
    generated = {q: s["filtered_resps"] for q, s in samples("toy_vqa_gen").items()}
    assert len(generated) == n == len(answers) and generated == answers
    assert results["toy_vqa_gen"]["vqa_acc,none"] == accuracy > 0

    # (2) multiple choice by loglikelihood: lmms-eval's choice (the argmin of the returned
    # losses) is the answer evaluate.py's rank gives
    ranked, _ = our_evaluate(tmp_path, ckpt, "rank")
    choices = json.load(open(os.path.join(data, "annotations", "answer_list.json")))
    picked = {}
    for q, s in samples("toy_vqa_mc").items():
        losses = [float(loss) for loss, _ in s["filtered_resps"]]
        picked[q] = choices[losses.index(min(losses))]
    assert len(picked) == n and picked == ranked
    assert len(set(picked.values())) > 1  # not one answer for everything


# --------------------------------------------------------------------------- the papers' protocols

README = os.path.join(REPO, "README.md")
PROTOCOL_COLUMNS = ("model", "arch", "model type", "eval configs", "prompt", "beams", "max_len / min_len",
                    "length penalty", "VQAv2", "GQA", "OK-VQA")
RELEASED = {"BLIP-2 OPT-2.7B", "BLIP-2 OPT-6.7B", "BLIP-2 Flan-T5-XL", "VPGTrans OPT-2.7B → 6.7B", "VL-LLaMA-7B",
            "VPGTrans Flan-T5-XL → XXL"}


def readme_protocol_table(path=None):
    """The rows of the README's protocol table ("| model | arch | model type | eval configs | prompt
    | beams | max_len / min_len | length penalty | VQAv2 | GQA | OK-VQA |"), cells without backticks."""
    path = path or README
    text = open(path).read()
    lines = text.splitlines()
    header = "| " + " | ".join(PROTOCOL_COLUMNS) + " |"
    assert header in lines, f"{path}: no protocol table (header {header!r})"
    assert "published; not reproduced here (needs the released checkpoints)" in text
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(PROTOCOL_COLUMNS), line
        rows.append(dict(zip(PROTOCOL_COLUMNS, cells)))
    return rows


def load_evaluate_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(REPO, "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_released_model_eval_configs_match_the_readme_protocol_table(plugin):
    from argparse import Namespace

    from lavis.common.registry import registry

    from lavis_vpgtrans.common.config import PluginConfig

    protocol = load_evaluate_script().protocol
    rows = readme_protocol_table()
    assert {r["model"] for r in rows} == RELEASED
    for row in rows:
        max_len, min_len = (int(v) for v in row["max_len / min_len"].split("/"))
        for bench in ("vqav2", "gqa", "okvqa"):
            path = os.path.join(REPO, row["eval configs"], f"{bench}.yaml")
            cfg = PluginConfig(Namespace(cfg_path=path, options=[
                f"model.arch={row['arch']}", f"model.model_type={row['model type']}", "run.apply_lemmatizer=False"]))
            task = registry.get_task_class(cfg.run_cfg.task).setup_task(cfg=cfg)
            got = protocol(task, cfg.model_cfg, registry.get_model_class(row["arch"]))
            want = {"kind": "vqa", "prompt": row["prompt"], "inference_method": "generate",
                    "num_beams": int(row["beams"]), "max_len": max_len, "min_len": min_len,
                    "length_penalty": float(row["length penalty"])}
            assert got == want, (row["model"], path)
            # the model type's own VQA prompt is the same (lmms-eval's prompt=vqa, predict_answers' default)
            assert cfg.model_cfg.vqa_prompt == row["prompt"], (row["model"], row["model type"])
        assert all(float(row[b]) > 0 for b in ("VQAv2", "GQA", "OK-VQA"))


def test_evaluate_prints_its_protocol(plugin, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    load_evaluate_script().main([
        "--cfg-path", os.path.join(REPO, "projects/vpgtrans/demo/tiny_vqa_eval_opt.yaml"), "--options",
        "model.model_type=tiny_opt_small", "run.batch_size_train=32", "run.question_subset=4",
        f"run.output_dir={tmp_path}", "run.job_id=eval"])
    text = caplog.text
    assert "Zero-shot protocol (VQA: predict_answers of blip2_opt_transfer tiny_opt_small)" in text
    assert "'Question: {} Answer:'" in text and "beams           3" in text and "length penalty  -1" in text
    assert "max_len 5, min_len 1" in text
    assert os.path.exists(os.path.join(tmp_path, "eval", "evaluate.txt"))  # and then it evaluated

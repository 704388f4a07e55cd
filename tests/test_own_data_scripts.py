"""README "Your own data": its three commands run as written, in miniature (VPGTRANS_MINIATURE=1:
toy models, your-data files in the documented layouts written from the toy world, tiny runs):
run_scripts/own_data/transfer_my_captions.sh (converter, stage 1 + stage 2 on your captions,
evaluate.py on your val split), finetune_my_vqa.sh (train, official VQA accuracy on your split)
and instruct_my_llava.sh (stage 3 on a LLaVA-format file, then a chat turn)."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("lavis_vpgtrans", "projects", "run_scripts", "train.py", "evaluate.py")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, toy_zoo):
    root = tmp_path_factory.mktemp("own_scripts") / "repo"
    root.mkdir()
    for part in PARTS:
        os.symlink(os.path.join(REPO, part), root / part)
    return root


def run_script(repo, name):
    env = {k: v for k, v in os.environ.items() if k not in ("MY_DATA", "NPROC", "OPTIONS", "IMAGE")}
    env.update(VPGTRANS_MINIATURE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(repo / "run_scripts" / "own_data" / name)], cwd=repo.parent, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


def eval_log(job):
    with open(job / "evaluate.txt") as f:
        return [json.loads(line) for line in f]


def test_transfer_my_captions(repo):
    out = run_script(repo, "transfer_my_captions.sh")
    own = repo / "output" / "own_data"
    converter = torch.load(own / "converter.pth", map_location="cpu", weights_only=True)
    assert set(converter["model"]) == {"opt_proj.weight", "opt_proj.bias"}
    train = own / "transfer" / "train"
    with open(train / "metrics.jsonl") as f:
        stages = [json.loads(line)["stage"] for line in f]
    assert stages == [1, 2]
    # a stage-1 checkpoint holds the inherited VPG besides the projector, so any checkpoint of the
    # run (checkpoint_best.pth from stage 1 included) loads as the whole trained model
    stage1 = torch.load(train / "checkpoint_0.pth", map_location="cpu", weights_only=False)
    source = torch.load(own / "miniature_source.pth", map_location="cpu", weights_only=True)["model"]
    vpg = [k for k in source if k.startswith(("Qformer.", "query_tokens", "ln_vision."))]
    assert vpg and all(torch.equal(stage1["model"][k], source[k]) for k in vpg)
    assert not torch.equal(stage1["model"]["opt_proj.weight"], converter["model"]["opt_proj.weight"])
    (metrics,) = eval_log(own / "transfer" / "eval")
    assert "CIDEr" in metrics["val"] and "Bleu_4" in metrics["val"], metrics
    assert "own_caption val: COCO-format ground truth (8 images)" in out


def test_finetune_my_vqa(repo):
    run_script(repo, "finetune_my_vqa.sh")
    job = repo / "output" / "own_data" / "vqa" / "eval"
    (metrics,) = eval_log(job)
    acc = metrics["val"]["agg_metrics"]
    # recomputed from the answers evaluate.py wrote and the val records (10 answers each: the
    # official min(#agreeing / 3, 1) averaged over leaving each answer out)
    with open(repo / "output" / "own_data" / "miniature" / "vqa" / "val.json") as f:
        truth = json.load(f)
    result_dir = job / "result"
    (name,) = [n for n in os.listdir(result_dir) if n.startswith("val") and "rank" not in n]
    with open(result_dir / name) as f:
        predicted = json.load(f)
    assert len(predicted) == len(truth) == 8

    def soft(answer, answers):
        return sum(min(sum(a == answer for a in answers[:i] + answers[i + 1:]) / 3, 1)
                   for i in range(len(answers))) / len(answers)

    from lavis.common.vqa_tools.vqa_eval import VQAEval

    normal = VQAEval()  # the official answer normalisation (punctuation, articles, number words)
    by_id = {r["question_id"]: normal.processDigitArticle(normal.processPunctuation(r["answer"])) for r in predicted}
    # question ids: the records' order in val.json, from 1
    expected = 100 * sum(soft(by_id[i + 1], r["answer"]) for i, r in enumerate(truth)) / len(truth)
    assert acc == pytest.approx(expected, abs=0.01), (acc, expected, by_id)


def test_instruct_my_llava_and_chat(repo):
    out = run_script(repo, "instruct_my_llava.sh")
    job = repo / "output" / "own_data" / "instruct" / "train"
    assert sorted(n for n in os.listdir(job) if n.startswith("checkpoint_")) == ["checkpoint_0.pth", "checkpoint_1.pth"]
    answers = [line for line in out.splitlines() if line.startswith("Assistant: ")]
    assert len(answers) == 1 and answers[0][len("Assistant: "):].strip(), out[-3000:]

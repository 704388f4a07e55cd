"""Known-answer tests of the evaluation tasks' metrics (VQA accuracy, GQA exact match, COCO
caption metrics, NoCaps domains) and of the tasks' plumbing (ground truth from the dataset
config, result gathering under torch.distributed with gloo)."""

import json
import math
import os
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

import lavis_vpgtrans  # noqa: F401  registers builders
import lavis_vpgtrans.tasks  # noqa: F401  registers the tasks
from lavis.common.registry import registry
from lavis_vpgtrans.tasks.captioning import (SPICE_UNAVAILABLE, VPGTransCaptionTask, evaluate_caption_file,
                                             score_captions)
from lavis_vpgtrans.tasks.vqa import (VPGTransVQATask, exact_match_accuracy, lemmatize, load_lemmatizer,
                                      normalize_answer, select_question_subset, vqa_accuracy)
from lavis_vpgtrans.toy import world

# Captions of different images share no word, so every n-gram has document frequency 1.
DISJOINT = ["alpha beta gamma delta", "red green blue yellow", "one two three four",
            "cat dog horse cow", "apple pear plum grape", "north south east west"]


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def coco_gt(refs, domains=None):
    images = [{"id": i, **({"domain": domains[i]} if domains else {})} for i in refs]
    anns = [{"image_id": i, "id": 100 * i + k, "caption": c} for i, caps in refs.items() for k, c in enumerate(caps)]
    return {"images": images, "annotations": anns}


# --------------------------------------------------------------------------- VQA accuracy


def vqa_files(tmp_path, questions):
    """questions: [(qid, [10 human answers], answer_type)] -> (annotation, question) files."""
    anns = [{"question_id": q, "image_id": q, "question_type": "what", "answer_type": t,
             "multiple_choice_answer": a[0],
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]}
            for q, a, t in questions]
    ques = [{"question_id": q, "image_id": q, "question": "?"} for q, _, _ in questions]
    anno_file = write_json(tmp_path / "anno.json", {"annotations": anns})
    ques_file = write_json(tmp_path / "ques.json", {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                                    "data_subtype": "val2014", "license": {}, "questions": ques})
    return anno_file, ques_file


def humans(k, right="cat", wrong="dog"):
    """Ten human answers of which k are `right`."""
    return [right] * k + [wrong] * (10 - k)


def test_vqa_accuracy_matches_the_official_formula(tmp_path):
    # With k of 10 humans agreeing, the accuracy is the mean over the ten 9-annotator subsets of
    # min(matches / 3, 1): k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
    questions = [(1, humans(0), "other"), (2, humans(1), "other"), (3, humans(2), "other"),
                 (4, humans(3), "other"), (5, ["2"] * 10, "number")]
    anno, ques = vqa_files(tmp_path, questions)
    # "Two." is normalised to "2" (punctuation, number words), as VQAEval does for predictions.
    preds = [{"question_id": 1, "answer": "cat"}, {"question_id": 2, "answer": "cat"},
             {"question_id": 3, "answer": "cat"}, {"question_id": 4, "answer": "cat"},
             {"question_id": 5, "answer": "Two."}]
    metrics = vqa_accuracy(anno, ques, write_json(tmp_path / "res.json", preds))
    assert metrics["agg_metrics"] == metrics["acc"] == pytest.approx((0 + 30 + 60 + 90 + 100) / 5)
    assert metrics["number"] == 100.0
    assert metrics["other"] == pytest.approx(45.0)

    # Every answer wrong -> 0; and the question subset restricts the ground truth.
    wrong = [{"question_id": q, "answer": "zebra"} for q in range(1, 6)]
    assert vqa_accuracy(anno, ques, write_json(tmp_path / "wrong.json", wrong))["acc"] == 0.0
    sub = [p for p in preds if p["question_id"] in (2, 3)]
    assert vqa_accuracy(anno, ques, write_json(tmp_path / "sub.json", sub), question_ids=[2, 3])["acc"] == 45.0


def test_vqa_accuracy_rejects_incomplete_results(tmp_path):
    anno, ques = vqa_files(tmp_path, [(1, humans(3), "other"), (2, humans(3), "other")])
    res = write_json(tmp_path / "res.json", [{"question_id": 1, "answer": "cat"}])
    with pytest.raises(ValueError, match="cover 1 of 2 questions"):
        vqa_accuracy(anno, ques, res)
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.json"):
        vqa_accuracy(str(tmp_path / "nope.json"), ques, res)


def test_question_subset_is_deterministic():
    ids = list(range(1000, 1100))
    a = select_question_subset(ids, 20, seed=0)
    assert a == select_question_subset(reversed(ids), 20, seed=0)  # independent of order
    assert len(a) == 20 and len(set(a)) == 20 and set(a) <= set(ids) and a == sorted(a)
    assert a != select_question_subset(ids, 20, seed=1)
    assert select_question_subset(ids, 500, seed=0) == ids


def test_gqa_exact_match_after_normalisation():
    results = [{"question_id": 1, "pred_ans": "Yes.", "gt_ans": "yes"},
               {"question_id": 2, "pred_ans": "two", "gt_ans": "2"},
               {"question_id": 3, "pred_ans": "the red one", "gt_ans": "red one"},
               {"question_id": 4, "pred_ans": "blue", "gt_ans": "green"}]
    assert exact_match_accuracy(results) == {"agg_metrics": 75.0, "acc": 75.0}
    assert normalize_answer("  An Apple!\n") == "apple"
    with pytest.raises(ValueError, match="no gold answer"):
        exact_match_accuracy([{"question_id": 9, "pred_ans": "x", "gt_ans": None}])


# --------------------------------------------------------------------------- lemmatizer


def test_lemmatizer_missing_model_is_a_clear_error():
    with pytest.raises(RuntimeError, match="python -m spacy download no_such_spacy_model"):
        load_lemmatizer("no_such_spacy_model")


def test_lemmatize_replaces_nouns_and_verbs_only():
    spacy = pytest.importorskip("spacy")
    from spacy.language import Language

    # A blank English pipeline whose tagger is a lookup table: the rule under test is ours
    # (nouns and verbs -> lemma, everything else verbatim), not spaCy's statistical tagger.
    table = {"dogs": ("NOUN", "dog"), "running": ("VERB", "run"), "red": ("ADJ", "red"),
             "better": ("ADJ", "well"), "apples": ("NOUN", "apple")}

    @Language.component("vpgtrans_test_lookup_tagger")
    def tagger(doc):
        for tok in doc:
            tok.pos_, tok.lemma_ = table.get(tok.text, ("X", tok.text.upper()))
        return doc

    nlp = spacy.blank("en")
    nlp.add_pipe("vpgtrans_test_lookup_tagger")
    assert lemmatize(["dogs running", "better apples", "red"], nlp) == ["dog run", "better apple", "red"]


# --------------------------------------------------------------------------- caption metrics


def test_cider_known_values(tmp_path, caplog):
    refs = {i + 1: [c, c] for i, c in enumerate(DISJOINT[:4])}
    # Prediction == references, n-grams unique to their image: each n-gram cosine is 1, no
    # length penalty, so CIDEr-D = 10 * mean_n(1) = 10 (pycocoevalcap's scale).
    exact = score_captions(refs, {i: caps[0] for i, caps in refs.items()})
    assert exact["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert exact["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert exact["ROUGE_L"] == pytest.approx(1.0, abs=1e-9)
    assert 0.9 < exact["METEOR"] <= 1.0
    assert SPICE_UNAVAILABLE in caplog.text and "SPICE" not in exact

    # Words no reference uses: every metric 0.
    wrong = score_captions(refs, {i: "zebra zebra zebra zebra" for i in refs})
    assert wrong["CIDEr"] == 0.0 and wrong["METEOR"] == 0.0 and wrong["ROUGE_L"] == 0.0
    assert wrong["Bleu_1"] < 1e-6

    # Half right: per-image scores 10, 0, 10, 0 (idf depends on the references only).
    half = score_captions(refs, {1: DISJOINT[0], 2: "zebra", 3: DISJOINT[2], 4: "zebra"})
    assert half["CIDEr"] == pytest.approx(5.0, abs=1e-9)


def test_cider_by_hand():
    # Two images, one reference each. Image 1's prediction drops the last word: with N = 2 and
    # every n-gram in one image, each weight is log(2) and the n-gram cosines are
    # 3/sqrt(3*4), 2/sqrt(2*3), 1/sqrt(1*2), 0; the length (bigram count) differs by 1, a
    # Gaussian penalty exp(-1 / (2 * 6^2)). Image 2 is exact: 10.
    refs = {1: ["alpha beta gamma delta"], 2: ["red green blue yellow"]}
    image1 = 10 * (3 / math.sqrt(12) + 2 / math.sqrt(6) + 1 / math.sqrt(2) + 0) / 4 * math.exp(-1 / 72)
    metrics = score_captions(refs, {1: "alpha beta gamma", 2: "red green blue yellow"}, spice=False)
    assert metrics["CIDEr"] == pytest.approx((image1 + 10) / 2, abs=1e-9)


def test_caption_metrics_subset():
    refs = {1: ["alpha beta gamma delta"], 2: ["red green blue yellow"]}
    preds = {1: "alpha beta gamma", 2: "red green blue yellow"}
    full = score_captions(refs, preds, spice=False)
    subset = score_captions(refs, preds, spice=False, metrics_to_run=["Bleu", "CIDEr"])
    assert set(subset) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert subset["CIDEr"] == full["CIDEr"] and subset["Bleu_4"] == full["Bleu_4"]
    with pytest.raises(ValueError, match="'SPICE' unknown"):
        score_captions(refs, preds, spice=False, metrics_to_run=["CIDEr", "SPICE"])
    # the task refuses at setup an aggregate metric its scorers would not compute
    with pytest.raises(ValueError, match="needs the CIDEr scorer"):
        VPGTransCaptionTask(num_beams=1, max_len=5, min_len=1, evaluate=True, agg_metric="CIDEr",
                            caption_metrics=["Bleu"])


def test_nocaps_domains(tmp_path):
    refs = {i + 1: [c] * 3 for i, c in enumerate(DISJOINT)}
    domains = {1: "in-domain", 2: "in-domain", 3: "near-domain", 4: "near-domain",
               5: "out-domain", 6: "out-domain"}
    gt = write_json(tmp_path / "nocaps_gt.json", coco_gt(refs, domains))
    preds = {1: DISJOINT[0], 2: DISJOINT[1], 3: "zebra", 4: "zebra", 5: DISJOINT[4], 6: "zebra"}
    res = write_json(tmp_path / "res.json", [{"image_id": i, "caption": c} for i, c in preds.items()])
    metrics = evaluate_caption_file(gt, res, spice=False)
    assert metrics["CIDEr_in-domain"] == pytest.approx(10.0, abs=1e-9)
    assert metrics["CIDEr_near-domain"] == 0.0
    assert metrics["CIDEr_out-domain"] == pytest.approx(5.0, abs=1e-9)
    assert metrics["CIDEr"] == pytest.approx(5.0, abs=1e-9)  # 3 of 6 images exact


def test_caption_results_must_cover_the_ground_truth(tmp_path):
    refs = {1: [DISJOINT[0]], 2: [DISJOINT[1]]}
    with pytest.raises(ValueError, match=r"1 ground-truth images without a caption \(e.g. \[2\]\)"):
        score_captions(refs, {1: DISJOINT[0]})
    with pytest.raises(ValueError, match=r"1 captions for images not in the ground truth \(e.g. \[7\]\)"):
        score_captions(refs, {1: DISJOINT[0], 2: DISJOINT[1], 7: "x"})


# --------------------------------------------------------------------------- task plumbing


class OracleCaptioner(torch.nn.Module):
    """Stands in for a VL-LLM: captions each image from a fixed table (known metrics)."""

    def __init__(self, captions):
        super().__init__()
        self.captions = captions
        self.calls = []

    def generate(self, samples, use_nucleus_sampling, num_beams, max_length, min_length):
        self.calls.append((use_nucleus_sampling, num_beams, max_length, min_length))
        return [self.captions[int(i)] for i in samples["image_id"]]


def caption_dataset(tmp_path, refs):
    """A toy_caption dataset config pointing at hand-made files under tmp_path (Karpathy
    layout: image names end in _<id>.jpg, the id COCOCapEvalDataset parses)."""
    os.makedirs(tmp_path / "images", exist_ok=True)
    scene = world.sample_scene(random.Random(0))
    entries = []
    for i, caps in refs.items():
        name = f"toy_{i:06d}.jpg"
        world.render(scene).save(tmp_path / "images" / name)
        entries.append({"image": name, "caption": caps, "image_id": i})
    write_json(tmp_path / "test.json", entries)
    write_json(tmp_path / "test_gt.json", coco_gt(refs))
    cfg = OmegaConf.load(os.path.join(os.path.dirname(lavis_vpgtrans.__file__), "datasets/configs/toy/caption.yaml"))
    dcfg = cfg.datasets.toy_caption
    dcfg.data_root = str(tmp_path)
    dcfg.build_info.annotations = {"test": {"storage": "test.json", "coco_gt": "test_gt.json"}}
    return dcfg


def run_config(datasets, **run):
    return OmegaConf.create({"datasets_cfg": datasets, "run_cfg": {"test_splits": ["test"], **run}})


def test_caption_task_reads_ground_truth_from_dataset_config(tmp_path):
    refs = {i + 1: [c, c] for i, c in enumerate(DISJOINT[:4])}
    cfg = run_config({"toy_caption": caption_dataset(tmp_path / "data", refs)},
                     num_beams=5, max_len=30, min_len=8, evaluate=True)
    task = VPGTransCaptionTask.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    assert task.gt_files == {"test": str(tmp_path / "data" / "test_gt.json")}

    out = tmp_path / "out"
    os.makedirs(out / "result")
    registry.mapping["paths"]["result_dir"] = str(out / "result")
    registry.mapping["paths"]["output_dir"] = str(out)
    dataset = datasets["toy_caption"]["test"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=dataset.collater)
    model = OracleCaptioner({i: caps[0] for i, caps in refs.items()})
    results = task.evaluation(model, loader)
    assert model.calls[0] == (False, 5, 30, 8)
    metrics = task.after_evaluation(val_result=results, split_name="test", epoch="best")
    assert metrics["agg_metrics"] == metrics["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    logged = [json.loads(line) for line in open(out / "evaluate.txt")]
    assert logged[-1]["test"]["CIDEr"] == metrics["CIDEr"]


def test_caption_task_requires_a_ground_truth_per_evaluated_split(tmp_path):
    dcfg = caption_dataset(tmp_path / "data", {1: [DISJOINT[0]]})
    del dcfg.build_info.annotations.test["coco_gt"]
    cfg = run_config({"toy_caption": dcfg}, num_beams=1, max_len=5, min_len=1, evaluate=True)
    with pytest.raises(ValueError, match=r"build_info.annotations.test.coco_gt"):
        VPGTransCaptionTask.setup_task(cfg).build_datasets(cfg)


def test_vqa_task_subset_and_oracle_answers(tmp_path):
    # The toy-world VQA layout (official question/annotation files) with an answering oracle
    # restricted to a seeded subset: every subset question right -> 100.
    data = tmp_path / "data"
    world.write_dataset(str(data), n_train=1, n_val=1, n_test=5, seed=3)
    cfg = OmegaConf.load(os.path.join(os.path.dirname(lavis_vpgtrans.__file__), "datasets/configs/toy/vqa.yaml"))
    dcfg = cfg.datasets.toy_vqa
    dcfg.data_root = str(data)
    run = run_config({"toy_vqa": dcfg}, question_subset=7, subset_seed=1, prompt="Question: {} Answer:")
    task = VPGTransVQATask.setup_task(run)
    assert (task.num_beams, task.max_len, task.min_len, task.inference_method) == (5, 10, 1, "generate")
    datasets = task.build_datasets(run)
    dataset = datasets["toy_vqa"]["test"]
    assert len(dataset) == 7 and task.subset_ids["test"] == sorted(a["question_id"] for a in dataset.annotation)
    anns = json.load(open(data / "annotations" / "vqa_test_annotations.json"))["annotations"]
    gold = {a["question_id"]: a["multiple_choice_answer"] for a in anns}

    class Oracle(torch.nn.Module):
        def predict_answers(self, samples, prompt, **kw):
            assert prompt == "Question: {} Answer:" and kw["num_beams"] == 5
            return [gold[int(q)] for q in samples["question_id"]]

    out = tmp_path / "out"
    os.makedirs(out / "result")
    registry.mapping["paths"]["result_dir"] = str(out / "result")
    registry.mapping["paths"]["output_dir"] = str(out)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collater)
    results = task.evaluation(Oracle(), loader)
    metrics = task.after_evaluation(val_result=results, split_name="test")
    # VQAEval normalises the prediction ("two" -> "2") but not a gold answer whose ten humans
    # agree, so a gold answer not already in normal form can never be matched (real VQAv2
    # gold answers are normalised).
    matchable = [q for q in task.subset_ids["test"] if normalize_answer(gold[q]) == gold[q]]
    assert metrics["acc"] == pytest.approx(round(100 * len(matchable) / 7, 2))
    assert json.load(open(out / "test_question_subset.json")) == task.subset_ids["test"]


# --------------------------------------------------------------------------- distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world_size, port, gt_file, out_dir, shards, queue):
    import torch.distributed as dist

    import lavis_vpgtrans.tasks  # noqa: F401
    from lavis.common.registry import registry as reg
    from lavis_vpgtrans.tasks.captioning import VPGTransCaptionTask as Task

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    reg.mapping["paths"]["result_dir"] = os.path.join(out_dir, "result")
    reg.mapping["paths"]["output_dir"] = out_dir
    task = Task(num_beams=5, max_len=30, min_len=8, evaluate=True)
    task.gt_files = {"test": gt_file}
    metrics = task.after_evaluation(val_result=shards[rank], split_name="test", epoch="best")
    queue.put((rank, metrics))
    dist.barrier()
    dist.destroy_process_group()


def test_caption_scoring_under_gloo(tmp_path):
    refs = {i + 1: [c, c] for i, c in enumerate(DISJOINT[:4])}
    gt = write_json(tmp_path / "gt.json", coco_gt(refs))
    os.makedirs(tmp_path / "result")
    res = [{"image_id": i, "caption": caps[0]} for i, caps in refs.items()]
    # A DistributedSampler pads rank 1 with a repeat of image 1.
    shards = [[res[0], res[2]], [res[1], res[3], res[0]]]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_dist_worker, args=(2, _free_port(), gt, str(tmp_path), shards, queue),
                       nprocs=2, join=True, start_method="spawn")
    got = dict(queue.get(timeout=10) for _ in range(2))
    assert got[1] is None  # only the main process scores
    assert got[0]["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    merged = json.load(open(tmp_path / "result" / "test_epochbest.json"))
    assert sorted(r["image_id"] for r in merged) == [1, 2, 3, 4]

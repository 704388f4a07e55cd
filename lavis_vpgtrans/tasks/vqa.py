"""Zero-shot VQA evaluation: VQAv2 / OK-VQA with the official VQA accuracy, GQA exact match.

Answers come from `model.predict_answers` (open-ended generation: the paper's beam 5,
max_len 10, min_len 1 and prompt). Scoring:
  - `vpgtrans_vqa`: the official VQAEval (lavis.common.vqa_tools), min(#humans agreeing / 3, 1)
    averaged over the ten leave-one-annotator-out subsets, on the dataset's official question
    and annotation files (the 3rd and 4th `storage` paths of LAVIS's VQA eval layout).
    Options: `apply_lemmatizer` (OK-VQA, as BLIP-2: nouns and verbs of the answer replaced by
    their spaCy `en_core_web_sm` lemmas) and `question_subset: N` (a seeded, deterministic
    N-question subset of each evaluated split; the paper's VQAv2 runs used 20k questions).
  - `vpgtrans_gqa`: exact match after VQAEval's answer normalisation (punctuation, articles,
    number words, contractions), applied to the prediction and the gold answer alike.
"""

import json
import logging
import os
import random
from typing import Dict, Iterable, List, Optional

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval
from lavis.tasks.vqa import VQATask

from lavis_vpgtrans.tasks.base import EvalTaskMixin, eval_splits

SPACY_MODEL = "en_core_web_sm"
LEMMATIZE_POS = ("NOUN", "VERB")


# --------------------------------------------------------------------------- lemmatizer


def load_lemmatizer(model_name: str = SPACY_MODEL):
    """spaCy's English pipeline, or a clear error saying how to install it."""
    try:
        import spacy
    except ImportError as e:
        raise RuntimeError("apply_lemmatizer needs spaCy: pip install spacy") from e
    try:
        return spacy.load(model_name)
    except OSError as e:
        raise RuntimeError(
            f"apply_lemmatizer needs the spaCy model {model_name!r}, which is not installed. Install it "
            f"with `python -m spacy download {model_name}` (or pip install its wheel from "
            f"https://github.com/explosion/spacy-models/releases), or set run.apply_lemmatizer: False"
        ) from e


def lemmatize(answers: Iterable[str], nlp) -> List[str]:
    """BLIP-2's OK-VQA post-processing: nouns and verbs -> lemma, other tokens unchanged."""
    out = []
    for doc in nlp.pipe(list(answers)):
        out.append(" ".join(tok.lemma_ if tok.pos_ in LEMMATIZE_POS else tok.text for tok in doc))
    return out


# --------------------------------------------------------------------------- scoring


def select_question_subset(question_ids: Iterable[int], n: int, seed: int) -> List[int]:
    """A deterministic n-question subset: depends only on the set of ids, n and the seed."""
    ids = sorted(set(int(q) for q in question_ids))
    if n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n))


def vqa_accuracy(anno_file: str, ques_file: str, result_file: str,
                 question_ids: Optional[Iterable[int]] = None) -> Dict[str, float]:
    """Official VQA accuracy of a [{"question_id", "answer"}] result file.

    `question_ids` restricts the ground truth to a subset (the results must cover exactly it).
    Returns {"agg_metrics", "acc", <answer type>: acc, ...} in percent, 2 decimals as VQAEval.
    """
    for what, path in (("annotation", anno_file), ("question", ques_file), ("result", result_file)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VQA {what} file not found: {path}")
    vqa = VQA(anno_file, ques_file)
    if question_ids is not None:
        keep = set(int(q) for q in question_ids)
        vqa.dataset["annotations"] = [a for a in vqa.dataset["annotations"] if a["question_id"] in keep]
        vqa.questions["questions"] = [q for q in vqa.questions["questions"] if q["question_id"] in keep]
        vqa.createIndex()
    with open(result_file) as f:
        results = json.load(f)
    got, want = {r["question_id"] for r in results}, set(vqa.getQuesIds())
    if got != want:
        raise ValueError(
            f"{result_file}: results cover {len(got & want)} of {len(want)} questions "
            f"(missing e.g. {sorted(want - got)[:5]}, unknown e.g. {sorted(got - want)[:5]})")
    scorer = VQAEval(vqa, vqa.loadRes(resFile=result_file, quesFile=ques_file), n=2)
    scorer.evaluate()
    metrics = {"agg_metrics": scorer.accuracy["overall"], "acc": scorer.accuracy["overall"]}
    metrics.update(scorer.accuracy["perAnswerType"])
    return metrics


def normalize_answer(answer: str, _tool=VQAEval()) -> str:
    """VQAEval's normalisation of one answer (as it treats predictions)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _tool.processDigitArticle(_tool.processPunctuation(answer))


def exact_match_accuracy(results: List[dict]) -> Dict[str, float]:
    """GQA accuracy in percent over [{"pred_ans", "gt_ans"}]."""
    if not results:
        raise ValueError("no results to score")
    missing = [r["question_id"] for r in results if r.get("gt_ans") is None]
    if missing:
        raise ValueError(f"{len(missing)} questions have no gold answer (e.g. {missing[:5]}); "
                         "GQA's test split is unlabelled, evaluate test-dev")
    correct = sum(normalize_answer(r["pred_ans"]) == normalize_answer(r["gt_ans"]) for r in results)
    acc = 100.0 * correct / len(results)
    return {"agg_metrics": acc, "acc": acc}


# --------------------------------------------------------------------------- tasks


@registry.register_task("vpgtrans_vqa")
class VPGTransVQATask(EvalTaskMixin, VQATask):
    """Open-ended VQA through `predict_answers`, scored by the official VQAEval.

    run_cfg: num_beams (5), max_len (10), min_len (1), length_penalty (-1, BLIP-2's), prompt,
    inference_method ("generate"), num_ans_candidates, apply_lemmatizer (False), question_subset
    (None = all), subset_seed (0).
    """

    def __init__(self, num_beams, max_len, min_len, evaluate, num_ans_candidates,
                 inference_method="generate", prompt="", apply_lemmatizer=False,
                 question_subset=None, subset_seed=0, length_penalty=-1.0):
        super().__init__(num_beams=num_beams, max_len=max_len, min_len=min_len, evaluate=evaluate,
                         num_ans_candidates=num_ans_candidates, inference_method=inference_method,
                         prompt=prompt)
        self.apply_lemmatizer = apply_lemmatizer
        self.length_penalty = float(length_penalty)
        self.question_subset = question_subset
        self.subset_seed = subset_seed
        self.subset_ids: Dict[str, List[int]] = {}
        # Fail at setup, not after a whole evaluation pass.
        self._lemmatizer = load_lemmatizer() if apply_lemmatizer else None

    @classmethod
    def setup_task(cls, cfg):
        run_cfg = cfg.run_cfg
        subset = run_cfg.get("question_subset", None)
        return cls(num_beams=run_cfg.get("num_beams", 5), max_len=run_cfg.get("max_len", 10),
                   min_len=run_cfg.get("min_len", 1), evaluate=run_cfg.get("evaluate", True),
                   num_ans_candidates=run_cfg.get("num_ans_candidates", 128),
                   inference_method=run_cfg.get("inference_method", "generate"),
                   prompt=run_cfg.get("prompt", ""),
                   apply_lemmatizer=run_cfg.get("apply_lemmatizer", False),
                   question_subset=int(subset) if subset else None,
                   subset_seed=int(run_cfg.get("subset_seed", 0)),
                   length_penalty=float(run_cfg.get("length_penalty", -1.0)))

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        owner: Dict[str, str] = {}
        for name, splits in datasets.items():
            for split, dataset in splits.items():
                if getattr(dataset, "answer_list", None) is not None:
                    self.answer_list = dataset.answer_list
                ques = getattr(dataset, "coco_fmt_qust_file", None)
                if ques is None:
                    continue
                if split in self.ques_files and self.ques_files[split] != ques:
                    raise ValueError(f"datasets {owner[split]!r} and {name!r} both give {split!r} "
                                     "VQA ground truth; evaluate one VQA dataset per run")
                self.ques_files[split], owner[split] = ques, name
                self.anno_files[split] = dataset.coco_fmt_anno_file
        for split in eval_splits(cfg):
            self._check_ground_truth(split)
            if self.question_subset:
                self._take_subset(datasets, split)
        return datasets

    def _check_ground_truth(self, split):
        if split not in self.ques_files:
            raise ValueError(
                f"split {split!r} is evaluated but no dataset gives its official VQA question and "
                f"annotation files: list them as the 3rd and 4th `storage` paths of "
                f"build_info.annotations.{split} (LAVIS's VQA eval layout)")

    def _take_subset(self, datasets, split):
        for splits in datasets.values():
            dataset = splits.get(split)
            if dataset is None:
                continue
            keep = select_question_subset((a["question_id"] for a in dataset.annotation),
                                          self.question_subset, self.subset_seed)
            keep_set = set(keep)
            dataset.annotation = [a for a in dataset.annotation if int(a["question_id"]) in keep_set]
            dataset._add_instance_ids()
            self.subset_ids[split] = keep
            logging.info("%s: evaluating a %d-question subset (seed %d)", split, len(keep),
                         self.subset_seed)

    def _answers(self, model, samples):
        answers = model.predict_answers(
            samples=samples, answer_list=self.answer_list, inference_method=self.inference_method,
            num_beams=self.num_beams, max_len=self.max_len, min_len=self.min_len,
            num_ans_candidates=self.num_ans_candidates, prompt=self.prompt, length_penalty=self.length_penalty)
        if self._lemmatizer is not None:
            answers = lemmatize(answers, self._lemmatizer)
        return answers

    def valid_step(self, model, samples):
        answers = self._answers(model, samples)
        return [{"question_id": int(q), "answer": a} for a, q in zip(answers, samples["question_id"])]

    answer_field = "answer"  # in the result records

    def after_evaluation(self, val_result, split_name, **kwargs):
        result_file = self.save_result(val_result, result_dir=registry.get_path("result_dir"),
                                       filename=f"{split_name}_vqa_result", remove_duplicate="question_id")
        self.warn_if_empty(result_file, self.answer_field, "answers", split_name, kwargs.get("epoch", "?"))
        return self._report_metrics(result_file=result_file, split=split_name)

    @main_process
    def _report_metrics(self, result_file, split):
        self._check_ground_truth(split)
        subset = self.subset_ids.get(split)
        if subset is not None:
            with open(os.path.join(registry.get_path("output_dir"), f"{split}_question_subset.json"), "w") as f:
                json.dump(subset, f)
        metrics = vqa_accuracy(self.anno_files[split], self.ques_files[split], result_file,
                               question_ids=subset)
        logging.info("%s VQA accuracy: %s", split, metrics)
        self.write_eval_log(split, metrics)
        return metrics


@registry.register_task("vpgtrans_gqa")
class VPGTransGQATask(VPGTransVQATask):
    """GQA (test-dev balanced): exact match of the normalised generated answer."""

    answer_field = "pred_ans"

    def _check_ground_truth(self, split):
        pass  # the gold answers are in the question file itself

    def valid_step(self, model, samples):
        answers = self._answers(model, samples)
        return [{"question_id": int(q), "pred_ans": a, "gt_ans": gt}
                for a, q, gt in zip(answers, samples["question_id"], samples["answer"])]

    @main_process
    def _report_metrics(self, result_file, split):
        with open(result_file) as f:
            metrics = exact_match_accuracy(json.load(f))
        logging.info("%s GQA accuracy: %s", split, metrics)
        self.write_eval_log(split, metrics)
        return metrics

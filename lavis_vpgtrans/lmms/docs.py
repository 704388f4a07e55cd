"""A LAVIS VQA eval split -> the documents of the local lmms-eval VQA tasks (JSON lines).

    python -m lavis_vpgtrans.lmms.docs --data-root DIR --questions annotations/vqa_val.json \
        --official-questions annotations/vqa_val_questions.json \
        --official-annotations annotations/vqa_val_annotations.json \
        --answer-list annotations/answer_list.json --images images --out vqa_val.jsonl

The inputs are the four `storage` files of LAVIS's VQA eval layout (a toy_vqa / vpgtrans_vqav2
eval split) and its image folder; each document holds one question, its image's absolute path,
its official question and annotation records and the answer list (the multiple-choice task's
choices, the `rank` candidates of our evaluate.py).
"""

import argparse
import json
import os
from typing import Optional


def write_vqa_docs(data_root: str, questions: str, official_questions: str, official_annotations: str,
                   answer_list: str, images: str, out: str, limit: Optional[int] = None) -> int:
    """Writes the documents to `out`; returns how many."""
    def load(rel):
        with open(os.path.join(data_root, rel)) as f:
            return json.load(f)

    entries = load(questions)
    records = {q["question_id"]: q for q in load(official_questions)["questions"]}
    annotations = {a["question_id"]: a for a in load(official_annotations)["annotations"]}
    choices = [str(a) for a in load(answer_list)]
    image_dir = os.path.abspath(os.path.join(data_root, images))
    n = 0
    with open(out, "w") as f:
        for entry in entries[:limit]:
            qid = entry["question_id"]
            if qid not in annotations or qid not in records:
                raise KeyError(f"question {qid} of {questions} is not in {official_annotations} / {official_questions}")
            path = os.path.join(image_dir, entry["image"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"question {qid}: image {path} not found")
            f.write(json.dumps({"question_id": qid, "question": entry["question"], "image": path,
                                "question_record": records[qid], "annotation": annotations[qid],
                                "choices": choices}) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    for name in ("questions", "official-questions", "official-annotations", "answer-list", "images", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--limit", type=int, default=None, help="the first N questions only")
    a = parser.parse_args(argv)
    n = write_vqa_docs(a.data_root, a.questions, a.official_questions, a.official_annotations, a.answer_list,
                       a.images, a.out, a.limit)
    print(f"{n} documents -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

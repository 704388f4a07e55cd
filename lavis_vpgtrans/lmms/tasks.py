"""Functions of the local lmms-eval task YAMLs (projects/lmms_eval/tasks/), named there as
`!function lavis_vpgtrans.lmms.tasks.<name>` (lmms-eval imports them by module path).

The documents are docs.py's: one VQA question each, with its image path, the official question
and annotation records, and the answer list. The text is prepared as our eval configs prepare it
(LAVIS's blip_question processor) and the accuracy is computed by the same function our
evaluate.py reports (tasks/vqa.py's vqa_accuracy: LAVIS's official VQAEval), so the two agree.
"""

import json
import os
import tempfile
from typing import List

from lavis.processors.blip_processors import BlipQuestionProcessor
from PIL import Image

from lavis_vpgtrans.tasks.vqa import vqa_accuracy

_QUESTION = BlipQuestionProcessor()  # the eval configs' text_processor: blip_question


def vqa_doc_to_visual(doc) -> List[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def vqa_doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    """The processed question; the model arg prompt=vqa puts it in the model's VQA prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return kwargs.get("pre_prompt", "") + _QUESTION(doc["question"]) + kwargs.get("post_prompt", "")


def vqa_doc_to_target(doc) -> str:
    return doc["annotation"]["multiple_choice_answer"]


def vqa_doc_to_choice(doc) -> List[str]:
    return list(doc["choices"])


def vqa_process_results(doc, results):
    """One generated answer -> the record the aggregation scores."""
    return {"vqa_acc": {"annotation": doc["annotation"], "question": doc["question_record"],
                        "answer": results[0]}}


def vqa_aggregate(items) -> float:
    """The official VQA accuracy (percent) of all answers, by evaluate.py's own function."""
    with tempfile.TemporaryDirectory(prefix="lmms_vqa_") as tmp:
        files = {}
        # the header fields LAVIS's VQA.loadRes copies from the official files
        header = {"info": {}, "license": {}, "data_type": "lmms-eval", "data_subtype": "docs"}
        for name, obj in (("annotations", {**header, "annotations": [i["annotation"] for i in items]}),
                          ("questions", {**header, "task_type": "Open-Ended",
                                         "questions": [i["question"] for i in items]}),
                          ("results", [{"question_id": i["question"]["question_id"], "answer": i["answer"]}
                                       for i in items])):
            files[name] = os.path.join(tmp, f"{name}.json")
            with open(files[name], "w") as f:
                json.dump(obj, f)
        return vqa_accuracy(files["annotations"], files["questions"], files["results"])["acc"]

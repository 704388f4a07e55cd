"""Synthetic mini versions of the five zero-shot benchmarks, in their real file formats.

    python -m lavis_vpgtrans.toy.benchmarks --out DIR

writes, under DIR, the layout the `vpgtrans_*` benchmark builders read (LAVIS's file names,
relative to a `data_root`), with toy-world images, captions and questions:

  coco/images/val2014/COCO_val2014_<12-digit id>.jpg
  coco/annotations/coco_karpathy_{val,test}.json        Karpathy split, LAVIS's caption format
  coco_gt/coco_karpathy_{val,test}_gt.json              COCO-format ground truth
  coco/annotations/vqa_val_eval.json, answer_list.json  VQAv2 val, LAVIS's eval format
  coco/annotations/v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json
  okvqa/annotations/vqa_val_eval.json, answer_list.json,
  okvqa/annotations/OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json
  nocaps/images/val/<16 hex>.jpg
  nocaps/annotations/nocaps_val.json                    LAVIS's NoCaps eval format (image, img_id)
  nocaps/annotations/nocaps_val_4500_captions.json      official ground truth, images carry `domain`
  gqa/images/n<id>.jpg
  gqa/annotations/testdev_balanced_questions.json       LAVIS's GQA format (question_id, answer)

Gold VQA answers are written normalised, as the official VQAv2 / OK-VQA files have them
(digits for numbers), so a correct prediction can score. NoCaps domains are assigned
round-robin: they exercise the per-domain breakdown, not real novelty.
"""

import argparse
import json
import os
import random
from typing import Dict, List

from lavis_vpgtrans.toy import world

NUMBERS = {"one": "1", "two": "2", "three": "3"}
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def _dump(root, rel, obj):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return rel


def _image(root, rel, scene):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    world.render(scene).save(path, quality=95)


def _coco_gt(images: List[dict], refs: Dict[int, List[str]]):
    anns, ann_id = [], 0
    for img in images:
        for cap in refs[img["id"]]:
            ann_id += 1
            anns.append({"image_id": img["id"], "id": ann_id, "caption": cap})
    return {"info": {"description": "toy world"}, "licenses": [], "type": "captions",
            "images": images, "annotations": anns}


def _human_answers(rng, gold, distractors):
    """Ten VQAv2-style human answers: mostly the gold answer, sometimes a few dissenters."""
    k = rng.choice([0, 0, 1, 2])
    others = [a for a in distractors if a != gold]
    return [gold] * (10 - k) + [rng.choice(others) for _ in range(k)]


def _vqa_files(root, prefix, names, questions, answer_lists):
    """LAVIS eval json + official question / annotation files for one VQA benchmark."""
    eval_entries, ques, anns = [], [], []
    for q in questions:
        eval_entries.append({"question_id": q["question_id"], "question": q["question"], "image": q["image"],
                             "answer": q["answers"]})
        ques.append({"image_id": q["image_id"], "question": q["question"], "question_id": q["question_id"]})
        anns.append({
            "question_id": q["question_id"], "image_id": q["image_id"], "question_type": q["question_type"],
            "answer_type": q["answer_type"], "multiple_choice_answer": q["gold"],
            "answers": [{"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(q["answers"])],
        })
    _dump(root, f"{prefix}/{names[0]}", eval_entries)
    _dump(root, f"{prefix}/{names[1]}", answer_lists)
    _dump(root, f"{prefix}/{names[2]}", {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                         "data_subtype": "val2014", "license": {}, "questions": ques})
    _dump(root, f"{prefix}/{names[3]}", {"info": {}, "data_type": "mscoco", "data_subtype": "val2014",
                                         "license": {}, "annotations": anns})


def write_benchmarks(out_dir: str, n_coco: int = 12, n_nocaps: int = 9, n_gqa: int = 8,
                     seed: int = 0) -> str:
    """Writes the five synthetic benchmarks under `out_dir` (their data_root); returns it."""
    rng = random.Random(seed)
    answers = sorted(set(world.COLORS) | set(world.SHAPES) | set(NUMBERS.values()) | {"yes", "no"})

    # COCO val2014 images: Karpathy val / test captions, VQAv2 and OK-VQA questions.
    karpathy = {"val": [], "test": []}
    gt_images = {"val": [], "test": []}
    refs: Dict[int, List[str]] = {}
    vqa, okvqa = [], []
    qid = 0
    for i in range(n_coco):
        image_id = 100000 + 37 * i  # sparse ids, as COCO's
        rel = f"val2014/COCO_val2014_{image_id:012d}.jpg"
        scene = world.sample_scene(rng)
        _image(out_dir, f"coco/images/{rel}", scene)
        split = "val" if i < n_coco // 3 else "test"
        refs[image_id] = world.captions(scene, rng)
        karpathy[split].append({"image": rel, "caption": refs[image_id], "image_id": f"coco_{image_id}"})
        gt_images[split].append({"id": image_id, "file_name": rel.split("/")[-1]})
        for q in world.questions(scene, rng):
            qid += 1
            gold = NUMBERS.get(q["answer"], q["answer"])  # VQAv2 gold answers are normalised
            vqa.append({"question_id": image_id * 1000 + qid, "image_id": image_id, "image": rel,
                        "question": q["question"], "gold": gold, "answer_type": q["answer_type"],
                        "question_type": " ".join(q["question"].split(" ")[:2]),
                        "answers": _human_answers(rng, gold, answers)})
            if q["answer_type"] == "other":
                # OK-VQA: "other" answers only; question_type is its knowledge category.
                okvqa.append({**vqa[-1], "question_id": image_id * 10 + len(okvqa) % 10,
                              "question_type": "four", "answers": [gold] * 10})
    for split in ("val", "test"):
        _dump(out_dir, f"coco/annotations/coco_karpathy_{split}.json", karpathy[split])
        _dump(out_dir, f"coco_gt/coco_karpathy_{split}_gt.json", _coco_gt(gt_images[split], refs))
    _vqa_files(out_dir, "coco/annotations",
               ["vqa_val_eval.json", "answer_list.json", "v2_OpenEnded_mscoco_val2014_questions.json",
                "v2_mscoco_val2014_annotations.json"], vqa, answers)
    _vqa_files(out_dir, "okvqa/annotations",
               ["vqa_val_eval.json", "answer_list.json", "OpenEnded_mscoco_val2014_questions.json",
                "mscoco_val2014_annotations.json"], okvqa, answers)

    # NoCaps val: Open Images file names, 10 references per image, a domain per image.
    nocaps_entries, nocaps_images, nocaps_refs = [], [], {}
    for i in range(n_nocaps):
        scene = world.sample_scene(rng)
        name = "%016x.jpg" % rng.getrandbits(64)
        _image(out_dir, f"nocaps/images/val/{name}", scene)
        nocaps_refs[i] = world.captions(scene, rng) * 2
        nocaps_entries.append({"image": f"val/{name}", "img_id": i})
        nocaps_images.append({"id": i, "file_name": name, "open_images_id": name[:-4],
                              "domain": NOCAPS_DOMAINS[i % 3], "height": world.IMAGE_SIZE,
                              "width": world.IMAGE_SIZE})
    _dump(out_dir, "nocaps/annotations/nocaps_val.json", nocaps_entries)
    _dump(out_dir, "nocaps/annotations/nocaps_val_4500_captions.json", _coco_gt(nocaps_images, nocaps_refs))

    # GQA test-dev (balanced): one gold answer per question; GQA asks no counting questions.
    gqa = []
    for i in range(n_gqa):
        scene = world.sample_scene(rng)
        name = f"n{500000 + i}.jpg"
        _image(out_dir, f"gqa/images/{name}", scene)
        for q in world.questions(scene, rng):
            if q["answer_type"] == "number":
                continue
            gqa.append({"question_id": 20000000 + len(gqa), "image": name, "question": q["question"],
                        "answer": q["answer"], "fullAnswer": f"The answer is {q['answer']}."})
    _dump(out_dir, "gqa/annotations/testdev_balanced_questions.json", gqa)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (use it as --data-root)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_benchmarks(args.out, seed=args.seed))


if __name__ == "__main__":
    main()

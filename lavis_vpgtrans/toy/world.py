"""A synthetic visual world for offline tests and the demo.

Each image holds one to three coloured shapes in the cells of a 2x2 grid. Captions and
questions are generated from the same scene description, so there is a ground truth for
captioning (several references per image, COCO style) and for VQA (10 answers per question,
VQAv2 style). Everything is deterministic given the seed.

The files are written in the formats LAVIS's real datasets use:
  - caption train json: [{"image", "caption", "image_id"}], one entry per caption
  - caption eval json: [{"image", "caption": [refs], "image_id"}] (Karpathy val/test layout)
  - COCO-format ground truth: {"images": [{"id"}], "annotations": [{"image_id", "id", "caption"}]}
  - VQA train json: [{"question_id", "question", "answer": [10 answers], "image"}]
  - VQA eval json: [{"question_id", "question", "image"}] plus the official question and
    annotation files ({"questions": [...]}, {"annotations": [...]}) and an answer list
"""

import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (150, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
CELLS = {  # name -> (column, row) of a 2x2 grid
    "top left": (0, 0),
    "top right": (1, 0),
    "bottom left": (0, 1),
    "bottom right": (1, 1),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
TRAIN_LAYOUT = ("train", "source")  # splits written one entry per caption / answer list
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    cell: str


def sample_scene(rng: random.Random) -> List[Thing]:
    n = rng.choice([1, 2, 3])
    cells = rng.sample(sorted(CELLS), n)
    return [Thing(rng.choice(sorted(COLORS)), rng.choice(SHAPES), cell) for cell in cells]


def render(scene: Sequence[Thing], size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    half = size // 2
    pad = size // 10
    for thing in scene:
        col, row = CELLS[thing.cell]
        x0, y0 = col * half + pad, row * half + pad
        x1, y1 = (col + 1) * half - pad, (row + 1) * half - pad
        fill = COLORS[thing.color]
        if thing.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif thing.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def _phrase(thing: Thing) -> str:
    return f"a {thing.color} {thing.shape} at the {thing.cell}"


def captions(scene: Sequence[Thing], rng: random.Random, k: int = 5) -> List[str]:
    """k reference captions: the canonical one first, then paraphrases."""
    ordered = sorted(scene, key=lambda t: CELLS[t.cell][::-1])
    canonical = " and ".join(_phrase(t) for t in ordered)
    n = len(scene)
    count = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    variants = [
        canonical,
        f"there is {canonical}",
        f"{count}: " + ", ".join(f"{t.color} {t.shape}" for t in ordered),
        "an image with " + " and ".join(f"a {t.color} {t.shape}" for t in ordered),
        " and ".join(_phrase(t) for t in rng.sample(list(scene), n)),
    ]
    return variants[:k]


def questions(scene: Sequence[Thing], rng: random.Random) -> List[Dict[str, str]]:
    """Questions with one correct answer each, and the VQAv2 answer type."""
    qs = []
    thing = rng.choice(list(scene))
    qs.append({"question": f"what color is the {thing.shape} at the {thing.cell}?",
               "answer": thing.color, "answer_type": "other"})
    qs.append({"question": f"what shape is at the {thing.cell}?",
               "answer": thing.shape, "answer_type": "other"})
    # VQAv2 gold answers are normalised to digits (VQAEval maps "two" -> "2" in predictions only)
    qs.append({"question": "how many shapes are there?",
               "answer": str(len(scene)), "answer_type": "number"})
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    present = any(t.color == color and t.shape == shape for t in scene)
    qs.append({"question": f"is there a {color} {shape}?",
               "answer": "yes" if present else "no", "answer_type": "yes/no"})
    return qs


def terse_description(scene: Sequence[Thing]) -> str:
    """The scene in a terse register, cell by cell in reading order: "red circle , empty , ..."."""
    by_cell = {t.cell: t for t in scene}
    order = sorted(CELLS, key=lambda c: CELLS[c][::-1])
    return " , ".join(f"{by_cell[c].color} {by_cell[c].shape}" if c in by_cell else "empty" for c in order)


def corpus_documents(n: int, seed: int = 0, questions_per_doc: int = 1) -> List[List[str]]:
    """Text-only documents of the toy world, one scene each: its terse description, one of its
    captions, then `questions_per_doc` question-answer lines about it. A language model trained
    on them learns to use its context -- the later sentences follow from the first -- as real
    LLMs do, which is what lets soft prompts in front of the text steer it. The order is fixed:
    after the first sentence comes a caption, so soft prompts standing where the description
    stands lead to a caption, not to a question."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        scene = sample_scene(rng)
        qa = [f"Question: {q['question']} Answer: {q['answer']}" for q in questions(scene, rng)]
        docs.append([terse_description(scene), rng.choice(captions(scene, rng))]
                    + rng.sample(qa, questions_per_doc))
    return docs


def corpus_sentences(n: int, seed: int = 0) -> List[str]:
    """Text-only sentences of the toy world, for tokenizer and language-model training."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.extend(captions(scene, rng))
        for q in questions(scene, rng):
            out.append(f"Question: {q['question']} Answer: {q['answer']}")
    return out


def write_dataset(out_dir: str, n_train: int = 256, n_val: int = 32, n_test: int = 32,
                  seed: int = 0, n_source: int = 0, eval_questions_per_image: Optional[int] = None) -> Dict[str, str]:
    """Writes images and annotation files; returns a name -> relative path map. `n_source` > 0
    adds a "source" split in the train layout, of other images: the larger pre-training set of
    the demo's source model (the paper's source VPG saw several times the transfer's data).
    `eval_questions_per_image` (default: all four) keeps that many of an eval image's questions,
    the question types taking turns from image to image so that each is asked equally often
    (the scenes and the other files stay the same)."""
    rng = random.Random(seed)
    img_dir = os.path.join(out_dir, "images")
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)

    # the source split comes last: the other splits are the same with or without it
    splits = {"train": n_train, "val": n_val, "test": n_test, **({"source": n_source} if n_source else {})}
    files: Dict[str, str] = {}
    image_id, question_id = 0, 0
    for split, n in splits.items():
        cap_entries, gt_images, gt_anns = [], [], []
        vqa_entries, vqa_questions, vqa_annotations = [], [], []
        for _ in range(n):
            image_id += 1
            scene = sample_scene(rng)
            # "_<id>.jpg": LAVIS's COCOCapEvalDataset parses the image id from the name.
            fname = f"toy_{image_id:06d}.jpg"
            render(scene).save(os.path.join(img_dir, fname), quality=95)
            refs = captions(scene, rng)
            if split in TRAIN_LAYOUT:
                cap_entries.extend({"image": fname, "caption": c, "image_id": image_id} for c in refs)
            else:
                cap_entries.append({"image": fname, "caption": refs, "image_id": image_id})
                gt_images.append({"id": image_id, "file_name": fname})
                gt_anns.extend({"image_id": image_id, "id": len(gt_anns) + i + 1, "caption": c}
                               for i, c in enumerate(refs))
            asked = questions(scene, rng)
            if eval_questions_per_image is not None and split not in TRAIN_LAYOUT:
                asked = [asked[(image_id + i) % len(asked)] for i in range(eval_questions_per_image)]
            for q in asked:
                question_id += 1
                entry = {"question_id": question_id, "question": q["question"], "image": fname}
                if split in TRAIN_LAYOUT:
                    vqa_entries.append({**entry, "answer": [q["answer"]] * 10})
                else:
                    vqa_entries.append(entry)
                    vqa_questions.append({"image_id": image_id, "question": q["question"],
                                          "question_id": question_id})
                    vqa_annotations.append({
                        "question_id": question_id, "image_id": image_id,
                        "question_type": q["question"].split(" ")[0],
                        "answer_type": q["answer_type"],
                        "multiple_choice_answer": q["answer"],
                        "answers": [{"answer": q["answer"], "answer_confidence": "yes",
                                     "answer_id": i + 1} for i in range(10)],
                    })

        def dump(name, obj):
            path = os.path.join("annotations", name)
            with open(os.path.join(out_dir, path), "w") as f:
                json.dump(obj, f)
            files[name.rsplit(".", 1)[0]] = path

        dump(f"caption_{split}.json", cap_entries)
        dump(f"vqa_{split}.json", vqa_entries)
        if split not in TRAIN_LAYOUT:
            dump(f"caption_{split}_gt.json", {"info": {"description": "toy world"}, "licenses": [],
                                              "type": "captions", "images": gt_images,
                                              "annotations": gt_anns})
            dump(f"vqa_{split}_questions.json", {"info": {}, "task_type": "Open-Ended",
                                                 "data_type": "toy", "data_subtype": split,
                                                 "license": {}, "questions": vqa_questions})
            dump(f"vqa_{split}_annotations.json", {"info": {}, "data_type": "toy",
                                                   "data_subtype": split, "license": {},
                                                   "annotations": vqa_annotations})

    answers = sorted(set(COLORS) | set(SHAPES) | {str(n) for n in NUMBER_WORDS} | {"yes", "no"})
    with open(os.path.join(ann_dir, "answer_list.json"), "w") as f:
        json.dump(answers, f)
    files["answer_list"] = os.path.join("annotations", "answer_list.json")
    return files

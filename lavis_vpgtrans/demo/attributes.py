"""Are a model's captions grounded in the image? Attribute F1 of the generated captions of the
toy world against a shuffled-caption baseline.

    python -m lavis_vpgtrans.demo.attributes RESULT_JSON GT_JSON [--shuffles 5] [--seed 0]

RESULT_JSON is a caption result file as LAVIS writes it (<run dir>/result/val_epoch{N}.json:
[{"caption", "image_id"}]); GT_JSON the COCO-format ground truth that toy.world.write_dataset
writes (annotations/caption_val_gt.json). Each image's scene is recovered from its canonical
reference (the first one), so the scores need nothing but these two files.

Attribute kinds, each compared as a set per image and micro-averaged over images:
  color   the colours a caption names            shape  the shapes it names
  cell    the grid cells it names                pair   its "{color} {shape}" pairs
  object  its "{color} {shape} at the {cell}" phrases (colour, shape and position of one thing)
count_acc is the fraction of captions stating the right number of things.

The shuffled baseline scores the same captions against other images (a seeded derangement,
averaged over `shuffles` seeds): what the caption distribution alone earns, without seeing.
A grounded model is well above it; a model that ignores its image is at it.
"""

import argparse
import json
import os
import random
import re
import sys
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from lavis_vpgtrans.toy.world import CELLS, COLORS, NUMBER_WORDS, SHAPES, Thing

KINDS = ("color", "shape", "cell", "pair", "object")

_COLOR_RE = "|".join(sorted(COLORS))
_SHAPE_RE = "|".join(SHAPES)
_CELL_RE = "|".join(sorted(CELLS))
_PHRASE_RE = rf"a ({_COLOR_RE}) ({_SHAPE_RE}) at the ({_CELL_RE})"
_CANONICAL_RE = re.compile(rf"{_PHRASE_RE}(?: and {_PHRASE_RE})*")
_ONE_PHRASE_RE = re.compile(_PHRASE_RE)
_CELL_WORDS = {tuple(cell.split()): cell for cell in CELLS}  # ("top", "left") -> "top left"
_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()}
_NUMBERS.update({str(n): n for n in NUMBER_WORDS})


# ---------------------------------------------------------------- ground truth


def parse_canonical(text: str, image_id=None) -> FrozenSet[Thing]:
    """The scene a canonical reference describes ("a red circle at the top left and a blue
    square at the bottom right"). Strict: anything else raises ValueError, since a wrong gold
    scene would silently skew every score."""
    where = f"image {image_id}: " if image_id is not None else ""
    if not isinstance(text, str) or not _CANONICAL_RE.fullmatch(text):
        raise ValueError(f"{where}the canonical reference {text!r} is not of the form "
                         f"'a <color> <shape> at the <cell>' joined by ' and '")
    things = [Thing(*m.groups()) for m in _ONE_PHRASE_RE.finditer(text)]
    cells = [t.cell for t in things]
    if len(set(cells)) != len(cells):  # a cell holds one thing: a repeat is a broken reference
        raise ValueError(f"{where}the canonical reference {text!r} names a cell twice")
    return frozenset(things)


def load_gt_scenes(gt_file: str) -> Dict[int, FrozenSet[Thing]]:
    """{image id: scene} from a COCO-format ground truth, each from the image's first reference
    (write_dataset writes an image's references in the order world.captions returns them)."""
    gt = _load_json(gt_file, "ground truth")
    if not isinstance(gt, dict) or not isinstance(gt.get("annotations"), list):
        raise ValueError(f"ground truth {gt_file}: expected a COCO-format object with an 'annotations' list")
    first: Dict[int, str] = {}
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int) or "caption" not in ann:
            raise ValueError(f"ground truth {gt_file}: annotation {i} has no integer 'image_id' and 'caption': {ann!r}")
        first.setdefault(ann["image_id"], ann["caption"])
    scenes = {}
    for image_id, text in first.items():
        try:
            scenes[image_id] = parse_canonical(text, image_id)
        except ValueError as e:
            raise ValueError(f"ground truth {gt_file}: {e}") from None
    return scenes


def gold_attributes(scene: Sequence[Thing]) -> Dict[str, Set]:
    return {
        "color": {t.color for t in scene},
        "shape": {t.shape for t in scene},
        "cell": {t.cell for t in scene},
        "pair": {(t.color, t.shape) for t in scene},
        "object": {(t.color, t.shape, t.cell) for t in scene},
    }


# ---------------------------------------------------------------- generated captions


def _tokens(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shape_at(tokens: List[str], i: int) -> Optional[str]:
    # plurals too: free-form model output may say "two circles"
    word = tokens[i] if 0 <= i < len(tokens) else ""
    if word in SHAPES:
        return word
    if word.endswith("s") and word[:-1] in SHAPES:
        return word[:-1]
    return None


def _cell_at(tokens: List[str], i: int) -> Optional[str]:
    return _CELL_WORDS.get(tuple(tokens[i:i + 2]))


def extract_mentions(caption: str) -> dict:
    """What a (possibly broken) caption states: {"color", "shape", "cell", "pair", "object"} as
    sets, and "count" (int, or None if it states no number and no thing).

    Tolerant by design: words are scanned wherever they are, so repeated phrases, a missing
    "at the ...", or text truncated mid-phrase still yield what was said. A pair is a colour
    word directly followed by a shape word; an object is a pair directly followed by
    "at the <cell>". The count is the number in "<one|two|three> shape(s)" when there is one,
    else the number of things named (a shape word each), where an object repeated word for
    word counts once: a cell holds one thing, so the repeat is not another thing.
    """
    tokens = _tokens(caption)
    found = {kind: set() for kind in KINDS}
    stated_count = None
    things_named = 0
    objects_named: List[Tuple[str, str, str]] = []
    for i, word in enumerate(tokens):
        if word in COLORS:
            found["color"].add(word)
        cell = _cell_at(tokens, i)
        if cell is not None:
            found["cell"].add(cell)
        if word in _NUMBERS and tokens[i + 1:i + 2] in (["shape"], ["shapes"]) and stated_count is None:
            stated_count = _NUMBERS[word]
        shape = _shape_at(tokens, i)
        if shape is None:
            continue
        found["shape"].add(shape)
        color = tokens[i - 1] if i > 0 and tokens[i - 1] in COLORS else None
        if color is None:
            things_named += 1
            continue
        found["pair"].add((color, shape))
        cell = _cell_at(tokens, i + 3) if tokens[i + 1:i + 3] == ["at", "the"] else None
        if cell is None:
            things_named += 1
            continue
        found["object"].add((color, shape, cell))
        objects_named.append((color, shape, cell))
    things_named += len(set(objects_named))
    if stated_count is not None:
        found["count"] = stated_count
    else:
        found["count"] = things_named or None
    return found


# ---------------------------------------------------------------- scores


def _micro(pairs: Sequence[Tuple[dict, dict]]) -> Dict[str, Dict[str, float]]:
    """{"precision"|"recall"|"f1": {kind: value}} summed over (mentions, gold) pairs."""
    out: Dict[str, Dict[str, float]] = {"precision": {}, "recall": {}, "f1": {}}
    for kind in KINDS:
        tp = sum(len(pred[kind] & gold[kind]) for pred, gold in pairs)
        n_pred = sum(len(pred[kind]) for pred, _ in pairs)
        n_gold = sum(len(gold[kind]) for _, gold in pairs)
        out["precision"][kind] = tp / n_pred if n_pred else 0.0
        out["recall"][kind] = tp / n_gold if n_gold else 0.0
        out["f1"][kind] = 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0
    return out


def _count_acc(pairs: Sequence[Tuple[dict, dict]]) -> float:
    return sum(pred["count"] == len(gold["object"]) for pred, gold in pairs) / len(pairs)


def derangement(n: int, seed: int) -> List[int]:
    """A seeded uniformly random permutation of range(n) with no fixed points (rejection
    sampling: about e tries)."""
    if n < 2:
        raise ValueError(f"a shuffled baseline needs at least 2 images, got {n}")
    rng = random.Random(seed)
    perm = list(range(n))
    while True:
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def load_results(result_file: str) -> Dict[int, str]:
    """{image id: caption} from a LAVIS caption result file."""
    results = _load_json(result_file, "result")
    if not isinstance(results, list):
        raise ValueError(f"result file {result_file}: expected a list of {{'caption', 'image_id'}}")
    captions: Dict[int, str] = {}
    for i, res in enumerate(results):
        if (not isinstance(res, dict) or not isinstance(res.get("caption"), str)
                or not isinstance(res.get("image_id"), int) or isinstance(res.get("image_id"), bool)):
            raise ValueError(f"result file {result_file}: entry {i} is not {{'caption': str, "
                             f"'image_id': int}}: {res!r}")
        if res["image_id"] in captions:
            raise ValueError(f"result file {result_file}: image_id {res['image_id']} appears twice")
        captions[res["image_id"]] = res["caption"]
    if not captions:
        raise ValueError(f"result file {result_file}: no results")
    return captions


def attribute_scores(result_file: str, gt_file: str, shuffles: int = 5, seed: int = 0) -> dict:
    """Attribute F1 (per kind, micro-averaged over the result's images) and count accuracy of
    the captions in `result_file`, and the same for the captions shuffled across images
    (mean over `shuffles` derangements seeded seed, seed + 1, ...; None when shuffles is 0)."""
    if shuffles < 0:
        raise ValueError(f"shuffles must be >= 0, got {shuffles}")
    captions = load_results(result_file)
    scenes = load_gt_scenes(gt_file)
    if shuffles and len(captions) < 2:
        raise ValueError(f"result file {result_file}: a shuffled baseline needs at least 2 images, "
                         f"got {len(captions)} (use shuffles=0)")
    for image_id in captions:
        if image_id not in scenes:
            raise ValueError(f"result file {result_file}: image_id {image_id} has no reference "
                             f"captions in the ground truth {gt_file}")
    ids = sorted(captions)  # the shuffles do not depend on the result file's order
    mentions = [extract_mentions(captions[i]) for i in ids]
    golds = [gold_attributes(scenes[i]) for i in ids]

    matched = list(zip(mentions, golds))
    scores = _micro(matched)
    out = {"n_images": len(ids), "f1": scores["f1"], "precision": scores["precision"],
           "recall": scores["recall"], "count_acc": _count_acc(matched),
           "shuffled_f1": None, "shuffled_count_acc": None}
    if shuffles:
        f1_sums = {kind: 0.0 for kind in KINDS}
        count_sum = 0.0
        for k in range(shuffles):
            perm = derangement(len(ids), seed + k)
            shuffled = [(mentions[j], golds[perm[j]]) for j in range(len(ids))]
            for kind, value in _micro(shuffled)["f1"].items():
                f1_sums[kind] += value
            count_sum += _count_acc(shuffled)
        out["shuffled_f1"] = {kind: value / shuffles for kind, value in f1_sums.items()}
        out["shuffled_count_acc"] = count_sum / shuffles
    return out


def _load_json(path: str, role: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} file {path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{role} file {path} is not valid JSON: {e}") from None


def format_table(scores: dict) -> str:
    shuffled = scores["shuffled_f1"]

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    rows = [["kind", "precision", "recall", "F1", "shuffled F1"]]
    for kind in KINDS:
        rows.append([kind, pct(scores["precision"][kind]), pct(scores["recall"][kind]),
                     pct(scores["f1"][kind]), pct(shuffled[kind] if shuffled else None)])
    rows.append(["count acc", "", "", pct(scores["count_acc"]), pct(scores["shuffled_count_acc"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{scores['n_images']} images\n" + "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result_json")
    parser.add_argument("gt_json")
    parser.add_argument("--shuffles", type=int, default=5, help="derangements averaged for the baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        scores = attribute_scores(args.result_json, args.gt_json, shuffles=args.shuffles, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())

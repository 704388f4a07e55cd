"""Attribute F1 of generated captions against a shuffled-caption baseline
(lavis_vpgtrans/demo/attributes.py), on ground truth written by the toy world's own writer."""

import json
import os
import random
import subprocess
import sys

import pytest

from lavis_vpgtrans.demo import attributes
from lavis_vpgtrans.demo.attributes import KINDS, attribute_scores, extract_mentions, parse_canonical
from lavis_vpgtrans.toy import world

# world.captions' five styles, by index: which kinds each states, and whether it states positions
CANONICAL, THERE_IS, COUNT_LIST, IMAGE_WITH, SHUFFLED = range(5)
ALL_KINDS = set(KINDS)
NO_CELL_KINDS = {"color", "shape", "pair"}  # "two shapes: red circle, ..." and "an image with ..."
STATED = {CANONICAL: ALL_KINDS, THERE_IS: ALL_KINDS, COUNT_LIST: NO_CELL_KINDS,
          IMAGE_WITH: NO_CELL_KINDS, SHUFFLED: ALL_KINDS}
N_VAL = 40


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory):
    """(gt file, [(image id, references)]) of a small validation split."""
    out = tmp_path_factory.mktemp("toy_world")
    files = world.write_dataset(str(out), n_train=0, n_val=N_VAL, n_test=0, seed=3)
    with open(out / files["caption_val"]) as f:
        entries = json.load(f)
    return str(out / files["caption_val_gt"]), [(e["image_id"], e["caption"]) for e in entries]


def write_results(path, pairs):
    with open(path, "w") as f:
        json.dump([{"caption": c, "image_id": i} for i, c in pairs], f)
    return str(path)


def scenes_of(toy_val):
    return {image_id: parse_canonical(refs[0], image_id) for image_id, refs in toy_val[1]}


# --------------------------------------------------------------------------- parsing


def test_canonical_parse_round_trips_sampled_scenes():
    rng = random.Random(0)
    for _ in range(500):
        scene = world.sample_scene(rng)
        assert parse_canonical(world.captions(scene, rng)[0]) == set(scene)


def test_every_style_states_exactly_its_kinds_on_sampled_scenes():
    rng = random.Random(1)
    for _ in range(500):
        scene = world.sample_scene(rng)
        gold = attributes.gold_attributes(scene)
        for style, caption in enumerate(world.captions(scene, rng)):
            found = extract_mentions(caption)
            for kind in KINDS:
                expected = gold[kind] if kind in STATED[style] else set()
                assert found[kind] == expected, (style, caption, kind)
            assert found["count"] == len(scene), (style, caption)


@pytest.mark.parametrize("text", [
    "a red circle at the top left and",  # truncated
    "there is a red circle at the top left",  # not the canonical style
    "a pink circle at the top left",  # not in the world's vocabulary
    "a red circle at the top left and a blue square at the top left",  # one cell, two things
    "a red circle at the top left ",
    "A red circle at the top left",
    "",
])
def test_canonical_parser_is_strict(text):
    with pytest.raises(ValueError, match="image 7"):
        parse_canonical(text, image_id=7)


# --------------------------------------------------------------------------- broken model output


def test_repeated_phrases_count_once_when_word_for_word():
    found = extract_mentions("a red circle at the top left and a red circle at the top left "
                             "and a red circle at the top left")
    assert found["object"] == {("red", "circle", "top left")}
    assert found["count"] == 1


def test_truncated_and_cell_less_phrases():
    found = extract_mentions("a red circle at the top left and a blue square at the bottom and a gre")
    assert found["color"] == {"red", "blue"}
    assert found["shape"] == {"circle", "square"}
    assert found["cell"] == {"top left"}
    assert found["pair"] == {("red", "circle"), ("blue", "square")}
    assert found["object"] == {("red", "circle", "top left")}
    assert found["count"] == 2  # "a gre" names no thing


def test_number_word_wins_over_a_truncated_list():
    found = extract_mentions("three shapes: red circle, blue squ")
    assert found["count"] == 3
    assert found["pair"] == {("red", "circle")}
    assert found["shape"] == {"circle"}


def test_loose_words_case_and_punctuation():
    found = extract_mentions("There is a Green triangle at the bottom right. A circle, top left, purple.")
    assert found["color"] == {"green", "purple"}
    assert found["shape"] == {"triangle", "circle"}
    assert found["cell"] == {"bottom right", "top left"}
    assert found["pair"] == {("green", "triangle")}  # "purple" follows the circle: no pair
    assert found["object"] == {("green", "triangle", "bottom right")}
    assert found["count"] == 2


def test_empty_caption_states_nothing():
    found = extract_mentions("")
    assert all(found[kind] == set() for kind in KINDS)
    assert found["count"] is None


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("style", range(5))
def test_references_as_captions_score_perfectly_on_what_they_state(toy_val, tmp_path, style):
    gt_file, refs = toy_val
    result = write_results(tmp_path / "val_epoch0.json", [(i, r[style]) for i, r in refs])
    scores = attribute_scores(result, gt_file)
    assert scores["n_images"] == N_VAL
    for kind in KINDS:
        assert scores["f1"][kind] == (1.0 if kind in STATED[style] else 0.0), kind
    assert scores["count_acc"] == 1.0
    # the shuffled baseline is strictly below perfect captions, for every kind they state
    for kind in STATED[style]:
        assert 0.0 < scores["shuffled_f1"][kind] < 1.0, kind
    assert scores["shuffled_count_acc"] < 1.0


def test_a_caption_repeated_for_every_image_is_at_its_shuffled_baseline(toy_val, tmp_path):
    gt_file, refs = toy_val
    # a blind model: the same caption whatever the image
    result = write_results(tmp_path / "blind.json", [(i, refs[0][1][CANONICAL]) for i, _ in refs])
    scores = attribute_scores(result, gt_file)
    for kind in KINDS:
        assert scores["f1"][kind] == pytest.approx(scores["shuffled_f1"][kind]), kind


def test_shuffles_are_derangements_and_deterministic(toy_val, tmp_path):
    for n in (2, 3, 10):
        for seed in range(20):
            perm = attributes.derangement(n, seed)
            assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
            assert perm == attributes.derangement(n, seed)
    gt_file, refs = toy_val
    pairs = [(i, r[CANONICAL]) for i, r in refs]
    first = attribute_scores(write_results(tmp_path / "a.json", pairs), gt_file)
    # the result file's order does not change the baseline
    again = attribute_scores(write_results(tmp_path / "b.json", pairs[::-1]), gt_file)
    assert first == again


def test_broken_outputs_known_counts(toy_val, tmp_path):
    """Two images, by hand: one thing t, captioned with its phrase repeated then truncated;
    two things u, v (different colours and shapes), captioned with u's phrase and v's shape
    in a wrong colour, without a cell."""
    gt_file, refs = toy_val
    scenes = scenes_of(toy_val)
    one = next(i for i, s in scenes.items() if len(s) == 1)
    two = next(i for i, s in scenes.items()
               if len(s) == 2 and len({t.color for t in s}) == 2 and len({t.shape for t in s}) == 2)
    (t,) = scenes[one]
    u, v = sorted(scenes[two], key=lambda x: x.cell)
    wrong = next(c for c in sorted(world.COLORS) if c not in (u.color, v.color))
    phrase = f"a {t.color} {t.shape} at the {t.cell}"
    result = write_results(tmp_path / "broken.json", [
        (one, f"{phrase} and {phrase} and a {t.color} {t.shape} at the"),
        (two, f"a {u.color} {u.shape} at the {u.cell} and a {wrong} {v.shape}"),
    ])
    scores = attribute_scores(result, gt_file)

    def f1(tp, n_pred, n_gold):
        return 2 * tp / (n_pred + n_gold)

    # (true positives, predicted, gold) summed over the two images
    assert scores["f1"]["color"] == pytest.approx(f1(1 + 1, 1 + 2, 1 + 2))
    assert scores["f1"]["shape"] == pytest.approx(f1(1 + 2, 1 + 2, 1 + 2))
    assert scores["f1"]["cell"] == pytest.approx(f1(1 + 1, 1 + 1, 1 + 2))
    assert scores["f1"]["pair"] == pytest.approx(f1(1 + 1, 1 + 2, 1 + 2))
    assert scores["f1"]["object"] == pytest.approx(f1(1 + 1, 1 + 1, 1 + 2))
    assert scores["precision"]["cell"] == 1.0 and scores["recall"]["cell"] == pytest.approx(2 / 3)
    # the truncated third phrase may be another thing: image one's count is 2, image two's 2
    assert scores["count_acc"] == 0.5


# --------------------------------------------------------------------------- bad input


def test_missing_files(toy_val, tmp_path):
    gt_file, refs = toy_val
    result = write_results(tmp_path / "ok.json", [(i, r[0]) for i, r in refs])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        attribute_scores(str(tmp_path / "nope.json"), gt_file)
    with pytest.raises(FileNotFoundError, match="gt_nope.json"):
        attribute_scores(result, str(tmp_path / "gt_nope.json"))


def test_unknown_image_id(toy_val, tmp_path):
    gt_file, refs = toy_val
    result = write_results(tmp_path / "extra.json", [(i, r[0]) for i, r in refs] + [(999999, "a red circle")])
    with pytest.raises(ValueError, match=r"extra\.json.*image_id 999999"):
        attribute_scores(result, gt_file)


@pytest.mark.parametrize("content, match", [
    ('[{"caption": "a red circle", "image_id": 1}', "not valid JSON"),
    ('{"caption": "a red circle", "image_id": 1}', "expected a list"),
    ('[{"caption": "a red circle", "image_id": "1"}]', "entry 0"),
    ('[{"image_id": 1}]', "entry 0"),
    ('[{"caption": "a", "image_id": 1}, {"caption": "b", "image_id": 1}]', "image_id 1 appears twice"),
    ("[]", "no results"),
])
def test_malformed_result_file(toy_val, tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        attribute_scores(str(path), toy_val[0])
    assert "bad.json" in str(err.value)


def test_malformed_ground_truth(toy_val, tmp_path):
    gt_file, refs = toy_val
    with open(gt_file) as f:
        gt = json.load(f)
    first = gt["annotations"][0]
    first["caption"] = "there is " + first["caption"]  # the canonical reference must come first
    bad_gt = tmp_path / "bad_gt.json"
    bad_gt.write_text(json.dumps(gt))
    result = write_results(tmp_path / "ok.json", [(i, r[0]) for i, r in refs])
    with pytest.raises(ValueError, match=rf"bad_gt\.json.*image {first['image_id']}.*there is") as err:
        attribute_scores(result, str(bad_gt))
    assert first["caption"] in str(err.value)

    broken = tmp_path / "broken_gt.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"broken_gt\.json.*not valid JSON"):
        attribute_scores(result, str(broken))


def test_one_image_needs_shuffles_off(toy_val, tmp_path):
    gt_file, refs = toy_val
    result = write_results(tmp_path / "one.json", [(refs[0][0], refs[0][1][0])])
    with pytest.raises(ValueError, match="at least 2 images"):
        attribute_scores(result, gt_file)
    scores = attribute_scores(result, gt_file, shuffles=0)
    assert scores["f1"]["object"] == 1.0 and scores["shuffled_f1"] is None


# --------------------------------------------------------------------------- CLI


def test_cli(toy_val, tmp_path, capsys):
    gt_file, refs = toy_val
    result = write_results(tmp_path / "val_epoch3.json", [(i, r[COUNT_LIST]) for i, r in refs])
    assert attributes.main([result, gt_file]) == 0
    table = capsys.readouterr().out
    assert f"{N_VAL} images" in table
    assert [line.split()[:4] for line in table.splitlines() if line.startswith("cell")] == [["cell", "0.0", "0.0", "0.0"]]
    assert [line.split()[:2] for line in table.splitlines() if line.startswith("pair")] == [["pair", "100.0"]]

    assert attributes.main([str(tmp_path / "missing.json"), gt_file]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_cli_as_module(toy_val, tmp_path):
    gt_file, refs = toy_val
    result = write_results(tmp_path / "val_epoch0.json", [(i, r[CANONICAL]) for i, r in refs])
    proc = subprocess.run([sys.executable, "-m", "lavis_vpgtrans.demo.attributes", result, gt_file],
                          capture_output=True, text=True, cwd=os.getcwd(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "shuffled F1" in proc.stdout and "count acc" in proc.stdout

"""Your own data (lavis_vpgtrans/datasets/generic.py): the own_caption / own_vqa builders on files
written by the tools people use (the json module from the documented schema, pandas' to_csv, HF
datasets' save_to_disk / to_parquet) over the toy world's images, trained one epoch through
train.py and evaluated through evaluate.py with known answers; every kind of bad input stops with
an error naming the file and the record, line or row."""

import collections
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_CONFIGS = os.path.join(REPO, "projects", "own_data")
N = 8  # records per file


# --------------------------------------------------------------------------- files

def write_jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def image_bytes(path):
    with open(path, "rb") as f:
        return {"bytes": f.read(), "path": None}


@pytest.fixture(scope="module")
def toy(toy_zoo):
    data = os.path.join(toy_zoo, "data")

    def load(name):
        with open(os.path.join(data, "annotations", name)) as f:
            return json.load(f)

    answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
               for a in load("vqa_val_annotations.json")["annotations"]}
    vqa_val = [{**q, "answer": answers[q["question_id"]]} for q in load("vqa_val.json")]
    return SimpleNamespace(images=os.path.join(data, "images"), captions=load("caption_train.json"),
                           references=load("caption_val.json"), vqa=load("vqa_train.json"), vqa_val=vqa_val)


@pytest.fixture(scope="module")
def own(tmp_path_factory, toy):
    """The toy world's captions and questions in every format, each written by its own tool."""
    import datasets
    import pandas as pd

    root = tmp_path_factory.mktemp("own_data")
    cap, vqa = root / "captions", root / "vqa"
    cap.mkdir()
    vqa.mkdir()
    images = toy.images
    train = toy.captions

    # captions: JSONL (json module), CSV (pandas, open_clip's columns, absolute paths), HF save_to_disk
    write_jsonl(cap / "train.jsonl", [{"image": r["image"], "caption": r["caption"]} for r in train[:N]])
    pd.DataFrame({"filepath": [os.path.join(images, r["image"]) for r in train[N:2 * N]],
                  "title": [r["caption"] for r in train[N:2 * N]]}).to_csv(cap / "train.csv")
    datasets.Dataset.from_dict(
        {"image": [os.path.join(images, r["image"]) for r in train[2 * N:3 * N]],
         "caption": [r["caption"] for r in train[2 * N:3 * N]]}).cast_column("image", datasets.Image()) \
        .save_to_disk(str(cap / "train_hf"))
    # evaluation: a JSON list with reference lists; a DatasetDict whose "test" split has list captions
    refs = toy.references
    with open(cap / "val.json", "w") as f:
        json.dump([{"image": r["image"], "caption": r["caption"]} for r in refs[:4]], f)
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"image": [image_bytes(os.path.join(images, r["image"])) for r in refs[4:8]],
         "caption": [r["caption"] for r in refs[4:8]]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}))}) \
        .save_to_disk(str(cap / "test_hf"))

    # VQA: parquet (to_parquet, image bytes, ten answers), JSON (one answer), JSONL val mixing both
    qa = toy.vqa
    datasets.Dataset.from_dict(
        {"image": [image_bytes(os.path.join(images, r["image"])) for r in qa[:N]],
         "question": [r["question"] for r in qa[:N]], "answer": [r["answer"] for r in qa[:N]]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.List(datasets.Value("string"))})) \
        .to_parquet(str(vqa / "train.parquet"))
    with open(vqa / "train.json", "w") as f:
        json.dump([{"image": r["image"], "question": r["question"], "answer": r["answer"][0]} for r in qa[N:2 * N]], f)
    val = [{"image": r["image"], "question": r["question"], "answer": r["answer"] if i % 2 else r["answer"][0]}
           for i, r in enumerate(toy.vqa_val[:N])]
    write_jsonl(vqa / "val.jsonl", val)
    return SimpleNamespace(root=root, captions=cap, vqa=vqa, images=images, val=val,
                           val_refs=[r["caption"] for r in refs[:4]], test_refs=[r["caption"] for r in refs[4:8]])


def builder(name, plugin, **config):
    """A builder of `name` with its default config merged with `config`."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_builder_class(name)
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path()).datasets[name], config)
    return cls(cfg)


def build(name, plugin, **config):
    return builder(name, plugin, **config).build_datasets()


def splits(**paths):
    return {split: {"storage": path} for split, path in paths.items()}


def small_images(**config):
    proc = {"name": "blip_image_eval", "image_size": 32}
    return {"vis_processor": {"train": proc, "eval": proc}, **config}


# --------------------------------------------------------------------------- formats


def test_every_format_reads_the_same_records(plugin, own, toy, tmp_path):
    """The same 8 captions as JSON, JSONL, CSV and TSV (pandas), HF save_to_disk and parquet."""
    import datasets
    import pandas as pd

    records = [{"img": r["image"], "text": r["caption"]} for r in toy.captions[:N]]
    with open(tmp_path / "a.json", "w") as f:
        json.dump(records, f)
    write_jsonl(tmp_path / "a.jsonl", records)
    frame = pd.DataFrame({"img": [r["img"] for r in records], "text": [r["text"] for r in records]})
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_csv(tmp_path / "a.tsv", sep="\t")
    hf = datasets.Dataset.from_dict(
        {"img": [image_bytes(os.path.join(own.images, r["img"])) for r in records], "text": frame["text"].tolist()},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")}))
    hf.save_to_disk(str(tmp_path / "a_hf"))
    hf.to_parquet(str(tmp_path / "a.parquet"))
    expected = [r["text"] for r in records]
    first = None
    for name in ("a.json", "a.jsonl", "a.csv", "a.tsv", "a_hf", "a.parquet"):
        train = build("own_caption", plugin, data_root=str(tmp_path), keys={"image": "img", "caption": "text"},
                      **small_images(build_info={"annotations": splits(train=name), "images": {"storage": own.images}}))["train"]
        assert [a["caption"] for a in train.annotation] == expected, name
        sample = train[3]
        assert sample["text_input"] == train.text_processor(expected[3])
        if first is None:
            first = sample["image"]
        assert sample["image"].shape == first.shape and (sample["image"] - first).abs().max() == 0, name


def test_caption_ground_truth_scores_references_against_themselves(plugin, own):
    """Evaluation groups each image's references into a COCO ground truth; one of an image's own
    references as its caption scores BLEU 1 (pycocoevalcap, as the caption task runs it)."""
    from lavis_vpgtrans.tasks.captioning import evaluate_caption_file

    b = builder("own_caption", plugin, data_root=str(own.captions), types={"caption": "list"},
                **small_images(build_info={"annotations": splits(val="val.json"), "images": {"storage": own.images}}))
    val = b.build_datasets()["val"]
    gt_file = b.config.build_info.annotations.val.coco_gt
    with open(gt_file) as f:
        gt = json.load(f)
    refs = collections.defaultdict(list)
    for ann in gt["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    assert [refs[i] for i in (1, 2, 3, 4)] == own.val_refs  # image ids: records' order, from 1
    assert [val[i]["image_id"] for i in range(4)] == [1, 2, 3, 4]
    result = own.root / "self.json"
    with open(result, "w") as f:
        json.dump([{"image_id": i, "caption": refs[i][0]} for i in refs], f)
    metrics = evaluate_caption_file(gt_file, str(result), spice=False, metrics_to_run=["Bleu"])
    assert metrics["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_vqa_accuracy_of_a_constant_answer(plugin, tmp_path):
    """The official VQA accuracy on ground truth built from own records, for a predictor that
    always answers "red", computed by hand: one answer is exact match (after the official
    normalisation), a list scores min(#others agreeing / 3, 1) averaged over leaving each out."""
    from lavis_vpgtrans.tasks.vqa import vqa_accuracy

    write_jsonl(tmp_path / "val.jsonl", [
        {"image": "a.jpg", "question": "q1", "answer": "Red."},                  # 1
        {"image": "a.jpg", "question": "q2", "answer": "blue"},                  # 0
        {"image": "b.jpg", "question": "q3", "answer": ["red"] * 10},            # 1
        {"image": "b.jpg", "question": "q4", "answer": ["red"] * 2 + ["green"] * 8},  # (2*1/3 + 8*2/3)/10 = 0.6
    ])
    from PIL import Image

    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    val = build("own_vqa", plugin, data_root=str(tmp_path), types={"answer": "list"},
                **small_images(build_info={"annotations": splits(val="val.jsonl")}))["val"]
    result = tmp_path / "result.json"
    with open(result, "w") as f:
        json.dump([{"question_id": a["question_id"], "answer": "red"} for a in val.annotation], f)
    metrics = vqa_accuracy(val.coco_fmt_anno_file, val.coco_fmt_qust_file, str(result))
    assert metrics["acc"] == pytest.approx(100 * (1 + 0 + 1 + 0.6) / 4)
    sample = val[0]
    assert sample["question_id"] == 1 and sample["text_input"] == "q1"


# --------------------------------------------------------------------------- bad input


def error_of(plugin, name="own_caption", data_root=None, **config):
    from lavis_vpgtrans.datasets.checked import DataError

    with pytest.raises((DataError, FileNotFoundError)) as info:
        build(name, plugin, data_root=str(data_root), **small_images(**config))
    return str(info.value)


def caption_files(tmp_path, images, split="train"):
    return {"annotations": splits(**{split: tmp_path / "bad.jsonl"}), "images": {"storage": images}}


def test_missing_image_names_the_line(plugin, own, tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"image": "toy_000001.jpg", "caption": "a"},
                                         {"image": "nowhere.jpg", "caption": "b"}])
    message = error_of(plugin, data_root=tmp_path, build_info=caption_files(tmp_path, own.images, "val"))
    assert f"line 2 of {tmp_path / 'bad.jsonl'}" in message and "nowhere.jpg" in message


def test_bad_images_are_skipped_and_counted_with_skip_bad_samples(plugin, own, tmp_path, monkeypatch):
    """A missing and an unreadable image: an error naming the line, or with run.skip_bad_samples
    skipped (None, dropped by the collater) and counted; evaluation splits never skip."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_vpgtrans.datasets.checked import DataError

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    write_jsonl(tmp_path / "bad.jsonl", [{"image": os.path.join(own.images, "toy_000001.jpg"), "caption": "a"},
                                         {"image": "broken.jpg", "caption": "b"},
                                         {"image": "gone.jpg", "caption": "c"}])
    files = {"annotations": splits(train=tmp_path / "bad.jsonl")}
    message = error_of(plugin, data_root=tmp_path, build_info=files)
    assert f"line 3 of {tmp_path / 'bad.jsonl'}" in message and "gone.jpg" in message and "skip_bad_samples" in message

    write_jsonl(tmp_path / "bad.jsonl", [{"image": os.path.join(own.images, "toy_000001.jpg"), "caption": "a"},
                                         {"image": "broken.jpg", "caption": "b"}])
    train = build("own_caption", plugin, data_root=str(tmp_path), **small_images(build_info=files))["train"]
    with pytest.raises(DataError, match=re.escape(f"line 2 of {tmp_path / 'bad.jsonl'} (image {tmp_path / 'broken.jpg'})")):
        train[1]

    monkeypatch.setitem(registry.mapping["state"], "configuration",
                        SimpleNamespace(run_cfg=OmegaConf.create({"skip_bad_samples": True})))
    write_jsonl(tmp_path / "bad.jsonl", [{"image": os.path.join(own.images, "toy_000001.jpg"), "caption": "a"},
                                         {"image": "broken.jpg", "caption": "b"},
                                         {"image": "gone.jpg", "caption": "c"}])
    train = build("own_caption", plugin, data_root=str(tmp_path), **small_images(build_info=files))["train"]
    batch = train.collater([train[i] for i in range(3)])
    assert batch["text_input"] == ["a"] and train.take_skipped() == 2
    message = error_of(plugin, data_root=tmp_path, build_info={"annotations": splits(val=tmp_path / "bad.jsonl")})
    assert f"line 3 of {tmp_path / 'bad.jsonl'}" in message  # evaluation: gone.jpg, never skipped


def test_unreadable_hf_image_names_the_row(plugin, tmp_path):
    import datasets

    from lavis_vpgtrans.datasets.checked import DataError

    datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": None}], "caption": ["a"]},
                               features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})) \
        .save_to_disk(str(tmp_path / "hf"))
    train = build("own_caption", plugin, data_root=str(tmp_path),
                  **small_images(build_info={"annotations": splits(train="hf")}))["train"]
    with pytest.raises(DataError, match=re.escape(f"row 0 of {tmp_path / 'hf'}")):
        train[0]


def test_missing_key_lists_the_record_keys(plugin, own, tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"image": "toy_000001.jpg", "caption": "a"},
                                         {"image": "toy_000002.jpg", "text": "b", "id": 7}])
    message = error_of(plugin, data_root=tmp_path, build_info=caption_files(tmp_path, own.images))
    assert f"line 2 of {tmp_path / 'bad.jsonl'}: no key 'caption'" in message
    assert "['id', 'image', 'text']" in message


def test_missing_csv_column_lists_the_columns(plugin, own, tmp_path):
    import pandas as pd

    pd.DataFrame({"filepath": ["toy_000001.jpg"], "caption": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    message = error_of(plugin, data_root=tmp_path, build_info={"annotations": splits(train="bad.csv")})
    assert f"{tmp_path / 'bad.csv'}: line 1 (header) has no column 'title'" in message
    assert "['filepath', 'caption']" in message and "keys.caption" in message


def test_invalid_json_line_names_its_number(plugin, own, tmp_path):
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write(json.dumps({"image": "toy_000001.jpg", "caption": "a"}) + "\n\n")
        f.write('{"image": "toy_000002.jpg", "caption": "b"\n')
    message = error_of(plugin, data_root=tmp_path, build_info=caption_files(tmp_path, own.images))
    assert f"{tmp_path / 'bad.jsonl'}: line 3 is not valid JSON" in message


@pytest.mark.parametrize("kind", ["jsonl", "csv", "hf"])
def test_empty_dataset_names_the_file(plugin, tmp_path, kind):
    import datasets
    import pandas as pd

    if kind == "jsonl":
        (tmp_path / "empty.jsonl").write_text("\n")
        name = "empty.jsonl"
    elif kind == "csv":
        pd.DataFrame({"filepath": [], "title": []}).to_csv(tmp_path / "empty.csv")
        name = "empty.csv"
    else:
        # image paths: datasets 5.0.1 cannot save an empty Image column (ZeroDivisionError)
        datasets.Dataset.from_dict({"image": [], "caption": []},
                                   features=datasets.Features({"image": datasets.Value("string"),
                                                               "caption": datasets.Value("string")})) \
            .save_to_disk(str(tmp_path / "empty_hf"))
        name = "empty_hf"
    message = error_of(plugin, data_root=tmp_path, build_info={"annotations": splits(train=name)})
    assert f"{tmp_path / name}: no records" in message


def test_caption_lists_where_strings_are_configured(plugin, own, tmp_path):
    """types.caption is "str" (the default): a list is an error naming the file and record / line
    / column, in JSON, in a CSV written by pandas from a list column, and in an HF List column."""
    import datasets
    import pandas as pd

    with open(tmp_path / "bad.json", "w") as f:
        json.dump([{"image": "toy_000001.jpg", "caption": "a"}, {"image": "toy_000002.jpg", "caption": ["b", "c"]}], f)
    message = error_of(plugin, data_root=tmp_path, build_info={"annotations": splits(train="bad.json"),
                                                               "images": {"storage": own.images}})
    assert f"record 1 of {tmp_path / 'bad.json'}: 'caption' holds a list" in message and "types.caption: list" in message

    pd.DataFrame({"filepath": [os.path.join(own.images, "toy_000001.jpg")] * 2,
                  "title": [["a", "b"], ["c"]]}).to_csv(tmp_path / "bad.csv")
    message = error_of(plugin, data_root=tmp_path, build_info={"annotations": splits(train="bad.csv")})
    assert f"line 2 of {tmp_path / 'bad.csv'}: 'title' holds a list (['a', 'b'])" in message
    # the same file is right with types.caption: list
    train = build("own_caption", plugin, data_root=str(tmp_path), types={"caption": "list"},
                  **small_images(build_info={"annotations": splits(train="bad.csv")}))["train"]
    assert [a["caption"] for a in train.annotation] == ["a", "b", "c"]

    datasets.Dataset.from_dict({"image": [os.path.join(own.images, "toy_000001.jpg")], "caption": [["a", "b"]]}) \
        .save_to_disk(str(tmp_path / "hf"))
    message = error_of(plugin, data_root=tmp_path, build_info={"annotations": splits(train="hf")})
    assert f"{tmp_path / 'hf'}: column 'caption' holds lists" in message and "row 0: ['a', 'b']" in message


# --------------------------------------------------------------------------- example configs


def example_layout(name, root, toy):
    """The files an example config documents, with 4 toy images."""
    import shutil

    import datasets
    import pandas as pd

    os.makedirs(root / "images" / "photos")
    names = [f"photos/{i:04d}.jpg" for i in range(4)]
    for src, dst in zip(toy.captions, names):
        shutil.copy(os.path.join(toy.images, src["image"]), root / "images" / dst)
    if name in ("caption_json.yaml", "mix_with_coco.yaml", "transfer_captions.yaml"):  # mix_with_coco: its own_caption part
        write_jsonl(root / "train.jsonl", [{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names)])
        with open(root / "val.json", "w") as f:
            json.dump([{"image": names[0], "caption": ["a mug", "a red cup"]}], f)
    elif name == "caption_csv.yaml":
        for split in ("train", "val"):
            pd.DataFrame({"filepath": [f"images/{n}" for n in names], "title": ["a", "b", "c", "d"]}).to_csv(
                root / f"{split}.csv")
    elif name == "caption_hf.yaml":
        ds = datasets.Dataset.from_dict({"image": [str(root / "images" / n) for n in names],
                                         "caption": ["a", "b", "c", "d"]}).cast_column("image", datasets.Image())
        parts = ds.train_test_split(test_size=0.25, seed=0)
        datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]}).save_to_disk(str(root / "hf"))
    else:
        write_jsonl(root / "train.jsonl", [{"image": n, "question": "what?", "answer": "red"} for n in names])
        with open(root / "val.json", "w") as f:
            json.dump([{"image": names[0], "question": "how many?", "answer": ["2", "two", "2"]}], f)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(OWN_CONFIGS)
                                         if not n.startswith(("instruct", "caption_webdataset"))))
# instruct_*: test_own_instruct.py; caption_webdataset: test_own_data_formats.py
def test_example_configs_build_their_documented_layout(plugin, toy, tmp_path, name):
    """Each projects/own_data config (no absolute paths) passes the config check and builds its
    splits from the layout its comments document."""
    import argparse

    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_vpgtrans.common.config import PluginConfig, check_config
    from lavis_vpgtrans.runners import launch

    path = os.path.join(OWN_CONFIGS, name)
    raw = OmegaConf.to_yaml(OmegaConf.load(path))
    assert not re.search(r":\s+['\"]?[/~]", raw), "absolute paths in a config"
    example_layout(name, tmp_path, toy)
    dataset = "own_vqa" if name.startswith("vqa") else "own_caption"
    cfg = PluginConfig(argparse.Namespace(cfg_path=path, options=[f"datasets.{dataset}.data_root={tmp_path}"]))
    check_config(cfg, readers=[launch])  # as train.py checks it
    built = registry.get_builder_class(dataset)(cfg.datasets_cfg[dataset]).build_datasets()
    assert set(built) == {"train", "val"} and len(built["train"]) > 0 and len(built["val"]) > 0
    assert built["val"][0]["image"].shape[-1] == 224


# --------------------------------------------------------------------------- train.py / evaluate.py


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def write_config(path, base, dataset, data_root, annotations, images, **run_cfg):
    import yaml

    config = {
        "base": os.path.join(OWN_CONFIGS, base),
        "model": {"model_type": "tiny_opt_small"},
        # keys null: each format's default keys (JSON, HF: image / caption; CSV: filepath / title)
        "datasets": {dataset: {"data_root": str(data_root), "keys": None, **small_images(),
                               "build_info": {"annotations": annotations, "images": {"storage": images}}}},
        "run": {"max_epoch": 1, "batch_size_train": 8, "batch_size_eval": 8, "num_workers": 0, "warmup_steps": 1,
                "init_lr": 1e-4, "num_beams": 1, "max_len": 6, "min_len": 1, "amp": False, "valid_splits": [],
                "test_splits": [], "device": "cpu", "distributed": False, "output_dir": str(path.parent / "out"),
                "job_id": "train", **run_cfg},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def train_and_evaluate(config, tmp_path, test_splits):
    """train.py one epoch, then evaluate.py on its checkpoint; the training output and the
    evaluation's {split: metrics}."""
    out = run([sys.executable, os.path.join(REPO, "train.py"), "--cfg-path", config], cwd=tmp_path)
    job = tmp_path / "out" / "train"
    run([sys.executable, os.path.join(REPO, "evaluate.py"), "--cfg-path", config,
         "--ckpt", str(job / "checkpoint_0.pth"),
         "--options", "run.job_id=eval", f"run.test_splits=[{','.join(test_splits)}]"], cwd=tmp_path)
    metrics = {}
    with open(tmp_path / "out" / "eval" / "evaluate.txt") as f:
        for line in f:
            metrics.update(json.loads(line))
    return out, metrics, tmp_path / "out" / "eval" / "result"


def result_file(result_dir, prefix):
    names = [n for n in os.listdir(result_dir) if n.startswith(prefix) and "_rank" not in n]
    assert len(names) == 1, os.listdir(result_dir)
    with open(os.path.join(result_dir, names[0])) as f:
        return json.load(f)


def test_captions_train_and_evaluate(plugin, own, tmp_path):
    """JSONL + CSV (pandas) + HF save_to_disk train one epoch (24 captions, 3 steps of 8);
    evaluate.py scores the JSON val split and the DatasetDict's test split against their
    references: the logged metrics are pycocoevalcap's on the records' references as written,
    image ids numbering the images in record order."""
    from lavis_vpgtrans.tasks.captioning import score_captions

    config = write_config(tmp_path / "caption.yaml", "caption_json.yaml", "own_caption", own.captions,
                          splits(train=["train.jsonl", "train.csv", "train_hf"], val="val.json", test="test_hf"),
                          own.images, caption_metrics=["Bleu", "CIDEr"], spice=False)
    out, metrics, results = train_and_evaluate(config, tmp_path, ["val", "test"])
    assert re.search(r"own_caption train: 24 samples from .*train\.jsonl, .*train\.csv, .*train_hf", out)
    assert re.search(r"Train: data epoch: \[0\]\s+\[2/3\]", out)
    for split, refs in (("val", own.val_refs), ("test", own.test_refs)):
        preds = {r["image_id"]: r["caption"] for r in result_file(results, f"{split}_")}
        assert sorted(preds) == [1, 2, 3, 4]
        expected = score_captions(dict(enumerate(refs, start=1)), preds, spice=False,
                                  metrics_to_run=["Bleu", "CIDEr"])
        for name in ("Bleu_1", "Bleu_4", "CIDEr"):
            assert metrics[split][name] == pytest.approx(expected[name], abs=1e-9), (split, name)


def test_vqa_trains_and_evaluates(plugin, own, tmp_path):
    """Parquet (to_parquet: image bytes, ten answers) + JSON (one answer) train one epoch through
    the vpgtrans_vqa task; evaluate.py's VQA accuracy on the JSONL val split (one answer or ten)
    equals the official formula computed here on the generated answers."""
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    config = write_config(tmp_path / "vqa.yaml", "vqa_json.yaml", "own_vqa", own.vqa,
                          splits(train=["train.parquet", "train.json"], val="val.jsonl"), own.images)
    out, metrics, results = train_and_evaluate(config, tmp_path, ["val"])
    assert re.search(r"own_vqa train: 16 samples", out)
    answers = {r["question_id"]: r["answer"] for r in result_file(results, "val_vqa_result")}
    assert sorted(answers) == list(range(1, N + 1))
    tool = VQAEval()

    def norm(text):
        return tool.processDigitArticle(tool.processPunctuation(text.replace("\n", " ").strip()))

    accuracies = []
    for qid, record in enumerate(own.val, start=1):
        pred = norm(answers[qid])
        if isinstance(record["answer"], str):
            accuracies.append(float(pred == norm(record["answer"])))
        else:
            gts = [norm(a) for a in record["answer"]]
            accuracies.append(sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3)
                                  for i in range(len(gts))) / len(gts))
    assert metrics["val"]["acc"] == pytest.approx(round(100 * sum(accuracies) / len(accuracies), 2), abs=1e-9)

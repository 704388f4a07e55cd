"""Your own data mixed with the existing datasets by ratio (issue 24, item 2): an `own_caption`
set (JSONL written with the json module over the toy world's images) and the COCO-format
`toy_caption` set, sampled 1:3 by run.train_dataset_ratios (not 1:1, which the loader's
uniform default would also give), iteration-based, trained by
train.py under torchrun with two gloo processes. tests/mixture_driver.py runs train.py unchanged
and counts, per rank, the batches drawn from each training set."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "projects", "own_data", "mix_with_coco.yaml")
ITERS = 20  # per rank


def write_config(path, data_root, images, output_dir):
    import yaml

    small = {"name": "blip_image_eval", "image_size": 32}
    config = {
        "model": {"arch": "blip2_opt_transfer", "model_type": "tiny_opt_small", "train_vpg": True},
        "datasets": {
            "toy_caption": {"type": "default"},
            "own_caption": {"data_root": str(data_root), "keys": {"image": "image", "caption": "caption"},
                            "vis_processor": {"train": small, "eval": small},
                            "build_info": {"annotations": {"train": {"storage": "train.jsonl"}},
                                           "images": {"storage": str(images)}}},
        },
        "run": {"runner": "runner_vpgtrans", "task": "vpgtrans_captioning",
                "train_dataset_ratios": {"own_caption": 0.25, "toy_caption": 0.75},
                "iters_per_inner_epoch": ITERS, "max_iters": ITERS, "warmup_epochs": 0,
                "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-4, "min_lr": 1e-5, "warmup_lr": 1e-6,
                "warmup_steps": 2, "weight_decay": 0.05, "batch_size_train": 4, "batch_size_eval": 4,
                "accum_grad_iters": 1, "num_workers": 0, "log_freq": 10, "num_beams": 1, "max_len": 6,
                "min_len": 1, "seed": 42, "output_dir": str(output_dir), "job_id": "job", "amp": False,
                "resume_ckpt_path": None, "evaluate": False, "train_splits": ["train"], "valid_splits": [],
                "test_splits": [], "device": "cpu", "world_size": 1, "dist_url": "env://",
                "distributed": True},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory, toy_zoo):
    root = tmp_path_factory.mktemp("own_mixture")
    data = os.path.join(toy_zoo, "data")
    with open(os.path.join(data, "annotations", "caption_train.json")) as f:
        captions = json.load(f)
    own = root / "own"
    own.mkdir()
    with open(own / "train.jsonl", "w") as f:
        for r in captions[:16]:
            f.write(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n")
    config = write_config(root / "mix.yaml", own, os.path.join(data, "images"), root / "out")
    report = root / "report"
    report.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXTURE_REPORT": str(report)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           os.path.join(REPO, "tests", "mixture_driver.py"), "--cfg-path", config],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = {}
    for name in sorted(os.listdir(report)):
        with open(report / name) as f:
            ranks[name] = json.load(f)
    return proc.stdout + proc.stderr, ranks, root / "out" / "job"


def test_own_data_mixes_with_coco_format_data_by_ratio_under_torchrun(mixture_run):
    out, ranks, job = mixture_run
    assert re.search(r"own_caption train: 16 samples from .*train\.jsonl", out)
    # both ranks trained every iteration, with finite losses
    assert sorted(ranks) == ["rank0.json", "rank1.json"]
    for record in ranks.values():
        assert len(record["losses"]) == ITERS
        assert all(math.isfinite(x) and x > 0 for x in record["losses"])
        assert len(record["draws"]) == 2 and sum(record["draws"]) == ITERS
    # each training set fed batches, about 1:3. Each rank draws a training set per iteration
    # (random.choices, seeded from run.seed, the epoch and the rank: the counts are fixed); of 2 x 20
    # draws own_caption expects 10 (sd 2.7), a uniform draw 20
    datasets = ranks["rank0.json"]["datasets"]
    assert ranks["rank1.json"]["datasets"] == datasets
    own = [i for i, name in enumerate(datasets) if name == "lavis_vpgtrans.datasets.generic.CaptionTrainSet"]
    assert len(own) == 1, datasets
    own_draws = sum(r["draws"][own[0]] for r in ranks.values())
    assert 4 <= own_draws <= 16, [r["draws"] for r in ranks.values()]
    with open(job / "log.txt") as f:
        stats = [json.loads(l) for l in f if l.startswith('{"train_')]
    assert len(stats) == 1 and math.isfinite(float(stats[0]["train_loss"]))


def test_example_config_mixes_by_ratio(plugin):
    """projects/own_data/mix_with_coco.yaml: no absolute paths; its ratios name exactly its
    training datasets; iteration-based."""
    from omegaconf import OmegaConf

    raw = open(EXAMPLE).read()
    assert not re.search(r":\s+['\"]?[/~]", raw), "absolute paths in a config"
    cfg = OmegaConf.load(EXAMPLE)
    ratios = dict(cfg.run.train_dataset_ratios)
    assert set(ratios) == set(cfg.datasets) == {"vpgtrans_coco_caption_train", "own_caption"}
    assert sum(ratios.values()) == pytest.approx(1.0)
    assert cfg.run.max_iters % cfg.run.iters_per_inner_epoch == 0


def test_a_ratio_mixture_drops_skipped_samples_like_a_single_training_set():
    """run.skip_bad_samples: a dataset returns None for a sample it skipped, and the training
    collate drops it. A ratio mixture collates each training set with its own collater, which
    must drop skipped samples as the single-set path does (it passed them on: default_collate
    fails on None)."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import Dataset
    from torch.utils.data.dataloader import default_collate

    from lavis_vpgtrans.runners.loaders import Loaders

    class Samples(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"x": torch.tensor(i)}

        def collater(self, samples):
            return default_collate(samples)

    class Runner(Loaders):
        infinite_train_loader = True  # iteration-based

        def __init__(self, ratios):
            self._dataloaders = None
            self.datasets = {"own_caption": {"train": Samples()}, "toy_caption": {"train": Samples()}}
            self.train_splits = ["train"]
            self.config = SimpleNamespace(run_cfg=OmegaConf.create(
                {"train_dataset_ratios": ratios, "num_workers": 0, "batch_size_train": 2, "batch_size_eval": 2}))

        def create_loaders(self, collate_fns, **unused):
            self.collate_fns = collate_fns
            return [None] * len(collate_fns)

    for ratios in ({"own_caption": 0.25, "toy_caption": 0.75}, None):
        runner = Runner(ratios)
        runner.dataloaders
        (train_collate,) = runner.collate_fns
        for collate in (train_collate if isinstance(train_collate, list) else [train_collate]):
            assert collate([{"x": torch.tensor(1)}, None])["x"].tolist() == [1], ratios


def test_two_own_sets_mix_by_ratio_in_an_epoch_based_run(tmp_path, toy_zoo):
    """Two datasets of one builder in a config (`builder: own_caption` under names of the user's
    own: a JSONL set and a CSV set written by pandas), mixed by run.train_dataset_ratios in an
    epoch-based run (max_epoch, no iters_per_inner_epoch): an epoch is as many batches as the
    two sets hold together, each drawn from one set by the ratios."""
    import pandas as pd
    import yaml

    data = os.path.join(toy_zoo, "data")
    with open(os.path.join(data, "annotations", "caption_train.json")) as f:
        captions = json.load(f)
    own = tmp_path / "own"
    own.mkdir()
    with open(own / "products.jsonl", "w") as f:
        for r in captions[:16]:
            f.write(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n")
    pd.DataFrame({"filepath": [r["image"] for r in captions[16:24]],
                  "title": [r["caption"] for r in captions[16:24]]}).to_csv(own / "faces.csv", index=False)
    small = {"name": "blip_image_eval", "image_size": 32}

    def own_set(storage, keys):
        return {"builder": "own_caption", "data_root": str(own), "keys": keys,
                "vis_processor": {"train": small, "eval": small},
                "build_info": {"annotations": {"train": {"storage": storage}},
                               "images": {"storage": os.path.join(data, "images")}}}

    path = write_config(tmp_path / "mix.yaml", own, os.path.join(data, "images"), tmp_path / "out")
    with open(path) as f:
        config = yaml.safe_load(f)
    config["datasets"] = {"products": own_set("products.jsonl", {"image": "image", "caption": "caption"}),
                          "faces": own_set("faces.csv", {"image": "filepath", "caption": "title"})}
    run_cfg = config["run"]
    del run_cfg["iters_per_inner_epoch"], run_cfg["max_iters"]
    run_cfg.update(max_epoch=1, batch_size_train=2, train_dataset_ratios={"products": 0.25, "faces": 0.75})
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    report = tmp_path / "report"
    report.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXTURE_REPORT": str(report)}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "mixture_driver.py"), "--cfg-path", path],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"products train: 16 samples from .*products\.jsonl", out), out[-3000:]
    assert re.search(r"faces train: 8 samples from .*faces\.csv", out), out[-3000:]
    with open(report / "rank0.json") as f:
        record = json.load(f)
    # one epoch = (16 + 8) / 2 batches, drawn about 1:3: products expects 3 of 12 (sd 1.5; the draws
    # are seeded, so the count is fixed), a concatenation would give 8. The loaders follow the
    # config's dataset order, which yaml.safe_dump sorted: faces, products.
    assert len(record["losses"]) == 12 and all(math.isfinite(x) for x in record["losses"])
    faces, products = record["draws"]
    assert faces + products == 12 and 0 < products <= 6, record["draws"]


def test_a_dataset_name_that_is_a_registered_builder_cannot_alias_another(plugin, tmp_path):
    """`coco_caption: {builder: own_caption}` would shadow LAVIS's builder: refused, naming it."""
    from omegaconf import OmegaConf

    from lavis_vpgtrans.common.config import ConfigKeyError, register_dataset_aliases

    with pytest.raises(ConfigKeyError, match=r"datasets\.coco_caption: 'coco_caption' is already a registered "
                                             r"builder .*a name of your own"):
        register_dataset_aliases(OmegaConf.create({"coco_caption": {"builder": "own_caption"}}))
    with pytest.raises(ConfigKeyError, match=r"datasets\.mine\.builder='own_captoin' is not registered; did you "
                                             r"mean 'own_caption'"):
        register_dataset_aliases(OmegaConf.create({"mine": {"builder": "own_captoin"}}))

"""The recipe scripts in miniature (VPGTRANS_MINIATURE=1): what explore.sh and _transfer.sh add
so that their commands, configs and paths run as written, on the toy zoo, on CPU, in seconds.

    python run_scripts/vpgtrans/miniature.py data DIR
        a data root in the real layout (the files every recipe dataset reads below run.data_root),
        made of the toy world: COCO Karpathy train / val, SBU, VG, LAION-COCO shards and the five
        benchmarks; prints the toy zoo's directory (its LLMs stand in for the hub ids)
    python run_scripts/vpgtrans/miniature.py source ARCH MODEL_TYPE OUT
        a source BLIP-2 checkpoint (untrained toy model: VPG + projector) for a transfer script
    python run_scripts/vpgtrans/miniature.py zoo
        prints the toy zoo's directory (built on first use)
    python run_scripts/vpgtrans/miniature.py own-data DIR
        "your own data" for run_scripts/own_data/ (README, "Your own data"), in the layouts the
        own_data configs document: DIR/captions (train.jsonl, val.json with reference lists),
        DIR/vqa (train.jsonl, val.json with VQAv2-style answer lists), DIR/instruct
        (llava_instruct.json in LLaVA's format), each with images/ -> the toy world's images
    python run_scripts/vpgtrans/miniature.py options CFG [OPTION ...]
        prints, a line each, the train.py options that make the run of CFG with the script's own
        OPTIONs tiny: toy model type, toy image size for every dataset (extra validation
        included), CPU, 1-2 epochs or a few iterations, greedy short generation

Only model types, sizes and devices change: data paths, output dirs, job ids and the checkpoint
paths one run reads from another stay the recipe's, so a wrong one fails here first.
"""

import json
import os
import shutil
import sys

from omegaconf import OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # the package of this checkout (a script's own directory is what Python adds)
IMAGE_SIZE = 32  # the toy zoo's ViT (lavis_vpgtrans/toy/zoo.py, TOY_VIT)
EPOCHS = 2  # at most: a stage-1 epoch and a stage-2 epoch
ITERS_PER_EPOCH = 2  # iteration-based runs: inner epochs of 2 iterations
CAPTIONS = 16  # training captions per training set
# the released model types of the recipes -> the toy zoo's stand-in of the same family and role
TOY_MODEL_TYPES = {
    "vitL_opt125m": "tiny_opt_small", "vitL_opt350m": "tiny_opt_small", "opt2.7b": "tiny_opt_small",
    "pretrain_opt2.7b": "tiny_opt_small", "vitL_opt1.3b": "tiny_opt_large", "vitL_opt2.7b": "tiny_opt_large",
    "opt6.7b": "tiny_opt_large", "pretrain_opt6.7b": "tiny_opt_large",
    "flant5xl": "tiny_t5", "flant5xxl": "tiny_t5", "pretrain_flant5xl": "tiny_t5", "pretrain_flant5xxl": "tiny_t5",
    "llama7b": "tiny_llama", "vl_llama7b": "tiny_llama", "vicuna7b": "tiny_vicuna", "vl_vicuna7b": "tiny_vl_vicuna",
}
DATASET_CONFIGS = os.path.join(REPO, "lavis_vpgtrans", "datasets", "configs")


def fail(message: str) -> None:
    sys.exit(f"miniature.py: {message}")


# ---------------------------------------------------------------------------- data

def write_data(out: str) -> str:
    """The recipe datasets' files below `out`, from the toy zoo (built on first use); returns
    the zoo's directory."""
    if os.path.isfile(os.path.join(out, "READY")):  # built: no need to import the package
        with open(os.path.join(out, "READY")) as f:
            return f.read().strip()
    from lavis_vpgtrans.toy import zoo

    root = zoo.ensure_zoo()
    tmp = f"{out}.tmp{os.getpid()}"  # scripts may build it at the same time: the first rename wins
    shutil.copytree(os.path.join(root, "benchmarks"), tmp)  # coco val/test, coco_gt, nocaps, vqav2, okvqa, gqa
    with open(os.path.join(root, "data", "annotations", "caption_train.json")) as f:
        captions = json.load(f)
    images = os.path.join(root, "data", "images")
    # three disjoint slices of the toy training captions, one per training set, in each set's layout
    layouts = [("coco", "coco/annotations/coco_karpathy_train.json", "coco/images/toy_train"),
               ("sbu", "sbu_captions/annotations/sbu.json", "sbu_captions/images"),
               ("vg", "vg/annotations/vg_caption.json", "vg/images")]
    for i, (name, ann_file, image_dir) in enumerate(layouts):
        part = captions[i * CAPTIONS:(i + 1) * CAPTIONS]
        prefix = "toy_train/" if name == "coco" else ""  # COCO's train images sit beside val2014/
        anns = [{"image": prefix + a["image"], "caption": a["caption"], "image_id": f"{name}_{a['image_id']}"}
                for a in part]
        os.makedirs(os.path.dirname(os.path.join(tmp, ann_file)), exist_ok=True)
        with open(os.path.join(tmp, ann_file), "w") as f:
            json.dump(anns, f)
        os.makedirs(os.path.dirname(os.path.join(tmp, image_dir)), exist_ok=True)
        os.symlink(images, os.path.join(tmp, image_dir))
    os.symlink(os.path.join(root, "laion_coco"), os.path.join(tmp, "laion_coco"))
    publish(tmp, out, root)  # READY names the zoo it was made from
    return root


def publish(tmp: str, out: str, ready: str) -> None:
    """Marks the directory built in `tmp` READY (holding `ready`) and renames it to `out`: scripts
    may build it at the same time, and the first rename wins."""
    with open(os.path.join(tmp, "READY"), "w") as f:
        f.write(ready)
    try:
        os.rename(tmp, out)
    except OSError:  # another script's build is there
        if not os.path.isfile(os.path.join(out, "READY")):
            raise
        shutil.rmtree(tmp)


def write_own_data(out: str) -> None:
    """Toy records in the own_data configs' layouts, written as a user would: json.dump / one
    json.dumps per line."""
    if os.path.isfile(os.path.join(out, "READY")):
        return
    from lavis_vpgtrans.toy import zoo

    data = os.path.join(zoo.ensure_zoo(), "data")
    with open(os.path.join(data, "annotations", "caption_train.json")) as f:
        captions = json.load(f)
    with open(os.path.join(data, "annotations", "vqa_train.json")) as f:
        questions = json.load(f)
    tmp = f"{out}.tmp{os.getpid()}"
    train_caps = captions[:CAPTIONS]
    references = {}  # the images after the training ones, each with all its captions
    for r in captions:
        if all(r["image"] != t["image"] for t in train_caps):
            references.setdefault(r["image"], []).append(r["caption"])
    val_caps = [{"image": image, "caption": refs} for image, refs in list(references.items())[:8]]
    files = {
        "captions/train.jsonl": [{"image": r["image"], "caption": r["caption"]} for r in train_caps],
        "captions/val.json": val_caps,
        "vqa/train.jsonl": [{"image": q["image"], "question": q["question"], "answer": q["answer"]}
                            for q in questions[:CAPTIONS]],
        "vqa/val.json": [{"image": q["image"], "question": q["question"], "answer": q["answer"]}
                         for q in questions[CAPTIONS:CAPTIONS + 8]],
        "instruct/llava_instruct.json": [
            {"id": str(i), "image": r["image"],
             "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                               {"from": "gpt", "value": r["caption"]},
                               {"from": "human", "value": "How many shapes are there?"},
                               {"from": "gpt", "value": str(len(r["caption"].split(" and ")))}]}
            for i, r in enumerate(train_caps)],
    }
    for name, records in files.items():
        path = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            if name.endswith(".jsonl"):
                f.writelines(json.dumps(r) + "\n" for r in records)
            else:
                json.dump(records, f)
    for part in ("captions", "vqa", "instruct"):
        os.symlink(os.path.join(data, "images"), os.path.join(tmp, part, "images"))
    publish(tmp, out, data)


def write_source(arch: str, model_type: str, out: str) -> None:
    """An untrained toy source model's trainable parameters (VPG + projector), saved as a run's
    checkpoint is: {"model": ...}."""
    if os.path.exists(out):
        return
    import torch

    import lavis_vpgtrans  # noqa: F401  registers the models
    from lavis.models import load_model

    model = load_model(arch, model_type)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save({"model": model.trainable_state_dict()}, out)


# ---------------------------------------------------------------------------- options

def load_config(path: str):
    """The config with its `base:` chain (as lavis_vpgtrans.common.config.load_config, without
    importing LAVIS: this runs before every train.py of a script)."""
    cfg = OmegaConf.load(path)
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    return OmegaConf.merge(load_config(os.path.join(os.path.dirname(os.path.abspath(path)), base)), cfg)


def default_processor_splits(dataset: str) -> list:
    """The splits (train / eval) the dataset's default config builds an image processor for."""
    for folder in sorted(os.listdir(DATASET_CONFIGS)):
        for name in sorted(os.listdir(os.path.join(DATASET_CONFIGS, folder))):
            cfg = OmegaConf.load(os.path.join(DATASET_CONFIGS, folder, name))
            if dataset in cfg.get("datasets", {}):
                return list(cfg.datasets[dataset].vis_processor)
    fail(f"no default config for dataset {dataset!r} under {DATASET_CONFIGS}")


def tiny_datasets(datasets) -> dict:
    """{dataset: {vis_processor: {split: {image_size: toy}}}} for every dataset of a config."""
    out = {}
    for name in datasets:
        splits = list((datasets[name] or {}).get("vis_processor", {}) or {}) or default_processor_splits(name)
        out[name] = {"vis_processor": {split: {"image_size": IMAGE_SIZE} for split in splits}}
    return out


def tiny_generation(run) -> dict:
    out = {key: value for key, value in (("num_beams", 1), ("max_len", 8), ("min_len", 1)) if key in run}
    if run.get("apply_lemmatizer"):  # OK-VQA's spaCy model is a download; the toy answers need no lemmas
        out["apply_lemmatizer"] = False
    if run.get("task") == "vpgtrans_captioning":
        out["caption_metrics"] = ["Bleu", "CIDEr"]  # METEOR's Java scorer costs seconds per validation
    return out


def options(cfg_path: str, script_options) -> list:
    cfg = OmegaConf.merge(load_config(cfg_path), OmegaConf.from_dotlist(list(script_options)))
    run, model = cfg.run, cfg.model
    model_type = model.get("model_type")
    toy_type = model_type if str(model_type).startswith("tiny_") else TOY_MODEL_TYPES.get(model_type)
    if toy_type is None:
        fail(f"{cfg_path}: model.model_type={model_type!r} has no toy stand-in in TOY_MODEL_TYPES")
    opts = {"model.model_type": toy_type, "run.device": "cpu", "run.amp": False, "run.num_workers": 0,
            "run.batch_size_train": 4, "run.batch_size_eval": 8, "run.log_freq": 1}
    # released checkpoints cannot be fetched offline: the toy model starts from its own init
    for key in ("vpg_checkpoint", "projector_checkpoint", "finetuned"):
        if "://" in str(model.get(key)):
            opts[f"model.{key}"] = None
    if run.get("iters_per_inner_epoch"):
        epochs = min(int(run.max_iters) // int(run.iters_per_inner_epoch), EPOCHS)
        opts.update({"run.iters_per_inner_epoch": ITERS_PER_EPOCH, "run.max_iters": ITERS_PER_EPOCH * epochs})
    else:
        opts["run.max_epoch"] = min(int(run.max_epoch), EPOCHS)
    if "warmup_steps" in run:
        opts["run.warmup_steps"] = 1
    opts.update({f"run.{k}": v for k, v in tiny_generation(run).items()})
    if "laion_coco" in cfg.datasets:  # two toy shards instead of LAION-COCO's 10,000
        opts["datasets.laion_coco.build_info.storage"] = "laion_coco/{00000..00001}.tar"
    for name, node in tiny_datasets(cfg.datasets).items():
        for split, processor in node["vis_processor"].items():
            opts[f"datasets.{name}.vis_processor.{split}.image_size"] = processor["image_size"]
    extra = []
    for entry in run.get("extra_validation", None) or []:
        entry = OmegaConf.to_container(entry)
        bench = load_config(os.path.join(REPO, entry["cfg_path"]) if not os.path.isabs(entry["cfg_path"])
                            else entry["cfg_path"])
        extra.append({**entry, "datasets": tiny_datasets(bench.datasets), "run": tiny_generation(bench.run)})
    if extra:
        opts["run.extra_validation"] = extra
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in opts.items()]


def main(argv) -> None:
    if len(argv) >= 2 and argv[0] == "data":
        print(write_data(argv[1]))
    elif argv == ["zoo"]:
        from lavis_vpgtrans.toy import zoo

        print(zoo.ensure_zoo())
    elif len(argv) == 2 and argv[0] == "own-data":
        write_own_data(argv[1])
    elif len(argv) == 4 and argv[0] == "source":
        write_source(*argv[1:])
    elif len(argv) >= 2 and argv[0] == "options":
        print("\n".join(options(argv[1], argv[2:])))
    else:
        fail(f"usage: data DIR | zoo | own-data DIR | source ARCH MODEL_TYPE OUT | options CFG [OPTION ...] (got {argv})")


if __name__ == "__main__":
    main(sys.argv[1:])

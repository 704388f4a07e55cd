"""Training loaders of your own data (datasets/generic.py, datasets/shard_stream.py) against
LAVIS's own COCO caption loader (the dataset class of LAVIS's `coco_caption` builder), and the
peak memory of streaming formats (issue 24).

    python benchmarks/own_data_loaders.py [--images 256] [--size 224] [--records 100000]

1. Throughput. `--images` generated JPEGs of `--size` px (noise over colour bands, quality 90)
   with a caption each, written in every format by the tool users write it with: JSON / JSONL
   (json module), CSV (pandas to_csv, open_clip's filepath / title), HF save_to_disk and
   to_parquet (datasets, Image column holding the JPEG bytes), an imagefolder (the files and a
   metadata.jsonl by datasets' to_json), webdataset shards (webdataset's TarWriter, img2dataset's
   jpg / txt / json layout), and LAVIS's COCO-format annotation JSON. Each is built by its builder
   (own_caption; LAVIS's dataset class directly) with the same processors (blip_image_train at
   --size, blip_caption) and read by a DataLoader in this process (num_workers 0, one torch
   thread: one core), batch 16, after one warm-up batch. Printed per format: images per second of
   process CPU time (per core; what the loader costs, whatever else runs on the machine) and per
   wall second, relative to LAVIS's COCO loader.
2. Peak memory. A `--records`-record JSONL (records naming 64 tiny 16 px images) and a
   `--records`-sample webdataset stream (tiny images inside, 10 shards), each built and iterated
   once through, in a fresh process: the peak resident set size (the kernel's high-water mark of
   the process's resident pages, VmHWM in /proc/self/status, what getrusage's ru_maxrss reports,
   reset after the imports through /proc/self/clear_refs; it counts Python objects, arrow / numpy
   / PIL buffers and the libraries alike) minus the RSS after the imports (VmRSS).
   tracemalloc would count only Python's own allocations (not PIL's or torch's buffers) and slow
   the loop several-fold, so RSS is what is measured.
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

WORDS = "red green blue yellow purple square circle triangle top bottom left right a an the with and".split()


def caption(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))


def jpeg(rng, size, quality=90) -> bytes:
    import numpy as np
    from PIL import Image

    bands = np.repeat(np.array([[rng.randrange(256) for _ in range(3)] for _ in range(8)], dtype=np.uint8),
                      (size + 7) // 8, axis=0)[:size]
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 40, (size, size, 3), dtype=np.uint8)
    array = (bands[:, None, :] + noise).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_formats(root, n, size, seed=0):
    """Every format of the same n images and captions; returns {format: build_info storage}."""
    import datasets
    import pandas as pd
    import webdataset as wds

    rng = random.Random(seed)
    images = os.path.join(root, "images")
    os.makedirs(images)
    names, captions = [], []
    for i in range(n):
        name = f"{i:06d}.jpg"
        with open(os.path.join(images, name), "wb") as f:
            f.write(jpeg(rng, size))
        names.append(name)
        captions.append(caption(rng))
    records = [{"image": n_, "caption": c} for n_, c in zip(names, captions)]
    with open(os.path.join(root, "a.json"), "w") as f:
        json.dump(records, f)
    with open(os.path.join(root, "a.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    pd.DataFrame({"filepath": [os.path.join(images, n_) for n_ in names], "title": captions}).to_csv(
        os.path.join(root, "a.csv"), index=False)
    blobs = []
    for n_ in names:
        with open(os.path.join(images, n_), "rb") as f:
            blobs.append({"bytes": f.read(), "path": None})
    hf = datasets.Dataset.from_dict({"image": blobs, "caption": captions},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    hf.save_to_disk(os.path.join(root, "a_hf"))
    hf.to_parquet(os.path.join(root, "a.parquet"))
    folder = os.path.join(root, "folder")
    shutil.copytree(images, folder)
    datasets.Dataset.from_dict({"file_name": names, "text": captions}).to_json(os.path.join(folder, "metadata.jsonl"))
    os.makedirs(os.path.join(root, "shards"))
    per = (n + 1) // 2
    for s in range(2):
        with wds.TarWriter(os.path.join(root, "shards", f"{s:05d}.tar")) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                sink.write({"__key__": f"{i:09d}", "jpg": blobs[i]["bytes"], "txt": captions[i].encode(),
                            "json": json.dumps({"caption": captions[i], "key": f"{i:09d}"}).encode()})
    with open(os.path.join(root, "coco.json"), "w") as f:
        json.dump([{**r, "image_id": i} for i, r in enumerate(records)], f)
    return {"json": "a.json", "jsonl": "a.jsonl", "csv": "a.csv", "hf (save_to_disk)": "a_hf",
            "parquet": "a.parquet", "imagefolder": "folder", "webdataset": "shards/{00000..00001}.tar"}


def processors(size):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    vis = registry.get_processor_class("blip_image_train").from_config(OmegaConf.create({"image_size": size}))
    text = registry.get_processor_class("blip_caption").from_config(OmegaConf.create({}))
    return vis, text


def own_dataset(root, storage, size, images=None, processor="blip_image_train", **config):
    from types import SimpleNamespace

    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    # the run a stream is built for: iteration-based (as train.py registers the configuration)
    registry.mapping["state"]["configuration"] = SimpleNamespace(run_cfg=OmegaConf.create({"iters_per_inner_epoch": 1}))
    cls = registry.get_builder_class("own_caption")
    proc = {"name": processor, "image_size": size}
    build_info = {"annotations": {"train": {"storage": storage}}}
    if images:
        build_info["images"] = {"storage": images}
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path()).datasets.own_caption,
                          {"data_root": root, "vis_processor": {"train": proc, "eval": proc},
                           "build_info": build_info, **config})
    return cls(cfg).build_datasets()["train"]


def iterate(dataset, n, batch=16):
    """Images per CPU second and per wall second of reading n samples (after one warm-up batch)."""
    from torch.utils.data import DataLoader, IterableDataset

    collate = None if isinstance(dataset, IterableDataset) else dataset.collater
    loader = iter(DataLoader(dataset, batch_size=batch, num_workers=0, collate_fn=collate,
                             shuffle=not isinstance(dataset, IterableDataset)))
    next(loader)
    seen, cpu, wall = 0, time.process_time(), time.perf_counter()
    while seen < n:
        seen += len(next(loader)["image"])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return seen / cpu, seen / wall


def throughput(args):
    import lavis.datasets.builders  # noqa: F401  registers coco_caption
    import torch
    from lavis.common.registry import registry

    import lavis_vpgtrans  # noqa: F401  registers own_caption

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="own_loaders_")
    try:
        formats = write_formats(root, args.images, args.size)
        vis, text = processors(args.size)
        coco_cls = registry.get_builder_class("coco_caption").train_dataset_cls
        rows = [("LAVIS coco_caption (" + coco_cls.__name__ + ")",
                 coco_cls(vis, text, os.path.join(root, "images"), [os.path.join(root, "coco.json")]))]
        for name, storage in formats.items():
            rows.append((name, own_dataset(root, storage, args.size, images=os.path.join(root, "images"),
                                           shuffle_buffer=64)))
        n = args.images - 16  # after the warm-up batch, one pass of the map-style sets
        results = []
        for name, dataset in rows:
            results.append((name, *iterate(dataset, n)))
        base = results[0][1]
        print(f"\nimages per second, {args.images} JPEGs of {args.size} px, blip_image_train({args.size}) + "
              f"blip_caption, batch 16, num_workers 0, 1 torch thread")
        print(f"{'loader':<42}{'per CPU s':>12}{'per wall s':>12}{'vs LAVIS':>10}")
        for name, per_cpu, per_wall in results:
            print(f"{name:<42}{per_cpu:>12.1f}{per_wall:>12.1f}{per_cpu / base:>10.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- peak memory

def status_kib(field="VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Resets the kernel's high-water mark (VmHWM) to the current RSS (Linux >= 4.0): the
    imports' transient peak is not the loader's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(kind, root, records):
    """In a fresh process: build and iterate `records` samples; prints JSON."""
    import torch
    from torch.utils.data import DataLoader

    import lavis_vpgtrans  # noqa: F401

    torch.set_num_threads(1)
    import braceexpand  # noqa: F401  what building imports lazily, before the baseline
    import datasets  # noqa: F401
    import webdataset  # noqa: F401
    from lavis.common.vqa_tools.vqa_eval import VQAEval  # noqa: F401

    base = status_kib()
    reset_peak()
    start = time.perf_counter()
    if kind == "jsonl":
        dataset = own_dataset(root, "big.jsonl", 16, images=os.path.join(root, "tiny"), processor="blip_image_eval")
        samples = iter(DataLoader(dataset, batch_size=256, num_workers=0, collate_fn=dataset.collater))
    else:
        dataset = own_dataset(root, "big/{00000..00009}.tar", 16, processor="blip_image_eval", shuffle_buffer=1000)
        samples = iter(DataLoader(dataset, batch_size=256, num_workers=0))
    seen = len(next(samples)["image"])
    first = status_kib()
    while seen < records:
        seen += len(next(samples)["image"])
    peak = status_kib("VmHWM")
    print(json.dumps({"kind": kind, "samples": seen, "baseline_mib": base / 1024, "first_batch_mib": first / 1024,
                      "peak_mib": peak / 1024, "added_mib": (peak - base) / 1024,
                      "seconds": time.perf_counter() - start}))


def write_big(root, records, seed=1):
    import webdataset as wds

    rng = random.Random(seed)
    tiny = os.path.join(root, "tiny")
    os.makedirs(tiny)
    blobs = [jpeg(rng, 16) for _ in range(64)]
    for i, blob in enumerate(blobs):
        with open(os.path.join(tiny, f"{i:02d}.jpg"), "wb") as f:
            f.write(blob)
    with open(os.path.join(root, "big.jsonl"), "w") as f:
        for i in range(records):
            f.write(json.dumps({"image": f"{i % 64:02d}.jpg", "caption": caption(rng)}) + "\n")
    os.makedirs(os.path.join(root, "big"))
    per = (records + 9) // 10
    for s in range(10):
        with wds.TarWriter(os.path.join(root, "big", f"{s:05d}.tar")) as sink:
            for i in range(s * per, min(records, (s + 1) * per)):
                sink.write({"__key__": f"{i:09d}", "jpg": blobs[i % 64], "txt": caption(rng).encode()})


def memory(args):
    root = tempfile.mkdtemp(prefix="own_memory_")
    try:
        write_big(root, args.records)
        big = os.path.join(root, "big")
        sizes = {"jsonl": os.path.getsize(os.path.join(root, "big.jsonl")),
                 "webdataset": sum(os.path.getsize(os.path.join(big, n)) for n in os.listdir(big))}
        print(f"\npeak memory of building and iterating {args.records} samples (batch 256, tiny 16 px images), "
              f"each in a fresh process: peak RSS (VmHWM) minus RSS after the imports")
        print(f"{'format':<14}{'files MiB':>11}{'after imports':>15}{'after batch 1':>15}{'peak MiB':>10}"
              f"{'added MiB':>11}{'seconds':>9}")
        for kind in ("jsonl", "webdataset"):
            proc = subprocess.run([sys.executable, __file__, "--memory-child", kind, root, str(args.records)],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{kind:<14}{sizes[kind] / 2**20:>11.1f}{r['baseline_mib']:>15.0f}{r['first_batch_mib']:>15.0f}"
                  f"{r['peak_mib']:>10.0f}{r['added_mib']:>11.1f}{r['seconds']:>9.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--skip", choices=["throughput", "memory"], default=None)
    parser.add_argument("--memory-child", nargs=3, metavar=("KIND", "ROOT", "RECORDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        kind, root, records = args.memory_child
        memory_child(kind, root, int(records))
        return
    print("load average before:", " ".join(f"{x:.2f}" for x in os.getloadavg()), f"({os.cpu_count()} cores)")
    if args.skip != "throughput":
        throughput(args)
    if args.skip != "memory":
        memory(args)
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()

"""Your own data as webdataset shards, as img2dataset writes them: a training stream.

A shard is a tar of samples grouped by key (`0000001.jpg`, `0000001.txt`, `0000001.json`: the
image, its caption, img2dataset's metadata with the caption and the url). The shards of a split
are given as brace patterns (`shards/{00000..00003}.tar`) or globs, or a list of them.

The stream is endless and never holds more than a shuffle buffer of samples: each pass over the
shards orders them by (seed, pass) and deals them to the (rank, DataLoader worker) slots in turn,
so ranks and workers read different shards (a shard is read by several slots only where there are
fewer shards than slots; a warning says so); samples are shuffled in a buffer of
`shuffle_buffer`. A stream has no length: train it iteration-based (run.iters_per_inner_epoch,
run.max_iters), alone or mixed by run.train_dataset_ratios. It is a webdataset DataPipeline, so
LAVIS's and this plugin's loaders iterate it as they do LAION's shards.

Fields: `keys.<field>` names a member of the sample by its extension (`txt`; alternatives joined
by ";": the image's default `jpg;png;jpeg;webp`), or a key of its JSON metadata as `json.<key>`
(`json.caption`, LAION-COCO's `json.top_caption`). The tar reading is webdataset's.

Bad input stops with an error naming the shard file and the sample key: an image that cannot be
read or a sample without one (with run.skip_bad_samples: skipped, warned and counted per epoch
like any unreadable training image), a missing member or JSON key (listing what the sample has),
a list where a string is configured, a shard that is not a tar, a pattern matching no file,
shards without samples.
"""

import io
import json
import logging
import multiprocessing
import os
import random
from glob import glob
from typing import Callable, Dict, List

import webdataset as wds
from PIL import Image
from webdataset.filters import _shuffle
from webdataset.tariterators import tarfile_samples
from webdataset.utils import pytorch_worker_info

from lavis_vpgtrans.datasets.checked import IMAGE_ERRORS, DataError

IMAGE_EXTENSIONS = "jpg;png;jpeg;webp"
# per kind: where each field is read from by default (img2dataset: .txt holds the caption)
SHARD_KEYS = {
    "caption": {"image": IMAGE_EXTENSIONS, "caption": "txt"},
    "vqa": {"image": IMAGE_EXTENSIONS, "question": "json.question", "answer": "json.answer"},
}


def expand_shards(patterns: List[str]) -> List[str]:
    """The shard files of brace patterns / globs / paths, in order; a pattern that matches no
    file is an error naming it."""
    import braceexpand

    shards = []
    for pattern in patterns:
        found, missing = [], []
        for path in braceexpand.braceexpand(pattern):
            if any(c in path for c in "*?["):
                found.extend(sorted(glob(path)))
            elif os.path.isfile(path):
                found.append(path)
            elif os.path.exists(path):
                raise DataError(f"{path} (from {pattern}): not a shard file (a .tar of samples)")
            else:
                missing.append(path)
        if not found:
            raise DataError(f"no shards: {pattern} matches no file (a brace pattern such as "
                            f"shards/{{00000..00009}}.tar or a glob, relative to data_root)")
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {pattern} not found, e.g. {missing[0]}")
        shards.extend(found)
    return shards


class ShardStream(wds.DataPipeline):
    """An endless, shuffled stream of training samples from webdataset shards (module doc).

    `make_sample(fields, image)` turns a sample's checked fields and its PIL image into the
    training sample (processors applied)."""

    def __init__(self, shards: List[str], fields: Dict[str, str], types: Dict[str, str],
                 make_sample: Callable, check_text: Callable, shuffle_buffer: int = 1000, seed: int = 0,
                 skip_bad_samples: bool = False, name: str = "own_caption"):
        super().__init__()
        self.shards, self.fields, self.types = list(shards), dict(fields), dict(types)
        self.make_sample, self.check_text = make_sample, check_text
        self.shuffle_buffer, self.seed, self.name = int(shuffle_buffer), int(seed), name
        self.skip_bad_samples = skip_bad_samples
        self.ann_paths = self.shards  # what logs and errors name
        self.skipped = multiprocessing.Value("i", 0)  # shared with DataLoader worker processes

    # ---- the pipeline

    def reader(self):
        """(slot, slots): this reader among ranks x DataLoader workers."""
        rank, world, worker, workers = pytorch_worker_info()
        return rank * workers + worker, world * workers

    def shards_of_pass(self, epoch: int) -> List[str]:
        """This reader's shards in pass `epoch`: the shards ordered by (seed, epoch), dealt in
        turn to the readers (each shard to one reader, unless there are fewer shards than readers)."""
        slot, slots = self.reader()
        order = list(self.shards)
        random.Random(f"{self.seed} pass {epoch}").shuffle(order)
        return [order[i % len(order)] for i in range(slot, max(len(order), slots), slots)]

    def one_pass(self, epoch: int, rng=None):
        """The samples of this reader's shards in pass `epoch`, shuffled in the buffer (as read:
        a buffered sample holds its compressed bytes, not its decoded image)."""
        mine = self.shards_of_pass(epoch)
        counts = {"read": 0, "used": 0}
        raws = _shuffle(self._raw_samples(mine, counts), bufsize=self.shuffle_buffer, initial=self.shuffle_buffer,
                        rng=rng or random.Random(f"{self.seed} {epoch}"))
        for shard, raw in raws:
            sample = self._sample(shard, raw)
            if sample is not None:
                counts["used"] += 1
                yield sample
        if counts["read"] == 0:
            raise DataError(f"{self.name}: no samples in {', '.join(mine)}")
        if counts["used"] == 0:
            raise DataError(f"{self.name}: every sample of {', '.join(mine)} was skipped as unreadable")

    def iterator(self):
        slot, slots = self.reader()
        if len(self.shards) < slots and slot == 0:
            logging.warning("%s: %d shard(s) for %d readers (ranks x DataLoader workers): some shards are read by "
                            "several of them each pass", self.name, len(self.shards), slots)
        rng = random.Random(f"{self.seed} {slot}")  # the shuffle buffer's, one per reader
        epoch = 0
        while True:
            yield from self.one_pass(epoch, rng)
            epoch += 1

    def _raw_samples(self, shards, counts):
        """(shard, webdataset's sample: {"__key__", extension: bytes, ...}) of each shard in turn."""
        for shard in shards:
            raws = tarfile_samples([{"url": shard}])
            while True:
                try:
                    raw = next(raws)
                except StopIteration:
                    break
                except Exception as e:  # truncated, not a tar, ...: webdataset raises various
                    raise DataError(f"{shard}: cannot be read as a webdataset shard ({type(e).__name__}: "
                                    f"{e.args[0] if e.args else e})") from e
                counts["read"] += 1
                yield shard, raw

    # ---- one sample

    def _sample(self, shard, raw):
        key = raw.get("__key__", "?")
        where = f"{shard}: sample {key!r}"
        members = sorted(k for k in raw if not k.startswith("__"))
        meta = None
        fields = {}
        for name, spec in self.fields.items():
            if name == "image":
                continue
            if spec.startswith("json."):
                if meta is None:
                    meta = self._json(raw, where, members, name)
                field_key = spec[len("json."):]
                if field_key not in meta:
                    raise DataError(f"{where}: its json has no key {field_key!r} (the {name}: set keys.{name}); the "
                                    f"json has the keys {sorted(meta)}")
                value = meta[field_key]
            else:
                ext = next((e for e in spec.split(";") if e in raw), None)
                if ext is None:
                    raise DataError(f"{where}: no {spec!r} member (the {name}: set keys.{name}, e.g. json.<key>); the "
                                    f"sample has {members}")
                value = raw[ext].decode("utf-8") if isinstance(raw[ext], bytes) else raw[ext]
                if ext == "json":
                    value = json.loads(value)
            fields[name] = self.check_text(value, name, spec, where)
        image = self._image(raw, where, members)
        if image is None:
            return None
        try:
            return self.make_sample(fields, image)
        except IMAGE_ERRORS as e:
            return self._bad_image(where, e)

    def _json(self, raw, where, members, name):
        if "json" not in raw:
            raise DataError(f"{where}: no json member (the {name} is configured as {self.fields[name]!r}); the "
                            f"sample has {members}")
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: its json is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DataError(f"{where}: its json is not an object: {str(meta)[:120]}")
        return meta

    def _image(self, raw, where, members):
        spec = self.fields["image"]
        ext = next((e for e in spec.split(";") if e in raw), None)
        if ext is None:
            return self._bad_image(where, None, f"no image (a {spec!r} member); the sample has {members}")
        try:
            return Image.open(io.BytesIO(raw[ext])).convert("RGB")
        except IMAGE_ERRORS as e:
            return self._bad_image(where, e)

    def _bad_image(self, where, error, what=None):
        what = what or f"image cannot be read ({type(error).__name__}: {error})"
        if not self.skip_bad_samples:
            raise DataError(f"{where}: {what}; set run.skip_bad_samples=True to skip and count such samples")
        with self.skipped.get_lock():
            self.skipped.value += 1
        logging.warning("skipped %s: %s", where, what)
        return None

    def take_skipped(self) -> int:
        """Samples skipped since the last call (run.skip_bad_samples)."""
        with self.skipped.get_lock():
            count, self.skipped.value = self.skipped.value, 0
        return count

    def __repr__(self):
        return f"ShardStream({self.name}: {len(self.shards)} shard(s), e.g. {self.shards[0]})"

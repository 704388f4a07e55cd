"""Your own data as webdataset shards, as img2dataset writes them: a training stream
(ShardStream) and an evaluation split (ShardEvalSet).

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

An evaluation split reads its shards once at build time for their text members only (the images
are passed over in the tar stream): the sample count, per-sample ids (img2dataset's keys) and the
ground truth. Each iteration is then one ordered pass, every sample once across ranks and
DataLoader workers (runners/loaders.py gives it a DataLoader that is iterated afresh each time).

Fields: `keys.<field>` names a member of the sample by its extension (`txt`; alternatives joined
by ";": the image's default `jpg;png;jpeg;webp`), or a key of its JSON metadata as `json.<key>`
(`json.caption`, LAION-COCO's `json.top_caption`). The tar reading is webdataset's.

Bad input stops with an error naming the shard file and the sample key: an image that cannot be
read or a sample without one (with run.skip_bad_samples: skipped, warned and counted per epoch
like any unreadable training image; an evaluation split never skips), a missing member or JSON key (listing what the sample has),
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
from typing import Callable, Dict, List, Tuple

import webdataset as wds
from PIL import Image
from webdataset.filters import _shuffle
from webdataset.tariterators import base_plus_ext, tar_file_expander, tarfile_samples, url_opener
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
        fields = self._fields(raw, where, members)
        image = self._image(raw, where, members)
        if image is None:
            return None
        try:
            return self.make_sample(fields, image)
        except IMAGE_ERRORS as e:
            return self._bad_image(where, e)

    def _fields(self, raw, where, members):
        """The sample's checked text fields (every configured one but the image)."""
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
        return fields

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


class ShardEvalSet(ShardStream):
    """An evaluation split from webdataset shards: one ordered pass each time it is iterated (a
    DataLoader over it is re-iterable: one pass per validation), every sample exactly once across
    ranks and DataLoader workers, with a length and a stable id per sample.

    `scan()` (at build time) reads the shards once for their text members only -- image members
    are passed over in the tar stream, never held -- to count the samples, check their fields
    (a missing image member included) and number them: img2dataset's key as a number where every
    key is a distinct decimal number, else 1, 2, ... in shard order. It returns each sample's id
    and text fields, from which the builder writes the ground truth; this object keeps only the
    ids per shard. Readers split the shards where there are at least as many shards as readers,
    else every reader reads all of them and takes every n-th sample. An image that cannot be read
    is an error: evaluation never skips (the scores would be over fewer samples)."""

    split_across_ranks = True  # loaders.py: False where every rank evaluates the whole split

    def __init__(self, shards: List[str], fields: Dict[str, str], types: Dict[str, str], make_sample: Callable,
                 check_text: Callable, id_field: str, name: str = "own_caption"):
        super().__init__(shards, fields, types, make_sample, check_text, shuffle_buffer=1, name=name)
        self.id_field = id_field
        self.ids: List[Dict[str, int]] = []  # per shard: sample key -> id
        self.counts: List[int] = []  # per shard: samples
        self.keyed = False  # the ids are img2dataset's keys

    # ---- the metadata pass

    def _text_samples(self, shard):
        """The shard's samples as webdataset groups them, with their text members only (an image
        member is there as None, unread)."""
        images = set(IMAGE_EXTENSIONS.split(";")) | set(self.fields["image"].split(";"))
        pending = []

        def select(fname):  # called for each member, in order, before its data would be read
            prefix, ext = base_plus_ext(fname)
            if prefix is None:
                return False
            if not pending or pending[-1]["__key__"] != prefix:
                pending.append({"__key__": prefix})
            if ext.lower() in images:
                pending[-1][ext.lower()] = None
                return False
            return True

        files = tar_file_expander(url_opener([{"url": shard}]), select_files=select, eof_value=None)
        while True:
            try:
                member = next(files)
            except StopIteration:
                break
            except Exception as e:  # as _raw_samples
                raise DataError(f"{shard}: cannot be read as a webdataset shard ({type(e).__name__}: "
                                f"{e.args[0] if e.args else e})") from e
            pending[-1][base_plus_ext(member["fname"])[1].lower()] = member["data"]
            while len(pending) > 1:
                yield pending.pop(0)
        yield from pending

    def scan(self) -> List[Tuple[int, str, dict]]:
        """(id, where, text fields) of every sample, in shard order (class doc)."""
        entries = []
        for i, shard in enumerate(self.shards):
            seen = set()
            for raw in self._text_samples(shard):
                key = raw["__key__"]
                where = f"{shard}: sample {key!r}"
                members = sorted(k for k in raw if not k.startswith("__"))
                if key in seen:
                    raise DataError(f"{where}: a second sample with this key in the shard (an evaluation sample "
                                    f"is identified by its key)")
                seen.add(key)
                if not any(e in raw for e in self.fields["image"].split(";")):
                    raise DataError(f"{where}: no image (a {self.fields['image']!r} member); the sample has {members}")
                entries.append((i, key, where, self._fields(raw, where, members)))
        if not entries:
            raise DataError(f"{self.name}: no samples in {', '.join(self.shards)}")
        keys = [key for _, key, _, _ in entries]
        self.keyed = all(k.isascii() and k.isdigit() for k in keys) and len({int(k) for k in keys}) == len(keys)
        self.ids = [{} for _ in self.shards]
        found = []
        for n, (i, key, where, fields) in enumerate(entries, start=1):
            self.ids[i][key] = int(key) if self.keyed else n
            found.append((self.ids[i][key], where, fields))
        self.counts = [len(ids) for ids in self.ids]
        return found

    # ---- the pass

    def _share(self, rank, world):
        """This rank's shard indices and the test `take(global index)` of its samples (None: all
        of them)."""
        if not self.split_across_ranks:
            rank, world = 0, 1
        if len(self.shards) >= world:
            return list(range(len(self.shards)))[rank::world], None
        return list(range(len(self.shards))), (lambda g: g % world == rank)

    def __len__(self):
        """This rank's samples."""
        rank, world, _, _ = pytorch_worker_info()
        shards, take = self._share(rank, world)
        return sum(self.counts[i] for i in shards) if take is None else sum(
            1 for g in range(sum(self.counts)) if take(g))

    def iterator(self):
        rank, world, worker, workers = pytorch_worker_info()
        shards, take = self._share(rank, world)
        offsets = [sum(self.counts[:i]) for i in range(len(self.shards))]
        if take is None and len(shards) >= workers:
            shards = shards[worker::workers]
            mine = lambda g, j: True  # noqa: E731
        elif take is None:  # fewer shards than workers: the j-th sample of the rank to worker j % workers
            mine = lambda g, j: j % workers == worker  # noqa: E731
        else:  # the rank's samples are every world-th: its j-th is g // world
            mine = lambda g, j: take(g) and (g // world) % workers == worker  # noqa: E731
        j = 0
        for i in shards:
            shard, g, read = self.shards[i], offsets[i], 0
            for _, raw in self._raw_samples([shard], {"read": 0}):
                if mine(g, j):
                    yield self._eval_sample(shard, raw, self.ids[i])
                g, j, read = g + 1, j + (take is None or take(g)), read + 1
            if read != self.counts[i]:
                raise DataError(f"{shard}: {read} samples now, {self.counts[i]} when {self.name}'s evaluation split "
                                f"was built (the shard changed)")

    def _eval_sample(self, shard, raw, ids):
        key = raw.get("__key__", "?")
        where = f"{shard}: sample {key!r}"
        if key not in ids:
            raise DataError(f"{where}: not in the shard when {self.name}'s evaluation split was built (the shard "
                            f"changed)")
        members = sorted(k for k in raw if not k.startswith("__"))
        fields = self._fields(raw, where, members)
        image = self._image(raw, where, members)
        try:
            sample = self.make_sample(fields, image)
        except IMAGE_ERRORS as e:
            self._bad_image(where, e)
        sample[self.id_field] = ids[key]
        return sample

    def _bad_image(self, where, error, what=None):
        what = what or f"image cannot be read ({type(error).__name__}: {error})"
        raise DataError(f"{where}: {what} (an evaluation split never skips a sample)")

    def __repr__(self):
        return f"ShardEvalSet({self.name}: {sum(self.counts)} samples in {len(self.shards)} shard(s))"

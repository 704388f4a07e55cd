"""Your own data: image-text and VQA datasets from the files people have, configured by keys.

Two builders, one family:

  own_caption   images with one or more captions: training (each caption a sample) and caption
                evaluation (one sample per image; the COCO-format ground truth is built from the
                records on the fly and scored by the vpgtrans_captioning task)
  own_vqa       a question with one answer or a list of answers: training (prefix LM: the
                prompt with the question -> the most frequent answer) and evaluation with the
                official VQA accuracy (vpgtrans_vqa; the official question and annotation files
                are built from the records on the fly)

Each annotation file of a split is read in its own format, from its name or `format`:

  .json      a list of records (JSON objects)
  .jsonl     one record per line (read line by line; only the configured fields are kept)
  .csv .tsv  a header row, then one record per row (open_clip's convention: columns `filepath`
             and `title`; separator "," / tab, or `csv_separator`)
  a directory written by HF datasets' `save_to_disk` (a Dataset, or a DatasetDict whose split
             is the LAVIS split's name: train / val or validation / test), or .parquet
             (`to_parquet`): the image column an `Image` feature (or image paths)
  imagefolder  a directory in HF's imagefolder layout: images and a metadata.jsonl (.csv,
             .parquet) whose `file_name` names each image (read by datasets' imagefolder loader;
             detected by the metadata file; split directories as HF names them; default caption
             column "text", as HF documents it)
  webdataset   tar shards as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json), given as brace
             patterns or globs (`shards/{00000..00009}.tar`), streamed (shard_stream.py: never the
             whole set in memory). Training: an endless shuffled stream (iteration-based runs;
             `shuffle_buffer` samples shuffled in a buffer, default 1000). Evaluation: one ordered
             pass per validation, each sample once across ranks; the samples are counted and the
             ground truth read in one pass over the text members at build time, each sample's id
             its key (img2dataset's keys are numbers). keys name a member by extension (default
             image "jpg;png;jpeg;webp", caption "txt") or a key of the json as "json.<key>"
             (own_vqa: "json.question", "json.answer")

Dataset config keys (besides LAVIS's processors and build_info.annotations.<split>.storage, a
file or a list of files, absolute or relative to `data_root`):

  keys     the record's key (column) per field. own_caption: image, caption (default "image",
           "caption"; in CSV / TSV "filepath", "title"); own_vqa: image, question, answer
           (CSV / TSV: "filepath", "question", "answer")
  types    caption (own_caption) or answer (own_vqa): "str" (default: one text per record; a list
           is an error) or "list" (a list per record, or one text: several reference captions, or
           several answers scored with the VQAv2 soft accuracy; in CSV a cell as pandas writes a
           list, "['a', 'b']")
  format   json | jsonl | csv | tsv | hf | parquet | imagefolder | webdataset for every file
           (default: from each name: a .tar or a pattern is webdataset, a directory with a
           metadata file imagefolder, other directories hf)
  build_info.images.storage   the root of relative image paths (default: the directory of the
           annotation file that names them)
  prompt   own_vqa: the training prefix with the question at "{}" (default: run.prompt, the one
           the vpgtrans_vqa task asks with, else "Question: {} Answer:")

Bad input stops with an error naming the file and the record (JSON, from 0), line (JSONL, CSV,
from 1; a CSV header is line 1) or row (HF, from 0): a record without a configured key (listing
the keys it has), a line that is not JSON, a file or split without records, a text field holding
a list where "str" is configured, an empty text, a missing image (all checked when the split is
built; in an HF Image column, the files it refers to). A training image that cannot be read is
an error too, or, with `run.skip_bad_samples`, skipped and counted (runner_base.report_skipped).
Evaluation splits never skip. Shards name the shard file and the sample key (shard_stream.py).

Evaluation: image ids number a split's distinct images from 1 in record order (the records of
one image are grouped, all their captions references), question ids its questions from 1 (shards:
each sample an image / a question, its id the sample's key where every key is a distinct number,
else numbered from 1 in shard order); the generated ground truth names each one's file and record
(shards: the shard and key). run.question_subset needs records. It is written, named by its content,
under <cache_root>/own_data/ (LAVIS's cache root; the path is logged). Parquet files and
imagefolders are converted once into HF's arrow cache under <cache_root>/hf_datasets/ (an
imagefolder's images stay files: the cache holds their paths).
"""

import ast
import collections
import csv
import difflib
import functools
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from lavis.common.registry import registry
from lavis.datasets.datasets.base_dataset import BaseDataset
from omegaconf import ListConfig, OmegaConf
from PIL import Image

from lavis_vpgtrans.datasets.builders import LocalFilesBuilder
from lavis_vpgtrans.datasets.checked import CheckedSamples, DataError, load_annotation_file

CAPTION, VQA = "caption", "vqa"
# per kind: the fields and their default keys, in JSON-like formats and in CSV / TSV
FIELDS = {
    CAPTION: {"image": "image", "caption": "caption"},
    VQA: {"image": "image", "question": "question", "answer": "answer"},
}
CSV_KEYS = {"image": "filepath", "caption": "title"}  # open_clip's columns
TEXT_FIELD = {CAPTION: "caption", VQA: "answer"}  # the field `types` sets
IMAGEFOLDER_KEYS = {"caption": "text"}  # HF's imagefolder documents metadata.jsonl with file_name / text
FORMATS = ("json", "jsonl", "csv", "tsv", "hf", "parquet", "imagefolder", "webdataset")
UNITS = {"json": "record", "jsonl": "line", "csv": "line", "tsv": "line", "hf": "row", "parquet": "row",
         "imagefolder": "row"}
HF_FORMATS = ("hf", "parquet", "imagefolder")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # what imagefolder reads
DEFAULT_VQA_PROMPT = "Question: {} Answer:"
VQA_ANSWERS = 10  # one answer is written as VQAv2's ten identical answers: exact match


def _closest(name, known) -> str:
    match = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def is_shard_pattern(path: str) -> bool:
    return path.endswith(".tar") or any(c in os.path.basename(path) for c in "{*?[")


def has_metadata(directory: str) -> bool:
    """An imagefolder's metadata file in the directory or in a split directory below it."""
    dirs = [directory] + [os.path.join(directory, d) for d in os.listdir(directory)]
    return any(os.path.isfile(os.path.join(d, m)) for d in dirs for m in METADATA_FILES)


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")):
            return "hf"
        if has_metadata(path):
            return "imagefolder"
        return "hf"
    if is_shard_pattern(path):
        return "webdataset"
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in ("json", "jsonl", "csv", "tsv", "parquet"):
        return ext
    raise DataError(f"{path}: cannot tell the format from the name (.json, .jsonl, .csv, .tsv, .parquet, .tar "
                    f"shards, a directory written by datasets' save_to_disk or an imagefolder with "
                    f"metadata.jsonl); set the dataset's `format`")


def _short(value, limit=120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- reading files

def iter_json(path: str) -> Iterator[Tuple[int, object]]:
    records = load_annotation_file(path)
    if not isinstance(records, list):
        got = f"an object with keys {sorted(records)[:10]}" if isinstance(records, dict) else type(records).__name__
        raise DataError(f"{path}: expected a JSON list of records, got {got} (or write one record per line as .jsonl)")
    yield from enumerate(records)


def iter_jsonl(path: str) -> Iterator[Tuple[int, object]]:
    """(line number, record) of each non-blank line, one line in memory at a time."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from None
            yield lineno, record


def iter_csv(path: str, separator: str, keys: Dict[str, str]) -> Iterator[Tuple[int, dict]]:
    """(line number, row) of each row; the header must hold every configured column."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for name, key in keys.items():
            if key not in columns:
                raise DataError(f"{path}: line 1 (header) has no column {key!r} (the {name} column: set keys.{name}); "
                                f"its columns are {columns}{_closest(key, columns)}")
        start = reader.line_num + 1
        for row in reader:
            yield start, row  # the row's first line (a quoted cell may span several)
            start = reader.line_num + 1


# --------------------------------------------------------------------------- text fields

def check_text(value, kind, name, key, where, from_csv=False):
    """A text field: a string, or a list of strings where `types.<name>` is "list"."""
    if from_csv and isinstance(value, str):
        parsed = _list_literal(value)
        if parsed is not None:
            value = parsed  # a list as pandas writes one: used with types list, an error with str
    if value is None:
        raise DataError(f"{where}: {key!r} has no value")
    if kind == "str":
        if isinstance(value, (list, tuple)):
            raise DataError(f"{where}: {key!r} holds a list ({_short(value)}) where types.{name} is 'str': set "
                            f"types.{name}: list to use each item" + (" as a reference caption" if name == "caption"
                                                                      else " as an answer"))
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {_short(value)}")
        if not value.strip():
            raise DataError(f"{where}: {key!r} is empty")
        return value.strip()
    if isinstance(value, str):
        value = [value]  # one text where a list may stand
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{where}: {key!r} must be a non-empty list of non-empty strings, got {_short(value)}")
    return [v.strip() for v in value]


# --------------------------------------------------------------------------- sources

@dataclass
class Sources:
    """The annotation files of one split: where each record comes from, and the images of HF
    datasets (read lazily, by row)."""

    paths: List[str] = field(default_factory=list)
    formats: List[str] = field(default_factory=list)
    hf_images: Dict[int, object] = field(default_factory=dict)  # source index -> Dataset (image column only)
    # source index -> per row, the image file an Image column refers to (None: bytes held in the dataset)
    hf_files: Dict[int, List[Optional[str]]] = field(default_factory=dict)
    image_key: str = "image"

    def add(self, path: str, fmt: str) -> int:
        self.paths.append(path)
        self.formats.append(fmt)
        return len(self.paths) - 1

    def where(self, src: int, at: int) -> str:
        return f"{UNITS[self.formats[src]]} {at} of {self.paths[src]}"

    def image_file(self, ann) -> Optional[str]:
        """The image file a record reads (None: bytes held in an HF dataset)."""
        image = ann["image"]
        if isinstance(image, str):
            return image
        files = self.hf_files.get(ann["_src"])
        return files[image] if files else None

    def image_name(self, ann) -> str:
        image = ann["image"]
        return image if isinstance(image, str) else f"column {self.image_key!r}, {self.where(ann['_src'], image)}"

    def load_image(self, ann):
        image = ann["image"]
        if isinstance(image, str):
            return Image.open(image).convert("RGB")
        return self.hf_images[ann["_src"]][image][self.image_key].convert("RGB")


class RecordReader:
    """Reads the configured fields of every record of a split's files into small dicts
    {"image": path or HF row, <field>: text(s), "_src": file index, "_at": record/line/row}."""

    def __init__(self, kind: str, keys: Dict[str, str], types: Dict[str, str], fmt: Optional[str],
                 csv_separator: Optional[str], image_root: Optional[str], cache_dir: str, split: str):
        self.kind, self.user_keys, self.types = kind, keys, types
        self.fmt, self.csv_separator, self.image_root = fmt, csv_separator, image_root
        self.cache_dir, self.split = cache_dir, split
        self.sources = Sources()

    def keys_for(self, fmt: str) -> Dict[str, str]:
        keys = dict(FIELDS[self.kind])
        if fmt in ("csv", "tsv"):
            keys.update({k: v for k, v in CSV_KEYS.items() if k in keys})
        elif fmt == "imagefolder":
            keys.update({k: v for k, v in IMAGEFOLDER_KEYS.items() if k in keys})
        keys.update(self.user_keys)
        return keys

    def read(self, paths: List[str]) -> List[dict]:
        records = []
        for path in paths:
            fmt = self.fmt or detect_format(path)
            src = self.sources.add(path, fmt)
            before = len(records)
            if fmt in HF_FORMATS:
                records.extend(self._read_hf(path, fmt, src))
            else:
                records.extend(self._read_rows(path, fmt, src))
            if len(records) == before:
                raise DataError(f"{path}: no records ({'an empty list' if fmt == 'json' else 'no rows'})")
        return records

    # ---- JSON, JSONL, CSV / TSV

    def _read_rows(self, path, fmt, src) -> Iterator[dict]:
        keys = self.keys_for(fmt)
        if fmt == "json":
            rows = iter_json(path)
        elif fmt == "jsonl":
            rows = iter_jsonl(path)
        else:
            sep = self.csv_separator or ("\t" if fmt == "tsv" else ",")
            rows = iter_csv(path, sep, keys)
        root = self.image_root or os.path.dirname(path)
        for at, row in rows:
            where = self.sources.where(src, at)
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with the keys {sorted(keys.values())}, got {_short(row)}")
            for name, key in keys.items():
                if key not in row:
                    raise DataError(f"{where}: no key {key!r} (the {name}: set keys.{name}); the record has the keys "
                                    f"{sorted(row)}{_closest(key, row)}")
            image = row[keys["image"]]
            if not isinstance(image, str) or not image.strip():
                raise DataError(f"{where}: the image {keys['image']!r} must be a path, got {_short(image)}")
            record = {"image": os.path.join(root, image.strip()), "_src": src, "_at": at}
            for name in keys:
                if name != "image":
                    record[name] = self._text(row[keys[name]], name, keys[name], where, from_csv=fmt in ("csv", "tsv"))
            yield record

    def _text(self, value, name, key, where, from_csv=False):
        return check_text(value, self.types.get(name, "str"), name, key, where, from_csv=from_csv)

    # ---- HF datasets

    def _open_hf(self, path, fmt):
        import datasets

        if fmt == "parquet":
            ds = datasets.Dataset.from_parquet(path, cache_dir=self.cache_dir)
        elif fmt == "imagefolder":
            ds = self._open_imagefolder(path)
        else:
            state = os.path.join(path, "state.json")
            if os.path.isfile(state):
                with open(state) as f:
                    if not json.load(f).get("_data_files", True):  # datasets 5.0.1 cannot load it back
                        raise DataError(f"{path}: no records (a dataset of 0 rows)")
            try:
                ds = datasets.load_from_disk(path)
            except FileNotFoundError as e:
                raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict) and len(ds) == 1 and fmt == "imagefolder":
            ds = next(iter(ds.values()))  # no split directories: imagefolder calls all of it "train"
        if isinstance(ds, datasets.DatasetDict):
            names = [self.split] + (["validation"] if self.split == "val" else [])
            found = next((n for n in names if n in ds), None)
            if found is None:
                raise DataError(f"{path}: a DatasetDict without a {' or '.join(map(repr, names))} split (it has "
                                f"{sorted(ds)}); give the split's own directory")
            ds = ds[found]
        return ds

    def _open_imagefolder(self, path):
        """HF's imagefolder loader (packaged with datasets: nothing is downloaded); its errors
        name the directory."""
        import datasets

        if not has_metadata(path):
            raise DataError(f"{path}: an imagefolder without {' / '.join(METADATA_FILES)} (the captions, with a "
                            f"file_name column naming each image)")
        try:
            return datasets.load_dataset("imagefolder", data_dir=path, cache_dir=self.cache_dir)
        except (ValueError, FileNotFoundError, KeyError, TypeError, datasets.exceptions.DatasetGenerationError) as e:
            cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
            raise DataError(f"{path}: HF's imagefolder cannot load it ({type(cause).__name__}: {cause})") from e

    def _read_hf(self, path, fmt, src) -> Iterator[dict]:
        import datasets

        ds = self._open_hf(path, fmt)
        keys = self.keys_for(fmt)
        columns = ds.column_names
        for name, key in keys.items():
            if key not in columns:
                raise DataError(f"{path}: no column {key!r} (the {name}: set keys.{name}); its columns are "
                                f"{columns}{_closest(key, columns)}")
        image_feature = ds.features[keys["image"]]
        paths = None
        if isinstance(image_feature, datasets.Image):
            self.sources.hf_images[src] = ds.select_columns([keys["image"]])
            self.sources.image_key = keys["image"]
            self.sources.hf_files[src] = _image_files(ds, keys["image"])
        elif isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string"):
            paths = _column(ds, keys["image"])
        else:
            raise DataError(f"{path}: column {keys['image']!r} is {image_feature}: expected an Image column or "
                            "image paths")
        root = self.image_root or path
        texts = {}
        for name, key in keys.items():
            if name == "image":
                continue
            feature = ds.features[key]
            is_list = isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList, list))
            kind = self.types.get(name, "str")
            if is_list and kind == "str":
                example = ds[0][key] if len(ds) else None
                raise DataError(f"{path}: column {key!r} holds lists ({feature}; row 0: {_short(example)}) where "
                                f"types.{name} is 'str': set types.{name}: list to use each item")
            texts[name] = _column(ds, key)
        for row in range(len(ds)):
            where = self.sources.where(src, row)
            if paths is not None:
                image = paths[row]
                if not image:
                    raise DataError(f"{where}: no image path in column {keys['image']!r}")
                image = os.path.join(root, image)
            else:
                image = row
            record = {"image": image, "_src": src, "_at": row}
            for name, column in texts.items():
                record[name] = self._text(column[row], name, keys[name], where)
            yield record


def _image_files(ds, key) -> List[Optional[str]]:
    """Per row, the file an Image column refers to where it holds no bytes (imagefolder, or
    Image() cast from paths), read through arrow without touching any bytes."""
    paths = []
    for chunk in ds.data.column(key).chunks:
        if not hasattr(chunk, "field"):
            return [None] * len(ds)
        no_bytes = chunk.field("bytes").is_null().to_pylist()
        paths.extend(p if empty else None for p, empty in zip(chunk.field("path").to_pylist(), no_bytes))
    return paths


def _column(ds, key) -> list:
    """A column as a python list, through arrow (indexing a datasets Column row by row costs
    ~0.1 ms a row)."""
    return ds.select_columns([key]).to_dict()[key]


def _list_literal(text: str):
    """A list of strings written into a CSV cell (pandas writes "['a', 'b']"), else None."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, list) else None


# --------------------------------------------------------------------------- ground truth files

def write_ground_truth(content: dict, cache_root: str, name: str, split: str, what: str) -> str:
    """Writes `content` as JSON under <cache_root>/own_data/, named by its content (every rank
    writes the same file; a rename makes each write whole). Returns the path."""
    data = json.dumps(content, sort_keys=True).encode("utf-8")
    digest = hashlib.sha1(data).hexdigest()[:16]
    directory = os.path.join(cache_root, "own_data")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}_{split}_{what}_{digest}.json")
    if not os.path.isfile(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def _record(ann, sources: Optional[Sources]) -> str:
    """Where an evaluation sample comes from (sources None: shards, the sample's own `_where`)."""
    return ann["_where"] if sources is None else sources.where(ann["_src"], ann["_at"])


def caption_ground_truth(annotation: List[dict], sources: Optional[Sources]) -> dict:
    """COCO caption format: an image per evaluation sample, its reference captions."""
    images, anns = [], []
    for ann in annotation:
        name = ann["_where"] if sources is None else sources.image_name(ann)
        images.append({"id": ann["image_id"], "file_name": name, "record": _record(ann, sources)})
        for caption in ann["captions"]:
            anns.append({"image_id": ann["image_id"], "id": len(anns) + 1, "caption": caption})
    return {"info": {"description": "built from the records by lavis_vpgtrans.datasets.generic"},
            "images": images, "annotations": anns, "type": "captions"}


def normalize_answer(answer: str, _tool=[]) -> str:
    """The official VQA evaluation's normalisation (as VQAEval treats a prediction)."""
    if not _tool:
        from lavis.common.vqa_tools.vqa_eval import VQAEval

        _tool.append(VQAEval())
    tool = _tool[0]
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return tool.processDigitArticle(tool.processPunctuation(answer))


def vqa_ground_truth(annotation: List[dict], sources: Optional[Sources], name: str, split: str) -> Tuple[dict, dict]:
    """The official VQA question and annotation files. Answers are normalised as VQAEval
    normalises predictions. One answer is written as ten identical answers (the VQAv2 layout:
    accuracy is then exact match); a list as given (VQAEval's min(#matches among the others / 3,
    1), averaged over leaving each answer out)."""
    header = {"info": {"description": "built from the records by lavis_vpgtrans.datasets.generic"},
              "task_type": "Open-Ended", "data_type": name, "data_subtype": split, "license": {}}
    questions, anns = [], []
    for ann in annotation:
        questions.append({"question_id": ann["question_id"], "image_id": ann["image_id"], "question": ann["question"],
                          "record": _record(ann, sources)})
        answers = ann["answers"] if len(ann["answers"]) > 1 else ann["answers"] * VQA_ANSWERS
        normalized = [normalize_answer(a) for a in answers]
        anns.append({"question_id": ann["question_id"], "image_id": ann["image_id"], "question_type": "none",
                     "answer_type": "other", "multiple_choice_answer": most_frequent(normalized),
                     "answers": [{"answer": a, "raw_answer": raw, "answer_confidence": "yes", "answer_id": i + 1}
                                 for i, (a, raw) in enumerate(zip(normalized, answers))]})
    return {**header, "questions": questions}, {**header, "annotations": anns}


def most_frequent(answers: List[str]) -> str:
    """The most frequent answer (the first of those tied)."""
    counts = collections.Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


# --------------------------------------------------------------------------- datasets

class _Samples:
    """CheckedSamples.__getitem__ wraps the next class's __getitem__: this one, before BaseDataset."""

    def __getitem__(self, index):
        return self._sample(index)


class OwnDataset(CheckedSamples, _Samples, BaseDataset):
    """Samples of a split of one's own records; errors name the file and record / line / row."""

    def __init__(self, vis_processor, text_processor, sources: Sources, annotation: List[dict]):
        super().__init__(vis_processor=vis_processor, text_processor=text_processor, vis_root=None, ann_paths=[])
        self.sources = sources
        self.ann_paths = list(sources.paths)
        self.annotation = annotation
        self._add_instance_ids()

    def _where(self, index) -> str:
        ann = self.annotation[index]
        return f"{self.sources.where(ann['_src'], ann['_at'])} (image {self.sources.image_name(ann)})"

    def image(self, ann):
        return self.vis_processor(self.sources.load_image(ann))


class CaptionTrainSet(OwnDataset):
    def _sample(self, index):
        ann = self.annotation[index]
        return {"image": self.image(ann), "text_input": self.text_processor(ann["caption"]),
                "image_id": ann["image_id"]}


class CaptionEvalSet(OwnDataset):
    def _sample(self, index):
        ann = self.annotation[index]
        return {"image": self.image(ann), "image_id": ann["image_id"], "instance_id": ann["instance_id"]}


class VQATrainSet(OwnDataset):
    def __init__(self, *args, prompt: str = DEFAULT_VQA_PROMPT, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt = prompt

    def _sample(self, index):
        ann = self.annotation[index]
        question = self.text_processor(ann["question"])
        prefix = self.prompt.format(question) if "{}" in self.prompt else self.prompt + question
        return {"image": self.image(ann), "text_input": prefix, "text_output": ann["answer"]}


class VQAEvalSet(OwnDataset):
    answer_list = None  # open-ended: answers are generated

    def _sample(self, index):
        ann = self.annotation[index]
        return {"image": self.image(ann), "text_input": self.text_processor(ann["question"]),
                "question_id": ann["question_id"], "instance_id": ann["instance_id"]}


# --------------------------------------------------------------------------- builders

def check_names(dataset: str, option: str, given: dict, known, what: str) -> None:
    """A dataset config's `<option>: {field: name}` (keys, roles): known fields, non-empty names."""
    for field_name, value in given.items():
        if field_name not in known:
            raise DataError(f"dataset {dataset!r}: {option}.{field_name}: not {what} "
                            f"{sorted(known)}{_closest(field_name, known)}")
        if not isinstance(value, str) or not value:
            raise DataError(f"dataset {dataset!r}: {option}.{field_name} must be a name, got {value!r}")


class OwnDataBuilder(LocalFilesBuilder):
    """Builds the splits of build_info.annotations from one's own files (see the module doc)."""

    kind = CAPTION
    SPLITS = ("train", "val", "test")

    def _resolve_paths(self):
        info = self.config.build_info
        for split, ann in (info.get("annotations", None) or {}).items():
            storage = ann.get("storage", None)
            paths = list(storage) if isinstance(storage, (list, ListConfig)) else [storage]
            ann.storage = [self.resolve_path(p) for p in paths if p]
        images = info.get("images", None)
        if images is not None and images.get("storage", None):
            images.storage = self.resolve_path(images.storage)

    def _name(self) -> str:
        return self.config.get("name", None) or type(self).__name__

    def _download_data(self):
        """Checks that the files exist instead of downloading."""
        name = self._name()
        annotations = self.config.build_info.get("annotations", None) or {}
        if not annotations:
            raise DataError(f"dataset {name!r}: no splits: set build_info.annotations.train.storage (and val / test) "
                            "to your annotation files")
        for split, ann in annotations.items():
            if split not in self.SPLITS:
                raise DataError(f"dataset {name!r}: split {split!r} is not one of {list(self.SPLITS)}"
                                f"{_closest(split, self.SPLITS)}")
            extra = sorted(set(ann.keys()) - {"storage"})
            if extra:
                raise DataError(f"dataset {name!r}: build_info.annotations.{split} has {extra}; only `storage` (the "
                                "ground truth of an evaluation split is built from its records)")
            if not ann.storage:
                raise DataError(f"dataset {name!r}: build_info.annotations.{split}.storage names no file")
            for path in ann.storage:
                if not os.path.exists(path) and not is_shard_pattern(path):  # shards: checked when expanded
                    raise FileNotFoundError(f"dataset {name!r}: {split} annotation file not found: {path}")
        images = self.config.build_info.get("images", None)
        root = images.get("storage", None) if images is not None else None
        if root and not os.path.isdir(root):
            raise FileNotFoundError(f"dataset {name!r}: image directory not found: {root}")

    def _options(self):
        name = self._name()
        fields = FIELDS[self.kind]
        keys = OmegaConf.to_container(self.config.get("keys", None) or OmegaConf.create({}))
        check_names(name, "keys", keys, fields, f"a field of {self.kind} data")
        types = OmegaConf.to_container(self.config.get("types", None) or OmegaConf.create({}))
        for field_name, kind in types.items():
            if field_name != TEXT_FIELD[self.kind]:
                raise DataError(f"dataset {name!r}: types.{field_name}: only types.{TEXT_FIELD[self.kind]} is set "
                                "(str or list)")
            if kind not in ("str", "list"):
                raise DataError(f"dataset {name!r}: types.{field_name} is {kind!r}: 'str' or 'list'")
        fmt = self.config.get("format", None)
        if fmt is not None and fmt not in FORMATS:
            raise DataError(f"dataset {name!r}: format {fmt!r} is not one of {list(FORMATS)}{_closest(fmt, FORMATS)}")
        images = self.config.build_info.get("images", None)
        root = images.get("storage", None) if images is not None else None
        return dict(keys=keys, types=types, fmt=fmt, csv_separator=self.config.get("csv_separator", None),
                    image_root=root or None)

    def _split_format(self, split, paths, fmt) -> str:
        """webdataset when the split's files are shards (they cannot be mixed with record files)."""
        formats = [fmt or detect_format(p) for p in paths]
        if "webdataset" in formats and set(formats) != {"webdataset"}:
            builder = "own_caption" if self.kind == CAPTION else "own_vqa"
            raise DataError(f"dataset {self._name()!r} {split}: webdataset shards and record files in one split "
                            f"({paths}); give them as two datasets (two names, each with `builder: {builder}`) "
                            f"mixed by run.train_dataset_ratios")
        return formats[0]

    def _build_stream(self, split, paths, options, skip):
        """The training split from webdataset shards: an endless stream (shard_stream.py)."""
        from lavis_vpgtrans.datasets.shard_stream import SHARD_KEYS, ShardStream, expand_shards

        name = self._name()
        if split != "train":
            return self._build_eval_stream(split, paths, options)
        run_cfg = self._run_cfg()
        training = run_cfg is not None and not run_cfg.get("evaluate", False)
        if training and not run_cfg.get("iters_per_inner_epoch", None):
            raise DataError(f"dataset {name!r} train: webdataset shards are streamed without a length: train "
                            f"iteration-based (set run.iters_per_inner_epoch and run.max_iters)")
        fields = {**SHARD_KEYS[self.kind], **options["keys"]}
        types = options["types"]
        if self.kind == CAPTION:
            make = functools.partial(_caption_sample, self.vis_processors["train"], self.text_processors["train"])
        else:
            make = functools.partial(_vqa_sample, self.vis_processors["train"], self.text_processors["train"],
                                     self._prompt())
        seed = run_cfg.get("seed", 0) if run_cfg is not None else 0
        shuffle_buffer = self.config.get("shuffle_buffer", None) or 1000
        stream = ShardStream(expand_shards(paths), fields, types, make, functools.partial(_shard_text, types),
                             shuffle_buffer=shuffle_buffer, seed=seed, skip_bad_samples=skip, name=name)
        logging.info("%s train: a stream of %d shard(s), %s ... %s (shuffle buffer %d)", name, len(stream.shards),
                     stream.shards[0], stream.shards[-1], stream.shuffle_buffer)
        return stream

    def _build_eval_stream(self, split, paths, options):
        """An evaluation split from webdataset shards: one metadata-only pass counts and numbers
        the samples (shard_stream.ShardEvalSet) and yields the ground truth, written as for records;
        the images are read when the split is evaluated, one ordered pass each time."""
        from lavis_vpgtrans.datasets.shard_stream import SHARD_KEYS, ShardEvalSet, expand_shards

        name = self._name()
        run_cfg = self._run_cfg()
        if self.kind == VQA and run_cfg is not None and run_cfg.get("question_subset", None):
            raise DataError(f"dataset {name!r} {split}: run.question_subset needs an evaluation split of records; "
                            f"webdataset shards are evaluated whole")
        fields = {**SHARD_KEYS[self.kind], **options["keys"]}
        types = options["types"]
        if self.kind == CAPTION:
            make, id_field = functools.partial(_caption_eval_sample, self.vis_processors["eval"]), "image_id"
        else:
            make = functools.partial(_vqa_eval_sample, self.vis_processors["eval"], self.text_processors["eval"])
            id_field = "question_id"
        stream = ShardEvalSet(expand_shards(paths), fields, types, make, functools.partial(_shard_text, types),
                              id_field=id_field, name=name)
        found = stream.scan()
        cache_root = registry.get_path("cache_root")
        if self.kind == CAPTION:
            annotation = [{"image_id": i, "_where": where,
                           "captions": f["caption"] if isinstance(f["caption"], list) else [f["caption"]]}
                          for i, where, f in found]
            path = write_ground_truth(caption_ground_truth(annotation, None), cache_root, name, split, "coco_gt")
            self.config.build_info.annotations[split]["coco_gt"] = path  # read by the caption task
            written = f"COCO-format ground truth written to {path}"
        else:
            annotation = [{"question_id": i, "image_id": i, "question": f["question"], "_where": where,
                           "answers": f["answer"] if isinstance(f["answer"], list) else [f["answer"]]}
                          for i, where, f in found]
            self._warn_few_answers(annotation, split)
            questions, annotations = vqa_ground_truth(annotation, None, name, split)
            stream.coco_fmt_qust_file = write_ground_truth(questions, cache_root, name, split, "questions")
            stream.coco_fmt_anno_file = write_ground_truth(annotations, cache_root, name, split, "annotations")
            written = (f"official VQA question / annotation files written to {stream.coco_fmt_qust_file}, "
                       f"{stream.coco_fmt_anno_file}")
        logging.info("%s %s: %d samples in %d shard(s), %s ... %s, ids %s; %s", name, split, len(found),
                     len(stream.shards), stream.shards[0], stream.shards[-1],
                     "their keys" if stream.keyed else "numbered from 1 in shard order", written)
        return stream

    def _warn_few_answers(self, annotation, split):
        few = sum(1 for a in annotation if 1 < len(a["answers"]) < 4)
        if few:
            logging.warning("%s %s: %d question(s) have 2 or 3 answers; VQA accuracy counts an answer fully right "
                            "when 3 of the other answers agree, so these can score at most %.2f", self._name(), split,
                            few, 2 / 3)

    def build(self):
        self.build_processors()
        run_cfg = self._run_cfg()
        skip = bool(run_cfg.get("skip_bad_samples", False)) if run_cfg is not None else False
        options = self._options()
        cache_root = registry.get_path("cache_root")
        datasets = {}
        for split, ann in self.config.build_info.annotations.items():
            if self._split_format(split, list(ann.storage), options["fmt"]) == "webdataset":
                datasets[split] = self._build_stream(split, list(ann.storage), options, skip)
                continue
            reader = RecordReader(self.kind, split=split, cache_dir=os.path.join(cache_root, "hf_datasets"), **options)
            records = reader.read(list(ann.storage))
            train = split == "train"
            self._check_images(records, reader.sources, split, skip=train and skip)
            datasets[split] = self.make_split(split, records, reader.sources, train)
            if train:
                datasets[split].skip_bad_samples = skip
            logging.info("%s %s: %d samples from %s", self._name(), split, len(datasets[split]),
                         ", ".join(reader.sources.paths))
        return datasets

    def _check_images(self, records, sources, split, skip):
        missing = {}
        for record in records:
            image = sources.image_file(record)
            if image and image not in missing and not os.path.isfile(image):
                missing[image] = sources.where(record["_src"], record["_at"])
        if not missing:
            return
        examples = "; ".join(f"{where}: {image}" for image, where in list(missing.items())[:3])
        if skip:
            logging.warning("%s %s: %d image(s) not found, skipped and counted when read (run.skip_bad_samples), "
                            "e.g. %s", self._name(), split, len(missing), examples)
            return
        hint = " (or set run.skip_bad_samples=True to skip and count them)" if split == "train" else ""
        raise DataError(f"dataset {self._name()!r} {split}: {len(missing)} image(s) not found, e.g. {examples}{hint}")

    def make_split(self, split, records, sources, train):
        raise NotImplementedError


@registry.register_builder("own_caption")
class OwnCaptionBuilder(OwnDataBuilder):
    """Images and their captions, from JSON / JSONL / CSV / TSV / HF datasets (module doc)."""

    kind = CAPTION
    DATASET_CONFIG_DICT = {"default": "datasets/configs/own_data/caption.yaml"}

    def make_split(self, split, records, sources, train):
        processors = "train" if train else "eval"
        image_ids: Dict[object, int] = {}
        if train:
            annotation = []
            for r in records:
                image_id = image_ids.setdefault(_image_key(r), len(image_ids) + 1)
                for caption in (r["caption"] if isinstance(r["caption"], list) else [r["caption"]]):
                    annotation.append({"image": r["image"], "caption": caption, "image_id": image_id,
                                       "_src": r["_src"], "_at": r["_at"]})
            return CaptionTrainSet(self.vis_processors[processors], self.text_processors[processors], sources,
                                   annotation)
        # evaluation: one sample per image, every caption of its records a reference
        groups: Dict[object, dict] = {}
        for r in records:
            group = groups.setdefault(_image_key(r), {"image": r["image"], "image_id": len(groups) + 1,
                                                      "captions": [], "_src": r["_src"], "_at": r["_at"]})
            group["captions"].extend(r["caption"] if isinstance(r["caption"], list) else [r["caption"]])
        annotation = list(groups.values())
        path = write_ground_truth(caption_ground_truth(annotation, sources), registry.get_path("cache_root"),
                                  self._name(), split, "coco_gt")
        self.config.build_info.annotations[split]["coco_gt"] = path  # read by the caption task
        logging.info("%s %s: COCO-format ground truth (%d images) written to %s", self._name(), split,
                     len(annotation), path)
        return CaptionEvalSet(self.vis_processors[processors], self.text_processors[processors], sources, annotation)


@registry.register_builder("own_vqa")
class OwnVQABuilder(OwnDataBuilder):
    """Questions about images with one answer or a list of answers (module doc)."""

    kind = VQA
    DATASET_CONFIG_DICT = {"default": "datasets/configs/own_data/vqa.yaml"}

    def _prompt(self) -> str:
        prompt = self.config.get("prompt", None)
        if not prompt:
            run_cfg = self._run_cfg()
            prompt = run_cfg.get("prompt", None) if run_cfg is not None else None
        return prompt or DEFAULT_VQA_PROMPT

    def make_split(self, split, records, sources, train):
        processors = "train" if train else "eval"
        image_ids: Dict[object, int] = {}
        annotation = []
        for r in records:
            answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
            entry = {"image": r["image"], "question": r["question"], "_src": r["_src"], "_at": r["_at"],
                     "image_id": image_ids.setdefault(_image_key(r), len(image_ids) + 1)}
            if train:
                # the target: the most frequent answer (as VQAEval compares them), as written
                normalized = [normalize_answer(a) for a in answers]
                entry["answer"] = answers[normalized.index(most_frequent(normalized))]
            else:
                entry.update(answers=answers, question_id=len(annotation) + 1)
            annotation.append(entry)
        if train:
            return VQATrainSet(self.vis_processors[processors], self.text_processors[processors], sources,
                               annotation, prompt=self._prompt())
        self._warn_few_answers(annotation, split)
        questions, annotations = vqa_ground_truth(annotation, sources, self._name(), split)
        cache_root = registry.get_path("cache_root")
        dataset = VQAEvalSet(self.vis_processors[processors], self.text_processors[processors], sources, annotation)
        dataset.coco_fmt_qust_file = write_ground_truth(questions, cache_root, self._name(), split, "questions")
        dataset.coco_fmt_anno_file = write_ground_truth(annotations, cache_root, self._name(), split, "annotations")
        logging.info("%s %s: official VQA question / annotation files (%d questions) written to %s, %s",
                     self._name(), split, len(annotation), dataset.coco_fmt_qust_file, dataset.coco_fmt_anno_file)
        return dataset


def _shard_text(types, value, name, key, where):
    return check_text(value, types.get(name, "str"), name, key, where)


def _caption_sample(vis_processor, text_processor, fields, image):
    captions = fields["caption"]
    caption = captions if isinstance(captions, str) else random.choice(captions)  # types list: one per visit
    return {"image": vis_processor(image), "text_input": text_processor(caption)}


def _vqa_sample(vis_processor, text_processor, prompt, fields, image):
    answers = fields["answer"] if isinstance(fields["answer"], list) else [fields["answer"]]
    normalized = [normalize_answer(a) for a in answers]
    question = text_processor(fields["question"])
    prefix = prompt.format(question) if "{}" in prompt else prompt + question
    return {"image": vis_processor(image), "text_input": prefix,
            "text_output": answers[normalized.index(most_frequent(normalized))]}


def _caption_eval_sample(vis_processor, fields, image):
    return {"image": vis_processor(image)}  # + image_id (ShardEvalSet)


def _vqa_eval_sample(vis_processor, text_processor, fields, image):
    return {"image": vis_processor(image), "text_input": text_processor(fields["question"])}  # + question_id


def _image_key(record):
    return record["image"] if isinstance(record["image"], str) else (record["_src"], record["image"])

"""Sentence datasets (text only) for P-Former pre-training.

Annotation files, any mix per split:
  - .txt: one sentence per line (blank lines skipped);
  - .json: a list of sentences, or a list of records with a "caption" (a string, or a list of
    reference captions: each becomes a sentence) or a "text" / "sentence" field. So LAVIS
    caption annotation files (COCO, VG, LAION-COCO style) are reused as sentence files.
Each sample is {"text_input": processed sentence}. Paths resolve as in LocalFilesBuilder
("toy:...", absolute, or relative to the dataset's / the run's `data_root`).
"""

import logging
import os
from typing import List

from lavis.common.registry import registry
from lavis.datasets.datasets.base_dataset import BaseDataset
from omegaconf import ListConfig

from lavis_vpgtrans.datasets.builders import LocalFilesBuilder
from lavis_vpgtrans.datasets.checked import load_annotation_file

TEXT_FIELDS = ("caption", "text", "sentence")


def read_sentences(path: str) -> List[str]:
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    if not path.endswith(".json"):
        raise ValueError(f"sentence file {path}: expected a .txt or .json file")
    records = load_annotation_file(path)
    if not isinstance(records, list):
        raise ValueError(f"sentence file {path}: expected a json list, got {type(records).__name__}")
    sentences = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict):
            field = next((k for k in TEXT_FIELDS if k in rec), None)
            if field is None:
                raise ValueError(f"sentence file {path}: record {i} has none of the fields {TEXT_FIELDS}")
            rec = rec[field]
        values = rec if isinstance(rec, list) else [rec]
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"sentence file {path}: record {i} is not a sentence or a list of sentences")
        sentences.extend(v.strip() for v in values if v.strip())
    return sentences


class SentenceDataset(BaseDataset):
    def __init__(self, text_processor=None, ann_paths=()):
        super().__init__(vis_processor=None, text_processor=text_processor, vis_root=None, ann_paths=[])
        self.sentences = [s for path in ann_paths for s in read_sentences(path)]
        if not self.sentences:
            raise ValueError(f"no sentences in {list(ann_paths)}")

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, index):
        text = self.sentences[index]
        return {"text_input": self.text_processor(text) if self.text_processor else text}


@registry.register_builder("pformer_sentences")
class SentencesBuilder(LocalFilesBuilder):
    """Sentences for P-Former pre-training (no images)."""

    DATASET_CONFIG_DICT = {
        "default": "datasets/configs/sentences/defaults.yaml",
        "toy": "datasets/configs/sentences/toy.yaml",
    }

    def _ann_paths(self, split) -> List[str]:
        paths = self.config.build_info.annotations[split].storage
        return list(paths) if isinstance(paths, (list, ListConfig)) else [paths]

    def _resolve_paths(self):
        for split, ann in self.config.build_info.annotations.items():
            ann.storage = [self.resolve_path(p) for p in self._ann_paths(split)]

    def _download_data(self):
        """Checks that the files exist instead of downloading."""
        hint = self.config.build_info.get("how_to_get", None)
        for split in self.config.build_info.annotations:
            for path in self._ann_paths(split):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"dataset 'pformer_sentences': {split} sentence file not found: "
                                            f"{path}" + (f" ({hint})" if hint else ""))

    def build(self):
        self.build_processors()
        datasets = {}
        for split in self.config.build_info.annotations:
            if split not in ("train", "val", "test"):
                continue
            processor = self.text_processors["train" if split == "train" else "eval"]
            datasets[split] = SentenceDataset(text_processor=processor, ann_paths=self._ann_paths(split))
        if self.config.get("exclude_eval_sentences", False) and "train" in datasets:
            self._exclude_eval_sentences(datasets)
        return datasets

    def _exclude_eval_sentences(self, datasets):
        """Drops from train every sentence that a val / test split holds (compared after the
        eval text processor), so that evaluation measures held-out reconstruction."""
        norm = self.text_processors["eval"]
        held_out = {norm(s) for split in ("val", "test") if split in datasets for s in datasets[split].sentences}
        train = datasets["train"]
        kept = [s for s in train.sentences if norm(s) not in held_out]
        logging.info("pformer_sentences: %d of %d train sentences are in val/test and were dropped",
                     len(train.sentences) - len(kept), len(train.sentences))
        if not kept:
            raise ValueError("pformer_sentences: every train sentence is also in val/test")
        train.sentences = kept

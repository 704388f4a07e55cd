"""LAVIS's datasets with errors that name the file and the record, and bad images skipped
and counted where `run.skip_bad_samples` allows it.

LAVIS's caption datasets set PIL's LOAD_TRUNCATED_IMAGES globally, so a truncated JPEG trains
as a half-grey image without a word; here it is an error (or, with skip_bad_samples, skipped
and counted like any image that cannot be read). Evaluation sets never skip: a metric must
cover its whole split.
"""

import json
import logging
import multiprocessing
import os

from lavis.datasets.datasets.coco_caption_datasets import COCOCapDataset, COCOCapEvalDataset, NoCapsEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset
from lavis.datasets.datasets.gqa_datasets import GQADataset, GQAEvalDataset
from lavis.datasets.datasets.image_text_pair_datasets import ImageTextPairDataset
from PIL import Image, ImageFile

# LAVIS's coco_caption_datasets (imported above) set it to True at import
ImageFile.LOAD_TRUNCATED_IMAGES = False

# what reading a bad image raises: missing, unreadable, truncated, decompression bomb
IMAGE_ERRORS = (OSError, Image.DecompressionBombError, SyntaxError)


class DataError(ValueError):
    """A training or evaluation sample cannot be used: the message names the file and record."""


def load_annotation_file(path: str):
    """json.load with the file's name in the error."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


class CheckedSamples:
    """Mixin over a LAVIS dataset: __getitem__ failures name the annotation file(s), the record
    and its image; unreadable images are skipped (None, dropped by the collater) and counted
    when `skip_bad_samples` is set by the builder."""

    skip_bad_samples = False

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except json.JSONDecodeError:
            ann_paths = kwargs.get("ann_paths", args[3] if len(args) > 3 else [])
            for path in ann_paths:  # which file: read them one by one, only on failure
                load_annotation_file(path)
            raise
        self.ann_paths = list(kwargs.get("ann_paths", args[3] if len(args) > 3 else []))
        self.skipped = multiprocessing.Value("i", 0)  # shared with DataLoader worker processes

    def image_path(self, ann):
        """The image file of an annotation record, as LAVIS's datasets join it."""
        image = ann.get("image", None) if isinstance(ann, dict) else None
        return os.path.join(getattr(self, "vis_root", "") or "", image) if image else None

    def _where(self, index) -> str:
        ann = self.annotation[index]
        try:
            image_path = self.image_path(ann)
        except (KeyError, TypeError):
            image_path = None
        record = json.dumps(ann, default=str)
        record = record if len(record) <= 300 else record[:300] + "..."
        return (f"record {index} of {', '.join(self.ann_paths) or type(self).__name__}"
                + (f" (image {image_path})" if image_path else "") + f": {record}")

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except IMAGE_ERRORS as e:
            if not self.skip_bad_samples:
                raise DataError(f"{self._where(index)}: image cannot be read ({type(e).__name__}: {e}); set "
                                f"run.skip_bad_samples=True to skip and count such images") from e
            with self.skipped.get_lock():
                self.skipped.value += 1
            logging.warning("skipped %s: image cannot be read (%s: %s)", self._where(index), type(e).__name__, e)
            return None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DataError(f"{self._where(index)}: {type(e).__name__}: {e}") from e

    def collater(self, samples):
        samples = [s for s in samples if s is not None]
        if not samples:
            raise DataError(f"every sample of a batch from {', '.join(self.ann_paths)} was skipped as unreadable")
        return super().collater(samples)

    def take_skipped(self) -> int:
        """Images skipped since the last call."""
        with self.skipped.get_lock():
            count, self.skipped.value = self.skipped.value, 0
        return count


class CaptionDataset(CheckedSamples, COCOCapDataset):
    pass


class CaptionEvalDataset(CheckedSamples, COCOCapEvalDataset):
    pass


class VQADataset(CheckedSamples, COCOVQADataset):
    pass


class VQAEvalDataset(CheckedSamples, COCOVQAEvalDataset):
    pass


class ImageTextDataset(CheckedSamples, ImageTextPairDataset):
    pass


class NoCapsDataset(CheckedSamples, NoCapsEvalDataset):
    pass


class GQATrainDataset(CheckedSamples, GQADataset):
    pass


class GQAEvalSet(CheckedSamples, GQAEvalDataset):
    pass

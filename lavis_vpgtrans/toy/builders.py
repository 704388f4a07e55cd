"""The toy world's dataset builders, `toy_caption` and `toy_vqa` (files under toy:data).

Registered in LAVIS's registry when this module is imported: a config that names them loads it
through the `lavis_vpgtrans.builders` entry points (setup.py, datasets.builders.register_builder_plugins),
so the production package never imports the toy world.
"""

from lavis.common.registry import registry

from lavis_vpgtrans.datasets.builders import LocalFilesBuilder
from lavis_vpgtrans.datasets.checked import CaptionDataset, CaptionEvalDataset, VQADataset, VQAEvalDataset


@registry.register_builder("toy_caption")
class ToyCaptionBuilder(LocalFilesBuilder):
    """Toy-world captions: LAVIS caption json + COCO-format ground truth for val/test."""

    train_dataset_cls = CaptionDataset
    eval_dataset_cls = CaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/toy/caption.yaml"}


@registry.register_builder("toy_vqa")
class ToyVQABuilder(LocalFilesBuilder):
    """Toy-world VQA in the VQAv2 layout (10 answers, official question/annotation files)."""

    train_dataset_cls = VQADataset
    eval_dataset_cls = VQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/toy/vqa.yaml"}

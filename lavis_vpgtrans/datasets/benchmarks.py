"""Builders for the paper's five zero-shot benchmarks, reading files already on disk.

The file names and layout are LAVIS's (its builders download them into `cache_root`); ours
resolve them against the dataset config's `data_root` (or LAVIS's cache_root when unset) and
stop with the missing path and `build_info.how_to_get` when a file is absent.

  vpgtrans_coco_caption  COCO Karpathy val/test captions + COCO-format ground truth
  vpgtrans_nocaps        NoCaps val + the official ground truth (with image domains)
  vpgtrans_vqav2         VQAv2 val (official questions / annotations)
  vpgtrans_okvqa         OK-VQA test (= COCO val2014 questions, LAVIS's "test" split)
  vpgtrans_gqa           GQA test-dev balanced (LAVIS's "val" split of balanced_testdev)

`python -m lavis_vpgtrans.toy.benchmarks --out DIR` writes synthetic mini versions of all five
in this layout, for offline runs (`data_root: DIR`).
"""

from lavis.common.registry import registry
from lavis_vpgtrans.datasets.builders import LocalFilesBuilder
from lavis_vpgtrans.datasets.checked import (CaptionDataset, CaptionEvalDataset, GQAEvalSet, GQATrainDataset,
                                             NoCapsDataset, VQADataset, VQAEvalDataset)


@registry.register_builder("vpgtrans_coco_caption")
class COCOCaptionBenchmarkBuilder(LocalFilesBuilder):
    train_dataset_cls = CaptionDataset
    eval_dataset_cls = CaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/coco_caption/defaults.yaml"}


@registry.register_builder("vpgtrans_nocaps")
class NoCapsBenchmarkBuilder(LocalFilesBuilder):
    eval_dataset_cls = NoCapsDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/nocaps/defaults.yaml"}


@registry.register_builder("vpgtrans_vqav2")
class VQAv2BenchmarkBuilder(LocalFilesBuilder):
    train_dataset_cls = VQADataset
    eval_dataset_cls = VQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/vqav2/defaults.yaml"}


@registry.register_builder("vpgtrans_okvqa")
class OKVQABenchmarkBuilder(LocalFilesBuilder):
    train_dataset_cls = VQADataset
    eval_dataset_cls = VQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/okvqa/defaults.yaml"}


@registry.register_builder("vpgtrans_gqa")
class GQABenchmarkBuilder(LocalFilesBuilder):
    train_dataset_cls = GQATrainDataset
    eval_dataset_cls = GQAEvalSet
    DATASET_CONFIG_DICT = {"default": "datasets/configs/gqa/defaults.yaml"}

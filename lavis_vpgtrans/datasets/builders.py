"""Dataset builders for files already on disk, and the toy-world builders.

LAVIS's builders download annotations into `cache_root` (which defaults to /export/...).
Ours never download: every path in `build_info` is resolved once, at construction, against
  - "toy:<path>"  -> the offline toy zoo (built on first use),
  - an absolute path -> itself,
  - a relative path -> `data_root` from the dataset config if set, else LAVIS's cache_root,
and a missing file is an error naming the dataset, split, path and what produces it.
"""

import os

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.coco_caption_datasets import COCOCapDataset, COCOCapEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset
from omegaconf import ListConfig

from lavis_vpgtrans.toy import zoo

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LocalFilesBuilder(BaseDatasetBuilder):
    """A LAVIS builder whose annotation and image paths point at local files."""

    # Keys under build_info.annotations.<split> that hold file paths besides `storage`.
    extra_path_keys = ("coco_gt",)

    @classmethod
    def default_config_path(cls, type="default"):
        return os.path.join(PACKAGE_ROOT, cls.DATASET_CONFIG_DICT[type])

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._resolve_paths()

    def _root(self) -> str:
        root = self.config.get("data_root", None)
        return zoo.resolve(root) if root else registry.get_path("cache_root")

    def resolve_path(self, path: str) -> str:
        path = zoo.resolve(os.path.expanduser(str(path)))
        return path if os.path.isabs(path) else os.path.join(self._root(), path)

    def _resolve_paths(self):
        info = self.config.build_info
        for split, ann in info.annotations.items():
            paths = ann.storage
            if isinstance(paths, (list, ListConfig)):
                ann.storage = [self.resolve_path(p) for p in paths]
            else:
                ann.storage = self.resolve_path(paths)
            for key in self.extra_path_keys:
                if ann.get(key, None):
                    ann[key] = self.resolve_path(ann[key])
        vis = info.get(self.data_type)
        vis.storage = self.resolve_path(vis.storage)

    def _download_data(self):
        """Checks that the files exist instead of downloading."""
        info = self.config.build_info
        hint = info.get("how_to_get", None)
        name = self.config.get("name", type(self).__name__)
        checks = []
        for split, ann in info.annotations.items():
            paths = ann.storage if isinstance(ann.storage, (list, ListConfig)) else [ann.storage]
            checks += [(f"{split} annotation", p) for p in paths]
            checks += [(f"{split} {key}", ann[key]) for key in self.extra_path_keys if ann.get(key, None)]
        checks.append((self.data_type, info.get(self.data_type).storage))
        for what, path in checks:
            # LAVIS's VQA eval sets treat a missing answer list as "no answer list".
            if not os.path.exists(path) and not str(path).endswith("answer_list.json"):
                raise FileNotFoundError(
                    f"dataset {name!r}: {what} file not found: {path}" + (f" ({hint})" if hint else ""))


@registry.register_builder("toy_caption")
class ToyCaptionBuilder(LocalFilesBuilder):
    """Toy-world captions: LAVIS caption json + COCO-format ground truth for val/test."""

    train_dataset_cls = COCOCapDataset
    eval_dataset_cls = COCOCapEvalDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/toy/caption.yaml"}


@registry.register_builder("toy_vqa")
class ToyVQABuilder(LocalFilesBuilder):
    """Toy-world VQA in the VQAv2 layout (10 answers, official question/annotation files)."""

    train_dataset_cls = COCOVQADataset
    eval_dataset_cls = COCOVQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/toy/vqa.yaml"}

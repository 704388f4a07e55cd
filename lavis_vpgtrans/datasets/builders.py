"""Dataset builders for files already on disk.

LAVIS's builders download annotations into `cache_root` (which defaults to /export/...).
Ours never download: every path in `build_info` is resolved once, at construction, against
  - "<scheme>:<path>" -> the scheme's resolver (common/paths.py; "toy:" is the offline toy zoo),
  - an absolute path -> itself,
  - a relative path -> `data_root` from the dataset config if set, else `run.data_root` (a
    relative data_root from the working directory), else LAVIS's cache_root,
and a missing file is an error naming the dataset, split, path and what produces it.

Builders of other packages (the toy world's toy_caption / toy_vqa) are registered when a
config names them: `register_builder_plugins`.
"""

import os
from importlib.metadata import entry_points

from lavis.common.dist_utils import get_rank
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from omegaconf import ListConfig

from lavis_vpgtrans.common.paths import PACKAGE_ROOT, resolve_path
from lavis_vpgtrans.datasets.checked import CaptionDataset, CheckedSamples, ImageTextDataset

BUILDER_ENTRY_POINTS = "lavis_vpgtrans.builders"


def register_builder_plugins(names) -> None:
    """Imports the builders that installed packages declare under the entry-point group
    `lavis_vpgtrans.builders` for those of `names` LAVIS's registry does not hold yet. Called
    with a config's dataset names before LAVIS parses it (it looks each builder up)."""
    missing = set(names) - set(registry.mapping["builder_name_mapping"])
    for ep in entry_points(group=BUILDER_ENTRY_POINTS):
        if ep.name in missing:
            ep.load()


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

    @staticmethod
    def _run_cfg():
        """The run section of the configuration being run, if any."""
        configuration = registry.get("configuration", no_warning=True)
        return getattr(configuration, "run_cfg", None) if configuration is not None else None

    def _root(self) -> str:
        """The dataset's data_root, else the run's `run.data_root` (a relative one from the working
        directory), else LAVIS's cache_root."""
        root = self.config.get("data_root", None)
        if not root:
            run_cfg = self._run_cfg()
            root = run_cfg.get("data_root", None) if run_cfg is not None else None
        # absolute: LAVIS would take a relative path from its cache_root
        return os.path.abspath(os.path.expanduser(resolve_path(root))) if root else registry.get_path("cache_root")

    def build(self):
        """LAVIS's build; the training split skips and counts unreadable images where
        `run.skip_bad_samples` is set (off by default: a bad image is an error)."""
        datasets = super().build()
        run_cfg = self._run_cfg()
        skip = bool(run_cfg.get("skip_bad_samples", False)) if run_cfg is not None else False
        if isinstance(datasets.get("train", None), CheckedSamples):
            datasets["train"].skip_bad_samples = skip
        return datasets

    def resolve_path(self, path: str) -> str:
        path = resolve_path(os.path.expanduser(str(path)))
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


@registry.register_builder("vpgtrans_coco_caption_train")
class COCOCaptionTrainBuilder(LocalFilesBuilder):
    """COCO captions, Karpathy train split only (evaluation splits: vpgtrans_coco_caption)."""

    train_dataset_cls = CaptionDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/coco_caption_train/defaults.yaml"}


@registry.register_builder("vpgtrans_sbu_caption")
class SBUCaptionBuilder(LocalFilesBuilder):
    """SBU captions (LAVIS's sbu.json + images), training only: the paper's stage-1 data."""

    train_dataset_cls = ImageTextDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/sbu_caption/defaults.yaml"}


@registry.register_builder("vpgtrans_vg_caption")
class VGCaptionBuilder(LocalFilesBuilder):
    """Visual Genome region captions (LAVIS's vg_caption.json + images), training only."""

    train_dataset_cls = ImageTextDataset
    DATASET_CONFIG_DICT = {"default": "datasets/configs/vg_caption/defaults.yaml"}


def caption_shard_pipeline(urls, vis_processor, text_processor, caption_key="caption",
                           shuffle_buffer=1000, seed=0):
    """An endless stream of {"image", "text_input"} from image-caption webdataset shards
    (jpg + json): shards resampled with replacement and samples shuffled in a buffer, both
    seeded (per rank, so ranks read different shards). Undecodable samples are skipped with
    a warning, as web-scale data has some."""
    import webdataset as wds

    def to_sample(pair):
        image, meta = pair
        if caption_key not in meta:
            raise KeyError(f"webdataset sample has no {caption_key!r} in its json (keys: {sorted(meta)})")
        return {"image": vis_processor(image), "text_input": text_processor(meta[caption_key])}

    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle_buffer, seed=seed),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.to_tuple("jpg", "json", handler=wds.warn_and_continue),
        wds.map(to_sample, handler=wds.warn_and_continue),
    )


@registry.register_builder("laion_coco")
class LaionCocoBuilder(LocalFilesBuilder):
    """LAION-COCO (or any image-caption webdataset) as a training stream.

    `build_info.storage` is a brace pattern of tar shards (absolute, relative to `data_root`,
    or toy:); only a train split. A stream has no length: train with the iteration-based
    settings (run.iters_per_inner_epoch, run.max_iters), usually in a mixture by
    run.train_dataset_ratios.
    """

    DATASET_CONFIG_DICT = {"default": "datasets/configs/laion_coco/defaults.yaml"}

    def _resolve_paths(self):
        self.config.build_info.storage = self.resolve_path(self.config.build_info.storage)

    def shard_urls(self):
        import braceexpand

        return list(braceexpand.braceexpand(self.config.build_info.storage))

    def _download_data(self):
        missing = [u for u in self.shard_urls() if not os.path.isfile(u)]
        if missing:
            hint = self.config.build_info.get("how_to_get", None)
            raise FileNotFoundError(
                f"dataset 'laion_coco': {len(missing)} shard(s) not found, e.g. {missing[0]}"
                + (f" ({hint})" if hint else ""))

    def build(self):
        self.build_processors()
        info = self.config.build_info
        return {"train": caption_shard_pipeline(
            self.shard_urls(), self.vis_processors["train"], self.text_processors["train"],
            caption_key=info.get("caption_key", "caption"),
            shuffle_buffer=int(info.get("shuffle_buffer", 1000)),
            seed=int(info.get("seed", 0)) + get_rank())}

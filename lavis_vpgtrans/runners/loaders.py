"""The data loaders of PortableRunner (runner_base.py): LAVIS's, with its CUDA-only parts made
conditional, seeded training samplers, and `run.train_dataset_ratios` (LAVIS 1.0.2's RunnerIter
raises NameError on it), in iteration- and epoch-based runs. An evaluation split that is a stream
(webdataset shards) gets a re-iterable DataLoader: LAVIS's one-shot `iter(DataLoader)`, right
for an endless training stream, would be empty at the second validation."""

import functools

import webdataset as wds
from lavis.common.dist_utils import get_rank, get_world_size
from lavis.datasets.data_utils import concat_datasets, reorg_datasets_by_split
from lavis.datasets.datasets.dataloader_utils import IterLoader, MultiIterLoader, PrefetchLoader
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data.dataset import ChainDataset, IterableDataset


def _without_skipped(collate, samples):
    return collate([s for s in samples if s is not None])


def _dropping_skipped(collate):
    """A collate function that drops the samples a dataset skipped (None, run.skip_bad_samples),
    also where LAVIS's ConcatDataset.collater (several training sets) would fail on them."""
    return None if collate is None else functools.partial(_without_skipped, collate)


class EpochMixture(MultiIterLoader):
    """A ratio mixture in an epoch-based run: an epoch is as many batches as the training sets
    hold together on this process (a pass over each, had they been concatenated), each batch
    drawn from one set by the ratios."""

    def __init__(self, loaders, ratios, names):
        super().__init__(loaders=loaders, ratios=ratios)
        for name, loader in zip(names, loaders):
            if not hasattr(loader, "__len__"):
                raise ValueError(f"run.train_dataset_ratios in an epoch-based run: the training set {name!r} is a "
                                 f"stream without a length; set run.iters_per_inner_epoch and run.max_iters "
                                 f"(iteration-based)")
        self.batches = sum(len(loader) for loader in loaders)

    def __len__(self):
        return self.batches


class Loaders:
    """A mixin over LAVIS's RunnerBase; `_train_samplers` collects the training samplers, whose
    epoch the runner sets."""

    @property
    def dataloaders(self) -> dict:
        """As LAVIS: datasets grouped by split, the training sets concatenated (map-style) or
        chained (webdataset) -- or, with `run.train_dataset_ratios` {name: ratio}, sampled
        from by those ratios."""
        if self._dataloaders is None:
            ratios = self.config.run_cfg.get("train_dataset_ratios", None)
            train_ratios = None
            if ratios is not None:
                names = [n for n, splits in self.datasets.items() if "train" in splits]
                missing, unexpected = set(ratios) - set(names), set(names) - set(ratios)
                if missing or unexpected:
                    raise ValueError(f"run.train_dataset_ratios {dict(ratios)} must name exactly the "
                                     f"training datasets {names}")
                train_ratios = [float(ratios[n]) for n in names]
            by_split = reorg_datasets_by_split(self.datasets)
            train_list = by_split.pop("train", None) if ratios is not None else None
            self.datasets = concat_datasets(by_split)
            if train_list is not None:
                self.datasets["train"] = train_list if len(train_list) > 1 else train_list[0]

            split_names = sorted(self.datasets)
            datasets = [self.datasets[s] for s in split_names]
            collate_fns = [[_dropping_skipped(getattr(d, "collater", None)) for d in ds] if isinstance(ds, (list, tuple))
                           else _dropping_skipped(getattr(ds, "collater", None)) for ds in datasets]
            loaders = self.create_loaders(
                datasets=datasets, num_workers=self.config.run_cfg.num_workers,
                batch_sizes=[self.config.run_cfg.batch_size_train if s == "train"
                             else self.config.run_cfg.batch_size_eval for s in split_names],
                is_trains=[s in self.train_splits for s in split_names],
                collate_fns=collate_fns, dataset_ratios=train_ratios)
            if train_list is not None and len(train_list) > 1 and not self.infinite_train_loader:
                mixture = loaders[split_names.index("train")]
                loaders[split_names.index("train")] = EpochMixture(mixture.loaders, train_ratios, names)
            self._dataloaders = dict(zip(split_names, loaders))
        return self._dataloaders

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns,
                       dataset_ratios=None):
        """LAVIS's loader construction, except: the CUDA prefetcher only on CUDA; training
        samplers are seeded DistributedSamplers (also for one process) whose epoch the runner
        sets, so the data order is a function of (seed, epoch); a single map-style training
        set is iterated afresh each epoch (LAVIS's IterLoader only for mixtures, which
        sample from several loaders)."""
        def _create_loader(dataset, bsz, is_train, collate_fn, infinite):
            if not is_train and isinstance(dataset, IterableDataset):
                # an evaluation stream (shard_stream.ShardEvalSet): the DataLoader itself, so each
                # validation iterates it afresh (one ordered pass); the stream splits its samples
                # between ranks as a DistributedSampler would, or not (use_dist_eval_sampler off)
                if hasattr(dataset, "split_across_ranks"):
                    dataset.split_across_ranks = bool(self.use_distributed and self.use_dist_eval_sampler)
                loader = DataLoader(dataset, batch_size=bsz, num_workers=num_workers, pin_memory=self.cuda_enabled,
                                    collate_fn=collate_fn)
                return PrefetchLoader(loader) if self.cuda_enabled else loader
            if isinstance(dataset, (ChainDataset, wds.DataPipeline)):
                # webdataset pipelines shard, shuffle and collate themselves
                return iter(DataLoader(dataset, batch_size=bsz, num_workers=num_workers,
                                       pin_memory=self.cuda_enabled))
            sampler = None
            if is_train:
                sampler = DistributedSampler(dataset, shuffle=True, num_replicas=get_world_size(),
                                             rank=get_rank(), seed=int(self.config.run_cfg.seed))
                self._train_samplers.append(sampler)
            elif self.use_distributed and self.use_dist_eval_sampler:
                sampler = DistributedSampler(dataset, shuffle=False, num_replicas=get_world_size(),
                                             rank=get_rank())
            loader = DataLoader(dataset, batch_size=bsz, num_workers=num_workers,
                                pin_memory=self.cuda_enabled, sampler=sampler, collate_fn=collate_fn,
                                drop_last=is_train)
            if self.cuda_enabled:
                loader = PrefetchLoader(loader)
            if is_train and infinite:
                loader = IterLoader(loader, use_distributed=True)  # True: it calls set_epoch
            return loader

        loaders = []
        for dataset, bsz, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):
                loaders.append(MultiIterLoader(
                    loaders=[_create_loader(d, bsz, is_train, collate_fn[i], infinite=True)
                             for i, d in enumerate(dataset)],
                    ratios=dataset_ratios))
            else:
                loaders.append(_create_loader(dataset, bsz, is_train, collate_fn,
                                              infinite=self.infinite_train_loader))
        return loaders

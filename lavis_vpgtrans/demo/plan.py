"""What the demo runs: each step as a `train.py` or converter-CLI command with its
dependencies, outputs and length (in epochs, for the progress bars)."""

import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from lavis_vpgtrans.toy.zoo import LM_TEXT_NAME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "projects", "vpgtrans", "demo", "experiment")
TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
JOB_ID = "run"  # LAVIS writes <output_dir>/<job_id>/; one fixed name keeps the layout predictable
CAPTION = "toy_caption"  # the runner names the primary benchmark after its dataset
VQA = "toy_vqa"  # the extra_validation entry of source.yaml
METRICS = {CAPTION: "CIDEr", VQA: "agg_metrics"}


@dataclass(frozen=True)
class Run:
    """One training run of the experiment."""

    name: str  # directory name
    label: str  # row name in tables and plots
    config: str  # file in CONFIG_DIR


SOURCE = Run("source", "source (opt-small)", "source.yaml")
TFS = Run("tfs", "TFS", "tfs.yaml")
INHERIT = Run("vpg_inherit", "VPG inherit", "vpg_inherit.yaml")
VPGTRANS = Run("vpgtrans", "VPGTrans", "vpgtrans.yaml")
NO_CONVERTER = Run("vpgtrans_no_converter", "VPGTrans w/o converter init", "vpgtrans_no_converter.yaml")
CROSS_TFS = Run("cross_tfs", "TFS (LLaMA)", "cross_tfs.yaml")
CROSS_VPGTRANS = Run("cross_vpgtrans", "VPGTrans opt-small->LLaMA", "cross_vpgtrans.yaml")
CROSS_NO_CONVERTER = Run("cross_vpgtrans_no_converter", "VPGTrans opt-small->LLaMA w/o converter init",
                         "cross_vpgtrans_no_converter.yaml")
STAGE1 = Run("qformer_stage1", "BLIP-2 stage-1 Q-Former", "qformer_stage1.yaml")
# the warm-up table (paper Table 2): projector-only epochs from the two initialisations
WARMUP_CONVERTER = Run("warmup_converter", "converter init", "warmup.yaml")
WARMUP_RANDOM = Run("warmup_random", "random init", "warmup_no_converter.yaml")
# the warm-up's lr (paper: 5x reaches in 1 epoch what 1x reaches in 3; 10x adds nothing): the
# converter-initialised warm-up at other multiples of the lr (WARMUP_CONVERTER is 5x)
WARMUP_LR_SCALES = (1, 5, 10)
WARMUP_DEFAULT_SCALE = 5  # warmup.yaml's run.warmup_lr_scale


def warmup_lr_run(scale: int) -> Run:
    if scale == WARMUP_DEFAULT_SCALE:
        return WARMUP_CONVERTER
    return Run(f"warmup_converter_lr{scale}x", f"converter init, {scale}x lr", WARMUP_CONVERTER.config)


@dataclass
class Job:
    key: str  # unique within a plan, e.g. "seed0/tfs"
    label: str
    argv: List[str]
    out_dir: str  # the run's output_dir, or the converter's output directory
    epochs: int  # progress units (a converter counts as one)
    deps: Tuple[str, ...] = ()
    validates: bool = True  # writes metrics.jsonl every epoch
    product: Optional[str] = None  # the file later jobs read
    run: Optional[Run] = None
    extra: Dict = field(default_factory=dict)

    @property
    def job_dir(self) -> str:
        return os.path.join(self.out_dir, JOB_ID)

    @property
    def log(self) -> str:
        return os.path.join(self.out_dir, "stdout.log")


def train_job(key: str, run: Run, out_dir: str, seed: int, epochs: int, options: Sequence[str] = (),
              deps: Sequence[str] = (), validates: bool = True, config_dir: str = CONFIG_DIR) -> Job:
    """`python train.py --cfg-path <run's config> --options ...` writing into out_dir/run/
    (the config is `run.config` in `config_dir`: the P-Former demo has its own)."""
    if not os.path.isfile(TRAIN_PY):
        raise FileNotFoundError(f"the demo runs {TRAIN_PY}, which is missing: run it from a checkout of the repository")
    argv = [sys.executable, TRAIN_PY, "--cfg-path", os.path.join(config_dir, run.config), "--options",
            f"run.output_dir={out_dir}", f"run.job_id={JOB_ID}", f"run.seed={seed}", f"run.max_epoch={epochs}",
            *options]
    product = os.path.join(out_dir, JOB_ID, "checkpoint_best.pth" if validates else f"checkpoint_{epochs - 1}.pth")
    return Job(key=key, label=run.label, argv=argv, out_dir=out_dir, epochs=epochs, deps=tuple(deps),
               validates=validates, product=product, run=run)


def converter_job(key: str, label: str, zoo_dir: str, src: str, tgt: str, tgt_arch: str, projector: str,
                  out_dir: str, seed: int, deps: Sequence[str]) -> Job:
    """`python -m lavis_vpgtrans.transfer.converter`: the word-embedding converter from the
    source LLM to the target, merged with the source projector."""
    out_dir = os.path.join(out_dir, f"{src}_to_{tgt}")  # its own directory: its own stdout.log
    out = os.path.join(out_dir, "projector.pth")
    argv = [sys.executable, "-m", "lavis_vpgtrans.transfer.converter",
            "--src", os.path.join(zoo_dir, src), "--tgt", os.path.join(zoo_dir, tgt),
            "--projector", projector, "--src-arch", "blip2_opt_transfer", "--tgt-arch", tgt_arch,
            "--out", out, "--seed", str(seed),
            # quality also on the tokens the LMs' pre-training text contains
            "--quality-text", os.path.join(zoo_dir, "data", LM_TEXT_NAME)]
    return Job(key=key, label=label, argv=argv, out_dir=out_dir, epochs=1, deps=tuple(deps), validates=False,
               product=out, extra={"src": src, "tgt": tgt})


def stage1_job(world_dir: str, epochs: int, seed: int = 0) -> Job:
    """BLIP-2 stage 1 on the toy world (the Q-Former train-from-scratch starts from)."""
    return train_job("world/qformer_stage1", STAGE1, os.path.join(world_dir, STAGE1.name), seed, epochs,
                     validates=False)


def stage1_stamp(zoo_stamp: str, epochs: int) -> str:
    """What the cached stage-1 Q-Former depends on: the zoo (its stamp names the profile and a
    digest of its settings), the run config and the model config it reads, the epochs."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    config_path = os.path.join(CONFIG_DIR, STAGE1.config)
    model_cfg = OmegaConf.load(config_path).model
    model_yaml = registry.get_model_class(model_cfg.arch).default_config_path(model_cfg.model_type)
    digest = hashlib.sha256()
    for path in (config_path, model_yaml):
        with open(path, "rb") as f:
            digest.update(f.read())
    return f"zoo={zoo_stamp} configs={digest.hexdigest()[:16]} epochs={epochs}"


@dataclass
class SeedPlan:
    seed: int
    root: str
    jobs: Dict[str, Job]  # by key, in dependency order


# One source model for every seed, as the paper transfers from one BLIP-2: a fixed seed, so
# that runs with different --seeds transfer from the same source.
SOURCE_SEED = 0


def source_job(out_dir: str, stage1_checkpoint: str, source_epochs: int) -> Job:
    """The source VL model (source.yaml: its own, larger training split), from the stage-1 Q-Former."""
    return train_job(SOURCE.name, SOURCE, os.path.join(out_dir, SOURCE.name), SOURCE_SEED, source_epochs,
                     [f"model.vpg_checkpoint={stage1_checkpoint}"])


def seed_plan(seed: int, out_dir: str, zoo_dir: str, stage1_checkpoint: str, epochs: int, source: Job,
              cross_family: bool = True, warmup_epochs: int = 0) -> SeedPlan:
    """The runs of one seed: the train-from-scratch baselines (they need only the stage-1
    Q-Former), the converters (they need the shared `source`'s projector), then the
    transfers, and with `warmup_epochs` > 0 the warm-up table's projector-only runs. The
    plan lists `source` among its jobs (one job, whichever seeds list it)."""
    root = os.path.join(out_dir, f"seed{seed}")
    key = lambda name: f"seed{seed}/{name}"  # noqa: E731
    run_dir = lambda run: os.path.join(root, run.name)  # noqa: E731

    def train(run, n_epochs, options=(), deps=()):
        return train_job(key(run.name), run, run_dir(run), seed, n_epochs, options, deps)

    stage1 = [f"model.vpg_checkpoint={stage1_checkpoint}"]
    first = [source, train(TFS, epochs, stage1)]
    if cross_family:
        first.append(train(CROSS_TFS, epochs, stage1))

    conv_dir = os.path.join(root, "converter")
    converters = [converter_job(key("convert_opt-large"), "converter opt-small -> opt-large", zoo_dir,
                                "opt-small", "opt-large", "blip2_opt_transfer", source.product, conv_dir, seed,
                                deps=[source.key])]
    if cross_family:
        converters.append(converter_job(key("convert_llama"), "converter opt-small -> LLaMA", zoo_dir,
                                        "opt-small", "llama", "blip2_llama", source.product, conv_dir, seed,
                                        deps=[source.key]))

    inherit_vpg = [f"model.vpg_checkpoint={source.product}"]
    to_large = converters[0]
    transfers = [
        train(VPGTRANS, epochs, inherit_vpg + [f"model.projector_checkpoint={to_large.product}"],
              deps=[source.key, to_large.key]),
        train(INHERIT, epochs, inherit_vpg, deps=[source.key]),
        train(NO_CONVERTER, epochs, inherit_vpg, deps=[source.key]),
    ]
    if cross_family:
        to_llama = converters[1]
        transfers += [train(CROSS_VPGTRANS, epochs, inherit_vpg + [f"model.projector_checkpoint={to_llama.product}"],
                            deps=[source.key, to_llama.key]),
                      train(CROSS_NO_CONVERTER, epochs, inherit_vpg, deps=[source.key])]
    if warmup_epochs > 0:
        only_stage1 = [f"run.warmup_epochs={warmup_epochs}"]
        transfers += [
            train(WARMUP_CONVERTER, warmup_epochs,
                  inherit_vpg + only_stage1 + [f"model.projector_checkpoint={to_large.product}"],
                  deps=[source.key, to_large.key]),
            train(WARMUP_RANDOM, warmup_epochs, inherit_vpg + only_stage1, deps=[source.key]),
        ]
        transfers += [train(warmup_lr_run(scale), warmup_epochs,
                            inherit_vpg + only_stage1 + [f"run.warmup_lr_scale={scale}",
                                                         f"model.projector_checkpoint={to_large.product}"],
                            deps=[source.key, to_large.key])
                      for scale in WARMUP_LR_SCALES if scale != WARMUP_DEFAULT_SCALE]
    return SeedPlan(seed=seed, root=root, jobs={job.key: job for job in first + converters + transfers})

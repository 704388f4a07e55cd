"""The recipe configs: they load (with their bases), name registered parts, and say what
the paper says."""

import argparse
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "projects", "vpgtrans", "*.yaml"))
                 + glob.glob(os.path.join(REPO, "projects", "vpgtrans", "baselines", "*.yaml"))
                 + glob.glob(os.path.join(REPO, "projects", "vpgtrans", "scale_up", "*.yaml")))
GPUS = 8  # the paper's effective batches assume 8 GPUs


def load(path):
    from lavis_vpgtrans.common.config import PluginConfig

    return PluginConfig(argparse.Namespace(cfg_path=path, options=["run.data_root=DATA"]))


def strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def trains(dataset_cfg):
    """A dataset with a train split: annotation files, or a shard stream (train only)."""
    info = dataset_cfg.build_info
    return "train" in (info.get("annotations", None) or {}) or "storage" in info


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, REPO) for p in RECIPES])
def test_recipe_config_loads_and_names_registered_parts(plugin, path):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cfg = load(path)
    run = cfg.run_cfg
    assert registry.get_runner_class(run.runner) is not None
    assert registry.get_task_class(run.task) is not None
    assert registry.get_model_class(cfg.model_cfg.arch) is not None
    for name in cfg.datasets_cfg:
        assert registry.get_builder_class(name) is not None, name
    for entry in run.get("extra_validation", None) or []:
        assert os.path.isfile(os.path.join(REPO, entry.cfg_path)), entry.cfg_path
    ratios = run.get("train_dataset_ratios", None)
    if ratios is not None:
        assert set(ratios) == {n for n, d in cfg.datasets_cfg.items() if trains(d)}
        assert run.max_iters % run.iters_per_inner_epoch == 0
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert not [s for s in strings(raw) if s.startswith(("/", "~"))], "absolute paths in a config"


def test_stage1_is_the_papers_projector_warmup(plugin):
    run = load(os.path.join(REPO, "projects", "vpgtrans", "stage1.yaml")).run_cfg
    assert run.runner == "runner_vpgtrans"
    assert run.warmup_epochs == 1 == run.max_epoch
    assert run.warmup_lr_scale == 5 and float(run.init_lr) == 1e-4


def test_stage2_continues_from_stage1_on_the_papers_mixture(plugin):
    cfg = load(os.path.join(REPO, "projects", "vpgtrans", "stage2.yaml"))
    run = cfg.run_cfg
    assert run.warmup_epochs == 0
    assert dict(run.train_dataset_ratios) == {"vpgtrans_coco_caption_train": 0.1, "vpgtrans_vg_caption": 0.2,
                                              "laion_coco": 0.7}
    assert cfg.model_cfg.train_vpg
    # the stage-1 run's checkpoint, where stage1.yaml's run writes it (the analysis then counts
    # this run's epochs after the warm-up)
    stage1 = load(os.path.join(REPO, "projects", "vpgtrans", "stage1.yaml")).run_cfg
    assert cfg.model_cfg.projector_checkpoint == f"{stage1.output_dir}/{stage1.job_id}/checkpoint_0.pth"
    assert (float(run.init_lr), float(run.min_lr)) == (1e-4, 5e-5)


@pytest.mark.parametrize("path", [p for p in RECIPES if "explore" not in p])
def test_effective_batch_is_the_papers(plugin, path):
    cfg = load(path)
    run = cfg.run_cfg
    effective = run.batch_size_train * run.get("accum_grad_iters", 1) * GPUS
    if "stage3" in os.path.basename(path):  # VL-Vicuna instruction tuning (MiniGPT-4's batch)
        assert effective == 120
    else:
        assert effective == (1152 if cfg.model_cfg.arch == "blip2_t5_transfer" else 1728)


def test_baselines_differ_from_vpgtrans_only_where_the_paper_says(plugin):
    base = os.path.join(REPO, "projects", "vpgtrans")
    vpgtrans = load(os.path.join(base, "vpgtrans.yaml"))
    tfs = load(os.path.join(base, "baselines", "tfs.yaml"))
    inherit = load(os.path.join(base, "baselines", "vpg_inherit.yaml"))
    linear = load(os.path.join(base, "baselines", "only_linear.yaml"))
    no_conv = load(os.path.join(base, "baselines", "vpgtrans_no_converter.yaml"))

    assert vpgtrans.run_cfg.warmup_epochs == 1 and vpgtrans.model_cfg.projector_checkpoint
    assert tfs.run_cfg.warmup_epochs == 0 and tfs.model_cfg.projector_checkpoint is None
    assert tfs.model_cfg.vpg_checkpoint.endswith("blip2_pretrained_vitL.pth")  # BLIP-2 stage-1 Q-Former
    assert inherit.run_cfg.warmup_epochs == 0 and inherit.model_cfg.projector_checkpoint is None
    assert inherit.model_cfg.vpg_checkpoint == vpgtrans.model_cfg.vpg_checkpoint
    assert linear.model_cfg.train_vpg is False and linear.run_cfg.runner == "runner_vpgtrans_base"
    assert no_conv.run_cfg.warmup_epochs == 1 and no_conv.model_cfg.projector_checkpoint is None
    job_dirs = {job_dir(cfg) for cfg in (vpgtrans, tfs, inherit, linear, no_conv)}
    assert len(job_dirs) == 5
    for cfg in (tfs, inherit, linear, no_conv):
        assert cfg.run_cfg.max_epoch == vpgtrans.run_cfg.max_epoch


def job_dir(cfg):
    return f"{cfg.run_cfg.output_dir}/{cfg.run_cfg.job_id}"


PFORMER = sorted(glob.glob(os.path.join(REPO, "projects", "pformer", "*.yaml")))


def test_checkpoint_paths_are_where_the_recipes_write_them(plugin):
    """Every recipe has a fixed job_id, so the checkpoint paths one config reads from another's
    run are known: <output_dir>/<job_id>/checkpoint_*.pth."""
    configs = {path: load(path) for path in RECIPES + PFORMER}
    for path, cfg in configs.items():
        assert cfg.run_cfg.get("job_id"), f"{path}: no run.job_id (the run would land in a timestamped dir)"
    written = {job_dir(cfg) for cfg in configs.values()}
    written.add("output/vpgtrans/explore/source_opt125m")  # explore.sh: tfs.yaml with run.job_id=source_opt125m
    read = 0
    for path, cfg in configs.items():
        for key in ("vpg_checkpoint", "projector_checkpoint", "finetuned", "pformer_checkpoint"):
            value = cfg.model_cfg.get(key, None)
            if isinstance(value, str) and value.startswith("output/"):
                read += 1
                if value.startswith("output/vpgtrans/converter/"):  # the converter's --out in run_scripts/vpgtrans
                    continue
                assert os.path.dirname(value) in written, f"{path}: model.{key}={value} is no recipe's job dir"
                assert os.path.basename(value).startswith("checkpoint_"), value
    assert read >= 10


def test_base_config_chain_and_missing_base(tmp_path):
    from lavis_vpgtrans.common.config import load_config

    (tmp_path / "a.yaml").write_text("run: {x: 1, y: 2}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nrun: {y: 3}\n")
    cfg = load_config(str(tmp_path / "sub" / "b.yaml"))
    assert (cfg.run.x, cfg.run.y) == (1, 3) and "base" not in cfg
    (tmp_path / "c.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "c.yaml"))

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
    assert run.warmup_epochs == 0 and run.completed_warmup
    assert dict(run.train_dataset_ratios) == {"vpgtrans_coco_caption_train": 0.1, "vpgtrans_vg_caption": 0.2,
                                              "laion_coco": 0.7}
    assert cfg.model_cfg.train_vpg
    assert cfg.model_cfg.projector_checkpoint.endswith("stage1/checkpoint_0.pth")
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
    for cfg in (tfs, inherit, linear, no_conv):
        assert cfg.run_cfg.max_epoch == vpgtrans.run_cfg.max_epoch
        assert cfg.run_cfg.output_dir != vpgtrans.run_cfg.output_dir


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

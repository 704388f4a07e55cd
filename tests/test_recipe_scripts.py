"""The documented recipe scripts run as written, in miniature (VPGTRANS_MINIATURE=1: toy models,
a toy data root in the real layout, tiny runs): run_scripts/vpgtrans/explore.sh (source model,
converter, VPGTrans, the baselines, the speed-up analysis) and opt2.7b_to_opt6.7b.sh (converter,
stage 1, stage 2), each handing the next step the paths its configs document. The other transfer
scripts run the same _transfer.sh: for each of them, the paths their configs hand each other
and their miniature options are checked here without running them."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the scripts use; the scripts cd to their repo root and write output/ there
PARTS = ("lavis_vpgtrans", "projects", "run_scripts", "train.py")


def repo_in(tmp_path):
    """The repository's scripts, configs and code, in a directory whose output/ is the test's own."""
    root = tmp_path / "repo"
    root.mkdir()
    for part in PARTS:
        os.symlink(os.path.join(REPO, part), root / part)
    return root


def start(root, script, log):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "NPROC", "SOURCE_CKPT", "OPTIONS")}
    env.update(VPGTRANS_MINIATURE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.Popen(["bash", str(root / "run_scripts" / "vpgtrans" / script)], cwd=root.parent, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def finish(proc, log):
    proc.wait(timeout=1200)
    text = open(log).read()
    assert proc.returncode == 0, text[-6000:]
    return text


def metrics(job_dir):
    with open(job_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def transfer_scripts():
    """{name: its exported variables} of every transfer script (run_scripts/vpgtrans/*.sh but
    explore.sh), as the script's `export A=... B=...` lines set them."""
    folder = os.path.join(REPO, "run_scripts", "vpgtrans")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".sh") and not name.startswith("_") and name != "explore.sh":
            text = open(os.path.join(folder, name)).read()
            exports = " ".join(line[len("export "):] for line in text.splitlines() if line.startswith("export "))
            out[name[:-3]] = {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', exports)}
    return out


TRANSFERS = transfer_scripts()


def miniature_module(root):
    spec = importlib.util.spec_from_file_location("miniature", root / "run_scripts" / "vpgtrans" / "miniature.py")
    miniature = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(miniature)
    return miniature


@pytest.mark.parametrize("name", sorted(TRANSFERS))
def test_transfer_script_hands_each_stage_the_paths_the_previous_one_writes(name):
    from lavis_vpgtrans.common.config import load_config

    env = TRANSFERS[name]
    assert env["NAME"] == name  # _transfer.sh writes the converter's output to output/vpgtrans/converter/$NAME.pth
    stage1, stage2 = (load_config(os.path.join(REPO, env[key])) for key in ("STAGE1_CFG", "STAGE2_CFG"))
    assert stage1.model.projector_checkpoint == f"output/vpgtrans/converter/{name}.pth"
    assert stage2.model.projector_checkpoint == f"{stage1.run.output_dir}/{stage1.run.job_id}/checkpoint_0.pth"
    assert stage1.run.output_dir == stage2.run.output_dir == f"output/vpgtrans/{name}"
    assert stage1.model.arch == stage2.model.arch == env["TGT_ARCH"]
    # the miniature's stand-ins exist: zoo LLMs and toy model types of the same architecture
    miniature = miniature_module(pathlib.Path(REPO))
    zoo = os.environ["VPGTRANS_TOY_ZOO"]
    assert os.path.isdir(os.path.join(zoo, env["MINI_SRC_LLM"])) and os.path.isdir(os.path.join(zoo, env["MINI_TGT_LLM"]))
    for cfg in (env["STAGE1_CFG"], env["STAGE2_CFG"]):
        options = dict(o.split("=", 1) for o in miniature.options(os.path.join(REPO, cfg), []))
        assert options["model.model_type"].startswith("tiny_"), cfg


def test_explore_and_opt_transfer_scripts_in_miniature(tmp_path, toy_zoo):
    from lavis_vpgtrans.analysis.speedup import load_run

    root = repo_in(tmp_path)
    # what the scripts would build themselves, built here in a process that has the package
    # imported already: the toy data root both read, and the transfer's toy source (the
    # miniature's stand-in for the released BLIP-2 checkpoint, a download)
    miniature = miniature_module(root)
    assert miniature.write_data(str(root / "output" / "vpgtrans" / "miniature" / "data")) == toy_zoo
    name = "opt2.7b_to_opt6.7b"
    miniature.write_source(*TRANSFERS[name]["MINI_SOURCE"].split(),
                           str(root / "output" / "vpgtrans" / "miniature" / f"source_{name}.pth"))
    # the two scripts are independent: run side by side
    explore = start(root, "explore.sh", tmp_path / "explore.log")
    transfer = start(root, f"{name}.sh", tmp_path / "transfer.log")
    explore_log, transfer_log = finish(explore, tmp_path / "explore.log"), finish(transfer, tmp_path / "transfer.log")
    out = root / "output" / "vpgtrans"

    # explore.sh: every run in the job dir its config names, the source where vpgtrans.yaml reads it
    runs = out / "explore"
    for job in ("source_opt125m", "tfs", "vpgtrans", "vpg_inherit", "only_linear", "vpgtrans_no_converter"):
        assert (runs / job / "checkpoint_best.pth").is_file(), job
        benchmarks = {r["benchmark"] for r in metrics(runs / job)}
        assert benchmarks == {"vpgtrans_coco_caption", "nocaps", "vqav2", "gqa", "okvqa"}, job
    assert (out / "converter" / "opt125m_to_opt1.3b.pth").is_file()
    assert "VPG from output/vpgtrans/explore/source_opt125m/checkpoint_best.pth" in explore_log
    assert "projector from output/vpgtrans/converter/opt125m_to_opt1.3b.pth" in explore_log
    assert [r["stage"] for r in metrics(runs / "vpgtrans") if r["benchmark"] == "nocaps"] == [1, 2]
    # the analysis: printed tables, its files, and the epochs counted from the runs' configs
    assert "### Table 3: speed-up against training from scratch (TFS)" in explore_log
    assert "### Table 5: speed-up of VPGTrans against VPG inherit (VPG inherit)" in explore_log
    for row in ("| VPGTrans |", "| VPG inherit |", "| only_linear |", "| no_converter |"):
        assert row in explore_log, row
    summary = json.loads((runs / "analysis" / "speedup.json").read_text())
    assert summary["epoch_counting"]["VPGTrans"].startswith("epochs 0-0 are stage 1 = paper epoch 1")
    assert summary["epoch_counting"]["TFS"] == "epoch e = paper epoch e + 1"
    assert (runs / "analysis" / "speedup.md").is_file() and (runs / "analysis" / "convergence.png").is_file()

    # opt2.7b_to_opt6.7b.sh: converter -> stage 1 -> stage 2 through the configs' own paths
    pipeline = out / "opt2.7b_to_opt6.7b"
    assert (out / "converter" / "opt2.7b_to_opt6.7b.pth").is_file()
    assert "projector from output/vpgtrans/converter/opt2.7b_to_opt6.7b.pth" in transfer_log
    assert "projector from output/vpgtrans/opt2.7b_to_opt6.7b/stage1/checkpoint_0.pth" in transfer_log
    assert [(r["stage"], r["benchmark"]) for r in metrics(pipeline / "stage1")] == [(1, "vpgtrans_coco_caption")]
    assert (pipeline / "stage2" / "checkpoint_best.pth").is_file()
    # stage 2 follows the stage-1 run: its epochs are the paper's 2 and 3
    stage2 = load_run(str(pipeline / "stage2"))
    assert stage2.counting.startswith(f"stage 2 after the stage-1 run {pipeline / 'stage1'}")
    assert sorted({r.paper_epoch for r in stage2.records}) == [2, 3]


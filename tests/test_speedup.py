"""Speed-up tables (paper Table 3 / appendix Table 5) and convergence plots on hand-made
metrics.jsonl logs whose answers are known."""

import json
import os
import subprocess
import sys

import pytest

from lavis_vpgtrans.analysis import speedup as sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(scores, benchmark="coco_caption", warmup=(), metric="agg_metrics", split="val", extra=None):
    """Log lines of one benchmark: `warmup` = stage-1 scores (all paper epoch 1), then
    `scores` = stage-2 scores, one per epoch."""
    out = []
    for epoch, score in enumerate(warmup):
        out.append({"epoch": epoch, "paper_epoch": 1, "stage": 1, "benchmark": benchmark, "split": split,
                    "metrics": {metric: score, **(extra or {})}})
    first = 2 if warmup else 1
    for i, score in enumerate(scores):
        out.append({"epoch": len(warmup) + i, "paper_epoch": first + i, "stage": 2, "benchmark": benchmark,
                    "split": split, "metrics": {metric: score, **(extra or {})}})
    return out


def write_log(directory, lines):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "metrics.jsonl")
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def run_of(tmp_path, name, lines):
    return sp.load_run(os.path.dirname(write_log(str(tmp_path / name), lines)), name)


TFS_COCO = [0.10, 0.20, 0.30, 0.40, 0.45, 0.50, 0.48, 0.49]  # peak 0.5 at epoch 6


def test_normal_case_speedup_three(tmp_path):
    tfs = run_of(tmp_path, "TFS", records(TFS_COCO))
    # stage 1 = epoch 1 (0.3), first > 0.5 at paper epoch 2
    vt = run_of(tmp_path, "VPGTrans", records([0.51, 0.6, 0.62], warmup=[0.3]))
    table = sp.speedup_table(tfs, [vt])
    cell = table.cells[("VPGTrans", "coco_caption")]
    assert (cell.p, cell.e_baseline, cell.e_run) == (0.5, 6, 2)
    assert cell.speedup == pytest.approx(3.0)
    assert table.cell_text("VPGTrans", "coco_caption") == "3.0"
    assert sp.speedup(tfs.scores("coco_caption", "agg_metrics"), vt.scores("coco_caption", "agg_metrics")) == 3.0


def test_speedup_on_plain_scores_and_paper_format():
    # TFS best at epoch 10, VPGTrans beats it at 3: the paper prints 3.3
    assert sp.format_speedup(sp.speedup({e: e / 10 for e in range(1, 11)}, {1: 0.1, 2: 0.5, 3: 1.01})) == "3.3"
    assert sp.format_speedup(sp.speedup({1: 0.1, 2: 0.5, 3: 0.4}, {1: 0.2, 2: 0.3, 3: 0.3, 4: 0.45, 5: 0.6})) == "0.4"
    assert sp.format_speedup(None) == "-"


def test_tie_in_tfs_best_uses_first_epoch(tmp_path):
    tfs = run_of(tmp_path, "TFS", records([0.1, 0.3, 0.4, 0.5, 0.45, 0.5, 0.5]))  # 0.5 first at epoch 4
    vt = run_of(tmp_path, "VPGTrans", records([0.4, 0.55]))
    cell = sp.speedup_table(tfs, [vt]).cells[("VPGTrans", "coco_caption")]
    assert (cell.e_baseline, cell.e_run, cell.speedup) == (4, 2, 2.0)


def test_equal_to_best_is_not_better(tmp_path):
    tfs = run_of(tmp_path, "TFS", records(TFS_COCO))
    vt = run_of(tmp_path, "VPGTrans", records([0.5, 0.5, 0.49], warmup=[0.2]))
    table = sp.speedup_table(tfs, [vt])
    cell = table.cells[("VPGTrans", "coco_caption")]
    assert cell.e_run is None and cell.speedup is None
    assert table.cell_text("VPGTrans", "coco_caption") == "-"
    assert "| VPGTrans | - |" in sp.render_markdown([table])
    assert table.to_json()["rows"][0]["cells"]["coco_caption"]["speedup"] is None


def test_multi_epoch_stage1_uses_last_warmup_epoch(tmp_path):
    tfs = run_of(tmp_path, "TFS", records(TFS_COCO))
    # three warm-up epochs share paper epoch 1; the last (0.6) stands for it -> 6 / 1
    beats = run_of(tmp_path, "beats", records([0.7], warmup=[0.2, 0.4, 0.6]))
    # an early warm-up epoch beats p but the last one does not: paper epoch 1 does not count
    falls = run_of(tmp_path, "falls", records([0.45, 0.55], warmup=[0.6, 0.4]))
    assert beats.scores("coco_caption", "agg_metrics") == {1: 0.6, 2: 0.7}
    assert falls.scores("coco_caption", "agg_metrics") == {1: 0.4, 2: 0.45, 3: 0.55}
    table = sp.speedup_table(tfs, [beats, falls])
    assert table.cells[("beats", "coco_caption")].speedup == 6.0
    assert table.cells[("falls", "coco_caption")].e_run == 3
    assert table.cell_text("falls", "coco_caption") == "2.0"


def test_benchmark_missing_in_one_run_warns_and_is_left_out(tmp_path):
    tfs = run_of(tmp_path, "TFS", records(TFS_COCO) + records([40, 42, 41], benchmark="vqav2"))
    vt = run_of(tmp_path, "VPGTrans", records([0.3, 0.6], ) + records([41, 43], benchmark="gqa"))
    with pytest.warns(sp.MissingBenchmarkWarning) as caught:
        table = sp.speedup_table(tfs, [vt])
    messages = " ".join(str(w.message) for w in caught)
    assert "'vqav2'" in messages and "'gqa'" in messages
    assert table.benchmarks == ["coco_caption"]
    assert table.cells[("VPGTrans", "coco_caption")].speedup == 3.0


def test_job_subdirectory_layout(tmp_path):
    write_log(str(tmp_path / "tfs" / "20240101123"), records(TFS_COCO))
    run = sp.load_run(str(tmp_path / "tfs"), "TFS")
    assert run.path == str(tmp_path / "tfs" / "20240101123" / "metrics.jsonl")
    assert run.scores("coco_caption", "agg_metrics")[6] == 0.5

    write_log(str(tmp_path / "two" / "job_a"), records([0.1]))
    write_log(str(tmp_path / "two" / "job_b"), records([0.2]))
    with pytest.raises(sp.LogError, match="several job subdirectories"):
        sp.load_run(str(tmp_path / "two"))
    (tmp_path / "empty" / "job").mkdir(parents=True)
    with pytest.raises(sp.LogError, match="no metrics.jsonl"):
        sp.load_run(str(tmp_path / "empty"))


@pytest.mark.parametrize("bad_line, message", [
    ('{"epoch": 2, "paper_epoch": ', "not valid JSON"),
    ({"epoch": 2, "stage": 2, "benchmark": "coco_caption", "metrics": {"agg_metrics": 0.3}}, "'paper_epoch'"),
    ({"epoch": 2, "paper_epoch": 0, "stage": 2, "benchmark": "coco_caption", "metrics": {"agg_metrics": 0.3}},
     "integer >= 1"),
    ({"epoch": 2, "paper_epoch": 1, "stage": 2, "benchmark": "coco_caption", "metrics": {"agg_metrics": 0.3}},
     "must not decrease"),
    ({"epoch": 2, "paper_epoch": 2, "stage": 2, "benchmark": "coco_caption", "metrics": {"agg_metrics": 0.3}},
     "share paper_epoch 2"),
    ({"epoch": 2, "paper_epoch": 3, "stage": 2, "benchmark": "coco_caption", "metrics": {"agg_metrics": "x"}},
     "finite number"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_log(str(tmp_path / "run"), records([0.1, 0.2]) + [bad_line])
    with pytest.raises(sp.LogError) as err:
        sp.load_run(str(tmp_path / "run"))
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_metric_override_changes_the_answer(tmp_path):
    # agg_metrics says VPGTrans wins at epoch 2 (6 / 2); CIDEr says it never beats TFS's 1.0
    tfs = run_of(tmp_path, "TFS", [dict(r, metrics={"agg_metrics": s, "CIDEr": 1.0 if e == 3 else 0.5})
                                   for e, (r, s) in enumerate(zip(records(TFS_COCO), TFS_COCO), start=1)])
    vt = run_of(tmp_path, "VPGTrans", [dict(r, metrics={"agg_metrics": s, "CIDEr": 0.9})
                                        for r, s in zip(records([0.3, 0.6]), [0.3, 0.6])])
    assert sp.speedup_table(tfs, [vt]).cells[("VPGTrans", "coco_caption")].speedup == 3.0
    cell = sp.speedup_table(tfs, [vt], {"coco_caption": "CIDEr"}).cells[("VPGTrans", "coco_caption")]
    assert (cell.metric, cell.p, cell.e_baseline, cell.speedup) == ("CIDEr", 1.0, 3, None)
    with pytest.raises(sp.LogError, match=r"TFS/metrics.jsonl:1: metric 'SPICE' not in the coco_caption"):
        sp.speedup_table(tfs, [vt], {"coco_caption": "SPICE"})


def test_plot_draws_every_run_in_every_panel(tmp_path):
    tfs = run_of(tmp_path, "TFS", records(TFS_COCO) + records([40, 42, 41], benchmark="vqav2"))
    inherit = run_of(tmp_path, "VPG inherit", records([0.2, 0.4]) + records([41, 43], benchmark="vqav2"))
    vt = run_of(tmp_path, "VPGTrans", records([0.5, 0.6], warmup=[0.2, 0.3])
                + records([43, 44], warmup=[30, 42], benchmark="vqav2"))
    runs = [tfs, inherit, vt]
    fig = sp.plot_convergence(runs, {"vqav2": "agg_metrics"}, str(tmp_path / "c.png"))
    assert [ax.get_title() for ax in fig.axes] == ["coco_caption", "vqav2"]
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["TFS", "VPG inherit", "VPGTrans"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TFS", "VPG inherit", "VPGTrans"]
        for line, run in zip(ax.get_lines(), runs):
            scores = run.scores(ax.get_title(), "agg_metrics")
            assert list(line.get_xdata()) == list(scores) and list(line.get_ydata()) == list(scores.values())
            assert line.get_marker() not in (None, "None", "")
    # stage 1's last epoch is VPGTrans's epoch 1
    assert list(fig.axes[1].get_lines()[2].get_ydata()) == [42, 43, 44]
    assert os.path.getsize(tmp_path / "c.png") > 10_000


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lavis_vpgtrans.analysis.speedup", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tmp_path):
    write_log(str(tmp_path / "tfs" / "job1"), records(TFS_COCO) + records([40, 42, 41], benchmark="vqav2"))
    write_log(str(tmp_path / "inherit"), records([0.2, 0.4, 0.55]) + records([41, 43, 44], benchmark="vqav2"))
    write_log(str(tmp_path / "vt"), records([0.56, 0.6], warmup=[0.3]) + records([42, 42], warmup=[41],
                                                                                 benchmark="vqav2"))
    write_log(str(tmp_path / "nolinear"), records([0.3, 0.4, 0.45, 0.5, 0.52]) + records([43], benchmark="vqav2"))
    out = tmp_path / "out"
    result = cli("--tfs", str(tmp_path / "tfs"), "--vpgtrans", f"OPT125M->350M={tmp_path / 'vt'}",
                 "--inherit", str(tmp_path / "inherit"), "--run", f"only linear={tmp_path / 'nolinear'}",
                 "--metric", "coco_caption=agg_metrics", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| OPT125M->350M | 3.0 | - |" in result.stdout
    assert "| VPG inherit | 2.0 | 1.0 |" in result.stdout
    assert "| only linear | 1.2 | 2.0 |" in result.stdout  # 6 / 5 on captions, 2 / 1 on VQA
    # Table 5: VPGTrans against VPG inherit (p = 0.55 at epoch 3, beaten at 2; 44 never beaten)
    assert "| OPT125M->350M | 1.5 | - |" in result.stdout.split("Table 5")[1]

    summary = json.loads((out / "speedup.json").read_text())
    table3, table5 = summary["tables"]
    cell = table3["rows"][0]["cells"]["coco_caption"]
    assert (cell["p"], cell["e_baseline"], cell["e_run"], cell["speedup"]) == (0.5, 6, 2, 3.0)
    assert table3["rows"][0]["cells"]["vqav2"]["speedup"] is None
    assert table5["baseline"] == "VPG inherit" and table5["rows"][0]["cells"]["coco_caption"]["speedup"] == 1.5
    assert set(summary["runs"]) == {"TFS", "VPG inherit", "OPT125M->350M", "only linear"}
    assert (out / "speedup.md").read_text().startswith("### Table 3")
    png = (out / "convergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_cli_bad_input_fails_cleanly(tmp_path, capsys):
    # main() in-process: an uncaught exception (a traceback) would fail this test
    write_log(str(tmp_path / "tfs"), records(TFS_COCO))
    path = write_log(str(tmp_path / "vt"), records([0.3]) + ["not json"])
    out = tmp_path / "o"
    assert sp.main(["--tfs", str(tmp_path / "tfs"), "--vpgtrans", str(tmp_path / "vt"), "--out", str(out)]) == 2
    assert f"error: {path}:2: not valid JSON" in capsys.readouterr().err
    assert sp.main(["--tfs", str(tmp_path / "tfs"), "--vpgtrans", str(tmp_path / "nowhere")]) == 2
    assert f"error: {tmp_path / 'nowhere'}: no such run directory" in capsys.readouterr().err
    assert sp.main(["--tfs", str(tmp_path / "tfs"), "--vpgtrans", str(tmp_path / "tfs"),
                    "--metric", "coco_caption"]) == 2
    assert "--metric expects BENCH=METRIC" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- paper epochs from the config

def runner_lines(scores, stages=None, benchmark="coco_caption"):
    """metrics.jsonl lines as the runner writes them: epochs (and runner_vpgtrans's stages), no paper epochs."""
    return [{"run_id": "r-1", "epoch": e, **({"stage": stages[e]} if stages else {}), "benchmark": benchmark,
             "split": "val", "metrics": {"agg_metrics": s}} for e, s in enumerate(scores)]


def write_run(job_dir, lines, run, model=None):
    """A job dir as train.py leaves it: LAVIS's log.txt (the config, then stats lines) and metrics.jsonl."""
    write_log(str(job_dir), lines)
    config = {"run": {"output_dir": "out", "seed": 42, **run}, "model": {"arch": "blip2_opt_transfer", **(model or {})},
              "datasets": {}}
    with open(os.path.join(job_dir, "log.txt"), "w") as f:
        f.write(json.dumps(config, indent=4) + "\n" + json.dumps({"train_loss": "1.0"}) + "\n")
    return str(job_dir)


def counted(run):
    return [(r.epoch, r.stage, r.paper_epoch) for r in run.records]


def test_paper_epochs_are_counted_from_the_runs_config(tmp_path, plugin):
    two_stage = sp.load_run(write_run(tmp_path / "vt", runner_lines([0.3, 0.4, 0.6], [1, 1, 2]),
                                      {"runner": "runner_vpgtrans", "warmup_epochs": 2, "max_epoch": 3}))
    assert counted(two_stage) == [(0, 1, 1), (1, 1, 1), (2, 2, 2)]
    assert two_stage.scores("coco_caption", "agg_metrics") == {1: 0.4, 2: 0.6}
    # runner_vpgtrans's default is one warm-up epoch; any other runner has a single stage
    default = sp.load_run(write_run(tmp_path / "d", runner_lines([0.3, 0.4], [1, 2]), {"runner": "runner_vpgtrans"}))
    assert counted(default) == [(0, 1, 1), (1, 2, 2)]
    plain = sp.load_run(write_run(tmp_path / "p", runner_lines([0.3, 0.4]), {"runner": "runner_vpgtrans_base"}))
    assert counted(plain) == [(0, 2, 1), (1, 2, 2)] and plain.counting == "epoch e = paper epoch e + 1"
    # the speed-up against a TFS run counted the same way
    tfs = sp.load_run(write_run(tmp_path / "tfs", runner_lines([0.1, 0.5, 0.45], [2, 2, 2]),
                                {"runner": "runner_vpgtrans", "warmup_epochs": 0}))
    cell = sp.speedup_table(tfs, [two_stage]).cells[("vt", "coco_caption")]
    assert (cell.e_baseline, cell.e_run, cell.speedup) == (2, 2, 1.0)


def test_stage2_after_a_stage1_run_counts_from_paper_epoch_2(tmp_path, plugin):
    launch = tmp_path / "repo"  # where both runs were launched from; the configs hold relative paths
    write_run(launch / "out" / "stage1", runner_lines([0.3], [1]),
              {"runner": "runner_vpgtrans", "warmup_epochs": 1, "max_epoch": 1, "output_dir": "out"})
    (launch / "out" / "stage1" / "checkpoint_0.pth").write_bytes(b"")
    stage2 = write_run(launch / "out" / "stage2", runner_lines([0.4, 0.5], [2, 2]),
                       {"runner": "runner_vpgtrans", "warmup_epochs": 0, "output_dir": "out"},
                       {"projector_checkpoint": "out/stage1/checkpoint_0.pth"})
    run = sp.load_run(stage2)  # from another working directory: found through the run's own output_dir
    assert counted(run) == [(0, 2, 2), (1, 2, 3)]
    assert run.counting == f"stage 2 after the stage-1 run {launch / 'out' / 'stage1'}: epoch e = paper epoch e + 2"

    # a projector from the converter (no run record beside it) or a full two-stage run: counted from 1
    (launch / "init.pth").write_bytes(b"")
    conv = write_run(launch / "out" / "conv", runner_lines([0.4]), {"output_dir": "out"},
                     {"projector_checkpoint": "init.pth"})
    assert counted(sp.load_run(conv)) == [(0, 2, 1)]
    write_run(launch / "out" / "full", runner_lines([0.3, 0.4], [1, 2]),
              {"runner": "runner_vpgtrans", "warmup_epochs": 1, "max_epoch": 2, "output_dir": "out"})
    (launch / "out" / "full" / "checkpoint_best.pth").write_bytes(b"")
    more = write_run(launch / "out" / "more", runner_lines([0.4]), {"output_dir": "out"},
                     {"projector_checkpoint": "out/full/checkpoint_best.pth"})
    assert counted(sp.load_run(more)) == [(0, 2, 1)]

    # the checkpoint is gone: said, and counted from 1
    gone = write_run(launch / "out" / "gone", runner_lines([0.4]), {"output_dir": "out"},
                     {"projector_checkpoint": "out/nowhere/checkpoint_0.pth"})
    with pytest.warns(sp.EpochCountWarning, match="out/nowhere/checkpoint_0.pth is not found"):
        assert counted(sp.load_run(gone)) == [(0, 2, 1)]


def test_config_and_log_disagreeing_is_an_error(tmp_path, plugin):
    job = write_run(tmp_path / "vt", runner_lines([0.3, 0.4], [1, 1]), {"runner": "runner_vpgtrans", "warmup_epochs": 1})
    with pytest.raises(sp.LogError, match=r"metrics.jsonl:2: the runner logged stage 1 for epoch 1, but the run's "
                                          r"config \(.*log.txt\) makes it stage 2"):
        sp.load_run(job)
    # two launches (a resume) that count differently are not one run
    job = write_run(tmp_path / "two", runner_lines([0.3, 0.4]), {"runner": "runner_vpgtrans", "warmup_epochs": 1})
    with open(os.path.join(job, "log.txt"), "a") as f:
        f.write(json.dumps({"run": {"runner": "runner_vpgtrans", "warmup_epochs": 0}, "model": {}}, indent=4) + "\n")
    with pytest.raises(sp.LogError, match="count epochs differently"):
        sp.load_run(job)

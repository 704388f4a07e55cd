"""Speed-up tables (VPGTrans paper, Table 3 and appendix Table 5) and Fig. 7-style
convergence plots from the runs' metrics.jsonl logs.

    python -m lavis_vpgtrans.analysis.speedup --tfs DIR --vpgtrans DIR [--inherit DIR]
        [--run NAME=DIR ...] [--metric BENCH=METRIC ...] [--out DIR]

Each run directory holds metrics.jsonl (or a single job subdirectory holding it, as LAVIS
writes <output_dir>/<job_id>/), one JSON object per (epoch, benchmark, split) evaluation,
and LAVIS's log.txt, which starts with the run's config:

    {"run_id": "job-3f2a9c1e", "epoch": 3, "stage": 2, "benchmark": "coco_caption",
     "split": "val", "metrics": {"CIDEr": 0.71, "agg_metrics": 0.71}}

A file whose lines carry different run ids (two runs wrote into one directory) is refused;
lines without a run id (logs written before run ids were recorded) count as one run.

The runner records epochs; the paper's 1-based epoch count, in which the whole stage 1
(projector warm-up) is epoch 1, is derived here from the run's config (`EpochCount`):
  - a runner_vpgtrans run: epochs [0, run.warmup_epochs) are stage 1, all paper epoch 1 (the
    last of them stands for it); later epochs count on from paper epoch 2;
  - any other run, or warmup_epochs 0: epoch e is paper epoch e + 1 -- or e + 2 when its
    model.projector_checkpoint is a checkpoint of a stage-1-only run (a runner_vpgtrans run
    with warmup_epochs = max_epoch, recognised by that run's log.txt next to the checkpoint):
    stage 2 run separately after its warm-up, as projects/vpgtrans/stage2.yaml does.
Lines that carry their own `paper_epoch` (and `stage`; logs written by earlier versions) are
read as they are.

Speed-up (paper §4.2): the baseline reaches its best score p on a benchmark first at epoch
e_base; the run first scores strictly more than p at epoch e_run; speed-up = e_base / e_run,
"-" when the run never beats p. Table 3: every run against TFS (train from scratch).
Table 5 (appendix C.3 of the paper): VPGTrans against VPG inherit.

--vpgtrans/--tfs/--inherit take DIR or NAME=DIR (the name labels table rows and plot lines).
"""

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from lavis_vpgtrans.runners.run_record import METRICS_FILE

DEFAULT_METRIC = "agg_metrics"
REQUIRED_KEYS = ("epoch", "benchmark", "metrics")
LOG_FILE = "log.txt"  # LAVIS's run log: the config (json), then one json line per epoch's stats
# Column order of the paper's Table 3; other benchmarks follow in order of appearance.
PAPER_BENCHMARK_ORDER = ("coco_caption", "nocaps", "vqav2", "gqa", "okvqa")
DEFAULT_NAMES = {"tfs": "TFS", "inherit": "VPG inherit", "vpgtrans": "VPGTrans"}


class LogError(ValueError):
    """Malformed or missing run log; the message names the file (and line)."""


class MissingEpochWarning(UserWarning):
    """A run's log skips an epoch it must have trained (e.g. a crash during validation, resumed
    by a version that did not validate that epoch again): its curve has a hole."""


class MissingBenchmarkWarning(UserWarning):
    """A benchmark evaluated in some of the compared runs but not in others."""


class EpochCountWarning(UserWarning):
    """The paper's epoch count of a run rests on a guess (e.g. its projector_checkpoint is gone)."""


@dataclass
class Record:
    epoch: int
    paper_epoch: int
    stage: int
    benchmark: str
    split: Optional[str]
    metrics: Dict[str, float]
    line: int
    run_id: Optional[str] = None


@dataclass
class Run:
    """One training run's evaluations. `series[key][paper_epoch]` is the record standing for
    that paper epoch; key is the benchmark name, or "benchmark/split" when the run evaluated
    that benchmark on several splits."""

    name: str
    path: str  # the metrics.jsonl file
    counting: str = "as logged"  # how paper epochs were counted (EpochCount.describe)
    series: Dict[str, Dict[int, Record]] = field(default_factory=dict)
    records: List[Record] = field(default_factory=list)  # every record, in file order

    def epoch_scores(self, benchmark: str, metric: str) -> Dict[int, float]:
        """{runner epoch: score} of one benchmark: each stage-1 epoch on its own, unlike
        scores(); the later line wins for an epoch logged twice."""
        scores = {r.epoch: r.metrics[metric] for r in self.records if r.benchmark == benchmark}
        return dict(sorted(scores.items()))

    @property
    def benchmarks(self) -> List[str]:
        return list(self.series)

    def scores(self, benchmark: str, metric: str) -> Dict[int, float]:
        """{paper_epoch: score} of one benchmark, in epoch order."""
        if benchmark not in self.series:
            raise LogError(f"{self.path}: run {self.name!r} has no evaluation of {benchmark!r} "
                           f"(it has: {', '.join(self.benchmarks) or 'none'})")
        out = {}
        for paper_epoch, record in sorted(self.series[benchmark].items()):
            if metric not in record.metrics:
                raise LogError(f"{self.path}:{record.line}: metric {metric!r} not in the {benchmark} "
                               f"metrics (has: {', '.join(sorted(record.metrics))})")
            out[paper_epoch] = record.metrics[metric]
        return out


# ---------------------------------------------------------------------------- loading

def find_metrics_file(path: str) -> str:
    """metrics.jsonl given directly, in `path`, or in its single job subdirectory."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise LogError(f"{path}: no such run directory")
    direct = os.path.join(path, METRICS_FILE)
    if os.path.isfile(direct):
        return direct
    nested = sorted(os.path.join(path, entry, METRICS_FILE) for entry in os.listdir(path)
                    if os.path.isfile(os.path.join(path, entry, METRICS_FILE)))
    if not nested:
        raise LogError(f"{path}: no {METRICS_FILE} in it or in a job subdirectory")
    if len(nested) > 1:
        raise LogError(f"{path}: several job subdirectories hold a {METRICS_FILE}, pass one of: "
                       + ", ".join(os.path.dirname(p) for p in nested))
    return nested[0]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_record(text: str, where: str, line: int, count) -> Record:
    """One metrics.jsonl line; `count()` gives the run's EpochCount (None without a config)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise LogError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(obj, dict):
        raise LogError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in obj]
    if missing:
        raise LogError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
    epoch = obj["epoch"]
    if not _is_int(epoch) or epoch < 0:
        raise LogError(f"{where}: 'epoch' must be an integer >= 0, got {epoch!r}")
    if "paper_epoch" in obj:  # written by an earlier version: its own count, read as it is
        if "stage" not in obj:
            raise LogError(f"{where}: missing key 'stage' (a line with 'paper_epoch' must have it)")
        paper_epoch, stage = obj["paper_epoch"], obj["stage"]
    else:
        epoch_count = count()
        if epoch_count is None:
            raise LogError(f"{where}: missing key 'paper_epoch' and no run config ({LOG_FILE} beside it) "
                           f"to count it from")
        paper_epoch, stage = epoch_count.paper_epoch(epoch), epoch_count.stage(epoch)
        if "stage" in obj and obj["stage"] != stage:
            raise LogError(f"{where}: the runner logged stage {obj['stage']!r} for epoch {epoch}, but the run's "
                           f"config ({epoch_count.source}) makes it stage {stage}")
    if not _is_int(paper_epoch) or paper_epoch < 1:
        raise LogError(f"{where}: 'paper_epoch' must be an integer >= 1, got {paper_epoch!r}")
    if stage not in (1, 2) or not _is_int(stage):
        raise LogError(f"{where}: 'stage' must be 1 or 2, got {stage!r}")
    # The whole stage 1 is the paper's epoch 1.
    if stage == 1 and paper_epoch != 1:
        raise LogError(f"{where}: a stage-1 record must have paper_epoch 1, got {paper_epoch}")
    benchmark, split = obj["benchmark"], obj.get("split")
    if not isinstance(benchmark, str) or not benchmark:
        raise LogError(f"{where}: 'benchmark' must be a non-empty string, got {benchmark!r}")
    if split is not None and not isinstance(split, str):
        raise LogError(f"{where}: 'split' must be a string, got {split!r}")
    metrics = obj["metrics"]
    if not isinstance(metrics, dict):
        raise LogError(f"{where}: 'metrics' must be an object, got {type(metrics).__name__}")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LogError(f"{where}: metric {key!r} must be a finite number, got {value!r}")
    run_id = obj.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise LogError(f"{where}: 'run_id' must be a non-empty string, got {run_id!r}")
    return Record(epoch, paper_epoch, stage, benchmark, split, dict(metrics), line, run_id)


def _check_one_run(path: str, records: Sequence[Record]) -> None:
    """Every line from one run: two runs appending to one file are not one run's curve."""
    first: Dict[Optional[str], Record] = {}
    for record in records:
        first.setdefault(record.run_id, record)
    if len(first) > 1:
        runs = ", ".join(f"{run_id or '(no run id)'} from line {r.line}" for run_id, r in first.items())
        raise LogError(f"{path}: lines from {len(first)} different runs ({runs}); several runs wrote into "
                       f"one output directory, so the file is no one run's record")


def _check_epochs(path: str, records: Sequence[Record]) -> None:
    """paper_epoch is a non-decreasing function of epoch; only stage-1 epochs share one."""
    by_epoch: Dict[int, Record] = {}
    for record in records:
        first = by_epoch.setdefault(record.epoch, record)
        if (first.paper_epoch, first.stage) != (record.paper_epoch, record.stage):
            raise LogError(f"{path}:{record.line}: epoch {record.epoch} has paper_epoch {record.paper_epoch}, "
                           f"stage {record.stage} but line {first.line} gives it paper_epoch "
                           f"{first.paper_epoch}, stage {first.stage}")
    previous = None
    for epoch in sorted(by_epoch):
        record = by_epoch[epoch]
        if previous is not None:
            if record.paper_epoch < previous.paper_epoch:
                raise LogError(f"{path}:{record.line}: paper_epoch {record.paper_epoch} at epoch {epoch} is "
                               f"lower than paper_epoch {previous.paper_epoch} at epoch {previous.epoch} "
                               f"(line {previous.line}); it must not decrease as epoch grows")
            if record.paper_epoch == previous.paper_epoch and not (record.stage == previous.stage == 1):
                raise LogError(f"{path}:{record.line}: epochs {previous.epoch} and {epoch} share paper_epoch "
                               f"{record.paper_epoch}; only stage-1 (warm-up) epochs may share one")
        previous = record


def _warn_missing_epochs(path: str, records: Sequence[Record]) -> None:
    epochs: Dict[str, set] = {}
    for record in records:
        epochs.setdefault(record.benchmark, set()).add(record.epoch)
    for benchmark, seen in epochs.items():
        missing = sorted(set(range(min(seen), max(seen) + 1)) - seen)
        if missing:
            warnings.warn(f"{path}: {benchmark} has no record of epoch(s) {', '.join(map(str, missing))} "
                          f"between epochs {min(seen)} and {max(seen)}", MissingEpochWarning, stacklevel=3)


def load_run(path: str, name: Optional[str] = None) -> Run:
    """Reads and validates a run's metrics.jsonl (`path`: the file, its directory, or the
    directory above a single job subdirectory); paper epochs are counted from the run's config
    in the log.txt beside it (see EpochCount)."""
    metrics_file = find_metrics_file(path)
    counted = []  # the run's EpochCount, read at the first line that needs it

    def count() -> Optional[EpochCount]:
        if not counted:
            counted.append(epoch_count_of(metrics_file))
        return counted[0]

    records: List[Record] = []
    with open(metrics_file) as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                records.append(_parse_record(text, f"{metrics_file}:{number}", number, count))
    if not records:
        raise LogError(f"{metrics_file}: no evaluation records")
    _check_one_run(metrics_file, records)
    _check_epochs(metrics_file, records)
    _warn_missing_epochs(metrics_file, records)

    splits: Dict[str, set] = {}
    for record in records:
        splits.setdefault(record.benchmark, set()).add(record.split)
    series: Dict[str, Dict[int, Record]] = {}
    for record in records:
        key = record.benchmark if len(splits[record.benchmark]) == 1 else f"{record.benchmark}/{record.split}"
        by_epoch = series.setdefault(key, {})
        held = by_epoch.get(record.paper_epoch)
        # Several stage-1 epochs share paper epoch 1: the last one is the stage's result.
        # The same epoch logged twice (a resumed run): the later line wins.
        if held is None or record.epoch >= held.epoch:
            by_epoch[record.paper_epoch] = record
    return Run(name=name or os.path.basename(os.path.normpath(path)), path=metrics_file, series=series,
               records=records, counting=counted[0].describe() if counted and counted[0] else "as logged")


# ---------------------------------------------------------------------------- paper epochs

@dataclass(frozen=True)
class EpochCount:
    """The paper's epoch count of a run's epochs: stage 1 (the first `warmup_epochs`) is
    paper epoch 1; stage 2 counts on from 2, or from 1 in a run with no warm-up at all."""

    warmup_epochs: int = 0
    after_warmup: Optional[str] = None  # the job dir of the stage-1 run this run continues
    source: str = ""  # the log.txt the config was read from

    def stage(self, epoch: int) -> int:
        return 1 if epoch < self.warmup_epochs else 2

    def paper_epoch(self, epoch: int) -> int:
        if epoch < self.warmup_epochs:
            return 1
        return epoch - self.warmup_epochs + (2 if self.warmup_epochs or self.after_warmup else 1)

    def describe(self) -> str:
        if self.warmup_epochs:
            return f"epochs 0-{self.warmup_epochs - 1} are stage 1 = paper epoch 1, then epoch e = paper epoch " \
                   f"e - {self.warmup_epochs} + 2"
        if self.after_warmup:
            return f"stage 2 after the stage-1 run {self.after_warmup}: epoch e = paper epoch e + 2"
        return "epoch e = paper epoch e + 1"


def run_configs(log_file: str) -> List[dict]:
    """The configs LAVIS's RunnerBase.log_config wrote into log.txt, one per launch (a resumed
    run adds one); the per-epoch stats lines in between are skipped."""
    with open(log_file, encoding="utf-8") as f:
        text = f.read()
    decoder, pos, configs = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return configs
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # not json (e.g. a line cut by a crash): on to the next line
            pos = text.find("\n", pos)
            pos = len(text) if pos < 0 else pos
            continue
        if isinstance(obj, dict) and isinstance(obj.get("run"), dict) and isinstance(obj.get("model"), dict):
            configs.append(obj)


def _warmup_epochs(run_cfg: Mapping) -> int:
    """Stage-1 epochs of a run: those of a runner_vpgtrans (or subclass) run, else none."""
    from lavis.common.registry import registry

    from lavis_vpgtrans.runners.runner_vpgtrans import VPGTransRunner

    runner = registry.get_runner_class(run_cfg.get("runner")) if run_cfg.get("runner") else None
    return VPGTransRunner.warmup_epochs_in(run_cfg) if runner and issubclass(runner, VPGTransRunner) else 0


def _is_stage1_only(run_cfg: Mapping) -> bool:
    iters = run_cfg.get("iters_per_inner_epoch")
    max_epoch = int(run_cfg.get("max_iters", 0)) // int(iters) if iters else int(run_cfg.get("max_epoch", 0))
    return 0 < max_epoch <= _warmup_epochs(run_cfg)


def _launch_dirs(job_dir: str, run_cfg: Mapping) -> List[str]:
    """Where a relative path in the run's config may start: the directory the run was launched
    from (job_dir = <there>/<run.output_dir>/<job_id> for a relative output_dir), then here."""
    bases = []
    output_dir = run_cfg.get("output_dir") or ""
    if output_dir and not os.path.isabs(output_dir):
        tail = Path(os.path.normpath(output_dir)).parts
        job = Path(os.path.abspath(job_dir))
        if job.parts[-len(tail) - 1:-1] == tail and len(job.parts) > len(tail) + 1:
            bases.append(str(job.parents[len(tail)]))
    return bases + [os.getcwd()]


def _stage1_run_of(checkpoint: str, job_dir: str, run_cfg: Mapping) -> Optional[str]:
    """The job dir of the stage-1-only run that wrote `checkpoint` (a projector_checkpoint),
    recognised by that run's log.txt beside it; None for anything else (a converter output,
    a released model, a URL)."""
    if "://" in checkpoint:
        return None
    path = os.path.expanduser(checkpoint)
    candidates = [path] if os.path.isabs(path) else [os.path.join(b, path) for b in _launch_dirs(job_dir, run_cfg)]
    found = next((c for c in candidates if os.path.exists(c)), None)
    if found is None:
        warnings.warn(f"{job_dir}: model.projector_checkpoint={checkpoint} is not found (looked for "
                      f"{' and '.join(candidates)}): cannot tell whether this run follows a stage-1 (warm-up) run; "
                      f"its epochs are counted from paper epoch 1", EpochCountWarning, stacklevel=2)
        return None
    log_file = os.path.join(os.path.dirname(os.path.abspath(found)), LOG_FILE)
    configs = run_configs(log_file) if os.path.isfile(log_file) else []
    if configs and all(_is_stage1_only(c["run"]) for c in configs):
        return os.path.dirname(os.path.abspath(found))
    return None


def _epoch_count(config: Mapping, log_file: str) -> EpochCount:
    run_cfg, model_cfg = config["run"], config["model"]
    warmup = _warmup_epochs(run_cfg)
    checkpoint = model_cfg.get("projector_checkpoint")
    after = _stage1_run_of(str(checkpoint), os.path.dirname(log_file), run_cfg) if not warmup and checkpoint else None
    return EpochCount(warmup_epochs=warmup, after_warmup=after, source=log_file)


def epoch_count_of(metrics_file: str) -> Optional[EpochCount]:
    """The EpochCount of the run that wrote `metrics_file`, from the config(s) in the log.txt
    beside it; None when there is none."""
    log_file = os.path.join(os.path.dirname(metrics_file), LOG_FILE)
    configs = run_configs(log_file) if os.path.isfile(log_file) else []
    if not configs:
        return None
    counts = list(dict.fromkeys(_epoch_count(config, log_file) for config in configs))
    if len(counts) > 1:
        raise LogError(f"{log_file}: the run's launches count epochs differently ("
                       + "; ".join(c.describe() for c in counts) + "): they are not one run")
    return counts[0]


# ---------------------------------------------------------------------------- speed-up

def best_score(scores: Mapping[int, float]) -> Tuple[float, int]:
    """(p, e): the best score and the first epoch reaching it."""
    if not scores:
        raise ValueError("no scores")
    epochs = sorted(scores)
    best = max(scores[e] for e in epochs)
    return best, next(e for e in epochs if scores[e] == best)


def first_epoch_above(scores: Mapping[int, float], threshold: float) -> Optional[int]:
    """The first epoch whose score is strictly greater than `threshold`, None if never."""
    return next((e for e in sorted(scores) if scores[e] > threshold), None)


def speedup(baseline_scores: Mapping[int, float], run_scores: Mapping[int, float]) -> Optional[float]:
    """e_base / e_run (paper Table 3), None when the run never beats the baseline's best."""
    best, best_epoch = best_score(baseline_scores)
    beat_epoch = first_epoch_above(run_scores, best)
    return None if beat_epoch is None else best_epoch / beat_epoch


def format_speedup(value: Optional[float]) -> str:
    """As the paper prints it: one decimal, "-" for never."""
    return "-" if value is None else f"{value:.1f}"


@dataclass
class Comparison:
    run: str
    baseline: str
    benchmark: str
    metric: str
    p: float  # the baseline's best score
    e_baseline: int  # first paper epoch the baseline reaches p (e_tfs in Table 3)
    e_run: Optional[int]  # first paper epoch the run beats p (e_vt), None if never
    run_best: float
    speedup: Optional[float]

    def to_json(self) -> dict:
        return {"metric": self.metric, "p": self.p, "e_baseline": self.e_baseline, "e_run": self.e_run,
                "run_best": self.run_best, "speedup": self.speedup}


@dataclass
class SpeedupTable:
    title: str
    baseline: str
    rows: List[str]
    benchmarks: List[str]
    cells: Dict[Tuple[str, str], Comparison]  # (run, benchmark) -> comparison
    missing: List[str] = field(default_factory=list)  # warnings about benchmarks left out

    def cell_text(self, run: str, benchmark: str) -> str:
        comparison = self.cells.get((run, benchmark))
        return "n/a" if comparison is None else format_speedup(comparison.speedup)

    def to_json(self) -> dict:
        return {"title": self.title, "baseline": self.baseline, "benchmarks": self.benchmarks,
                "rows": [{"run": run, "cells": {b: self.cells[(run, b)].to_json()
                                                for b in self.benchmarks if (run, b) in self.cells}}
                         for run in self.rows],
                "missing": self.missing}


def order_benchmarks(names) -> List[str]:
    """Paper's column order first, then the others in order of appearance."""
    names = list(dict.fromkeys(names))
    rank = {b: i for i, b in enumerate(PAPER_BENCHMARK_ORDER)}

    def key(name):
        base = name.split("/", 1)[0]
        return (rank.get(base, len(rank)), names.index(name) if base not in rank else 0, name)

    return sorted(names, key=key)


def metric_of(benchmark: str, metrics: Mapping[str, str]) -> str:
    """The chosen metric: by series key ("gqa/val"), else by benchmark ("gqa"), else agg_metrics."""
    return metrics.get(benchmark) or metrics.get(benchmark.split("/", 1)[0]) or DEFAULT_METRIC


def speedup_table(baseline: Run, runs: Sequence[Run], metrics: Optional[Mapping[str, str]] = None,
                  title: Optional[str] = None) -> SpeedupTable:
    """Speed-up of each run against `baseline` on every benchmark the two share; warns
    (MissingBenchmarkWarning) for benchmarks that only some of them evaluated."""
    metrics = metrics or {}
    everything = order_benchmarks(b for run in [baseline, *runs] for b in run.benchmarks)
    cells: Dict[Tuple[str, str], Comparison] = {}
    missing = []
    for bench in everything:
        lacking = [run.name for run in [baseline, *runs] if bench not in run.series]
        if lacking:
            message = (f"{bench!r} is not evaluated in run(s) {', '.join(lacking)}: "
                       f"no speed-up on it for {'any run' if baseline.name in lacking else ', '.join(lacking)}")
            missing.append(message)
            warnings.warn(message, MissingBenchmarkWarning, stacklevel=2)
        if bench not in baseline.series:
            continue
        metric = metric_of(bench, metrics)
        base_scores = baseline.scores(bench, metric)
        p, e_baseline = best_score(base_scores)
        for run in runs:
            if bench not in run.series:
                continue
            run_scores = run.scores(bench, metric)
            e_run = first_epoch_above(run_scores, p)
            cells[(run.name, bench)] = Comparison(
                run=run.name, baseline=baseline.name, benchmark=bench, metric=metric, p=p,
                e_baseline=e_baseline, e_run=e_run, run_best=max(run_scores.values()),
                speedup=None if e_run is None else e_baseline / e_run)
    benchmarks = [b for b in everything if any((run.name, b) in cells for run in runs)]
    return SpeedupTable(title=title or f"Speed-up against {baseline.name}", baseline=baseline.name,
                        rows=[run.name for run in runs], benchmarks=benchmarks, cells=cells, missing=missing)


def render_markdown(tables: Sequence[SpeedupTable]) -> str:
    """The tables as the paper prints them, each followed by the numbers behind it."""
    out = []
    for table in tables:
        out += [f"### {table.title}", ""]
        if not table.benchmarks:
            out += ["(no benchmark shared with the baseline)", ""]
            continue
        out.append("| Transfer | " + " | ".join(table.benchmarks) + " |")
        out.append("|---" * (len(table.benchmarks) + 1) + "|")
        for run in table.rows:
            out.append(f"| {run} | " + " | ".join(table.cell_text(run, b) for b in table.benchmarks) + " |")
        out += ["", f"speed-up = e_base / e_run: {table.baseline} reaches its best score p first at "
                    f"epoch e_base, the run first scores > p at epoch e_run (\"-\": never; stage 1 = epoch 1).", ""]
        out.append("| Transfer | benchmark | metric | p | e_base | e_run | run's best | speed-up |")
        out.append("|---" * 8 + "|")
        for run in table.rows:
            for bench in table.benchmarks:
                c = table.cells.get((run, bench))
                if c is None:
                    continue
                out.append(f"| {run} | {bench} | {c.metric} | {c.p:.4g} | {c.e_baseline} | "
                           f"{'-' if c.e_run is None else c.e_run} | {c.run_best:.4g} | "
                           f"{format_speedup(c.speedup)} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots

def plot_convergence(runs: Sequence[Run], metrics: Optional[Mapping[str, str]] = None,
                     path: Optional[str] = None):
    """Fig. 7-style curves: one panel per benchmark (title = benchmark), x = paper epoch,
    y = the chosen metric, one line per run that evaluated it (label = run name). Colours
    follow the run order, so TFS / VPG inherit / VPGTrans get the paper's blue / orange /
    green. Saves a PNG to `path` if given; returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt

    metrics = metrics or {}
    benchmarks = order_benchmarks(b for run in runs for b in run.benchmarks)
    if not benchmarks:
        raise LogError("nothing to plot: the runs have no evaluations")
    ncols = min(len(benchmarks), 3)
    nrows = math.ceil(len(benchmarks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, bench in zip(flat, benchmarks):
        plot_panel(ax, runs, bench, metric_of(bench, metrics), title=bench)
    for ax in flat[len(benchmarks):]:
        fig.delaxes(ax)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_panel(ax, runs: Sequence[Run], benchmark: str, metric: str, title: str, ylabel: Optional[str] = None,
               legend_size: str = "small") -> None:
    """One convergence panel: `metric` on `benchmark` per paper epoch, one line per run that
    evaluated it; colours and markers follow the run order."""
    from matplotlib.ticker import MaxNLocator

    markers = "osD^v<>ph*"
    for i, run in enumerate(runs):
        if benchmark not in run.series:
            continue
        scores = run.scores(benchmark, metric)
        ax.plot(list(scores), list(scores.values()), marker=markers[i % len(markers)], color=f"C{i}",
                label=run.name)
    ax.set_title(title)
    ax.set_xlabel("epoch (stage 1 = epoch 1)")
    ax.set_ylabel(ylabel or metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


# ---------------------------------------------------------------------------- CLI

def _named_path(value: str, default_name: Optional[str]) -> Tuple[str, str]:
    """"NAME=DIR" or, when a default name exists, plain "DIR" (also a DIR containing '=')."""
    if default_name is not None and (os.path.exists(value) or "=" not in value):
        return default_name, value
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise LogError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _metric_choices(values: Sequence[str]) -> Dict[str, str]:
    out = {}
    for value in values:
        bench, sep, metric = value.partition("=")
        if not sep or not bench or not metric:
            raise LogError(f"--metric expects BENCH=METRIC, got {value!r}")
        out[bench] = metric
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_vpgtrans.analysis.speedup",
        description="Speed-up tables (VPGTrans paper Table 3, appendix Table 5) and convergence plots "
                    "from the runs' metrics.jsonl.")
    parser.add_argument("--tfs", required=True, metavar="[NAME=]DIR", help="train-from-scratch run")
    parser.add_argument("--vpgtrans", required=True, metavar="[NAME=]DIR",
                        help="VPGTrans run; its name labels the table row (the transfer, e.g. 'OPT125M->350M')")
    parser.add_argument("--inherit", metavar="[NAME=]DIR", help="VPG inherit run: a row of Table 3 and "
                        "the baseline of Table 5")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                        help="another run, plotted and compared with TFS (repeatable)")
    parser.add_argument("--metric", action="append", default=[], metavar="BENCH=METRIC",
                        help=f"score used for a benchmark (default {DEFAULT_METRIC}), e.g. coco_caption=CIDEr")
    parser.add_argument("--out", default=".", help="writes speedup.json, speedup.md, convergence.png here")
    return parser


def run_analysis(tfs: Run, vpgtrans: Run, inherit: Optional[Run] = None, others: Sequence[Run] = (),
                 metrics: Optional[Mapping[str, str]] = None, out_dir: Optional[str] = None):
    """Tables 3 (and 5 with `inherit`), written with the plot under `out_dir` if given.
    Returns (tables, markdown)."""
    runs = [tfs] + ([inherit] if inherit else []) + [vpgtrans] + list(others)
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LogError(f"run names must differ, repeated: {', '.join(duplicates)}")
    metrics = dict(metrics or {})
    known = {b.split("/", 1)[0] for run in runs for b in run.benchmarks} | {b for run in runs for b in run.benchmarks}
    for bench in metrics:
        if bench not in known:
            warnings.warn(f"--metric {bench}=...: no run evaluated {bench!r}", MissingBenchmarkWarning, stacklevel=2)

    rows = [vpgtrans] + ([inherit] if inherit else []) + list(others)
    tables = [speedup_table(tfs, rows, metrics,
                            title=f"Table 3: speed-up against training from scratch ({tfs.name})")]
    if inherit is not None:
        tables.append(speedup_table(inherit, [vpgtrans], metrics,
                                    title=f"Table 5: speed-up of {vpgtrans.name} against VPG inherit ({inherit.name})"))
    markdown = render_markdown(tables)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        summary = {"runs": {run.name: run.path for run in runs},
                   "epoch_counting": {run.name: run.counting for run in runs},
                   "metrics": {b: metric_of(b, metrics) for b in order_benchmarks(
                       b for run in runs for b in run.benchmarks)},
                   "tables": [table.to_json() for table in tables]}
        with open(os.path.join(out_dir, "speedup.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        with open(os.path.join(out_dir, "speedup.md"), "w", encoding="utf-8") as f:
            f.write(markdown)
        import matplotlib.pyplot as plt

        plt.close(plot_convergence(runs, metrics, os.path.join(out_dir, "convergence.png")))
    return tables, markdown


def _print_warnings(caught) -> None:
    # Table 3 and Table 5 can raise the same warning: print each once.
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingBenchmarkWarning)
        warnings.simplefilter("always", MissingEpochWarning)
        warnings.simplefilter("always", EpochCountWarning)
        try:
            metrics = _metric_choices(args.metric)
            named = {"tfs": _named_path(args.tfs, DEFAULT_NAMES["tfs"]),
                     "vpgtrans": _named_path(args.vpgtrans, DEFAULT_NAMES["vpgtrans"])}
            if args.inherit:
                named["inherit"] = _named_path(args.inherit, DEFAULT_NAMES["inherit"])
            loaded = {role: load_run(path, name) for role, (name, path) in named.items()}
            others = [load_run(path, name) for name, path in (_named_path(v, None) for v in args.run)]
            for run in [*loaded.values(), *others]:
                print(f"{run.name}: {run.counting}", file=sys.stderr)
            _, markdown = run_analysis(loaded["tfs"], loaded["vpgtrans"], loaded.get("inherit"), others,
                                       metrics, args.out)
        except (LogError, OSError) as err:
            _print_warnings(caught)
            print(f"error: {err}", file=sys.stderr)
            return 2
    _print_warnings(caught)
    print(markdown)
    print(f"wrote {os.path.join(args.out, 'speedup.json')}, speedup.md and convergence.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

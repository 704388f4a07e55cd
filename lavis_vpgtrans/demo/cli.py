"""`python -m lavis_vpgtrans.demo`: builds the toy world, runs the experiment's jobs and
reports the speed-ups (see the package docstring)."""

import argparse
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from lavis_vpgtrans.analysis.speedup import LogError, load_run, plot_panel, run_analysis
from lavis_vpgtrans.analysis.speedup import Run as SpeedupRun
from lavis_vpgtrans.common import kernels
from lavis_vpgtrans.demo import plan as P
from lavis_vpgtrans.demo.jobs import JobFailed, run_jobs
from lavis_vpgtrans.demo.stats import fmt_spread, paired_image_interval, projector_movement, run_scores, spread

# Table 2 of the paper compares projector-only warm-up epochs with and without the converter
# initialisation; these runs are that ablation (warmup.yaml: every epoch is stage 1).
WARMUP_EPOCHS = 3
GOAL_SPEEDUP = 2.0
GOAL_TOP1 = 0.5


def build_parser() -> argparse.ArgumentParser:
    import lavis_vpgtrans.demo as package

    p = argparse.ArgumentParser(prog="python -m lavis_vpgtrans.demo", description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output directory (default: output/demo/<date>_<time>); one "
                                                "holding earlier results needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the seed directories of an earlier run in --out")
    # one seed fits the default command's 15-minute budget on 2 cores (venv and world included);
    # the README's statistics come from --seeds 0 1 2 3 4 5
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one experiment per seed (default: 0; statistics over seeds need several, e.g. 0 1 2 3 4 5)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every transfer and baseline (default: 10)")
    # the paper transfers from a fully trained BLIP-2, trained on several times the transfer's
    # data: the source trains on the world's 8x larger source split (source.yaml)
    p.add_argument("--source-epochs", type=int, default=8,
                   help="epochs of the source model, shared by all seeds, on the source split (default: 8)")
    p.add_argument("--stage1-epochs", type=int, default=5,
                   help="epochs of BLIP-2 stage 1 for the train-from-scratch Q-Former (default: 5)")
    p.add_argument("--warmup-epochs", type=int, default=WARMUP_EPOCHS,
                   help="projector-only epochs of the warm-up table's runs (default: %(default)s; 0: no table)")
    p.add_argument("--no-cross-family", action="store_true", help="leave out the opt-small -> LLaMA transfer")
    p.add_argument("--zoo", default=None, help="toy world directory (default: $VPGTRANS_TOY_ZOO, else the cache's "
                                                 "toy_zoo_demo); built there if missing")
    p.add_argument("--profile", default="demo", help="toy zoo profile (default: demo; 'test' is the test suite's "
                                                    "quick zoo, on which nothing is learnt well)")
    p.add_argument("--jobs", type=int, default=2, help="training processes at once (default: 2)")
    p.add_argument("--analyse-only", action="store_true",
                   help="no training: the tables of the finished runs in --out (same options as the run), e.g. "
                        "after an update of the analysis")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1; the results are the same on every machine for the same count)")
    return p


def check_args(args) -> None:
    for name in ("source_epochs", "stage1_epochs", "jobs", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_epochs < 0:
        raise SystemExit(f"error: --warmup-epochs must be 0 or more, got {args.warmup_epochs}")
    if args.epochs < 2:
        raise SystemExit(f"error: --epochs must be at least 2 (VPGTrans spends the first on the warm-up), "
                         f"got {args.epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds repeats a seed: {args.seeds}")


# --------------------------------------------------------------------------- the world

class StepBars:
    """One tqdm bar per step of a build reported as progress(what, done, total)."""

    def __init__(self, prefix: str):
        self.prefix, self.what, self.bar = prefix, None, None

    def __call__(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if what != self.what:
            self.close()
            self.what = what
            self.bar = tqdm(total=total, desc=f"{self.prefix}: {what}", unit="step", leave=False, file=sys.stdout,
                            mininterval=1.0)
        self.bar.update(done - self.bar.n)  # redrawn at most once a second

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_world(zoo_dir: str, profile: str) -> str:
    from lavis_vpgtrans.toy.zoo import ensure_zoo, zoo_profile

    start = time.time()
    reused = zoo_profile(zoo_dir) == profile
    bars = StepBars("toy world")
    try:
        root = ensure_zoo(zoo_dir, profile=profile, progress=bars)
    except ValueError as err:  # a zoo of another profile there: refused, nothing deleted
        raise SystemExit(f"error: --zoo: {err}") from err
    finally:
        bars.close()
    say(f"[world] toy zoo ({profile} profile) {'reused' if reused else 'built'} at {root} "
        f"({time.time() - start:.0f} s)")
    return root


def count_val_scenes(zoo_dir: str) -> int:
    with open(captions_gt(zoo_dir)) as f:
        return len(json.load(f)["images"])


def zoo_stamp(zoo_dir: str) -> str:
    with open(os.path.join(zoo_dir, "ZOO_VERSION")) as f:
        return f.read().strip()


def ensure_stage1(zoo_dir: str, epochs: int, env: Dict[str, str]) -> str:
    """The BLIP-2 stage-1 Q-Former train-from-scratch starts from, trained once per zoo (kept
    next to it, with a stamp of what it was trained from) and reused by every seed."""
    from filelock import FileLock

    world_dir = os.path.join(zoo_dir, "demo")
    os.makedirs(world_dir, exist_ok=True)
    job = P.stage1_job(world_dir, epochs)
    stamp_file = os.path.join(job.out_dir, "STAMP")
    stamp = P.stage1_stamp(zoo_stamp(zoo_dir), epochs)
    with FileLock(job.out_dir + ".lock"):
        if os.path.isfile(stamp_file) and os.path.isfile(job.product) and read_text(stamp_file) == stamp:
            say(f"[world] BLIP-2 stage-1 Q-Former reused: {job.product}")
            return job.product
        shutil.rmtree(job.out_dir, ignore_errors=True)
        wall = run_with_bar([job], env, 1, "BLIP-2 stage-1 Q-Former")
        with open(stamp_file, "w") as f:
            f.write(stamp)
    say(f"[world] BLIP-2 stage-1 Q-Former: {epochs} epochs ({wall[job.key]:.0f} s) -> {job.product}")
    return job.product


# --------------------------------------------------------------------------- running

def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def run_with_bar(jobs: List[P.Job], env, max_parallel: int, desc: str, on_done=None) -> Dict[str, float]:
    from tqdm import tqdm

    with tqdm(total=sum(job.epochs for job in jobs), desc=desc, unit="epoch", file=sys.stdout,
              dynamic_ncols=True) as bar:
        return run_jobs(jobs, env, max_parallel, bar=bar, on_done=on_done)


def converter_quality(path: str) -> dict:
    from lavis_vpgtrans.common.checkpoint import load_checkpoint_file

    meta = load_checkpoint_file(path)["metadata"]
    overlap, quality = meta["overlap"], meta["quality"]
    return {"pairs": overlap["pairs"], "same_tokenizer": overlap["same_tokenizer"], "fit": overlap["fit"],
            "held_out": overlap["held_out"], "held_out_mean_cosine": quality.get("held_out_mean_cosine"),
            "held_out_top1_nn_accuracy": quality.get("held_out_top1_nn_accuracy"),
            "held_out_in_text": quality.get("held_out_in_text"),
            "held_out_in_text_mean_cosine": quality.get("held_out_in_text_mean_cosine"),
            "held_out_in_text_top1_nn_accuracy": quality.get("held_out_in_text_top1_nn_accuracy"),
            "nn_candidates": quality.get("nn_candidates")}


def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def job_summary(job: P.Job, wall: float) -> str:
    seed = job.key.split("/", 1)[0]
    if job.run is None:  # a converter
        q = converter_quality(job.product)
        return (f"[{seed}] {job.label}: {q['pairs']} shared tokens, held-out cosine "
                f"{fmt(q['held_out_mean_cosine'], '.3f')}, top-1 NN {fmt(q['held_out_top1_nn_accuracy'], '.2f')}; "
                f"the {q['held_out_in_text']} in the LMs' text: cosine "
                f"{fmt(q['held_out_in_text_mean_cosine'], '.3f')}, top-1 NN "
                f"{fmt(q['held_out_in_text_top1_nn_accuracy'], '.2f')} ({wall:.0f} s)")
    if not job.validates:
        return f"[{seed}] {job.label}: {job.epochs} epochs ({wall:.0f} s)"
    run = load_run(job.job_dir, job.label)
    parts = []
    for bench, metric in P.METRICS.items():
        scores = run.epoch_scores(bench, metric)
        if scores:
            best_epoch = max(scores, key=lambda e: (scores[e], -e))
            parts.append(f"{bench} best {scores[best_epoch]:.3f} (epoch {best_epoch + 1}), last {scores[max(scores)]:.3f}")
    return f"[{seed}] {job.label}: {job.epochs} epochs, " + "; ".join(parts) + f" ({wall:.0f} s)"


# --------------------------------------------------------------------------- analysis

def load_runs(seed_plan: P.SeedPlan) -> Dict[str, SpeedupRun]:
    """The validated metrics of every run of one seed that validates, by run name."""
    return {job.run.name: load_run(job.job_dir, job.run.label)
            for job in seed_plan.jobs.values() if job.run is not None and job.validates}


def last_captions(job: P.Job, epoch: Optional[int] = None) -> str:
    """The captions a run generated for the val split at its last epoch (or at `epoch`, 0-based:
    the caption task's result file, <job dir>/result/val_epoch<N>.json)."""
    path = os.path.join(job.job_dir, "result", f"val_epoch{job.epochs - 1 if epoch is None else epoch}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{job.key}: no captions of its last epoch at {path}")
    return path


def captions_gt(zoo_dir: str) -> str:
    return os.path.join(zoo_dir, "data", "annotations", "caption_val_gt.json")


def analyse_seed(seed_plan: P.SeedPlan, runs: Mapping[str, SpeedupRun], cross_family: bool, zoo_dir: str) -> dict:
    """Table 3 / Table 5 / warm-up tables of one seed (written under <seed dir>/analysis/),
    every run's best / last / mean-over-epochs scores, the attribute F1 of its last captions
    and the warm-up lr runs' projector movement."""
    from lavis_vpgtrans.demo.attributes import attribute_scores

    root = seed_plan.root
    opt_tables, opt_md = run_analysis(runs[P.TFS.name], runs[P.VPGTRANS.name], runs[P.INHERIT.name],
                                      [runs[P.NO_CONVERTER.name]], P.METRICS, os.path.join(root, "analysis", "opt-large"))
    result = {"opt-large": {"tables": [t.to_json() for t in opt_tables], "markdown": opt_md}}
    if cross_family:
        tables, md = run_analysis(runs[P.CROSS_TFS.name], runs[P.CROSS_VPGTRANS.name], None,
                                  [runs[P.CROSS_NO_CONVERTER.name]], P.METRICS, os.path.join(root, "analysis", "llama"))
        result["llama"] = {"tables": [t.to_json() for t in tables], "markdown": md}
    result["converters"] = {job.extra["tgt"]: converter_quality(job.product)
                            for job in seed_plan.jobs.values() if job.run is None}
    warmup, warmup_lr = {}, {}
    for spec in (P.WARMUP_CONVERTER, P.WARMUP_RANDOM):
        if spec.name in runs:  # every epoch is stage 1: runner epochs, not paper epochs
            scores = runs[spec.name].epoch_scores(P.CAPTION, P.METRICS[P.CAPTION])
            warmup[spec.label] = {str(epoch + 1): score for epoch, score in scores.items()}
    if warmup:
        result["warmup"] = warmup
    converted = seed_plan.jobs.get(f"seed{seed_plan.seed}/convert_opt-large")
    for scale in P.WARMUP_LR_SCALES:
        spec = P.warmup_lr_run(scale)
        if spec.name in runs:
            job = seed_plan.jobs[f"seed{seed_plan.seed}/{spec.name}"]
            scores = runs[spec.name].epoch_scores(P.CAPTION, P.METRICS[P.CAPTION])
            warmup_lr[str(scale)] = {
                "caption": {str(epoch + 1): score for epoch, score in scores.items()},
                # after the first warm-up epoch, from the converter's projector
                "movement": projector_movement(converted.product, os.path.join(job.job_dir, "checkpoint_0.pth"))}
    if warmup_lr:
        result["warmup_lr"] = warmup_lr
    result["best"] = {run.name: {bench: max(run.epoch_scores(bench, metric).values())
                                 for bench, metric in P.METRICS.items() if run.epoch_scores(bench, metric)}
                      for run in runs.values()}
    result["scores"] = {name: {bench: run_scores(run.epoch_scores(bench, metric))
                               for bench, metric in P.METRICS.items() if run.epoch_scores(bench, metric)}
                        for name, run in runs.items()}
    result["attributes"] = {job.run.name: attribute_scores(last_captions(job), captions_gt(zoo_dir))
                            for job in seed_plan.jobs.values()
                            if job.run is not None and job.validates and job.run.name in ATTRIBUTE_RUNS}
    # this seed's validation noise on the differences the demo claims: per-image paired intervals
    jobs = {job.run.name: job for job in seed_plan.jobs.values() if job.run is not None}
    result["image_intervals"] = {
        label: paired_image_interval(last_captions(jobs[a], epoch), last_captions(jobs[b], epoch), captions_gt(zoo_dir))
        for label, a, b, epoch in IMAGE_INTERVALS if a in jobs and b in jobs}
    return result


# (label, run a, run b, 0-based epoch or None for the last): the differences whose per-image
# validation noise the demo reports
IMAGE_INTERVALS = [
    ("warm-up epoch 1: converter init - random init", P.WARMUP_CONVERTER.name, P.WARMUP_RANDOM.name, 0),
    ("last epoch: VPGTrans - w/o converter init", P.VPGTRANS.name, P.NO_CONVERTER.name, None),
    ("last epoch: VPGTrans - TFS", P.VPGTRANS.name, P.TFS.name, None),
    ("last epoch: cross-family VPGTrans - w/o converter init", P.CROSS_VPGTRANS.name, P.CROSS_NO_CONVERTER.name, None),
]


# the runs whose captions are checked for what they say about the image (the transfers, their
# baselines and the source)
ATTRIBUTE_RUNS = [spec.name for spec in (P.SOURCE, P.TFS, P.INHERIT, P.VPGTRANS, P.NO_CONVERTER, P.CROSS_TFS,
                                         P.CROSS_VPGTRANS, P.CROSS_NO_CONVERTER)]
LABELS = {spec.name: spec.label for spec in (P.SOURCE, P.TFS, P.INHERIT, P.VPGTRANS, P.NO_CONVERTER, P.CROSS_TFS,
                                             P.CROSS_VPGTRANS, P.CROSS_NO_CONVERTER)}
ATTRIBUTE_KINDS = ("shape", "color", "cell", "object")


def cell(tables_json: List[dict], row: str, bench: str) -> Optional[dict]:
    for table in tables_json[:1]:  # Table 3
        for r in table["rows"]:
            if r["run"] == row and bench in r["cells"]:
                return r["cells"][bench]
    return None


def speedup_value(c: Optional[dict]) -> Optional[float]:
    """A Table 3 cell's speed-up for statistics: a transfer that never beat TFS's best counts 0;
    None without the comparison."""
    if c is None:
        return None
    return 0.0 if c["speedup"] is None else float(c["speedup"])


def fmt_speedup(c: Optional[dict], last_epoch: int) -> str:
    """As the paper prints it; "*" when the baseline's best came at its last epoch."""
    if c is None:
        return "n/a"
    text = "-" if c["speedup"] is None else f"{c['speedup']:.1f}"
    return text + ("*" if c["e_baseline"] == last_epoch else "")


STILL_IMPROVING = ("*: TFS's best came at its last epoch, so it was still improving: the speed-up is "
                   "measured within the epoch budget, and TFS might have gone higher with more epochs.")


def speedup_rows(cross_family: bool) -> List[tuple]:
    """(row label, transfer key, run label) of the summary's speed-up table."""
    rows = [(P.VPGTRANS.label, "opt-large", P.VPGTRANS.label), (P.INHERIT.label, "opt-large", P.INHERIT.label),
            (P.NO_CONVERTER.label, "opt-large", P.NO_CONVERTER.label)]
    if cross_family:
        rows += [(P.CROSS_VPGTRANS.label + " (vs TFS LLaMA)", "llama", P.CROSS_VPGTRANS.label),
                 (P.CROSS_NO_CONVERTER.label + " (vs TFS LLaMA)", "llama", P.CROSS_NO_CONVERTER.label)]
    return rows


def over_seeds(results: Mapping[int, dict], value) -> Optional[dict]:
    """spread() of value(seed result) over the seeds that have it (value returns None where not)."""
    return spread([value(results[s]) for s in sorted(results)])


def summary_markdown(results: Mapping[int, dict], cross_family: bool, epochs: int) -> str:
    seeds = sorted(results)
    n = len(seeds)
    out = [f"Statistics over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, seeds))}): mean ± standard "
           f"deviation [min, max] over the seeds, unless a column says otherwise."
           + (" One seed is one draw of the training noise: no spread, no interval (run --seeds 0 1 2 3 4 5)."
              if n == 1 else ""), "",
           "### Table 3 in miniature: speed-up against train from scratch (TFS)", "",
           "Speed-up = epoch at which TFS first reaches its best score / epoch at which the transfer first beats "
           "it (\"-\": never, counted 0 in the statistics; VPGTrans's warm-up counts as epoch 1).", "",
           "| transfer | caption CIDEr | VQA acc | caption CIDEr per seed |", "|---|---|---|---|"]
    for label, transfer, run in speedup_rows(cross_family):
        stats_ = [fmt_spread(over_seeds(results, lambda r, b=bench: speedup_value(cell(r[transfer]["tables"], run, b))),
                             ".1f") for bench in (P.CAPTION, P.VQA)]
        per_seed = " / ".join(fmt_speedup(cell(results[s][transfer]["tables"], run, P.CAPTION), epochs) for s in seeds)
        out.append(f"| {label} | {stats_[0]} | {stats_[1]} | {per_seed} |")
    out += ["", STILL_IMPROVING, "", "### Scores: best epoch, last epoch and mean over epochs", "",
            f"Caption CIDEr and VQA accuracy on the {results[seeds[0]].get('n_val', '?')} validation scenes.", "",
            "| run | CIDEr best | CIDEr last | CIDEr mean over epochs | VQA best | VQA last |", "|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(name for s in seeds for name in results[s]["scores"]))
    for name in names:
        def stat(bench, key, spec):
            return fmt_spread(over_seeds(results, lambda r: (r["scores"].get(name, {}).get(bench) or {}).get(key)),
                              spec)
        out.append(f"| {LABELS.get(name, name)} | {stat(P.CAPTION, 'best', '.3f')} | {stat(P.CAPTION, 'last', '.3f')} "
                   f"| {stat(P.CAPTION, 'mean', '.3f')} | {stat(P.VQA, 'best', '.1f')} | {stat(P.VQA, 'last', '.1f')} |")
    if all("warmup" in results[s] for s in seeds):
        w_epochs = sorted({e for s in seeds for w in results[s]["warmup"].values() for e in w}, key=int)
        conv, rand = P.WARMUP_CONVERTER.label, P.WARMUP_RANDOM.label
        out += ["", "### Table 2 in miniature: projector-only warm-up from the converter's and a random "
                "initialisation, caption CIDEr after each epoch", "",
                "| epoch | converter init | random init | converter - random, mean [95% CI] | seeds ahead |",
                "|---|---|---|---|---|"]
        for e in w_epochs:
            diff = over_seeds(results, lambda r: r["warmup"][conv][e] - r["warmup"][rand][e])
            ahead = sum(results[s]["warmup"][conv][e] > results[s]["warmup"][rand][e] for s in seeds)
            out.append(f"| {e} | {fmt_spread(over_seeds(results, lambda r: r['warmup'][conv][e]))} | "
                       f"{fmt_spread(over_seeds(results, lambda r: r['warmup'][rand][e]))} | "
                       f"{fmt_spread(diff, '+.3f', ci=True)} | {ahead} of {n} |")
    if all("warmup_lr" in results[s] for s in seeds):
        scales = sorted({int(k) for s in seeds for k in results[s]["warmup_lr"]})
        w_epochs = sorted({e for s in seeds for w in results[s]["warmup_lr"].values() for e in w["caption"]}, key=int)
        out += ["", "### The warm-up's learning rate (converter init; paper: 5x reaches in 1 epoch what 1x reaches "
                "in 3, 10x adds nothing)", "",
                "Projector movement after warm-up epoch 1: ||W - W0|| / ||W0|| and cos(W, W0) from the converter's "
                "projector W0.", "",
                "| lr | " + " | ".join(f"CIDEr after epoch {e}" for e in w_epochs)
                + " | movement after epoch 1 | cosine to init |", "|---" * (len(w_epochs) + 3) + "|"]
        for scale in scales:
            k = str(scale)
            cols = [fmt_spread(over_seeds(results, lambda r, e=e: r["warmup_lr"][k]["caption"].get(e))) for e in w_epochs]
            cols += [fmt_spread(over_seeds(results, lambda r: r["warmup_lr"][k]["movement"][m]), ".2f")
                     for m in ("relative_change", "cosine")]
            out.append(f"| {scale}x | " + " | ".join(cols) + " |")
    if all("attributes" in results[s] for s in seeds):
        out += ["", "### Does the model see? Attribute F1 of the last epoch's captions", "",
                "F1 (%) of the shapes, colours, grid cells and whole objects (colour + shape + cell) the captions "
                "state, against the scene; in brackets the shuffled baseline: the same captions scored against "
                "other scenes (what the caption distribution alone gets, without seeing). Count: accuracy of the "
                "number of things stated.", "",
                "| run | " + " | ".join(ATTRIBUTE_KINDS) + " | count |", "|---" * (len(ATTRIBUTE_KINDS) + 2) + "|"]
        names = list(dict.fromkeys(name for s in seeds for name in results[s]["attributes"]))
        for name in names:
            def attr(key, kind=None):
                return over_seeds(results, lambda r: None if name not in r["attributes"] else
                                  100 * (r["attributes"][name][key][kind] if kind else r["attributes"][name][key]))
            cols = [f"{fmt_spread(attr('f1', k), '.1f').split(' [')[0]} ({attr('shuffled_f1', k)['mean']:.1f})"
                    for k in ATTRIBUTE_KINDS]
            cols.append(f"{fmt_spread(attr('count_acc'), '.1f').split(' [')[0]} ({attr('shuffled_count_acc')['mean']:.1f})")
            out.append(f"| {LABELS.get(name, name)} | " + " | ".join(cols) + " |")
    if all("image_intervals" in results[s] for s in seeds):
        out += ["", "### Validation noise: one seed's paired differences on the validation images", "",
                "Caption CIDEr of a minus b on the same images, with the 95% interval that the images alone give "
                "(± 1.96 standard errors of the per-image differences), averaged over the seeds; the spread of the "
                "difference between seeds (training noise included) is in the other tables.", "",
                "| difference | mean over seeds | one seed's interval half-width, mean [min, max] |", "|---|---|---|"]
        labels = list(dict.fromkeys(k for s in seeds for k in results[s]["image_intervals"]))
        for label in labels:
            diff = over_seeds(results, lambda r: (r["image_intervals"].get(label) or {}).get("diff"))
            half = over_seeds(results, lambda r: (r["image_intervals"].get(label) or {}).get("half_width"))
            out.append(f"| {label} | {fmt_spread(diff, '+.3f')} | {half['mean']:.3f} [{half['min']:.3f}, {half['max']:.3f}] |")
    out += ["", "### Word-embedding converter (held-out shared tokens)", "",
            "All held-out pairs, and those of them whose two tokens occur in the LMs' pre-training text "
            "(the others are never trained: they keep their initial embeddings, which in this world a "
            "linear map relates exactly).", "",
            "| transfer | shared tokens | held out | held-out cosine | top-1 NN accuracy "
            "| held out, in the text | cosine, in the text | top-1 NN, in the text |",
            "|---|---|---|---|---|---|---|---|"]
    targets = list(dict.fromkeys(t for s in seeds for t in results[s]["converters"]))
    for tgt in targets:
        def q(key, spec):
            return fmt_spread(over_seeds(results, lambda r: (r["converters"].get(tgt) or {}).get(key)), spec)
        first = results[seeds[0]]["converters"][tgt]
        out.append(f"| opt-small -> {tgt} | {first['pairs']} | {first['held_out']} | "
                   f"{q('held_out_mean_cosine', '.3f')} | {q('held_out_top1_nn_accuracy', '.2f')} | "
                   f"{q('held_out_in_text', '.1f')} | {q('held_out_in_text_mean_cosine', '.3f')} | "
                   f"{q('held_out_in_text_top1_nn_accuracy', '.2f')} |")
    return "\n".join(out) + "\n"


def judged(text: str, per_seed: Mapping[str, Optional[float]], passes, spec: str = ".2f") -> dict:
    """A goal stated on the statistics: met on every seed, on the mean only, or not; `passes`
    says whether one value (a seed's, or the mean) meets it."""
    values = list(per_seed.values())
    s = spread(values)
    every = all(v is not None and passes(v) for v in values)
    on_mean = s is not None and passes(s["mean"])
    worst = min(per_seed, key=lambda k: -math.inf if per_seed[k] is None else per_seed[k])
    return {"text": text, "per_seed": dict(per_seed), "stats": s, "met": every, "met_on_mean": on_mean,
            "worst_seed": worst,
            "show": {k: "-" if v is None else format(v, spec) for k, v in per_seed.items()}, "spec": spec}


def goal_text(goal: Mapping) -> str:
    """A goal as the line the demo prints: its verdict on the mean and on the worst seed."""
    s, worst = goal["stats"], goal["worst_seed"]
    if goal["met"]:
        verdict = "met on every seed"
    elif goal["met_on_mean"]:
        verdict = f"met on the mean, NOT on every seed (worst: seed {worst}, {goal['show'][worst]})"
    else:
        verdict = f"NOT met (worst: seed {worst}, {goal['show'][worst]})"
    return (f"Goal ({goal['text']}): {verdict}. Mean {fmt_spread(s, goal['spec'])} over {len(goal['per_seed'])} "
            f"seeds; per seed: " + ", ".join(f"{k}: {v}" for k, v in goal["show"].items()))


def goal(results: Mapping[int, dict], epochs: int) -> dict:
    """The issue's goal: VPGTrans beats TFS's best caption CIDEr in at most half of TFS's
    epochs (speed-up >= 2); a seed without the comparison fails it."""
    per_seed, still_improving = {}, {}
    for seed, res in sorted(results.items()):
        c = cell(res["opt-large"]["tables"], P.VPGTRANS.label, P.CAPTION)
        if c is None:
            raise LogError(f"seed {seed}: no caption comparison of {P.VPGTRANS.label} with TFS")
        per_seed[str(seed)] = c["speedup"]
        still_improving[str(seed)] = c["e_baseline"] == epochs
    judged_ = judged(f"VPGTrans speed-up >= {GOAL_SPEEDUP:g} on caption CIDEr",
                     {k: 0.0 if v is None else v for k, v in per_seed.items()}, lambda v: v >= GOAL_SPEEDUP, ".1f")
    return {**judged_, "metric": f"{P.CAPTION} {P.METRICS[P.CAPTION]}", "threshold": GOAL_SPEEDUP,
            "speedup_per_seed": per_seed, "tfs_best_at_last_epoch": still_improving}


def further_goals(results: Mapping[int, dict]) -> Dict[str, dict]:
    """The issue's other goals, where the run has what they compare, each judged on the mean
    and on every seed: the converter's start ahead of a random projector after warm-up epoch 1
    (paper Table 2), the cross-family VPGTrans ahead of LLaMA TFS (speed-up > 1 on caption
    CIDEr), the within-family converter's held-out top-1 NN accuracy >= 0.5, and VPGTrans's
    captions stating whole objects above the shuffled baseline."""
    seeds = sorted(results)
    goals = {}
    if all("warmup" in results[s] for s in seeds):
        goals["warmup"] = judged(
            "converter init ahead of random init after warm-up epoch 1, caption CIDEr difference > 0",
            {str(s): results[s]["warmup"][P.WARMUP_CONVERTER.label].get("1") - results[s]["warmup"][P.WARMUP_RANDOM.label].get("1")
             for s in seeds}, lambda v: v > 0, "+.3f")
    if all("llama" in results[s] for s in seeds):
        goals["cross_family"] = judged(
            "cross-family VPGTrans ahead of LLaMA TFS, speed-up > 1 on caption CIDEr",
            {str(s): speedup_value(cell(results[s]["llama"]["tables"], P.CROSS_VPGTRANS.label, P.CAPTION)) for s in seeds},
            lambda v: v > 1, ".1f")
    goals["converter"] = judged(
        f"converter opt-small -> opt-large held-out top-1 NN accuracy >= {GOAL_TOP1:g}",
        {str(s): results[s]["converters"].get("opt-large", {}).get("held_out_top1_nn_accuracy") for s in seeds},
        lambda v: v >= GOAL_TOP1, ".2f")
    if all(P.VPGTRANS.name in results[s].get("attributes", {}) for s in seeds):
        def lead(r):
            a = r["attributes"][P.VPGTRANS.name]
            return 100 * (a["f1"]["object"] - a["shuffled_f1"]["object"])
        goals["sees"] = judged("VPGTrans's captions state whole objects above the shuffled baseline, object F1 "
                               "lead > 0 points", {str(s): lead(results[s]) for s in seeds}, lambda v: v > 0, "+.1f")
    return goals


def effects(results: Mapping[int, dict]) -> List[str]:
    """Measured effects the demo reports without a goal: the converter's share of the
    cross-family lead, and the warm-up lr claim, as paired differences over seeds."""
    seeds = sorted(results)
    lines = []
    if all(P.CROSS_NO_CONVERTER.name in results[s].get("scores", {}) for s in seeds):
        for key, what in (("mean", "mean over epochs"), ("last", "last epoch")):
            diff = over_seeds(results, lambda r: r["scores"][P.CROSS_VPGTRANS.name][P.CAPTION][key]
                              - r["scores"][P.CROSS_NO_CONVERTER.name][P.CAPTION][key])
            lines.append(f"Converter's share across families: VPGTrans opt-small->LLaMA minus the same without "
                         f"converter init, caption CIDEr {what}: {fmt_spread(diff, '+.3f', ci=True)} (95% CI over seeds)")
    if all("warmup_lr" in results[s] and {"1", "5"} <= set(results[s]["warmup_lr"]) for s in seeds):
        diff = over_seeds(results, lambda r: r["warmup_lr"]["5"]["caption"].get("1") - r["warmup_lr"]["1"]["caption"].get(
            max(r["warmup_lr"]["1"]["caption"], key=int)))
        lines.append(f"Warm-up lr: 5x after 1 epoch minus 1x after its last warm-up epoch, caption CIDEr: "
                     f"{fmt_spread(diff, '+.3f', ci=True)} (95% CI over seeds)")
    return lines


def plot(runs_by_seed: Mapping[int, Mapping[str, SpeedupRun]], cross_family: bool, path: str) -> None:
    """Convergence curves: a row per seed; caption CIDEr and VQA accuracy of the opt-large
    runs (and of the LLaMA runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("opt-small -> opt-large", [P.TFS, P.INHERIT, P.VPGTRANS, P.NO_CONVERTER])]
    if cross_family:
        groups.append(("opt-small -> LLaMA", [P.CROSS_TFS, P.CROSS_VPGTRANS, P.CROSS_NO_CONVERTER]))
    panels = [(title, specs, bench) for title, specs in groups for bench in (P.CAPTION, P.VQA)]
    seeds = sorted(runs_by_seed)
    fig, axes = plt.subplots(len(seeds), len(panels), figsize=(4.2 * len(panels), 3.4 * len(seeds)), squeeze=False)
    for row, seed in enumerate(seeds):
        for col, (title, specs, bench) in enumerate(panels):
            plot_panel(axes[row][col], [runs_by_seed[seed][spec.name] for spec in specs], bench, P.METRICS[bench],
                       title=f"seed {seed}: {title}", ylabel=f"{bench} {P.METRICS[bench]}", legend_size="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def output_and_zoo(args, name: str, shared: str, reuse: bool = False) -> Tuple[str, str]:
    """A demo's output directory (--out, default output/<name>/<date>_<time>; one holding an
    earlier run's seed directories or its `shared` directory is refused unless --overwrite or
    `reuse`) and its world (--zoo, default the cache's zoo of --profile)."""
    from lavis_vpgtrans.toy.zoo import PROFILES, default_zoo_dir

    if args.profile not in PROFILES:
        raise SystemExit(f"error: --profile {args.profile!r}: known profiles are {sorted(PROFILES)}")
    out = os.path.abspath(args.out or os.path.join("output", name, time.strftime("%Y%m%d_%H%M%S")))
    earlier = [path for path in [os.path.join(out, f"seed{seed}") for seed in args.seeds]
               + [os.path.join(out, shared)] if os.path.isdir(path)]
    if earlier and not args.overwrite and not reuse:
        raise SystemExit(f"error: --out {out} holds an earlier run ({', '.join(earlier)}): choose another "
                         f"directory, or pass --overwrite to replace it")
    os.makedirs(out, exist_ok=True)
    return out, os.path.abspath(args.zoo or default_zoo_dir(args.profile))


def job_env(zoo_dir: str, threads: int) -> Dict[str, str]:
    """The environment of a demo's jobs: this zoo behind `toy:` paths, offline, pinned CPU
    kernels (the same results on any x86-64 machine with AVX2) with `threads` threads."""
    return kernels.pinned_env(dict(os.environ, VPGTRANS_TOY_ZOO=zoo_dir, HF_HUB_OFFLINE="1",
                                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"), threads=threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    start = time.time()
    if args.analyse_only and not args.out:
        raise SystemExit("error: --analyse-only needs --out: the directory of the finished runs")
    out, zoo_dir = output_and_zoo(args, "demo", P.SOURCE.name, reuse=args.analyse_only)
    cross_family = not args.no_cross_family
    say(f"VPGTrans demo: seeds {args.seeds}, {args.epochs} epochs per transfer, output in {out}")

    say(f"[world] {kernels.describe()}")
    # every job sees this zoo through `toy:` paths; `--jobs` of them at once, each with pinned CPU
    # kernels (the same results on any x86-64 machine with AVX2) and `--threads` threads
    env = job_env(zoo_dir, args.threads)
    timings = {}
    if args.analyse_only:  # the runs' own record: no world build, no training
        stage1 = P.stage1_job(os.path.join(zoo_dir, "demo"), args.stage1_epochs).product
    else:
        t = time.time()
        build_world(zoo_dir, args.profile)
        timings["world"] = time.time() - t
        t = time.time()
        stage1 = ensure_stage1(zoo_dir, args.stage1_epochs, env)
        timings["qformer_stage1"] = time.time() - t

    source = P.source_job(out, stage1, args.source_epochs)
    plans = {seed: P.seed_plan(seed, out, zoo_dir, stage1, args.epochs, source, cross_family,
                               warmup_epochs=args.warmup_epochs) for seed in args.seeds}
    if not args.analyse_only:
        for path in [p.root for p in plans.values()] + [source.out_dir]:
            shutil.rmtree(path, ignore_errors=True)  # --overwrite: the rerun starts clean
        # all seeds in one queue, the shared source first: the transfers wait only for it
        jobs = sorted({job.key: job for p in plans.values() for job in p.jobs.values()}.values(),
                      key=lambda job: (job.run is not P.SOURCE, job.key))
        t = time.time()
        walls = run_with_bar(jobs, env, args.jobs, f"training {len(jobs)} jobs",
                             on_done=lambda job, wall: say(job_summary(job, wall)))
        timings["jobs"] = time.time() - t
        timings["job_walls"] = walls

    runs_by_seed = {seed: load_runs(seed_plan) for seed, seed_plan in plans.items()}
    results = {seed: analyse_seed(plans[seed], runs, cross_family, zoo_dir) for seed, runs in runs_by_seed.items()}
    n_val = count_val_scenes(zoo_dir)
    for res in results.values():
        res["n_val"] = n_val
    markdown = summary_markdown(results, cross_family, args.epochs)
    outcome = goal(results, args.epochs)
    further = further_goals(results)
    goal_line = "\n\n".join([goal_text(outcome)] + [goal_text(g) for g in further.values()] + effects(results))
    plot_path = os.path.join(out, "convergence.png")
    plot(runs_by_seed, cross_family, plot_path)
    if args.analyse_only:  # the wall time is the runs', as their results.json recorded it
        earlier_json = os.path.join(out, "results.json")
        if os.path.isfile(earlier_json):
            with open(earlier_json) as f:
                timings = json.load(f).get("timings_s", {})
        timings["analysed_again_s"] = time.time() - start
    else:
        timings["total"] = time.time() - start
    total = ("Total wall time: n/a" if "total" not in timings else
             f"Total wall time: {timings['total'] / 60:.1f} min ({timings['total']:.0f} s)")
    if args.analyse_only:
        total += f"; tables made again from the finished runs (--analyse-only) in {timings['analysed_again_s']:.0f} s"

    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown + "\n" + goal_line + "\n\n" + total + "\n\n")
        for seed in sorted(results):
            for transfer in ("opt-large", "llama"):
                if transfer in results[seed]:
                    f.write(f"## seed {seed}, opt-small -> {transfer}\n\n{results[seed][transfer]['markdown']}\n")
    summary = {
        "args": vars(args), "kernels": kernels.describe(), "zoo": zoo_dir, "zoo_stamp": zoo_stamp(zoo_dir), "stage1_checkpoint": stage1,
        "metrics": P.METRICS, "goal": outcome, "further_goals": further, "timings_s": timings,
        "seeds": {str(seed): {k: v for k, v in res.items() if k not in ("opt-large", "llama")}
                  | {transfer: {"tables": res[transfer]["tables"]} for transfer in ("opt-large", "llama")
                     if transfer in res}
                  for seed, res in results.items()},
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print()
    print(markdown)
    print(goal_line)
    print(f"Wrote {os.path.join(out, 'results.json')}, results.md, {plot_path}; per-seed tables and plots "
          f"under seed*/analysis/")
    print(total)
    return 0


def entry() -> int:
    # the world is built in this process: pinned kernels from the start (common/kernels.py)
    kernels.reexec_pinned("lavis_vpgtrans.demo", sys.argv[1:])
    try:
        return main()
    except (JobFailed, LogError, OSError) as err:  # the message names the job, log or file
        print(f"\nerror: {err}", file=sys.stderr)
        return 1

"""`python -m lavis_vpgtrans.demo pformer`: the P-Former experiment in miniature, on CPU
(issue 21; P-Former paper Table 1 and Table 6).

1. Stage 0, text only, once for all seeds: a P-Former for the toy LLaMA pre-trained on the
   captions of the VL training split and of the source split's 2,048 images, which the VL
   stages never see (the cheap extra text); the ablation's P-Former on the VL training
   captions only (fewer sentences, as many steps). Each is measured on held-out val
   sentences: does the frozen LLaMA reproduce a sentence's content words from its own
   prompts, well above another sentence's?
2. BLIP-2 stage 1 (Q-Former: ITC + ITM + ITG) with and without L_align (omega 10), at a scarce
   image-text budget (a subset of the training split) and a plentiful one (all of it); the
   ablation's P-Former at the scarce budget. Once for all seeds, from one Q-Former
   initialisation: each pair starts from the same point.
3. Stage 2 per seed: the toy LLaMA VL model from each stage-1 Q-Former, with alignment
   (omega 100, projector from stage 1) and without (a new projector, as BLIP-2), caption CIDEr
   and zero-shot VQA after every epoch.
4. Statistics over seeds and the three claims, judged on the mean and on every seed.

Every run is a `train.py` process on a config of projects/pformer/demo/experiment/.
"""

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from lavis_vpgtrans.analysis.speedup import LogError, load_run, plot_panel
from lavis_vpgtrans.common import kernels
from lavis_vpgtrans.demo import plan as P
from lavis_vpgtrans.demo.cli import (build_world, goal_text, job_env, judged, output_and_zoo, run_with_bar, say,
                                     zoo_stamp)
from lavis_vpgtrans.demo.jobs import JobFailed
from lavis_vpgtrans.demo.stats import fmt_spread, run_scores, spread

CONFIG_DIR = os.path.join(P.REPO_ROOT, "projects", "pformer", "demo", "experiment")
# stage 0 and stage 1 are shared by the seeds (as the VPGTrans demo's source model): fixed seed
SHARED_SEED = 0
PFORMER_TYPE = "tiny_llama"  # the `pformer` model type of stage0.yaml
HELD_OUT = 160  # val images whose first caption measures the P-Formers' reconstruction

STAGE0 = P.Run("stage0", "P-Former, VL + extra captions", "stage0.yaml")
STAGE0_FEW = P.Run("stage0_few", "P-Former, VL captions only", "stage0_few.yaml")


@dataclass(frozen=True)
class Arm:
    """One way to train the VL model: which P-Former (None: no alignment)."""

    name: str
    label: str
    pformer: Optional[P.Run]


WITH = Arm("with", "with P-Former", STAGE0)
WITHOUT = Arm("without", "without P-Former", None)
FEW = Arm("with_few", "with P-Former (fewer sentences)", STAGE0_FEW)
BUDGETS = ("scarce", "plentiful")
ARMS = {"scarce": (WITHOUT, WITH, FEW), "plentiful": (WITHOUT, WITH)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavis_vpgtrans.demo pformer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output directory (default: output/pformer_demo/<date>_<time>); "
                                                "one holding earlier results needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="one stage-2 run of every arm per seed (default: 0 1 2 3)")
    p.add_argument("--epochs", type=int, default=6, help="stage-2 epochs, validated each (default: %(default)s)")
    p.add_argument("--stage1-epochs", type=int, default=5, help="BLIP-2 stage-1 epochs (default: %(default)s)")
    # about 900 steps each: ~100 steps leave the prompts without content (0.45 own vs 0.41
    # another sentence's content-word accuracy), ~1,000 give 0.9 vs 0.44
    p.add_argument("--stage0-epochs", type=int, default=5,
                   help="epochs of the P-Former on the VL + extra captions (default: %(default)s, ~920 steps)")
    p.add_argument("--stage0-few-epochs", type=int, default=42,
                   help="epochs of the ablation's P-Former on the VL captions only (default: %(default)s, "
                        "about as many steps)")
    p.add_argument("--scarce-images", type=int, default=64,
                   help="images of the scarce budget, the first of the training split (default: %(default)s; "
                        "the plentiful budget is the whole split)")
    p.add_argument("--zoo", default=None, help="toy world directory (default: $VPGTRANS_TOY_ZOO, else the cache's "
                                                 "toy_zoo_demo); built there if missing")
    p.add_argument("--profile", default="demo", help="toy zoo profile (default: demo)")
    p.add_argument("--jobs", type=int, default=2, help="training processes at once (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    return p


def check_args(args) -> None:
    for name in ("epochs", "stage1_epochs", "stage0_epochs", "stage0_few_epochs", "scarce_images", "jobs",
                 "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds repeats a seed: {args.seeds}")


# --------------------------------------------------------------------------- the plan

def budget_files(zoo_dir: str, out: str, scarce_images: int) -> Dict[str, str]:
    """The training annotation file of each budget: the scarce one is the first
    `scarce_images` images of the training split (all their captions), written into `out`."""
    train = os.path.join(zoo_dir, "data", "annotations", "caption_train.json")
    with open(train) as f:
        records = json.load(f)
    images = list(dict.fromkeys(r["image"] for r in records))
    if scarce_images >= len(images):
        raise SystemExit(f"error: --scarce-images {scarce_images}: the training split has only {len(images)}")
    keep = set(images[:scarce_images])
    scarce = os.path.join(out, "data", f"caption_train_first{scarce_images}.json")
    os.makedirs(os.path.dirname(scarce), exist_ok=True)
    with open(scarce, "w") as f:
        json.dump([r for r in records if r["image"] in keep], f)
    return {"scarce": scarce, "plentiful": train}


def stage1_run(arm: Arm) -> P.Run:
    return P.Run(f"stage1_{arm.name}", f"stage 1, {arm.label}",
                 "stage1_no_align.yaml" if arm.pformer is None else "stage1.yaml")


def stage2_run(arm: Arm) -> P.Run:
    return P.Run(arm.name, arm.label, "stage2_no_align.yaml" if arm.pformer is None else "stage2.yaml")


def make_plan(out: str, seeds: Sequence[int], budgets: Mapping[str, str], args) -> Dict[str, P.Job]:
    """All jobs by key, dependencies first: the two stage-0 P-Formers and the stage-1
    Q-Formers (shared), then every seed's stage-2 runs."""
    def job(key, run, out_dir, seed, epochs, options=(), deps=(), validates=True):
        return P.train_job(key, run, out_dir, seed, epochs, options, deps, validates, config_dir=CONFIG_DIR)

    shared = os.path.join(out, "shared")
    stage0 = {run.name: job(f"shared/{run.name}", run, os.path.join(shared, run.name), SHARED_SEED, epochs,
                            validates=False)
              for run, epochs in ((STAGE0, args.stage0_epochs), (STAGE0_FEW, args.stage0_few_epochs))}
    jobs = list(stage0.values())
    stage1 = {}
    for budget in BUDGETS:
        data = [f"datasets.toy_caption.build_info.annotations.train.storage={budgets[budget]}"]
        for arm in ARMS[budget]:
            run = stage1_run(arm)
            options, deps = list(data), []
            if arm.pformer is not None:
                p0 = stage0[arm.pformer.name]
                options.append(f"model.pformer_checkpoint={p0.product}")
                deps.append(p0.key)
            stage1[budget, arm.name] = job(f"shared/{budget}/{run.name}", run,
                                           os.path.join(shared, budget, run.name), SHARED_SEED,
                                           args.stage1_epochs, options, deps, validates=False)
    jobs += stage1.values()
    for seed in seeds:
        for budget in BUDGETS:
            data = [f"datasets.toy_caption.build_info.annotations.train.storage={budgets[budget]}"]
            for arm in ARMS[budget]:
                s1 = stage1[budget, arm.name]
                options, deps = data + [f"model.vpg_checkpoint={s1.product}"], [s1.key]
                if arm.pformer is not None:
                    p0 = stage0[arm.pformer.name]
                    # stage 1's llm_proj was trained toward the P-Former's prompts: stage 2 keeps it
                    options += [f"model.projector_checkpoint={s1.product}", f"model.pformer_checkpoint={p0.product}"]
                    deps.append(p0.key)
                run = stage2_run(arm)
                jobs.append(job(f"seed{seed}/{budget}/{arm.name}", run,
                                os.path.join(out, f"seed{seed}", budget, arm.name), seed, args.epochs, options, deps))
    return {j.key: j for j in jobs}


# --------------------------------------------------------------------------- measurements

def held_out_sentences(zoo_dir: str, n: int = HELD_OUT) -> List[str]:
    """The first caption of the first `n` val images (stage 0 drops every val sentence from its
    training text)."""
    with open(os.path.join(zoo_dir, "data", "annotations", "caption_val.json")) as f:
        records = json.load(f)
    first = [r["caption"][0] if isinstance(r["caption"], list) else r["caption"] for r in records]
    return first[:n]


def pformer_reconstruction(checkpoint: str, zoo_dir: str) -> dict:
    """demo.prompt_reconstruction of a stage-0 checkpoint on the held-out sentences."""
    from lavis_vpgtrans.demo.prompt_reconstruction import PromptedLM, reconstruction
    from lavis_vpgtrans.models.pformer_encoder import load_frozen_pformer, pformer_config

    cfg = pformer_config(PFORMER_TYPE)
    encoder = load_frozen_pformer(PFORMER_TYPE, checkpoint, cfg.num_query_token)
    return reconstruction(encoder, PromptedLM(cfg.llm_model, cfg.max_txt_len), held_out_sentences(zoo_dir))


def train_stats(job: P.Job) -> List[dict]:
    """The per-epoch training averages the runner wrote to log.txt (train_loss, train_loss_lm,
    train_loss_align, ...), as floats."""
    path = os.path.join(job.job_dir, "log.txt")
    stats = []
    with open(path) as f:
        for line in f:
            if line.startswith('{"train_'):
                stats.append({k[len("train_"):]: float(v) for k, v in json.loads(line).items()})
    if not stats:
        raise LogError(f"{path}: no per-epoch training statistics")
    return stats


def stage0_size(job: P.Job) -> Dict[str, Optional[int]]:
    """Training sentences of a stage-0 run after the held-out ones were dropped, and its
    optimisation steps, as its log states them."""
    import re

    sentences = per_epoch = None
    with open(job.log, errors="replace") as f:
        for line in f:
            m = re.search(r"pformer_sentences: (\d+) of (\d+) train sentences are in val/test", line)
            if m:
                sentences = int(m.group(2)) - int(m.group(1))
            m = re.search(r"Train: data epoch: \[0\]\s+\[\s*0/(\d+)\]", line)
            if m:
                per_epoch = int(m.group(1))
    return {"sentences": sentences, "steps": None if per_epoch is None else per_epoch * job.epochs}


# --------------------------------------------------------------------------- analysis

def seed_scores(jobs: Mapping[str, P.Job], seed: int) -> dict:
    """{budget: {arm: {benchmark: run_scores}}} of one seed's stage-2 runs."""
    result = {}
    for budget in BUDGETS:
        result[budget] = {}
        for arm in ARMS[budget]:
            run = load_run(jobs[f"seed{seed}/{budget}/{arm.name}"].job_dir, arm.label)
            result[budget][arm.name] = {bench: run_scores(run.epoch_scores(bench, metric))
                                        for bench, metric in P.METRICS.items() if run.epoch_scores(bench, metric)}
    return result


def over_seeds(scores: Mapping[int, dict], value) -> Optional[dict]:
    return spread([value(scores[s]) for s in sorted(scores)])


def effect(r: dict, budget: str, a: str, b: str, bench: str, key: str) -> float:
    return r[budget][a][bench][key] - r[budget][b][bench][key]


CLAIM_KEY = "last"  # the trained model's score, as the paper reports it


def claims(scores: Mapping[int, dict]) -> Dict[str, dict]:
    """The paper's three claims on the last epoch's caption CIDEr and VQA accuracy, judged on
    the mean and on every seed."""
    out = {}
    for bench, spec in ((P.CAPTION, "+.3f"), (P.VQA, "+.2f")):
        what = f"{bench} {P.METRICS[bench]}, last epoch"

        def per_seed(value):
            return {str(s): value(scores[s]) for s in sorted(scores)}

        out[f"scarce_gain/{bench}"] = judged(
            f"with P-Former ahead of without at the scarce budget, {what}: difference > 0",
            per_seed(lambda r: effect(r, "scarce", WITH.name, WITHOUT.name, bench, CLAIM_KEY)), lambda v: v > 0, spec)
        out[f"gap_shrinks/{bench}"] = judged(
            f"the gain smaller at the plentiful budget, {what}: scarce gain minus plentiful gain > 0",
            per_seed(lambda r: effect(r, "scarce", WITH.name, WITHOUT.name, bench, CLAIM_KEY)
                     - effect(r, "plentiful", WITH.name, WITHOUT.name, bench, CLAIM_KEY)), lambda v: v > 0, spec)
        out[f"more_sentences/{bench}"] = judged(
            f"more pre-training sentences better than fewer (scarce budget), {what}: difference > 0",
            per_seed(lambda r: effect(r, "scarce", WITH.name, FEW.name, bench, CLAIM_KEY)), lambda v: v > 0, spec)
    return out


def score_table(scores: Mapping[int, dict]) -> List[str]:
    seeds = sorted(scores)
    out = [f"### Stage 2 (toy LLaMA), {len(seeds)} seeds: mean ± sd [min, max]", "",
           "| budget | run | caption CIDEr, last | CIDEr, best | CIDEr, mean over epochs | VQA acc, last "
           "| VQA, best | VQA, mean over epochs |", "|---|---|---|---|---|---|---|---|"]
    for budget in BUDGETS:
        for arm in ARMS[budget]:
            cols = [fmt_spread(over_seeds(scores, lambda r: r[budget][arm.name][bench][key]), spec)
                    for bench, spec in ((P.CAPTION, ".3f"), (P.VQA, ".2f")) for key in ("last", "best", "mean")]
            out.append(f"| {budget} | {arm.label} | " + " | ".join(cols) + " |")
    out += ["", "### Paired differences over seeds: mean [95% CI]", "",
            "| difference | caption CIDEr, last | CIDEr, mean over epochs | VQA acc, last | VQA, mean over epochs |",
            "|---|---|---|---|---|"]
    rows = [("scarce: with - without P-Former", lambda r, b, k: effect(r, "scarce", WITH.name, WITHOUT.name, b, k)),
            ("plentiful: with - without P-Former",
             lambda r, b, k: effect(r, "plentiful", WITH.name, WITHOUT.name, b, k)),
            ("gain at scarce - gain at plentiful",
             lambda r, b, k: effect(r, "scarce", WITH.name, WITHOUT.name, b, k)
             - effect(r, "plentiful", WITH.name, WITHOUT.name, b, k)),
            ("scarce: more - fewer pre-training sentences", lambda r, b, k: effect(r, "scarce", WITH.name, FEW.name, b, k))]
    for label, diff in rows:
        cols = [fmt_spread(over_seeds(scores, lambda r: diff(r, bench, key)), spec, ci=True)
                for bench, spec in ((P.CAPTION, "+.3f"), (P.VQA, "+.2f")) for key in ("last", "mean")]
        out.append(f"| {label} | " + " | ".join(cols) + " |")
    return out


def diagnostics_table(stage0: Mapping[str, dict], losses: Mapping[str, dict]) -> List[str]:
    out = ["", "### Stage 0: do the P-Former's prompts carry their sentence? (held-out val sentences)", "",
           f"The frozen toy LLaMA given a sentence's own P-Former prompts, or another sentence's; accuracy of "
           f"its next-token argmax (teacher-forced) on all tokens and on content words (colour, shape, position), "
           f"and of greedy decoding on content words at their word position. {HELD_OUT} sentences.", "",
           "| P-Former | training sentences | steps | prompts | token acc | content-word acc | greedy content-word acc "
           "| [CLS] cosine between sentences |", "|---|---|---|---|---|---|---|---|"]
    for name, d in stage0.items():
        r = d["reconstruction"]
        for which in ("own", "other"):
            s = r[which]
            out.append(f"| {d['label']} | {d['sentences'] if d['sentences'] is not None else 'n/a'} | {d['steps']} "
                       f"| {which if which == 'own' else 'another sentence'} | {s['token_acc']:.3f} "
                       f"| {s['content_acc']:.3f} | {s['greedy_content_acc']:.3f} "
                       f"| {r['cls_cosine_between_sentences']:.3f} |")
    out += ["", "### Alignment against the LM loss (training averages, first and last epoch)", "",
            "L_align is the MSE between the projected queries and the P-Former's prompt of the caption; "
            "weighted: omega x L_align, the share it takes of the training loss.", "",
            "| run | omega | L_align (first -> last) | omega x L_align | LM / ITC+ITM+ITG loss (first -> last) |",
            "|---|---|---|---|---|"]
    for name, d in losses.items():
        first, last = d["epochs"][0], d["epochs"][-1]
        # stage 1's other losses are ITC + ITM + ITG (its loss_lm), stage 2's the LM loss alone
        parts = [k for k in ("loss_itc", "loss_itm", "loss_lm") if k in first]
        base = f"{sum(first[k] for k in parts):.3f} -> {sum(last[k] for k in parts):.3f}"
        out.append(f"| {d['label']} | {d['omega']:g} | {first['loss_align']:.4f} -> {last['loss_align']:.4f} "
                   f"| {d['omega'] * first['loss_align']:.3f} -> {d['omega'] * last['loss_align']:.3f} | {base} |")
    return out


def plot(jobs: Mapping[str, P.Job], seeds: Sequence[int], path: str) -> None:
    """A row per seed; caption CIDEr and VQA accuracy per epoch at each budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(budget, bench) for budget in BUDGETS for bench in (P.CAPTION, P.VQA)]
    fig, axes = plt.subplots(len(seeds), len(panels), figsize=(4.2 * len(panels), 3.3 * len(seeds)), squeeze=False)
    for row, seed in enumerate(seeds):
        for col, (budget, bench) in enumerate(panels):
            runs = [load_run(jobs[f"seed{seed}/{budget}/{arm.name}"].job_dir, arm.label) for arm in ARMS[budget]]
            plot_panel(axes[row][col], runs, bench, P.METRICS[bench], title=f"seed {seed}: {budget} budget",
                       ylabel=f"{bench} {P.METRICS[bench]}", legend_size="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    start = time.time()
    out, zoo_dir = output_and_zoo(args, "pformer_demo", "shared")
    say(f"P-Former demo: seeds {args.seeds}, stage 2 {args.epochs} epochs, scarce budget {args.scarce_images} "
        f"images, output in {out}")
    say(f"[world] {kernels.describe()}")
    env = job_env(zoo_dir, args.threads)
    os.environ["VPGTRANS_TOY_ZOO"] = zoo_dir  # this process's own measurements read `toy:` paths too
    timings = {}
    t = time.time()
    build_world(zoo_dir, args.profile)
    timings["world"] = time.time() - t

    budgets = budget_files(zoo_dir, out, args.scarce_images)
    jobs = make_plan(out, args.seeds, budgets, args)
    for path in [os.path.join(out, f"seed{seed}") for seed in args.seeds] + [os.path.join(out, "shared")]:
        shutil.rmtree(path, ignore_errors=True)  # --overwrite: the rerun starts clean
    t = time.time()
    timings["job_walls"] = run_with_bar(list(jobs.values()), env, args.jobs, f"training {len(jobs)} jobs",
                                        on_done=lambda job, wall: say(f"[{job.key}] {job.label}: {job.epochs} "
                                                                      f"epochs ({wall:.0f} s)"))
    timings["jobs"] = time.time() - t

    t = time.time()
    stage0 = {}
    for run in (STAGE0, STAGE0_FEW):
        job = jobs[f"shared/{run.name}"]
        stage0[run.name] = {"label": run.label, "checkpoint": job.product, "epochs": job.epochs, **stage0_size(job),
                            "losses": train_stats(job)[-1],
                            "reconstruction": pformer_reconstruction(job.product, zoo_dir)}
    timings["reconstruction"] = time.time() - t
    losses = {}
    for key, job in jobs.items():
        if job.run.config in ("stage1.yaml", "stage2.yaml") and (key.startswith("shared/") or
                                                                  key.startswith(f"seed{args.seeds[0]}/")):
            losses[key] = {"label": f"{key}", "omega": 10.0 if job.run.config == "stage1.yaml" else 100.0,
                           "epochs": train_stats(job)}
    scores = {seed: seed_scores(jobs, seed) for seed in args.seeds}
    verdicts = claims(scores)
    markdown = "\n".join(score_table(scores) + diagnostics_table(stage0, losses)) + "\n"
    goal_lines = "\n\n".join(goal_text(g) for g in verdicts.values())
    plot_path = os.path.join(out, "convergence.png")
    plot(jobs, args.seeds, plot_path)
    timings["total"] = time.time() - start
    total = (f"Total wall time: {timings['total'] / 60:.1f} min ({timings['total']:.0f} s), {len(jobs)} train.py "
             f"runs, {args.jobs} at once")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown + "\n" + goal_lines + "\n\n" + total + "\n")
    summary = {"args": vars(args), "kernels": kernels.describe(), "zoo": zoo_dir, "zoo_stamp": zoo_stamp(zoo_dir),
               "metrics": P.METRICS, "claim_score": CLAIM_KEY, "budgets": budgets,
               "claims": verdicts, "stage0": stage0, "alignment_losses": losses, "timings_s": timings,
               "seeds": {str(seed): scores[seed] for seed in args.seeds},
               "runs": {key: job.job_dir for key, job in jobs.items()}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print(markdown)
    print(goal_lines)
    print(f"\nWrote {os.path.join(out, 'results.json')}, results.md, {plot_path}")
    print(total)
    return 0


def entry(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)  # after `pformer`
    # the runs' results are the same on any x86-64 machine with AVX2 (common/kernels.py)
    kernels.reexec_pinned("lavis_vpgtrans.demo", ["pformer", *argv])
    try:
        return main(argv)
    except (JobFailed, LogError, OSError) as err:  # the message names the job, log or file
        print(f"\nerror: {err}", file=sys.stderr)
        return 1

"""The demo's figures as statistics: a score per run (best, last and mean over epochs), an
effect as mean and spread over seeds with a 95% interval, and the warm-up's projector
movement. One seed is one draw of the training noise; what the demo claims is stated on these."""

import math
from typing import Dict, Mapping, Optional, Sequence

import torch

from lavis_vpgtrans.common.checkpoint import load_checkpoint_file


def spread(values: Sequence[Optional[float]]) -> Optional[dict]:
    """Mean, standard deviation, standard error, min / max and the 95% t-interval of the mean
    of `values` (None entries, e.g. a speed-up that never happened, are counted in `missing`
    and left out); None when no value is left."""
    from scipy import stats

    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    n = len(present)
    mean = sum(present) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * se if n > 1 else math.inf
    return {"n": n, "missing": len(values) - n, "mean": mean, "sd": sd, "se": se, "min": min(present),
            "max": max(present), "ci95": [mean - half, mean + half], "values": list(values)}


def fmt_spread(s: Optional[dict], spec: str = ".3f", ci: bool = False) -> str:
    """"mean ± sd [min, max]" (or "mean [95% CI lo, hi]" with `ci`); "n/a" for None."""
    if s is None:
        return "n/a"
    text = f"{s['mean']:{spec}} [{s['ci95'][0]:{spec}}, {s['ci95'][1]:{spec}}]" if ci else \
        f"{s['mean']:{spec}} ± {s['sd']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"
    return text + (f" ({s['missing']} of {len(s['values'])} none)" if s["missing"] else "")


def run_scores(epoch_scores: Mapping[int, float]) -> Optional[dict]:
    """A run's score three ways: best of its epochs (and where), the last epoch's, and the mean
    over epochs (the area under its curve: a run that gets there sooner scores higher)."""
    if not epoch_scores:
        return None
    best_epoch = max(epoch_scores, key=lambda e: (epoch_scores[e], -e))
    return {"best": epoch_scores[best_epoch], "best_epoch": best_epoch + 1,
            "last": epoch_scores[max(epoch_scores)],
            "mean": sum(epoch_scores.values()) / len(epoch_scores)}


def projector_state(path: str) -> Dict[str, torch.Tensor]:
    """The projector's tensors of a checkpoint (the `*_proj.*` entries: LAVIS's opt_proj /
    t5_proj, our llm_proj)."""
    state = load_checkpoint_file(path)["model"]
    found = {k: v.float() for k, v in state.items() if k.split(".")[0].endswith("_proj")}
    if not found:
        raise KeyError(f"{path}: no projector (*_proj.*) entries among {sorted(state)[:8]}")
    return found


def projector_movement(init_path: str, trained_path: str) -> dict:
    """How far training moved the projector from its initialisation: ||W - W0|| / ||W0|| and
    the cosine between W and W0 (weight and bias flattened together)."""
    init, trained = projector_state(init_path), projector_state(trained_path)
    if sorted(init) != sorted(trained):
        raise KeyError(f"projector entries differ: {init_path} has {sorted(init)}, {trained_path} {sorted(trained)}")
    w0 = torch.cat([init[k].flatten() for k in sorted(init)])
    w = torch.cat([trained[k].flatten() for k in sorted(init)])
    return {"relative_change": float((w - w0).norm() / w0.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(w, w0, dim=0))}


def per_image_cider(result_file: str, gt_file: str) -> Dict[int, float]:
    """Each image's CIDEr (pycocoevalcap's CIDEr-D, document frequencies from all the images'
    references, as the corpus score takes them): the corpus score is their mean."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from lavis_vpgtrans.tasks.captioning import load_caption_results, load_coco_gt

    refs, _ = load_coco_gt(gt_file)
    preds = load_caption_results(result_file)
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise ValueError(f"{result_file}: no caption for {len(missing)} ground-truth images of {gt_file} "
                         f"(e.g. {missing[:5]})")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in sorted(refs)})
    res = tokenizer.tokenize({i: [{"caption": preds[i]}] for i in sorted(refs)})
    _, scores = Cider().compute_score(gts, res)
    return {i: float(s) for i, s in zip(gts, scores)}  # compute_score scores in the order of gts


def paired_image_interval(result_a: str, result_b: str, gt_file: str) -> dict:
    """CIDEr of captions a minus captions b on the same validation images, with the 95% interval
    of that difference from the images alone (one seed's validation noise: mean ± 1.96 standard
    errors of the per-image differences)."""
    a, b = per_image_cider(result_a, gt_file), per_image_cider(result_b, gt_file)
    diffs = [a[i] - b[i] for i in a]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return {"n_images": n, "diff": mean, "ci95": [mean - 1.96 * se, mean + 1.96 * se], "half_width": 1.96 * se}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m lavis_vpgtrans.demo.stats RESULT_A RESULT_B GT: the paired per-image interval."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lavis_vpgtrans.demo.stats", description=paired_image_interval.__doc__)
    parser.add_argument("result_a", help="captions a: [{image_id, caption}] (a run's result/val_epoch<N>.json)")
    parser.add_argument("result_b", help="captions b, of the same images")
    parser.add_argument("gt", help="COCO-format ground truth (the zoo's data/annotations/caption_val_gt.json)")
    args = parser.parse_args(argv)
    out = paired_image_interval(args.result_a, args.result_b, args.gt)
    print(f"CIDEr a - b over {out['n_images']} images: {out['diff']:+.3f}, 95% interval "
          f"[{out['ci95'][0]:+.3f}, {out['ci95'][1]:+.3f}] (± {out['half_width']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

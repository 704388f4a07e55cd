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

"""VPGTrans stage 1(b): start the target projector from the source projector merged with a
linear word-embedding converter g_c(e) = W_c e + b_c from LLM_src's input embeddings to LLM_tgt's.

    python -m lavis_vpgtrans.transfer.converter --src facebook/opt-2.7b --tgt facebook/opt-6.7b \\
        --projector blip2_opt2.7b.pth --src-arch blip2_opt --tgt-arch blip2_opt --out init.pth

Without --tgt-arch (and --tgt-projector-key) the target's class is chosen by the model_type in
its config.json: opt, t5 and llama keep their classes, any other decoder-only LM (Qwen2,
Mistral, Gemma, ...) gets the generic blip2_causal_lm.

1. Read only the two input-embedding matrices (embeddings.py) and pair the tokens the two
   vocabularies share (pairing.py); a seeded fraction of the text pairs is held out.
2. Fit g_c: closed-form (ridge-regularised) weighted least squares with bias, then, for the
   cosine loss, epochs of Adam on L = 1 - cos(g_c(x_s), x_t). The closed form is already the
   exact minimiser of the euclidean (squared distance) loss, so that loss runs no epochs.
   Of the closed form and the state after the epochs, the one with the lower loss on a fixed
   sample of the fit pairs is kept.
3. Report quality on the held-out pairs: mean cosine to the true target embedding, and top-1
   nearest-neighbour accuracy (cosine) over the whole target vocabulary on a seeded sample of
   them (--nn-sample), chunked so nothing vocab x vocab is ever built. With --quality-text,
   the same again on the held-out pairs whose two tokens both occur in that text (e.g. the
   LLMs' pre-training text): shared tokens that no text trains keep their initial embeddings,
   which tell nothing about the map between the trained ones.
4. Merge with the source projector f_s(x) = W_s x + b_s:
       W_t = W_c W_s,    b_t = W_c b_s + b_c
   and write {"model": {"<tgt_proj>.weight", "<tgt_proj>.bias"}, "metadata": {...}}, which the
   models load as `projector_checkpoint` (torch.load(weights_only=True) reads it).
"""

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from lavis_vpgtrans.transfer.embeddings import (TransferError, embedding_shape, load_input_embeddings,
                                                read_model_config)
from lavis_vpgtrans.transfer.pairing import frequency_weights, load_tokenizer, pair_tokens, read_captions, token_counts

logger = logging.getLogger(__name__)

LOSSES = ("cosine", "euclidean")
MERGE_FORMULA = "W_t = W_c @ W_s, b_t = W_c @ b_s + b_c"
_EPS = 1e-8


@dataclass
class LinearMap:
    """y = x W^T + b, float32."""

    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor  # (out,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.t())


def _rows(matrix: torch.Tensor, ids: torch.Tensor, device) -> torch.Tensor:
    """Rows of an embedding matrix (any stored dtype) as float32 on `device`: the matrices stay
    in their file dtype on the CPU and only one chunk at a time is widened."""
    return matrix.index_select(0, ids).to(device=device, dtype=torch.float32)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


# --------------------------------------------------------------------------- fit


def least_squares(src: torch.Tensor, tgt: torch.Tensor, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                  weights: Optional[torch.Tensor] = None, ridge: float = 1e-6, device="cpu",
                  chunk: int = 4096) -> LinearMap:
    """Weighted least squares with bias, min sum_i w_i ||W x_i + b - y_i||^2 over the pairs
    (x_i = src[src_ids[i]], y_i = tgt[tgt_ids[i]]).

    Centred normal equations, accumulated chunk by chunk in float64 (centring keeps fp32
    chunk products accurate); `ridge` is relative to the mean variance of x."""
    n = src_ids.numel()
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    total = w.sum()
    mean_x = torch.zeros(src.shape[1], dtype=torch.float64, device=device)
    mean_y = torch.zeros(tgt.shape[1], dtype=torch.float64, device=device)
    for a, b in _chunks(n, chunk):
        wc = (w[a:b] / total).to(device=device, dtype=torch.float32)
        mean_x += (wc @ _rows(src, src_ids[a:b], device)).double()
        mean_y += (wc @ _rows(tgt, tgt_ids[a:b], device)).double()
    sxx = torch.zeros(src.shape[1], src.shape[1], dtype=torch.float64, device=device)
    sxy = torch.zeros(src.shape[1], tgt.shape[1], dtype=torch.float64, device=device)
    mx, my = mean_x.float(), mean_y.float()
    for a, b in _chunks(n, chunk):
        sw = (w[a:b] / total).sqrt().to(device=device, dtype=torch.float32)[:, None]
        xc = _rows(src, src_ids[a:b], device).sub_(mx).mul_(sw)  # in place: one chunk copy each
        yc = _rows(tgt, tgt_ids[a:b], device).sub_(my).mul_(sw)
        sxx.add_(xc.t() @ xc)  # fp32 chunk product added into fp64 without a widened copy
        sxy.add_(xc.t() @ yc)
    lam = ridge * max(float(torch.diagonal(sxx).mean()), _EPS)
    sxx.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(sxx)
    if int(info) == 0:
        del sxx  # free each (in x in) / (in x out) float64 matrix as soon as it is used
        wt = torch.cholesky_solve(sxy, chol)  # (in, out)
        del chol, sxy
    else:  # not positive definite: rank-deficient pairs with no ridge
        del chol
        wt = torch.linalg.lstsq(sxx, sxy).solution
    weight = wt.t()
    bias = mean_y - weight @ mean_x
    return LinearMap(weight.float().contiguous(), bias.float())


def _pair_losses(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(pred, target, dim=1, eps=_EPS)
    return (pred - target).pow(2).sum(1)  # euclidean: squared distance


@torch.no_grad()
def mean_loss(conv: LinearMap, src, tgt, src_ids, tgt_ids, weights=None, loss="cosine", device="cpu",
              chunk: int = 4096) -> float:
    """Weighted mean of the per-pair loss of `conv` over the pairs."""
    total, norm = 0.0, 0.0
    for a, b in _chunks(src_ids.numel(), chunk):
        per = _pair_losses(conv(_rows(src, src_ids[a:b], device)), _rows(tgt, tgt_ids[a:b], device), loss)
        w = torch.ones_like(per) if weights is None else weights[a:b].to(device=device, dtype=per.dtype)
        total += float((w * per).sum())
        norm += float(w.sum())
    return total / max(norm, _EPS)


@dataclass
class FitResult:
    converter: LinearMap
    closed_form_loss: float  # loss on a fixed sample of the fit pairs
    epoch_losses: List[float]  # running mean of the batch losses through each epoch
    final_loss: Optional[float]  # loss on the same sample after the epochs (None: no epochs)
    kept: str  # "closed_form" or "epochs": whichever has the lower loss
    loss_pairs: int  # size of that sample

    @property
    def loss(self) -> float:
        return self.final_loss if self.kept == "epochs" else self.closed_form_loss

    def summary(self) -> Dict:
        return {"closed_form_loss": self.closed_form_loss, "epoch_losses": list(self.epoch_losses),
                "final_loss": self.final_loss, "kept": self.kept, "loss_pairs": self.loss_pairs}


def fit_converter(src: torch.Tensor, tgt: torch.Tensor, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                  weights: Optional[torch.Tensor] = None, loss: str = "cosine", epochs: int = 2,
                  lr: float = 0.03, batch_size: int = 1024, seed: int = 0, ridge: float = 1e-6,
                  device="cpu", loss_sample: Optional[int] = 8192) -> FitResult:
    """Closed-form least squares, then (cosine loss) `epochs` of Adam; keeps whichever of the
    two has the lower loss on a fixed random sample of `loss_sample` fit pairs (None: all)."""
    if loss not in LOSSES:
        raise TransferError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    closed = least_squares(src, tgt, src_ids, tgt_ids, weights, ridge=ridge, device=device)
    # Closed form and epochs are compared on one fixed random sample of the fit pairs: a
    # paired comparison needs no full pass over the pairs (each costs as much as an epoch's half).
    n = src_ids.numel()
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:loss_sample or n]
    s_src, s_tgt, s_w = src_ids[sample], tgt_ids[sample], None if weights is None else weights[sample]
    closed_loss = mean_loss(closed, src, tgt, s_src, s_tgt, s_w, loss, device)
    logger.info("converter: closed-form start, %s loss %.6f on %d of the %d fit pairs", loss, closed_loss,
                sample.numel(), n)
    if loss == "euclidean" or epochs <= 0:
        return FitResult(closed, closed_loss, [], None, "closed_form", sample.numel())

    weight = closed.weight.clone().requires_grad_(True)
    bias = closed.bias.clone().requires_grad_(True)
    # Step sizes relative to the scale of what they move (weights: their RMS; bias: the RMS of
    # the target embeddings), so one `lr` suits LLMs whatever their embedding scale and width.
    y_rms = float(_rows(tgt, tgt_ids[:batch_size], device).pow(2).mean().sqrt())
    w_rms = float(weight.detach().pow(2).mean().sqrt())
    groups = [{"params": [weight], "lr": lr * max(w_rms, _EPS)}, {"params": [bias], "lr": lr * max(y_rms, _EPS)}]
    try:
        opt = torch.optim.Adam(groups, fused=True)  # one kernel per step: several times faster on CPU
    except RuntimeError:  # a device / torch build without the fused kernel
        opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(seed + 1)
    epoch_losses = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=g)
        total, norm = 0.0, 0.0
        for a, b in _chunks(n, batch_size):
            idx = order[a:b]
            x, y = _rows(src, src_ids[idx], device), _rows(tgt, tgt_ids[idx], device)
            per = _pair_losses(torch.addmm(bias, x, weight.t()), y, loss)
            w = torch.ones_like(per) if weights is None else weights[idx].to(device=device, dtype=per.dtype)
            batch_loss = (w * per).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            total += float(batch_loss.detach()) * float(w.sum())
            norm += float(w.sum())
        epoch_losses.append(total / norm)
        logger.info("converter: epoch %d/%d, running %s loss %.6f", epoch, epochs, loss, epoch_losses[-1])
    tuned = LinearMap(weight.detach(), bias.detach())
    final_loss = mean_loss(tuned, src, tgt, s_src, s_tgt, s_w, loss, device)
    kept = "epochs" if final_loss < closed_loss else "closed_form"
    logger.info("converter: after %d epochs %s loss %.6f on the same pairs; keeping the %s map", epochs, loss,
                final_loss, kept.replace("_", "-"))
    return FitResult(tuned if kept == "epochs" else closed, closed_loss, epoch_losses, final_loss, kept,
                     sample.numel())


# --------------------------------------------------------------------------- quality


def mean_cosine(conv: LinearMap, src: torch.Tensor, tgt: torch.Tensor, src_ids: torch.Tensor,
                tgt_ids: torch.Tensor, device="cpu") -> float:
    """Mean cosine between g_c(x_s) and x_t over the pairs."""
    return 1.0 - mean_loss(conv, src, tgt, src_ids, tgt_ids, None, "cosine", device)


@torch.no_grad()
def top1_accuracy(conv: LinearMap, src: torch.Tensor, tgt: torch.Tensor, src_ids: torch.Tensor,
                  tgt_ids: torch.Tensor, candidates: Optional[int] = None, device="cpu", chunk_rows: int = 2048,
                  chunk_vocab: int = 4096) -> float:
    """How often x_t is the nearest (cosine) of the first `candidates` target rows (default:
    all) to g_c(x_s). Scores are built chunk x chunk, never vocab x vocab."""
    candidates = tgt.shape[0] if candidates is None else min(candidates, tgt.shape[0])
    hits, n = 0, src_ids.numel()
    for a, b in _chunks(n, chunk_rows):
        pred = conv(_rows(src, src_ids[a:b], device))
        pred = pred / pred.norm(dim=1, keepdim=True).clamp_min(_EPS)
        best_score = torch.full((b - a,), -math.inf, device=device)
        best_id = torch.zeros(b - a, dtype=torch.long, device=device)
        for va, vb in _chunks(candidates, chunk_vocab):
            cand = tgt[va:vb].to(device=device, dtype=torch.float32)
            cand = cand / cand.norm(dim=1, keepdim=True).clamp_min(_EPS)
            score, idx = (pred @ cand.t()).max(dim=1)
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_id = torch.where(better, idx + va, best_id)
        hits += int((best_id == tgt_ids[a:b].to(device)).sum())
    return hits / max(n, 1)


# --------------------------------------------------------------------------- merge


def merge_projector(conv: LinearMap, proj_weight: torch.Tensor, proj_bias: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """g_c(f_s(x)) = W_c (W_s x + b_s) + b_c: returns (W_c W_s, W_c b_s + b_c), float32.
    (The papers print W_s W_c, which does not compose; this is the composition.)"""
    wc, bc = conv.weight.double().cpu(), conv.bias.double().cpu()
    ws, bs = proj_weight.double(), proj_bias.double()
    if wc.shape[1] != ws.shape[0]:
        raise TransferError(f"converter input size {wc.shape[1]} does not match the projector output size "
                            f"{ws.shape[0]}")
    return (wc @ ws).float(), (wc @ bs + bc).float()


def projector_tensors(state: Dict[str, torch.Tensor], name: str, source: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the projector `name` in a state dict."""
    wkey, bkey = f"{name}.weight", f"{name}.bias"
    missing = [k for k in (wkey, bkey) if k not in state]
    if missing:
        similar = sorted(k for k in state if k.endswith((".weight", ".bias")) and "proj" in k)[:12]
        raise TransferError(f"{source}: no projector {name!r} (missing {', '.join(missing)}); "
                            f"keys with 'proj': {', '.join(similar) or 'none'}")
    weight, bias = state[wkey], state[bkey]
    if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise TransferError(f"{source}: {wkey} {tuple(weight.shape)} / {bkey} {tuple(bias.shape)} "
                            f"are not the weight and bias of a linear layer")
    return weight, bias


def projector_name_for_arch(arch: str) -> str:
    """The projector prefix a model architecture uses, by the model class's own name for it (the
    plugin's classes are registered: importing this module ran the package's __init__)."""
    from lavis_vpgtrans.models.projector import projector_name_of

    try:
        return projector_name_of(arch)
    except KeyError as e:
        raise TransferError(str(e.args[0] if e.args else e)) from e


# The target class by config.json's model_type when --tgt-arch is omitted (the table is
# models/projector.py's ARCH_BY_LLM_TYPE).
_NAME_IT = "name the target projector with --tgt-arch or --tgt-projector-key"


def target_arch_for(name_or_path: str) -> str:
    """The registered model class for a target LLM, from the model_type in its config.json."""
    from lavis_vpgtrans.models.projector import ARCH_BY_LLM_TYPE, GENERIC_CAUSAL_LM_ARCH
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_model_config(name_or_path)
    model_type = config.get("model_type")
    where = f"config.json of {name_or_path!r} (model_type={model_type!r})"
    if model_type in ARCH_BY_LLM_TYPE:
        return ARCH_BY_LLM_TYPE[model_type]
    if model_type not in CONFIG_MAPPING:
        raise TransferError(f"{where}: not a model type this transformers knows; {_NAME_IT}")
    encoder_decoder = config.get("is_encoder_decoder")
    if encoder_decoder is None:  # not written when it equals the config class's default
        try:
            encoder_decoder = CONFIG_MAPPING[model_type]().is_encoder_decoder
        except Exception as e:  # composite configs cannot be built without their parts
            raise TransferError(f"{where}: cannot tell whether it is an encoder-decoder ({e}); {_NAME_IT}") from e
    if encoder_decoder:
        raise TransferError(f"{where}: an encoder-decoder LLM, and the only encoder-decoder family with a class "
                            f"is t5 (blip2_t5_transfer); {_NAME_IT}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TransferError(f"{where}: not a causal LM (transformers has no AutoModelForCausalLM class for it); "
                            f"{_NAME_IT}")
    return GENERIC_CAUSAL_LM_ARCH


def detect_projector_name(state: Dict[str, torch.Tensor], source: str) -> str:
    """The single known projector name (of any registered BLIP-2-style model) present in `state`."""
    from lavis_vpgtrans.models.projector import known_projector_names

    known = sorted(known_projector_names())
    present = [n for n in known if f"{n}.weight" in state]
    if len(present) == 1:
        return present[0]
    if not present:
        raise TransferError(f"{source}: holds none of the known projectors ({', '.join(known)}); "
                            f"name it with --src-arch or --src-projector-key")
    raise TransferError(f"{source}: holds several projectors ({', '.join(present)}); "
                        f"choose one with --src-arch or --src-projector-key")


# --------------------------------------------------------------------------- pipeline


@dataclass
class ConverterConfig:
    src: str
    tgt: str
    projector: str
    out: Optional[str] = None
    src_arch: Optional[str] = None
    tgt_arch: Optional[str] = None
    src_projector_key: Optional[str] = None
    tgt_projector_key: Optional[str] = None
    src_tokenizer: Optional[str] = None  # default: the model itself
    tgt_tokenizer: Optional[str] = None
    src_embedding_key: Optional[str] = None  # default: by config.json's model_type
    tgt_embedding_key: Optional[str] = None
    loss: str = "cosine"
    corpus: Optional[str] = None
    quality_text: Optional[str] = None
    epochs: int = 2
    lr: float = 0.03
    batch_size: int = 1024
    held_out: float = 0.1
    nn_sample: int = 2000  # held-out pairs scored for top-1 NN accuracy (0: all)
    seed: int = 0
    ridge: float = 1e-6
    device: str = "cpu"

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise TransferError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not 0.0 <= self.held_out < 1.0:
            raise TransferError(f"held-out fraction must be in [0, 1), got {self.held_out}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.ridge < 0 or self.nn_sample < 0:
            raise TransferError("epochs must be >= 0, batch size >= 1, lr > 0, ridge >= 0 and nn-sample >= 0")


def _source_projector(cfg: ConverterConfig) -> Tuple[str, torch.Tensor, torch.Tensor]:
    from lavis_vpgtrans.common.checkpoint import check_finite_state, load_checkpoint_file

    state = load_checkpoint_file(cfg.projector)["model"]
    if cfg.src_projector_key:
        name = cfg.src_projector_key
    elif cfg.src_arch:
        name = projector_name_for_arch(cfg.src_arch)
    else:
        name = detect_projector_name(state, cfg.projector)
    weight, bias = projector_tensors(state, name, cfg.projector)
    # a NaN projector merges into a NaN target projector: refused, naming the file and the key
    check_finite_state({f"{name}.weight": weight, f"{name}.bias": bias}, cfg.projector, "the source projector")
    # clone, then drop the checkpoint: a full BLIP-2 checkpoint must not stay in memory
    return name, weight.detach().clone(), bias.detach().clone()


def check_out_path(out: str, projector: str, overwrite: bool) -> None:
    """Before any work: `out` is not the input projector file (not even with overwrite), not an
    existing file unless `overwrite`, and its directory can be written -- so nothing is lost
    and no fit is wasted on an output that cannot be saved."""
    if os.path.isdir(out):
        raise TransferError(f"--out {out} is a directory; give the output .pth file")
    if os.path.exists(out) and os.path.isfile(projector) and os.path.samefile(out, projector):
        raise TransferError(f"--out {out} is the input --projector; the converter never overwrites its input, "
                            f"choose another --out")
    if os.path.exists(out) and not overwrite:
        raise TransferError(f"--out {out} exists; pass --overwrite to replace it")
    directory = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise TransferError(f"--out {out}: its directory cannot be written ({e.strerror or e})") from None


def convert(cfg: ConverterConfig) -> Dict:
    """Runs the whole stage-1(b) initialisation; returns (and, with cfg.out, writes) the
    projector checkpoint {"model": {...}, "metadata": {...}}. An existing cfg.out is replaced
    (the command line asks for --overwrite first), the input projector never."""
    cfg.check()
    if cfg.out:
        check_out_path(cfg.out, cfg.projector, overwrite=True)
    timings, clock = {}, time.perf_counter()

    def lap(what):  # wall time per phase, kept in the metadata
        nonlocal clock
        now = time.perf_counter()
        timings[what] = round(now - clock, 3)
        clock = now

    tgt_arch = cfg.tgt_arch
    if not (tgt_arch or cfg.tgt_projector_key):
        tgt_arch = target_arch_for(cfg.tgt)
        logger.info("target projector: %s of %s, chosen by the model_type in the config.json of %s (override with "
                    "--tgt-arch)", projector_name_for_arch(tgt_arch), tgt_arch, cfg.tgt)
    tgt_name = cfg.tgt_projector_key or projector_name_for_arch(tgt_arch)
    src_name, ws, bs = _source_projector(cfg)
    src_rows, src_hidden = embedding_shape(cfg.src, cfg.src_embedding_key)
    tgt_rows, tgt_hidden = embedding_shape(cfg.tgt, cfg.tgt_embedding_key)
    if ws.shape[0] != src_hidden:
        raise TransferError(
            f"hidden-size mismatch: projector {src_name!r} in {cfg.projector} outputs {ws.shape[0]}-d vectors, "
            f"but the input embeddings of the source LLM {cfg.src!r} are {src_hidden}-d")
    lap("projector")

    src_tok = load_tokenizer(cfg.src_tokenizer or cfg.src)
    tgt_tok = load_tokenizer(cfg.tgt_tokenizer or cfg.tgt)
    pairs = pair_tokens(src_tok, tgt_tok, src_rows, tgt_rows)
    fit_idx, held_idx = pairs.split(cfg.held_out, cfg.seed)
    weights = None
    if cfg.corpus:
        counts = token_counts(src_tok, read_captions(cfg.corpus), src_rows)
        weights = frequency_weights(counts)[pairs.src_ids]
    tgt_candidates = min(tgt_rows, len(tgt_tok))  # rows past the vocabulary are padding
    if fit_idx.numel() <= src_hidden:
        logger.warning("only %d fit pairs for a %d-d source: the map is underdetermined, the ridge term "
                       "decides the rest", fit_idx.numel(), src_hidden)
    lap("tokens")

    src = load_input_embeddings(cfg.src, cfg.src_embedding_key)
    tgt = load_input_embeddings(cfg.tgt, cfg.tgt_embedding_key)
    lap("embeddings")

    fit = fit_converter(src.weight, tgt.weight, pairs.src_ids[fit_idx], pairs.tgt_ids[fit_idx],
                        None if weights is None else weights[fit_idx], loss=cfg.loss, epochs=cfg.epochs,
                        lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, ridge=cfg.ridge, device=cfg.device)
    lap("fit")

    quality = {"nn_metric": "cosine", "nn_candidates": tgt_candidates, "fit_loss": fit.loss}

    def held_out_quality(idx: torch.Tensor, prefix: str) -> None:
        if not idx.numel():
            return
        # nearest neighbours cost a pass over the whole target vocabulary per pair: a seeded sample
        g = torch.Generator().manual_seed(cfg.seed)
        nn_idx = idx[torch.randperm(idx.numel(), generator=g)[:cfg.nn_sample or idx.numel()]]
        quality.update({
            f"{prefix}_mean_cosine": mean_cosine(fit.converter, src.weight, tgt.weight, pairs.src_ids[idx],
                                                 pairs.tgt_ids[idx], cfg.device),
            f"{prefix}_top1_nn_accuracy": top1_accuracy(fit.converter, src.weight, tgt.weight, pairs.src_ids[nn_idx],
                                                        pairs.tgt_ids[nn_idx], tgt_candidates, cfg.device),
            f"{prefix.replace('held_out', 'nn')}_pairs": int(nn_idx.numel())})

    held_out_quality(held_idx, "held_out")
    if cfg.quality_text:
        text = sorted(set(read_captions(cfg.quality_text)))  # which tokens occur, not how often
        in_text = ((token_counts(src_tok, text, src_rows)[pairs.src_ids[held_idx]] > 0)
                   & (token_counts(tgt_tok, text, tgt_rows)[pairs.tgt_ids[held_idx]] > 0))
        quality["held_out_in_text"] = int(in_text.sum())
        held_out_quality(held_idx[in_text], "held_out_in_text")
    lap("quality")

    wt, bt = merge_projector(fit.converter, ws, bs)
    lap("merge")
    metadata = {
        "kind": "vpgtrans_projector_init",
        "merge": MERGE_FORMULA,
        "source_llm": cfg.src, "target_llm": cfg.tgt,
        "source_tokenizer": cfg.src_tokenizer or cfg.src, "target_tokenizer": cfg.tgt_tokenizer or cfg.tgt,
        "source_embedding_key": src.key, "target_embedding_key": tgt.key,
        "source_hidden": src_hidden, "target_hidden": tgt_hidden, "projector_in": int(ws.shape[1]),
        "source_projector": cfg.projector, "source_projector_name": src_name, "target_projector_name": tgt_name,
        "source_arch": cfg.src_arch, "target_arch": tgt_arch,
        "target_arch_detected": tgt_arch is not None and cfg.tgt_arch is None,
        "overlap": {**pairs.summary(), "fit": int(fit_idx.numel()), "held_out": int(held_idx.numel())},
        "quality": quality,
        "loss": cfg.loss, "epochs": cfg.epochs, "fit": fit.summary(),
        "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "ridge": cfg.ridge,
        "held_out_fraction": cfg.held_out, "corpus": cfg.corpus, "quality_text": cfg.quality_text,
        "timings_s": timings,
    }
    checkpoint = {"model": {f"{tgt_name}.weight": wt, f"{tgt_name}.bias": bt}, "metadata": metadata}
    if cfg.out:
        from lavis_vpgtrans.common.checkpoint import save_checkpoint_atomic

        save_checkpoint_atomic(checkpoint, cfg.out)
        logger.info("wrote %s", cfg.out)
    return checkpoint


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavis_vpgtrans.transfer.converter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and output")
    io.add_argument("--src", required=True, help="source LLM: local HF directory or hub id")
    io.add_argument("--tgt", required=True, help="target LLM: local HF directory or hub id")
    io.add_argument("--projector", required=True,
                    help="checkpoint (.pth / .safetensors, path or URL) holding the source projector")
    io.add_argument("--out", required=True, help="output .pth, loaded by the models as projector_checkpoint "
                                                 "(never the --projector file)")
    io.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    names = p.add_argument_group("projector names (by the model class's projector name)")
    names.add_argument("--src-arch", help="source model architecture (e.g. blip2_opt); default: the single "
                                          "known projector present in --projector")
    names.add_argument("--tgt-arch", help="target model architecture (e.g. blip2_llama); default: by the model_type "
                                          "in --tgt's config.json (opt, t5, llama: their classes; any other "
                                          "decoder-only LM: blip2_causal_lm)")
    names.add_argument("--src-projector-key", help="explicit source projector prefix (e.g. opt_proj)")
    names.add_argument("--tgt-projector-key", help="explicit target projector prefix (e.g. llama_proj)")
    names.add_argument("--src-tokenizer", help="tokenizer of the source LLM if not in --src")
    names.add_argument("--tgt-tokenizer", help="tokenizer of the target LLM if not in --tgt")
    names.add_argument("--src-embedding-key", help="input-embedding tensor name (default: by model type)")
    names.add_argument("--tgt-embedding-key", help="input-embedding tensor name (default: by model type)")
    fit = p.add_argument_group("fit")
    fit.add_argument("--loss", choices=LOSSES, default="cosine",
                     help="cosine: 1 - cos; euclidean: squared distance, solved exactly in closed form")
    fit.add_argument("--corpus", help="captions (.txt one per line, or a LAVIS caption .json) to weight tokens "
                                      "by 1 + log(1 + count)")
    fit.add_argument("--epochs", type=int, default=2, help="Adam epochs after the closed-form start (cosine)")
    fit.add_argument("--lr", type=float, default=0.03,
                     help="Adam step size relative to the RMS of the closed-form weights (bias: of the targets)")
    fit.add_argument("--batch-size", type=int, default=1024)
    fit.add_argument("--held-out", type=float, default=0.1, help="fraction of text pairs held out for quality")
    fit.add_argument("--quality-text", help="text (.txt one line each, or a LAVIS caption .json), e.g. the LLMs' "
                                            "pre-training text: quality is also reported on the held-out pairs "
                                            "whose two tokens both occur in it")
    fit.add_argument("--nn-sample", type=int, default=2000,
                     help="held-out pairs (a seeded sample) scored for top-1 NN accuracy; 0: all")
    fit.add_argument("--ridge", type=float, default=1e-6, help="ridge term, relative to the mean source variance")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overwrite = args.__dict__.pop("overwrite")
    cfg = ConverterConfig(**{k: v for k, v in vars(args).items()})
    from lavis_vpgtrans.common.checkpoint import CheckpointError

    try:
        check_out_path(cfg.out, cfg.projector, overwrite)
        checkpoint = convert(cfg)
    except (TransferError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = checkpoint["metadata"]
    overlap, quality = meta["overlap"], meta["quality"]
    print(f"overlap: {overlap['pairs']} pairs ({overlap['text_pairs']} text + {overlap['special_pairs']} special"
          f"{', same tokenizer' if overlap['same_tokenizer'] else ''}); fit {overlap['fit']}, "
          f"held out {overlap['held_out']}")
    if "held_out_mean_cosine" in quality:
        print(f"held-out quality: mean cosine {quality['held_out_mean_cosine']:.4f}, top-1 NN accuracy "
              f"{quality['held_out_top1_nn_accuracy']:.4f} ({quality['nn_pairs']} pairs, nearest of "
              f"{quality['nn_candidates']} target tokens)")
    if "held_out_in_text" in quality:
        if "held_out_in_text_mean_cosine" in quality:
            print(f"held-out pairs in --quality-text: {quality['held_out_in_text']}, mean cosine "
                  f"{quality['held_out_in_text_mean_cosine']:.4f}, top-1 NN accuracy "
                  f"{quality['held_out_in_text_top1_nn_accuracy']:.4f}")
        else:
            print("held-out pairs in --quality-text: none")
    arch = f" (for {meta['target_arch']}{', by model_type' if meta['target_arch_detected'] else ''})" \
        if meta["target_arch"] else ""
    print(f"{meta['target_projector_name']}{arch}: {meta['projector_in']} -> {meta['target_hidden']} written to "
          f"{cfg.out}")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in meta["timings_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Non-finite values (NaN, inf): found where they appear, refused, and named (issue 22).

- `nonfinite_keys` / `first_nonfinite`: the keys of a state dict (or of an optimizer state,
  nested) that hold non-finite values; common/checkpoint.py's `check_finite_state` refuses such
  a state, naming the file and the first bad key, in every checkpoint load and write.
- `NonFiniteGuard`: the training step's check (common/train_loop.py). A step whose loss or
  gradients are non-finite on any rank is skipped, not applied; `max_steps` such steps in a
  row stop the run with a message naming the steps, the epoch, the loss terms and a hint from
  what a diagnostic forward pass of the same batch saw (the ViT's output, the soft prompts, the
  weights). The decision is shared: every rank sees every rank's flag, so all stop together.

Cost per step: the loss is read to the host once per step, as LAVIS's loop already did
(`loss.item()`); the finiteness flags (and, under torchrun, their all_reduce) travel in that
same read, so no host-device synchronisation is added. The gradients are checked on the device
by one fused kernel per (device, dtype) (GradScaler's own check, which amp runs anyway).
Diagnosis (an extra forward pass) runs only on a skipped step.
"""

import contextlib
import logging
import math
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_NONFINITE_STEPS = 3  # run.max_nonfinite_steps

# What the loss terms our models return are, for the message.
LOSS_TERMS = {"loss_lm": "LM", "loss_align": "alignment", "loss_itc": "image-text contrastive",
              "loss_itm": "image-text matching", "loss_recon": "reconstruction", "loss_contrast": "contrastive",
              "loss_vocab": "vocabulary", "loss": "total"}

FP16_VIT_HINT = "fp16 ViT overflowed: set `model.vit_precision: fp32`"
LOWER_LR_HINT = "lower the lr (run.init_lr)"


class NonFiniteError(RuntimeError):
    """Non-finite values where they must not be: the message names where."""


class NonFiniteLossError(NonFiniteError):
    """The loss (or its gradients) stayed non-finite for run.max_nonfinite_steps steps."""


# ---------------------------------------------------------------------------- states

def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (sharded parameter's) local part; any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _is_checked(value) -> bool:
    return torch.is_tensor(value) and (value.is_floating_point() or value.is_complex())


def _walk(obj, prefix: str) -> Iterable[Tuple[str, torch.Tensor]]:
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_keys(state, prefix: str = "") -> List[str]:
    """The keys (dotted paths in nested dicts / lists, e.g. an optimizer state's
    "state.3.exp_avg") of the floating-point tensors holding NaN or inf, in order. One host read
    for all tensors of a device."""
    named = [(k, _local(v)) for k, v in _walk(state, prefix) if _is_checked(v)]
    if not named:
        return []
    by_device: Dict[torch.device, List[int]] = defaultdict(list)
    for i, (_, t) in enumerate(named):
        by_device[t.device].append(i)
    bad = [False] * len(named)
    for device, idx in by_device.items():
        flags = torch.stack([~torch.isfinite(named[i][1]).all() for i in idx]).tolist()
        for i, flag in zip(idx, flags):
            bad[i] = flag
    return [named[i][0] for i in range(len(named)) if bad[i]]


def first_nonfinite(state, prefix: str = "") -> Optional[str]:
    keys = nonfinite_keys(state, prefix)
    return keys[0] if keys else None


# ---------------------------------------------------------------------------- the training step

def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


class GradCheck:
    """Whether any gradient an optimizer would apply holds NaN or inf, as a 1-element float tensor
    (> 0: yes) on the device; no host read. GradScaler's fused kernel does the check, one call per
    (device, dtype) group of parameters (grouped once per optimizer: a stage switch makes a new
    one); with a GradScaler, its own finding after `scaler.unscale_` (as before gradient clipping)."""

    def __init__(self):
        self._optimizer = None
        self._groups: List[Tuple[torch.Tensor, torch.Tensor, List[torch.nn.Parameter]]] = []
        self._sharded = False

    def _group(self, optimizer) -> None:
        by_key: Dict[Tuple[torch.device, torch.dtype], List[torch.nn.Parameter]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                local = _local(p)
                by_key[(local.device, local.dtype)].append(p)
        self._sharded = any(hasattr(p, "to_local") for params in by_key.values() for p in params)
        self._groups = [(torch.zeros(1, device=dev), torch.ones(1, device=dev), params)
                        for (dev, _), params in by_key.items()]
        self._optimizer = optimizer

    def __call__(self, optimizer, scaler=None) -> Optional[torch.Tensor]:
        if scaler is not None:
            scaler.unscale_(optimizer)
            state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
            found = list(state.get("found_inf_per_device", {}).values())
        else:
            if optimizer is not self._optimizer:
                self._group(optimizer)
            found = []
            for flag, one, params in self._groups:
                grads = [p.grad for p in params if p.grad is not None]
                if self._sharded:
                    grads = [_local(g) for g in grads]
                if grads:
                    flag.zero_()
                    # unscaling by 1: the gradients keep their values
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, one)
                    found.append(flag)
        if not found:
            return None
        if len(found) == 1:
            return found[0].reshape(1)
        device = found[0].device
        return torch.stack([f.reshape(()).to(device) for f in found]).sum().reshape(1)


class NonFiniteGuard:
    """The training loop's non-finite check, one per run (its count spans epochs).

    Per step: `read(loss, ...)` -> (loss value, ranks whose loss or gradients were non-finite),
    in one host read; then `applied()` or `skipped(...)`, the latter raising NonFiniteLossError
    at the `max_steps`-th skipped step in a row."""

    def __init__(self, max_steps: int = DEFAULT_MAX_NONFINITE_STEPS):
        max_steps = int(max_steps)
        if max_steps < 1:
            raise ValueError(f"run.max_nonfinite_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.consecutive: List[str] = []  # the skipped steps in a row, described
        self.applied_steps = 0  # optimizer steps applied by this process (since start or resume)
        self.skipped_steps = 0
        self._window_bad = False  # a non-finite micro-batch loss within a gradient accumulation window
        self._rank_onehot = None
        self._grad_check = GradCheck()

    # -------------------------------------------------------------- per step

    def read(self, loss: torch.Tensor, optimizer, scaler=None, at_step: bool = True):
        """(loss value, ranks that were non-finite, this rank's (loss bad, grads bad)) in one host
        read; the ranks only at an optimizer step (`at_step`), else None."""
        loss_det = loss.detach().float().reshape(1)
        if not at_step:  # a micro-batch of gradient accumulation: LAVIS's own loss.item()
            value = loss_det.item()
            self._window_bad |= not math.isfinite(value)
            return value, None, (not math.isfinite(value), False)
        grads = self._grad_check(optimizer, scaler)
        grads = torch.zeros_like(loss_det) if grads is None else grads.to(loss_det.device)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            from lavis_vpgtrans.common.dist import collective_device

            device = collective_device()
            if self._rank_onehot is None or self._rank_onehot.device != device:
                self._rank_onehot = torch.zeros(dist.get_world_size(), device=device)
                self._rank_onehot[dist.get_rank()] = 1.0
            local_bad = (~torch.isfinite(loss_det)) | (grads > 0)
            if self._window_bad:
                local_bad = torch.ones_like(local_bad)
            flags = local_bad.float().to(device) * self._rank_onehot
            dist.all_reduce(flags)  # asynchronous on NCCL: read below, with the loss
            values = torch.cat([loss_det.to(device), grads.to(device), flags]).tolist()
        else:
            values = torch.cat([loss_det, grads]).tolist()
        loss_bad, grads_bad = not math.isfinite(values[0]) or self._window_bad, values[1] > 0
        if distributed:
            bad_ranks = [r for r, f in enumerate(values[2:]) if f > 0]
        else:
            bad_ranks = [0] if (loss_bad or grads_bad) else []
        self._window_bad = False
        return values[0], bad_ranks, (loss_bad, grads_bad)

    def applied(self) -> None:
        self.applied_steps += 1
        if self.consecutive:
            logger.warning("step applied after %d skipped non-finite step(s): training goes on",
                           len(self.consecutive))
        self.consecutive = []

    def skipped(self, *, step: int, epoch, iteration: int, iters_per_epoch: int, bad_ranks: Sequence[int],
                local: Tuple[bool, bool], model, samples, use_amp: bool, scaler=None) -> None:
        """Logs the skipped step (why, and a hint from a diagnostic forward pass of the same batch
        on every rank); raises NonFiniteLossError at the max_steps-th in a row."""
        self.skipped_steps += 1
        diagnosis = self.diagnose(model, samples, use_amp, local, bad_ranks, scaler)
        where = f"step {step} (epoch {epoch}, iteration {iteration} of {iters_per_epoch})"
        self.consecutive.append(where)
        n, limit = len(self.consecutive), self.max_steps
        if n < limit:
            logger.warning("non-finite loss at %s: %s; step skipped, not applied (%d of run.max_nonfinite_steps=%d "
                           "in a row)", where, diagnosis, n, limit)
            return
        raise NonFiniteLossError(
            f"training stopped: the loss was non-finite for {n} consecutive steps (run.max_nonfinite_steps="
            f"{limit}), from {self.consecutive[0]} to {where}; none of them was applied. At {where}: {diagnosis}. "
            f"No checkpoint was written with these values: the last checkpoint written is from before")

    # -------------------------------------------------------------- diagnosis

    def diagnose(self, model, samples, use_amp, local, bad_ranks, scaler=None) -> str:
        """What was non-finite, and a hint. Every rank runs the same forward pass (a sharded model
        gathers its weights in it), with its own random state restored afterwards."""
        loss_bad, grads_bad = local
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        module = _unwrap(model)
        seen: Dict[str, torch.Tensor] = {}
        handles = []
        for name, part in (("vit", getattr(module, "visual_encoder", None)),
                           ("prompts", getattr(module, "projector", None))):
            if isinstance(part, torch.nn.Module):
                handles.append(part.register_forward_hook(
                    lambda _m, _i, out, name=name: seen.setdefault(name, _first_tensor(out).detach())))
        output = None
        try:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
            amp = torch.autocast("cuda") if use_amp else contextlib.nullcontext()
            with torch.random.fork_rng(devices=devices), torch.no_grad(), amp:
                output = module(samples)
        except Exception as e:  # the diagnosis must not hide the finding
            logger.warning("diagnostic forward pass failed: %s", e)
        finally:
            for h in handles:
                h.remove()

        parts = []
        if len(bad_ranks) and bad_ranks != [rank]:
            others = [r for r in bad_ranks if r != rank]
            parts.append(f"non-finite on rank(s) {', '.join(map(str, bad_ranks))} (this is rank {rank}"
                         f"{'' if rank in bad_ranks else ', finite here'}; see rank {others[0]}'s log)")
        terms = _loss_terms(output)
        bad_terms = [k for k, v in terms.items() if not math.isfinite(v)]
        if len(bad_terms) > 1:
            bad_terms = [k for k in bad_terms if k != "loss"]  # the total follows from its terms
        if terms:
            shown = ", ".join(f"{k} ({LOSS_TERMS.get(k, k)}) = {v:.6g}" for k, v in terms.items())
            if bad_terms:
                parts.append(f"non-finite loss term(s): {', '.join(f'{k} ({LOSS_TERMS.get(k, k)})' for k in bad_terms)} "
                             f"[{shown}]")
            elif loss_bad or grads_bad:
                parts.append(f"loss terms finite on a second pass [{shown}]")
        if grads_bad and not bad_terms:
            if scaler is not None:
                parts.append(f"GradScaler found non-finite gradients (fp16 overflow; loss scale {scaler.get_scale():g})")
            else:
                parts.append("the gradients were non-finite, the loss finite")
        if rank in bad_ranks or not bad_ranks:
            parts.append("hint: " + self._hint(module, seen))
        return "; ".join(parts)

    def _hint(self, module, seen: Dict[str, torch.Tensor]) -> str:
        params = dict(module.named_parameters())
        bad_weights = nonfinite_keys({k: p.detach() for k, p in params.items()})
        if bad_weights:
            trained = [k for k in bad_weights if params[k].requires_grad]
            if not trained:
                return (f"a frozen weight is non-finite ({bad_weights[0]!r}): the model as loaded (ViT, LLM, "
                        f"model.vpg_checkpoint / finetuned) holds non-finite values")
            key = trained[0]
            if self.applied_steps == 0:
                return (f"the weights were non-finite before this run applied any step ({key!r}): a loaded "
                        f"checkpoint holds non-finite values (model.vpg_checkpoint / projector_checkpoint / "
                        f"finetuned / pformer_checkpoint, run.resume_ckpt_path)")
            return f"the weights went non-finite ({key!r}, after {self.applied_steps} applied steps): {LOWER_LR_HINT}"
        vit = seen.get("vit")
        if vit is not None and not torch.isfinite(vit).all():
            if vit.dtype == torch.float16 or getattr(module, "vit_dtype", None) == torch.float16:
                return f"the ViT's output was non-finite: {FP16_VIT_HINT}"
            return (f"the ViT's output was non-finite although it runs in {vit.dtype}: check the input images "
                    f"and the ViT's weights ({FP16_VIT_HINT} if it was fp16)")
        prompts = seen.get("prompts")
        if prompts is not None:
            if not torch.isfinite(prompts).all():
                return f"the soft prompts (projector output) were non-finite, the ViT's output finite: {LOWER_LR_HINT}"
            largest = prompts.abs().max().item()
            low_precision = getattr(module, "llm_dtype", torch.float32) != torch.float32
            return (f"the soft prompts are finite (largest |value| {largest:.3g}) but the LLM's loss is not: "
                    + (f"{LOWER_LR_HINT}, or run the LLM in higher precision (model.llm_precision)" if low_precision
                       else LOWER_LR_HINT))
        return LOWER_LR_HINT


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (list, tuple)) and out and torch.is_tensor(out[0]):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return torch.zeros(())


def _loss_terms(output) -> Dict[str, float]:
    """The scalar loss terms of a model's output dict ("loss" last), as floats."""
    if not isinstance(output, Mapping):
        return {}
    terms = {k: float(v.detach().float()) for k, v in output.items()
             if k.startswith("loss") and torch.is_tensor(v) and v.numel() == 1}
    if "loss" in terms and len(terms) > 1:
        terms["loss"] = terms.pop("loss")
    return terms


def guard_of(task) -> NonFiniteGuard:
    """The task's guard (the runner installs one with run.max_nonfinite_steps), or the default."""
    guard = getattr(task, "nonfinite_guard", None)
    if guard is None:
        guard = task.nonfinite_guard = NonFiniteGuard()
    return guard

"""Checkpoint files: safe loading, atomic writing, and state-dict loads that report every key.

Formats read: LAVIS `.pth` files ({"model": state_dict, ...} or a bare state dict), read with
`torch.load(weights_only=True)` so no arbitrary pickle runs, and `.safetensors` files (their
string metadata is returned under "metadata"). URLs go through LAVIS's download cache.
Directories are read by the reader registered for their format (`register_dir_reader`:
models/hf_blip2.py registers HF-format BLIP-2), so this module imports no model code.
"""

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, NamedTuple

import torch

from lavis_vpgtrans.common import sharding
from lavis_vpgtrans.common.finite import NonFiniteError, nonfinite_keys
from lavis_vpgtrans.common.paths import resolve_path

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model: the message names the file and the keys."""


class NonFiniteCheckpointError(CheckpointError, NonFiniteError):
    """A checkpoint read, or about to be written, holds NaN or inf."""


def check_finite_state(state, source: str, what: str = "checkpoint", writing: bool = False) -> None:
    """Raises NonFiniteCheckpointError naming `source` and the first key (a dotted path in nested
    states, e.g. "optimizer.state.3.exp_avg") whose tensor holds NaN or inf."""
    keys = nonfinite_keys(state)
    if not keys:
        return
    where = f"non-finite values (NaN or inf) in {keys[0]!r}" + (
        f" (and {len(keys) - 1} more tensor(s))" if len(keys) > 1 else "")
    if writing:
        raise NonFiniteCheckpointError(
            f"{source}: not written: {what} would hold {where}; the file keeps what it held before (the last "
            f"good checkpoint: resume from it)")
    raise NonFiniteCheckpointError(
        f"{source}: {what} holds {where}: refused. It was written by a run that diverged, or damaged; use an "
        f"earlier checkpoint")


def _local_path(url_or_path: str) -> str:
    from lavis.common.utils import is_url

    if is_url(url_or_path):
        from lavis.common.dist_utils import download_cached_file

        return download_cached_file(url_or_path, check_hash=False, progress=True)
    if not os.path.isfile(url_or_path):
        raise FileNotFoundError(f"checkpoint not found: {url_or_path}")
    return url_or_path


class DirReader(NamedTuple):
    accepts: Callable[[str], bool]  # is this directory in the reader's format?
    read: Callable[[str], Dict]  # the directory as a checkpoint dict ({"model": ..., ...})
    expected: str  # the format, as an error message names it


_dir_readers: List[DirReader] = []


def register_dir_reader(accepts: Callable[[str], bool], read: Callable[[str], Dict], expected: str) -> None:
    """Lets `load_checkpoint_file` read directories that `accepts`; `expected` describes the
    format for the error on a directory no reader accepts."""
    _dir_readers.append(DirReader(accepts, read, expected))


def load_checkpoint_file(url_or_path: str) -> Dict:
    """Returns the checkpoint as a dict with at least "model" (the state dict).

    A directory must be in a registered directory format: an HF-format BLIP-2
    (`Blip2ForConditionalGeneration.save_pretrained`, e.g. Salesforce/blip2-opt-2.7b), whose
    VPG and projector come back in LAVIS's names, its language model not read (see
    models/hf_blip2.py, which registers the reader)."""
    if os.path.isdir(url_or_path):
        for reader in _dir_readers:
            if reader.accepts(url_or_path):
                return reader.read(url_or_path)
        expected = " or ".join(r.expected for r in _dir_readers) or "a checkpoint format (none is registered)"
        raise CheckpointError(f"{url_or_path}: a directory, but not {expected}")
    path = _local_path(url_or_path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        return {"model": state, "metadata": {k: _maybe_json(v) for k, v in meta.items()}}
    try:
        # mmap: a multi-GB source checkpoint is paged in only where read (e.g. its projector)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:  # weights_only refuses pickled objects other than tensors/containers
        raise CheckpointError(f"{path}: cannot be read as a safe (weights-only) checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if "model" not in obj:
        obj = {"model": obj}
    if not isinstance(obj["model"], dict):
        raise CheckpointError(f"{path}: 'model' is not a state dict")
    return obj


def _is_zip(path: str) -> bool:
    """torch.save's default (zip) format, the only one torch.load can memory-map."""
    import zipfile

    return zipfile.is_zipfile(path)


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def save_checkpoint_atomic(obj: Dict, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename: a crash
    mid-write never leaves a truncated file under `path`, and a power loss after the rename
    does not either. Temporary files are named after their writer's pid; those of writers no
    longer alive (killed mid-write) are removed here. A checkpoint with NaN or inf (weights,
    optimizer state) is never written: NonFiniteCheckpointError, and `path` keeps its content."""
    check_finite_state(obj, path, "the checkpoint", writing=True)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temporaries(directory)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.getpid()}_", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TMP_PREFIX = ".tmp_"


def _remove_stale_temporaries(directory: str) -> None:
    for name in os.listdir(directory):
        if not (name.startswith(_TMP_PREFIX) and name.endswith(".pth")):
            continue
        pid = name[len(_TMP_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(directory, name))
            logger.info("removed %s, left by a checkpoint write that did not finish", name)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LoadReport:
    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)

    def log(self, what: str) -> None:
        logger.info(
            "%s from %s: %d keys loaded, %d missing, %d unexpected, %d dropped by design",
            what, self.source, len(self.loaded), len(self.missing), len(self.unexpected), len(self.dropped))
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("dropped by design", self.dropped)):
            if keys:
                logger.info("  %s: %s", name, _summarise(keys))


def _summarise(keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_with_report(
    module: torch.nn.Module,
    state_dict: Dict[str, torch.Tensor],
    source: str,
    *,
    keep: Callable[[str], bool] = lambda k: True,
    drop: Callable[[str], bool] = lambda k: False,
    required: Iterable[str] = (),
) -> LoadReport:
    """Loads the entries of `state_dict` that `keep` selects into `module`.

    - keys that `drop` matches are skipped and reported as dropped by design;
    - kept keys the module does not have are an error (unexpected);
    - a shape mismatch is an error naming the key and both shapes;
    - `required` module keys absent from the file are an error (missing);
    - a loaded tensor with NaN or inf is an error naming the key (NonFiniteCheckpointError).
    The module's other keys keep their values. Nothing is loaded unless all checks pass. A
    sharded module (common/sharding.py) takes full tensors too: each rank keeps its shard.
    """
    own = module.state_dict()
    report = LoadReport(source=source)
    to_load = {}
    for key, value in state_dict.items():
        if drop(key) or not keep(key):
            report.dropped.append(key)
            continue
        if key not in own:
            report.unexpected.append(key)
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for '{key}': checkpoint has {tuple(value.shape)}, "
                f"model has {tuple(own[key].shape)}")
        to_load[key] = value
    report.missing = [k for k in required if k not in to_load]
    if report.unexpected:
        raise CheckpointError(f"{source}: unexpected keys not in the model: {_summarise(report.unexpected)}")
    if report.missing:
        raise CheckpointError(f"{source}: missing keys: {_summarise(report.missing)}")
    check_finite_state(to_load, source)
    with torch.no_grad():
        for key, value in to_load.items():
            sharding.copy_full_into(own[key], value)
    report.loaded = sorted(to_load)
    return report


# Persistent buffers of a frozen LLM that trainer checkpoints carry but today's transformers
# model does not have. LAVIS's and the official VPGTrans runner save state_dict() minus frozen
# parameters, so buffers stay: with transformers 4.28's LLaMA (LLM attribute `llama_model`), the
# rotary `inv_freq` of every layer (now one non-persistent buffer, recomputed from the config).
FROZEN_LLM_BUFFERS = re.compile(r"^(llm_model|llama_model|opt_model|t5_model)\..*\.rotary_emb\.inv_freq$")


def trainable_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What a training checkpoint holds: the trainable parameters (detached), nothing frozen,
    no buffers, no tied copies."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def load_trained_state(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
                       what: str = "checkpoint", optional: Callable[[str], bool] = None) -> LoadReport:
    """A training checkpoint's weights (trainable parameters only, as our runner writes them, or
    trainable parameters + persistent buffers, as LAVIS's and the VPGTrans runner write them):
    every key must fit the module and every trainable parameter must be there; frozen weights
    (ViT, LLM) keep their values. Frozen-LLM buffers the module does not have
    (FROZEN_LLM_BUFFERS) are dropped by design and reported; any other unknown key is an error.
    The same rules for a sharded module (run.fsdp): the checkpoint's full tensors are loaded
    into each rank's shards (every rank must call this, with the same state). `optional`: trainable
    parameters the file may lack (they keep their values; e.g. fresh LoRA adapters)."""
    if sharding.is_sharded(module):
        sharding.resharded(module)  # the sharded parameters, not the copies an evaluation gathered
    own = module.state_dict()
    required = [k for k in trainable_state(module) if not (optional and optional(k))]
    report = load_state_with_report(module, state_dict, source, required=required,
                                    drop=lambda k: k not in own and bool(FROZEN_LLM_BUFFERS.match(k)))
    report.log(what)
    return report


def load_trained_checkpoint(module: torch.nn.Module, url_or_path: str, what: str = "checkpoint") -> LoadReport:
    """`load_trained_state` from a file or URL ("<scheme>:" paths resolved)."""
    path = resolve_path(url_or_path)
    return load_trained_state(module, load_checkpoint_file(path)["model"], path, what)

"""Read only the input word-embedding matrix of a Hugging Face LLM, never the whole model.

A model is a local directory or a hub id. Its weights are found as, in this order,
`model.safetensors.index.json` (sharded), `model.safetensors`, `pytorch_model.bin.index.json`
(sharded), `pytorch_model.bin`. The embedding tensor's name comes from the model type in
config.json (or an explicit key); of a sharded model only the shard holding it is opened
(or downloaded), so memory stays at about one matrix.
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """Bad input to the transfer tools: the message names the file, key or size at fault."""


# Input-embedding tensor names by config.json `model_type`, in priority order. The bare
# names cover base models saved without their LM-head wrapper (e.g. OPTModel).
EMBEDDING_KEYS = {
    "opt": ["model.decoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
    "llama": ["model.embed_tokens.weight", "embed_tokens.weight"],
    "mistral": ["model.embed_tokens.weight", "embed_tokens.weight"],
    "qwen2": ["model.embed_tokens.weight", "embed_tokens.weight"],
    "gemma": ["model.embed_tokens.weight", "embed_tokens.weight"],
    "phi3": ["model.embed_tokens.weight", "embed_tokens.weight"],
    # T5 ties encoder and decoder inputs to `shared`; some exports store only one of them.
    "t5": ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
    "mt5": ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
    "gpt2": ["transformer.wte.weight", "wte.weight"],
    "gptj": ["transformer.wte.weight", "wte.weight"],
    "gpt_neox": ["gpt_neox.embed_in.weight", "embed_in.weight"],
    "bloom": ["transformer.word_embeddings.weight", "word_embeddings.weight"],
    "falcon": ["transformer.word_embeddings.weight", "word_embeddings.weight"],
}
# For model types not listed: the last component of the usual names.
GENERIC_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "shared.weight")

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


@dataclass
class EmbeddingMatrix:
    weight: torch.Tensor  # (rows, hidden), in the dtype stored in the file
    key: str
    file: str
    source: str

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1]


class _ModelFiles:
    """Resolves the few files needed from a local directory or a hub repository."""

    def __init__(self, name_or_path: str, revision: Optional[str] = None):
        self.source = name_or_path
        self.revision = revision
        self.local = os.path.isdir(name_or_path)
        if not self.local and looks_like_path(name_or_path):
            what = "is not a directory" if os.path.exists(name_or_path) else "not found"
            raise TransferError(f"model directory {what}: {name_or_path}")

    def get(self, filename: str) -> Optional[str]:
        """Local path of `filename` in the model, or None if the model has no such file."""
        if self.local:
            path = os.path.join(self.source, filename)
            return path if os.path.isfile(path) else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return hf_hub_download(self.source, filename, revision=self.revision)
        except LocalEntryNotFoundError as e:
            # Offline and not cached: cannot tell "absent" from "unreachable", so stop here.
            raise TransferError(f"{self.source!r} is not a local directory, and {filename} is not in the "
                                f"local hub cache while the hub cannot be reached: {e}") from e
        except EntryNotFoundError:
            return None
        except Exception as e:  # repository missing, gated, network failure, bad id
            raise TransferError(f"{self.source!r} is not a local directory, and fetching {filename} "
                                f"from the Hugging Face hub failed: {type(e).__name__}: {e}") from e

    def require(self, filename: str) -> str:
        path = self.get(filename)
        if path is None:
            raise TransferError(f"{_where(self.source, filename)} not found")
        return path


def looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing path.
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or os.path.exists(name)


def _where(source: str, filename: str) -> str:
    return os.path.join(source, filename) if os.path.isdir(source) else f"{filename} of {source!r}"


def _read_config(files: _ModelFiles) -> Dict:
    path = files.require("config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise TransferError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise TransferError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_model_config(name_or_path: str, revision: Optional[str] = None) -> Dict:
    """config.json of a local model directory or hub id (only that file is fetched)."""
    return _read_config(_ModelFiles(name_or_path, revision))


def _weights_layout(files: _ModelFiles) -> Tuple[str, str]:
    for name in WEIGHT_FILES:
        path = files.get(name)
        if path is not None:
            return name, path
    raise TransferError(f"no weights found for {files.source!r}: expected one of {', '.join(WEIGHT_FILES)}")


def _tensor_names(layout: str, path: str) -> Dict[str, str]:
    """Tensor name -> file name (within the model) holding it."""
    if layout.endswith(".index.json"):
        with open(path) as f:
            index = json.load(f)
        if "weight_map" not in index:
            raise TransferError(f"{path}: not a weights index (no 'weight_map')")
        return dict(index["weight_map"])
    if layout.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: layout for k in f.keys()}
    return {k: layout for k in _load_bin(path)}


def _load_bin(path: str) -> Dict[str, torch.Tensor]:
    """A torch .bin state dict, read safely; memory-mapped so that unused tensors cost nothing."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for non-tensor content, RuntimeError for the rest
        if not (isinstance(e, RuntimeError) and "mmap" in str(e)):  # legacy (non-zip) files cannot be mapped
            raise TransferError(f"{path}: cannot be read as a weights-only torch file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TransferError(f"{path}: cannot be read as a weights-only torch file: {e}") from e


def embedding_key(names: List[str], config: Dict, source: str) -> str:
    """The input-embedding tensor among `names`, chosen by the config's model type."""
    present = set(names)
    model_type = config.get("model_type")
    for key in EMBEDDING_KEYS.get(model_type, []):
        if key in present:
            return key
    vocab = config.get("vocab_size")
    candidates = [n for n in names if n.endswith(GENERIC_SUFFIXES)]
    if len(candidates) == 1:
        return candidates[0]
    hint = candidates or [n for n in names if "embed" in n] or sorted(names)[:20]
    raise TransferError(
        f"cannot tell which tensor of {source!r} (model_type={model_type!r}, vocab_size={vocab}) is the "
        f"input word embedding; candidates: {', '.join(sorted(hint)) or 'none'}. "
        f"Name it explicitly (--src-embedding-key / --tgt-embedding-key).")


@dataclass
class _Located:
    key: str
    path: str  # the file holding the tensor (one shard of a sharded model)


def _locate(name_or_path: str, key: Optional[str], revision: Optional[str]) -> _Located:
    files = _ModelFiles(name_or_path, revision)
    layout, layout_path = _weights_layout(files)
    names = _tensor_names(layout, layout_path)
    if key is None:
        key = embedding_key(list(names), _read_config(files), name_or_path)
    elif key not in names:
        raise TransferError(f"tensor {key!r} not found in the weights of {name_or_path!r} "
                            f"({_where(name_or_path, layout)})")
    shard = names[key]
    return _Located(key, layout_path if shard == layout else files.require(shard))


def load_input_embeddings(name_or_path: str, key: Optional[str] = None,
                          revision: Optional[str] = None) -> EmbeddingMatrix:
    """The input word-embedding matrix of an LLM, read alone from its weight files.

    `key` overrides the tensor name; by default it follows config.json's `model_type`.
    """
    loc = _locate(name_or_path, key, revision)
    if loc.path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(loc.path, framework="pt") as f:
            weight = f.get_tensor(loc.key)
    else:
        state = _load_bin(loc.path)
        # clone: detaches the one matrix from the memory map of the whole file
        weight = state[loc.key].clone()
        del state
    _check_2d(tuple(weight.shape), loc)
    logger.info("%s: input embeddings %r %s %s from %s", name_or_path, loc.key, tuple(weight.shape),
                weight.dtype, loc.path)
    return EmbeddingMatrix(weight=weight, key=loc.key, file=loc.path, source=name_or_path)


def embedding_shape(name_or_path: str, key: Optional[str] = None,
                    revision: Optional[str] = None) -> Tuple[int, int]:
    """(rows, hidden) of the input embeddings, read from the file header (safetensors) or a
    memory map (.bin), so that inputs can be checked before anything large is loaded."""
    loc = _locate(name_or_path, key, revision)
    if loc.path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(loc.path, framework="pt") as f:
            shape = tuple(f.get_slice(loc.key).get_shape())
    else:
        shape = tuple(_load_bin(loc.path)[loc.key].shape)
    _check_2d(shape, loc)
    return shape


def _check_2d(shape, loc: _Located) -> None:
    if len(shape) != 2:
        raise TransferError(f"{loc.path}: tensor {loc.key!r} has shape {shape}, not (vocab, hidden)")

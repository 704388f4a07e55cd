"""Pair the tokens of two LLM tokenizers, so that their word embeddings can be regressed.

Same tokenizer (equal vocabularies): every token pairs with itself. Different tokenizers: the
tokens whose text is the same, compared as bytes after undoing each tokenizer's encoding:
  byte-level BPE (GPT-2, OPT)      each character stands for one byte; 'Ġ' is the space byte
  SentencePiece (LLaMA, T5)        '▁' is the space, '<0xNN>' byte-fallback pieces are byte NN
  WordPiece (BERT)                 '##' marks a continuation, anything else starts a word
so 'Ġdog' (OPT) and '▁dog' (LLaMA) both read b' dog'. Special tokens never pair by text; they
pair by role (bos, eos, pad, unk) when both tokenizers define that role.
"""

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from lavis_vpgtrans.transfer.embeddings import TransferError, looks_like_path

logger = logging.getLogger(__name__)

ROLES = ("bos", "eos", "pad", "unk")
BYTE_LEVEL, SENTENCEPIECE, WORDPIECE = "byte_level", "sentencepiece", "wordpiece"
SP_SPACE = "\u2581"  # '▁'
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load_tokenizer(name_or_path: str, revision: Optional[str] = None):
    """AutoTokenizer of a local directory or hub id (only the tokenizer files are fetched)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(name_or_path) and looks_like_path(name_or_path):
        raise TransferError(f"tokenizer directory not found: {name_or_path}")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except Exception as e:  # transformers raises OSError/ValueError/... with its own wording
        raise TransferError(f"cannot load the tokenizer of {name_or_path!r}: {type(e).__name__}: {e}") from e


def _nodes(spec):
    """A tokenizer.json component and, for Sequence components, its members."""
    if not isinstance(spec, dict):
        return
    yield spec
    for member in spec.get("decoders", []) + spec.get("pretokenizers", []):
        yield from _nodes(member)


def tokenizer_scheme(tokenizer) -> str:
    """How the tokenizer writes text into token strings: byte_level, sentencepiece or wordpiece."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        nodes = list(_nodes(spec.get("decoder"))) + list(_nodes(spec.get("pre_tokenizer")))
        types = {n.get("type") for n in nodes}
        if "ByteLevel" in types:
            return BYTE_LEVEL
        if "Metaspace" in types or any(n.get("type") == "Replace" and n.get("pattern", {}).get("String") == SP_SPACE
                                       for n in nodes):
            return SENTENCEPIECE
        if "WordPiece" in types:
            return WORDPIECE
    else:  # slow tokenizers
        if hasattr(tokenizer, "byte_decoder"):
            return BYTE_LEVEL
        if hasattr(tokenizer, "sp_model"):
            return SENTENCEPIECE
        if hasattr(tokenizer, "wordpiece_tokenizer"):
            return WORDPIECE
    raise TransferError(f"tokenizer of {tokenizer.name_or_path!r} ({type(tokenizer).__name__}) is neither "
                        f"byte-level BPE, SentencePiece nor WordPiece; cannot compare its tokens as text")


def _byte_decoder() -> Dict[str, int]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(token: str, scheme: str, byte_decoder: Optional[Dict[str, int]] = None) -> Tuple[bytes, bool]:
    """(the token's text as bytes with a leading b' ' for a word start, whether it is a
    single-byte fallback piece)."""
    if scheme == BYTE_LEVEL:
        byte_decoder = byte_decoder or _byte_decoder()
        if all(c in byte_decoder for c in token):
            return bytes(byte_decoder[c] for c in token), False
        return token.encode("utf-8"), False  # an added token, stored as plain text
    if scheme == SENTENCEPIECE:
        m = _BYTE_PIECE.fullmatch(token)
        if m:
            return bytes([int(m.group(1), 16)]), True
        return token.replace(SP_SPACE, " ").encode("utf-8"), False
    if scheme == WORDPIECE:
        return (token[2:] if token.startswith("##") else " " + token).encode("utf-8"), False
    raise ValueError(f"unknown scheme {scheme!r}")


def special_ids(tokenizer) -> set:
    ids = set(tokenizer.all_special_ids)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(i)
    return ids


def text_forms(tokenizer, rows: int) -> Dict[bytes, int]:
    """Text form (bytes) -> token id, over the non-special tokens with an embedding row.

    Where several tokens read the same (LLaMA's 'A' and its fallback '<0x41>'), the regular
    piece wins over the byte piece, then the lower id."""
    scheme = tokenizer_scheme(tokenizer)
    decoder = _byte_decoder() if scheme == BYTE_LEVEL else None
    skip = special_ids(tokenizer)
    best: Dict[bytes, Tuple[bool, int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i in skip or i >= rows:
            continue
        form, is_byte = token_bytes(token, scheme, decoder)
        if not form:
            continue
        if form not in best or (is_byte, i) < best[form]:
            best[form] = (is_byte, i)
    return {form: i for form, (_, i) in best.items()}


def role_ids(tokenizer) -> Dict[str, int]:
    out = {}
    for role in ROLES:
        i = getattr(tokenizer, f"{role}_token_id", None)
        if i is not None:
            out[role] = i
    return out


@dataclass
class TokenPairs:
    """Row indices into the source and target embedding matrices, one pair per entry."""

    src_ids: torch.Tensor  # int64 (n,)
    tgt_ids: torch.Tensor  # int64 (n,)
    special: torch.Tensor  # bool (n,): paired by role, not by text
    same_tokenizer: bool
    src_scheme: str
    tgt_scheme: str
    roles: List[str]
    src_name: str
    tgt_name: str

    def __len__(self) -> int:
        return self.src_ids.numel()

    @property
    def n_text(self) -> int:
        return int((~self.special).sum())

    def split(self, held_out: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fit, held-out) positions into the pairs; held-out pairs are a seeded random
        `held_out` fraction of the text pairs (special tokens always go to the fit set)."""
        text = torch.nonzero(~self.special).flatten()
        g = torch.Generator().manual_seed(seed)
        text = text[torch.randperm(text.numel(), generator=g)]
        n_held = int(round(held_out * text.numel()))
        if held_out > 0 and n_held == 0:
            n_held = 1
        if n_held >= text.numel() and held_out > 0:
            raise TransferError(f"held-out fraction {held_out} leaves no text pairs to fit "
                                f"({text.numel()} text pairs)")
        held = text[:n_held].sort().values
        fit = torch.cat([text[n_held:], torch.nonzero(self.special).flatten()]).sort().values
        return fit, held

    def summary(self) -> Dict:
        return {"pairs": len(self), "text_pairs": self.n_text, "special_pairs": len(self) - self.n_text,
                "special_roles": list(self.roles), "same_tokenizer": self.same_tokenizer,
                "source_scheme": self.src_scheme, "target_scheme": self.tgt_scheme}


def pair_tokens(src_tok, tgt_tok, src_rows: int, tgt_rows: int) -> TokenPairs:
    """Pairs of (source id, target id) that stand for the same token; ids limited to the rows
    of each embedding matrix."""
    src_name, tgt_name = src_tok.name_or_path, tgt_tok.name_or_path
    src_vocab = src_tok.get_vocab()
    if src_vocab == tgt_tok.get_vocab():
        ids = sorted(i for i in set(src_vocab.values()) if i < min(src_rows, tgt_rows))
        if not ids:
            raise TransferError(f"no token of {src_name!r} has a row in both embedding matrices "
                                f"({src_rows} and {tgt_rows} rows)")
        specials = special_ids(src_tok)
        t = torch.tensor(ids, dtype=torch.long)
        scheme = tokenizer_scheme(src_tok)
        return TokenPairs(t, t.clone(), torch.tensor([i in specials for i in ids], dtype=torch.bool),
                          True, scheme, scheme, [r for r in ROLES if r in role_ids(src_tok)], src_name, tgt_name)

    src_forms, tgt_forms = text_forms(src_tok, src_rows), text_forms(tgt_tok, tgt_rows)
    text = sorted((src_forms[f], tgt_forms[f]) for f in src_forms.keys() & tgt_forms.keys())
    if not text:
        raise TransferError(f"empty overlap: the tokenizers of {src_name!r} and {tgt_name!r} share no token "
                            f"({len(src_forms)} and {len(tgt_forms)} non-special tokens compared as text)")
    src_roles, tgt_roles = role_ids(src_tok), role_ids(tgt_tok)
    roles, role_pairs = [], []
    for role in ROLES:
        s, t = src_roles.get(role), tgt_roles.get(role)
        if s is not None and t is not None and s < src_rows and t < tgt_rows:
            roles.append(role)
            if (s, t) not in role_pairs:  # OPT's bos and eos are one token
                role_pairs.append((s, t))
    pairs = text + role_pairs
    logger.info("token overlap of %r and %r: %d text tokens (of %d / %d) + %d special (%s)", src_name, tgt_name,
                len(text), len(src_forms), len(tgt_forms), len(role_pairs), ", ".join(roles) or "none")
    return TokenPairs(
        torch.tensor([s for s, _ in pairs], dtype=torch.long), torch.tensor([t for _, t in pairs], dtype=torch.long),
        torch.tensor([False] * len(text) + [True] * len(role_pairs), dtype=torch.bool),
        False, tokenizer_scheme(src_tok), tokenizer_scheme(tgt_tok), roles, src_name, tgt_name)


# --------------------------------------------------------------------------- corpus weights


def read_captions(path: str) -> List[str]:
    """Captions from a text file (one per line) or a LAVIS annotation json (a list of records
    with a "caption" string or list of strings, or a list of strings)."""
    if not os.path.isfile(path):
        raise TransferError(f"caption corpus not found: {path}")
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise TransferError(f"{path}: expected a json list of captions or caption records")
        captions = []
        for record in data:
            value = record.get("caption") if isinstance(record, dict) else record
            captions.extend(value if isinstance(value, list) else [value])
        captions = [c for c in captions if isinstance(c, str) and c.strip()]
    else:
        with open(path, encoding="utf-8") as f:
            captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise TransferError(f"{path}: no captions found")
    return captions


def token_counts(tokenizer, captions: List[str], rows: int, batch: int = 4096) -> torch.Tensor:
    """How often each token id (< rows) occurs in the tokenised captions."""
    counts = torch.zeros(rows, dtype=torch.float64)
    for start in range(0, len(captions), batch):
        ids = tokenizer(captions[start:start + batch], add_special_tokens=False)["input_ids"]
        flat = torch.tensor([i for seq in ids for i in seq if i < rows], dtype=torch.long)
        counts += torch.bincount(flat, minlength=rows).to(torch.float64)
    return counts


def frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """1 + log(1 + count): frequent caption tokens count more, sub-linearly so that a few
    function words do not swamp the fit, and unseen shared tokens still constrain the map."""
    return 1.0 + torch.log1p(counts)

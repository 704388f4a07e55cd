"""The offline tiny zoo: real model formats at toy sizes, built locally.

    python -m lavis_vpgtrans.toy.zoo --out DIR [--profile test|demo]

writes, each with `save_pretrained` (so everything loads back through `from_pretrained`):
The language models are pre-trained for a few seconds on the toy world's text.

  opt-small/, opt-large/   OPT family, one byte-level BPE tokenizer (GPT-2 style, "Ġ")
  llama/                   LLaMA family, SentencePiece BPE tokenizer ("▁", byte fallback)
  t5/                      T5 (Flan-T5 layout: gated-gelu, untied head), SentencePiece unigram
  bert/                    tiny BERT + WordPiece tokenizer, the Q-Former's initialisation
  eva-vit/                 tiny EVA ViT (LAVIS's VisionTransformer): config.json + safetensors
  data/                    the synthetic image-caption / VQA dataset (see toy/world.py)
  benchmarks/              mini versions of the five evaluation benchmarks (toy/benchmarks.py)
  laion_coco/              image-caption webdataset shards in the LAION-COCO layout (toy/shards.py)
  instruct/                an instruction set in MiniGPT-4's layout (toy/instruct.py)

Model configs refer to these as "toy:<name>" (e.g. `llm_model: toy:opt-small`);
`resolve()` maps such names to paths, building the zoo on first use. The zoo lives in
$VPGTRANS_TOY_ZOO, or <cache>/toy_zoo with <cache> = $VPGTRANS_CACHE or
~/.cache/lavis_vpgtrans.

Two profiles of the same world (PROFILES):
  test   built in seconds for the test suite: LMs pre-trained on single sentences, a random
         ViT. Models run and train, but an image barely changes what they say.
  demo   the world the demo (python -m lavis_vpgtrans.demo) learns in: the ViT pre-trained on
         the scenes, LMs pre-trained on multi-sentence documents until they use their context
         (a few minutes), opt-large grown from opt-small (one family: a linear map relates
         their word embeddings), a Q-Former initialisation scaled to its width, a larger val
         split and an 8x larger "source" split for the source model. The LLaMA is made
         related to the OPT family, as real LLMs trained on overlapping corpora are: its
         embeddings of the tokens both vocabularies share start from opt-small's pre-trained
         ones through a random linear map (the other rows random), and it is pre-trained on
         the same documents in the same order. Independently pre-trained, the toy LLaMA's
         embeddings had no linear relation to OPT's (converter held-out cosine ~0.01).
The decoder-only LMs learn the released BLIP-2 / VPGTrans end of text: every line ends with
"\n". The build is deterministic (deterministic_build): the same seed and profile give the
same bytes, on any x86-64 machine with AVX2 when built with pinned CPU kernels
(common/kernels.py; ensure_zoo always builds so).
"""

import argparse
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

from lavis_vpgtrans.common import kernels
from lavis_vpgtrans.models.eva_vit import build_eva_vit, save_eva_vit_dir
from lavis_vpgtrans.toy import benchmarks as toy_benchmarks
from lavis_vpgtrans.toy import instruct, shards, world

ZOO_VERSION = "9"  # bump when the zoo's content changes; stale zoos are rebuilt
TOY_PREFIX = "toy:"

# Tiny but structurally faithful sizes: two OPT widths so that cross-size transfer changes
# the LLM hidden size, as OPT-2.7B -> 6.7B does.
OPT_SIZES = {"opt-small": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2),
             "opt-large": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4)}
TOY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True)


@dataclass(frozen=True)
class ZooProfile:
    """How long and on what the zoo's models are pre-trained (the world itself is the same)."""

    name: str
    opt_sizes: Dict[str, dict] = field(default_factory=lambda: dict(OPT_SIZES))
    # decoder-only LMs: single sentences (None) or documents with this many question lines
    lm_doc_questions: Optional[int] = None
    lm_steps: int = 200
    lm_lr: float = 3e-3
    lm_warmup_steps: int = 0
    pretrain_vit: bool = False
    # BERT's 0.02 is scaled for 768-d; at 64-d the Q-Former's cross-attention then adds ~2 %
    # of image signal to its queries, too little to learn from in a short run
    qformer_init_range: float = 0.02
    n_val: int = 32
    # questions per val / test image (None: all four); the demo's 1,024 validation scenes ask one
    # each, the types taking turns, to keep its per-epoch VQA evaluation affordable
    eval_questions_per_image: Optional[int] = None
    vit_steps: int = 150  # with pretrain_vit
    lm_documents: int = 6000  # with lm_doc_questions
    n_source: int = 64  # images of the data set's "source" split (world.write_dataset)
    # opt-large related to opt-small as members of one family are: grown from it (its
    # embeddings start as opt-small's pre-trained ones through a random orthonormal map, as
    # model-growth methods initialise a larger model from a smaller one), then pre-trained
    # on the same batches in the same order
    related_opt_init: bool = False
    # the LLaMA family related to the OPT family as real LLMs trained on overlapping corpora
    # are: its embeddings of the tokens both vocabularies share start from opt-small's
    # pre-trained ones through a random linear map, and it is pre-trained on the same
    # documents in the same order
    related_llama_init: bool = False


PROFILES = {
    "test": ZooProfile("test"),
    "demo": ZooProfile(
        "demo",
        # opt-small wide enough to learn to read its context within the pre-training budget
        opt_sizes={"opt-small": dict(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4),
                   "opt-large": OPT_SIZES["opt-large"]},
        lm_doc_questions=1, lm_steps=1250, lm_lr=2e-3, lm_warmup_steps=50,
        pretrain_vit=True, qformer_init_range=0.08, n_val=1024, eval_questions_per_image=1,
        n_source=2048, related_opt_init=True, related_llama_init=True),
}
DEFAULT_PROFILE = "test"
STAMP_NAME = "ZOO_VERSION"
KERNELS_NAME = "KERNELS"  # the CPU kernels it was built with (kernels.describe())
LM_TEXT_NAME = "lm_text.txt"  # in data/


def default_zoo_dir(profile: str = DEFAULT_PROFILE) -> str:
    """$VPGTRANS_TOY_ZOO, else <cache>/toy_zoo (the demo profile: <cache>/toy_zoo_demo)."""
    if os.environ.get("VPGTRANS_TOY_ZOO"):
        return os.environ["VPGTRANS_TOY_ZOO"]
    cache = os.environ.get("VPGTRANS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lavis_vpgtrans"))
    return os.path.join(cache, "toy_zoo" if profile == DEFAULT_PROFILE else f"toy_zoo_{profile}")


def _stamp(profile: str) -> str:
    # the test profile keeps the plain version stamp, so existing test zoos stay valid; the
    # others carry a digest of their settings, so editing a profile rebuilds its zoos
    if profile == DEFAULT_PROFILE:
        return ZOO_VERSION
    digest = hashlib.sha256(repr(PROFILES[profile]).encode()).hexdigest()[:12]
    return f"{ZOO_VERSION} {profile} {digest}"


def zoo_profile(root: str) -> Optional[str]:
    """The profile of the complete zoo of this version at `root`, None if there is none."""
    stamp = os.path.join(root, STAMP_NAME)
    if not os.path.isfile(stamp):
        return None
    with open(stamp) as f:
        text = f.read().strip()
    return next((name for name in PROFILES if _stamp(name) == text), None)


def _stamped_profile(root: str) -> Optional[str]:
    """The profile named by the stamp of a zoo of any version (its second word; the test
    profile's stamp is the version alone), None without a stamp or for an unknown name."""
    stamp = os.path.join(root, STAMP_NAME)
    if not os.path.isfile(stamp):
        return None
    with open(stamp) as f:
        words = f.read().split()
    name = words[1] if len(words) > 1 else DEFAULT_PROFILE
    return name if name in PROFILES else None


def is_toy(name) -> bool:
    return isinstance(name, str) and name.startswith(TOY_PREFIX)


def resolve(name: str) -> str:
    """'toy:<relative path>' -> a path inside the (built) zoo; anything else unchanged."""
    if not is_toy(name):
        return name
    root = ensure_zoo()
    path = os.path.join(root, name[len(TOY_PREFIX):])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name!r}: no such entry in the toy zoo at {root}")
    return path


def ensure_zoo(root: str = None, profile: str = None, progress=None) -> str:
    """Builds the zoo at `root` unless a complete one of this version is there.

    `profile` None accepts a complete zoo of any profile (what `toy:` paths resolve against),
    rebuilds an outdated one in the profile its stamp names, and builds the test profile if
    there is none. A named profile must match: a complete zoo of another profile is an error
    (nothing is deleted), an outdated one is rebuilt.

    Safe under torchrun: a file lock serialises builders, and the zoo is built in a temporary
    directory that is renamed into place only when complete.
    """
    from filelock import FileLock

    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown toy zoo profile {profile!r}; known: {sorted(PROFILES)}")
    root = os.path.abspath(root or default_zoo_dir(profile or DEFAULT_PROFILE))
    if profile is None and zoo_profile(root) is None:
        profile = _stamped_profile(root)  # an outdated zoo: rebuilt as what it was

    def ready():
        found = zoo_profile(root)
        if found is not None and profile is not None and found != profile:
            raise ValueError(f"{root} holds the toy zoo's {found!r} profile, not {profile!r}: choose another "
                             f"directory (or delete this one to rebuild it)")
        return found is not None

    if ready():
        return root
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(os.path.join(root, STAMP_NAME)):
        # only an outdated zoo is replaced, never a directory that is not a zoo
        raise ValueError(f"{root} is not empty and holds no toy zoo ({STAMP_NAME} missing): choose an empty "
                         f"or new directory for the zoo")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with FileLock(root + ".lock"):
        if ready():
            return root
        tmp = tempfile.mkdtemp(prefix=".toy_zoo_build_", dir=os.path.dirname(root))
        try:
            _build_pinned(tmp, profile or DEFAULT_PROFILE, progress)
            if os.path.exists(root):
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
    return root


def _build_pinned(out: str, profile: str, progress) -> None:
    """build_zoo with pinned CPU kernels (common/kernels.py), so that the zoo is the same on
    every machine: in this process if it was started pinned, else in a pinned child process
    (without progress reports)."""
    if kernels.is_pinned():
        build_zoo(out, profile=profile, progress=progress)
        return
    command = [sys.executable, "-m", "lavis_vpgtrans.toy.zoo", "--build-dir", out, "--profile", profile]
    logging.info("building the toy zoo in a process with pinned CPU kernels: %s", " ".join(command))
    if subprocess.run(command, env=kernels.pinned_env()).returncode != 0:
        raise RuntimeError(f"building the toy zoo failed: {' '.join(command)} (its output is above)")


# --------------------------------------------------------------------------- determinism


@contextmanager
def deterministic_build():
    """One thread, deterministic algorithms and no tokenizer parallelism while the zoo is built:
    float reductions then run in one fixed order, so the same seed gives the same bytes
    whatever thread count the caller's process has. Restores the caller's settings."""
    threads = torch.get_num_threads()
    algorithms = torch.are_deterministic_algorithms_enabled()
    tokenizers_env = os.environ.get("TOKENIZERS_PARALLELISM")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms)
        if tokenizers_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = tokenizers_env


# --------------------------------------------------------------------------- tokenizers


def _byte_level_bpe(sentences, vocab_size):
    """An OPT-style tokenizer: GPT-2 byte-level BPE, ids <s>=0 <pad>=1 </s>=2 <unk>=3, and
    '</s>' prepended as BOS like facebook/opt-*."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bos_id = bpe.token_to_id("</s>")
    bpe._tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos_id)])
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>",
                             unk_token="<unk>", pad_token="<pad>", add_prefix_space=False)


def _sentencepiece_model(sentences, path_prefix, vocab_size, model_type, **ids):
    import io

    import sentencepiece as spm

    # written through model_writer, not model_prefix: the model file records its trainer
    # options, and a temporary path among them would make every build's file differ
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, num_threads=1, minloglevel=2,
        hard_vocab_limit=False, **ids)
    with open(path_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    return path_prefix + ".model"


def _save_sentencepiece_tokenizer(slow_cls, fast_cls, spm_file, out_dir, **kwargs):
    """Saves the slow (tokenizer.model) and fast (tokenizer.json) forms, as real LLaMA / T5
    repositories ship them."""
    slow = slow_cls(vocab_file=spm_file, **kwargs)
    slow.save_pretrained(out_dir)
    fast = fast_cls.from_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return fast


def _wordpiece(sentences, out_dir):
    """A BERT WordPiece vocabulary of the toy text: the special tokens, then every word and
    character (and ## continuation character), sorted. Written directly, not by the
    WordPiece trainer, which breaks ties between equally frequent pieces in hash order."""
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizer

    split = BertPreTokenizer()
    words = {word for s in sentences for word, _ in split.pre_tokenize_str(s.lower())}
    chars = {c for word in words for c in word}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words | chars) + sorted(f"##{c}" for c in chars)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.txt"), "w") as f:
        f.write("".join(f"{token}\n" for token in vocab))
    tok = BertTokenizer(os.path.join(out_dir, "vocab.txt"))
    tok.save_pretrained(out_dir)
    return tok


# --------------------------------------------------------------------------- models


def lm_text(lines) -> str:
    """A decoder-only LM's pre-training text: every line followed by "\\n" (EOS comes after)."""
    return "".join(f"{line}\n" for line in lines)


def document_ids(tokenizer, lines) -> list:
    """A document's token ids: BOS, each line (with its "\\n") tokenized on its own -- as the VL
    models tokenize a caption: a SentencePiece tokenizer then starts every line with a word-start
    piece ('▁a'), not only the first (byte-level BPE gives the same ids either way) -- then EOS."""
    ids = tokenizer(lm_text(lines[:1])).input_ids
    for line in lines[1:]:
        ids += tokenizer(lm_text([line]), add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id]


def pretrain_lm(model, tokenizer, sentences, steps=200, batch_size=32, lr=3e-3, seed=0, documents=None,
                warmup_steps=0, clip_norm=None, on_step=None):
    """A short language-model pre-training on the toy world's text, so that the frozen LLMs
    of the zoo speak its language (as a real LLM speaks English) before any VL training.
    Decoder-only: next-token prediction, on single sentences, or on `documents` (lists of
    lines) when given. Every sentence / line ends with "\\n" and a sequence (a sentence, or a
    document's lines joined) is closed by EOS: the end-of-text convention of the released
    decoder-only BLIP-2 / VPGTrans models, whose captions end with "\\n". Encoder-decoder:
    a random word split, the first part encoded and the rest decoded (prefix LM, as BLIP-2
    trains Flan-T5)."""
    import random

    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
    if documents is not None:
        if model.config.is_encoder_decoder:
            raise ValueError("documents are for decoder-only LMs")
        # tokenized once: the per-step tokenizer calls would cost as much as the model
        pool = [document_ids(tokenizer, doc) for doc in documents]
    model.train()
    for step in range(steps):
        if documents is not None:
            rows = rng.sample(pool, batch_size)
        elif model.config.is_encoder_decoder:
            batch = rng.sample(sentences, batch_size)
            cuts = [rng.randint(1, max(1, len(s.split()) - 1)) for s in batch]
            sources = [" ".join(s.split()[:c]) for s, c in zip(batch, cuts)]
            targets = [" ".join(s.split()[c:]) for s, c in zip(batch, cuts)]
            enc = tokenizer(sources, return_tensors="pt", padding=True)
            dec = tokenizer(targets, return_tensors="pt", padding=True)
            labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
            rows = None
        else:
            rows = [tokenizer(lm_text([s])).input_ids + [tokenizer.eos_token_id]
                    for s in rng.sample(sentences, batch_size)]
        if rows is None:
            loss = model(**enc, labels=labels).loss
        else:
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    logging.info("pre-trained %s: final LM loss %.3f", type(model).__name__, loss.item())
    return loss.item()


def pretrain_vit(vit, cfg, steps=150, n_scenes=2000, batch_size=128, lr=2e-3, seed=0):
    """A short supervised pre-training of the tiny ViT on rendered scenes, so that its patch
    features encode what the captions talk about and where it is, as CLIP / EVA pre-training
    gives a real ViT (whose patch tokens carry their position: a linear probe reads it back):
    a linear head on every patch token classifies the grid cell the patch lies in, crossed with
    that cell's content (empty, or one of the colour x shape combinations). The head is
    discarded. A random ViT would leave the Q-Former almost nothing image-specific to pass on;
    one trained on cell content alone (pooled by fixed patch indices) kept the content but lost
    the position (a probe read a patch's cell back at 0.30, chance 0.25), so the VL models named
    the right colours at the wrong places."""
    import random

    import torch.nn.functional as F
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    rng = random.Random(seed)
    torch.manual_seed(seed)
    # the datasets' own eval transform (resize + CLIP normalisation): the features the VL
    # models will see
    transform = BlipImageEvalProcessor(image_size=cfg["img_size"])
    colors, shapes, cells = sorted(world.COLORS), list(world.SHAPES), sorted(world.CELLS)
    contents = 1 + len(colors) * len(shapes)  # 0: empty cell
    scenes = [world.sample_scene(rng) for _ in range(n_scenes)]
    images = torch.stack([transform(world.render(scene)) for scene in scenes])
    labels = torch.zeros(n_scenes, len(cells), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for thing in scene:
            labels[i, cells.index(thing.cell)] = 1 + colors.index(thing.color) * len(shapes) + shapes.index(thing.shape)
    grid = cfg["img_size"] // cfg["patch_size"]
    # the grid cell of each patch token (after the CLS token), in row-major patch order
    cell_of_patch = torch.tensor([cells.index(next(name for name, (col, row) in world.CELLS.items()
                                                   if (col, row) == (c * 2 // grid, r * 2 // grid)))
                                  for r in range(grid) for c in range(grid)])
    head = torch.nn.Linear(vit.num_features, len(cells) * contents)
    optimizer = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr)
    vit.train()
    for _ in range(steps):
        batch = torch.randint(0, n_scenes, (batch_size,))
        patches = vit(images[batch])[:, 1:]  # (B, patches, D)
        target = cell_of_patch * contents + labels[batch][:, cell_of_patch]  # (B, patches)
        loss = F.cross_entropy(head(patches).flatten(0, 1), target.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    vit.eval()
    logging.info("pre-trained the toy ViT: final patch (cell x content) loss %.4f", loss.item())
    return loss.item()


def save_toy_vit(out_dir, seed=0, pretrain=False, steps=150, **overrides):
    """A tiny EVA ViT with LAVIS's own VisionTransformer class, stored as config + weights."""
    cfg = {**TOY_VIT, **overrides}
    torch.manual_seed(seed)
    vit = build_eva_vit(cfg)
    if pretrain:
        pretrain_vit(vit, cfg, steps=steps, seed=seed)
    save_eva_vit_dir(vit, cfg, out_dir)


def related_embeddings(embeddings: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """`embeddings` (vocab x d) through a random map with orthonormal columns to `width` >= d
    dimensions, rescaled to the same per-coordinate spread: a wider model's initial embeddings
    that a linear map relates to the narrower one's."""
    d = embeddings.shape[1]
    if width < d:
        raise ValueError(f"related embeddings widen: {d}-d to {width}-d is not possible")
    q, _ = torch.linalg.qr(torch.randn(width, d, generator=torch.Generator().manual_seed(seed)))
    return embeddings @ q.t() * math.sqrt(width / d)


def _relate_to(model, tokenizer, base, base_tokenizer, seed: int) -> None:
    """Starts `model`'s input embeddings of the tokens its vocabulary shares with
    `base_tokenizer`'s (paired as the converter pairs them) from `base`'s pre-trained ones
    through a random linear map (related_embeddings, scaled to the spread of `model`'s own
    initialisation); the other rows keep their random init."""
    from lavis_vpgtrans.transfer.pairing import pair_tokens

    emb = model.get_input_embeddings().weight
    base_emb = base.get_input_embeddings().weight.detach()
    pairs = pair_tokens(base_tokenizer, tokenizer, base_emb.shape[0], emb.shape[0])
    mapped = related_embeddings(base_emb, emb.shape[1], seed)
    with torch.no_grad():
        emb[pairs.tgt_ids] = mapped[pairs.src_ids] * (emb.std() / mapped[pairs.src_ids].std())


def build_zoo(out: str, seed: int = 0, profile: Union[str, ZooProfile] = DEFAULT_PROFILE, progress=None) -> None:
    """Writes the whole zoo of `profile` (a name in PROFILES, or a ZooProfile: e.g. a reduced
    one for tests) into `out`, the same bytes for the same seed and profile (see
    deterministic_build). `progress(what, done, total)`, if given, is called as the build goes
    (the LM pre-training step by step)."""
    logging.log(logging.INFO if kernels.is_pinned() else logging.WARNING, "toy zoo build: %s", kernels.describe())
    with deterministic_build():
        _build_zoo(out, seed, PROFILES[profile] if isinstance(profile, str) else profile, progress)


def _build_zoo(out: str, seed: int, prof: ZooProfile, progress) -> None:
    from transformers import (BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM,
                              LlamaTokenizer, LlamaTokenizerFast, OPTConfig, OPTForCausalLM,
                              T5Config, T5ForConditionalGeneration, T5Tokenizer, T5TokenizerFast)

    report = progress or (lambda what, done, total: None)
    logging.info("building the toy zoo (%s profile) in %s", prof.name, out)
    os.makedirs(out, exist_ok=True)
    report("data", 0, 1)
    data_dir = os.path.join(out, "data")
    world.write_dataset(data_dir, n_val=prof.n_val, seed=seed, n_source=prof.n_source,
                        eval_questions_per_image=prof.eval_questions_per_image)
    toy_benchmarks.write_benchmarks(os.path.join(out, "benchmarks"), seed=seed)
    shards.write_caption_shards(os.path.join(out, "laion_coco"), seed=seed + 2)
    instruct.write_instruct_set(os.path.join(out, "instruct"), seed=seed + 7)
    sentences = world.corpus_sentences(2000, seed=seed + 1)
    with open(os.path.join(data_dir, "corpus.txt"), "w") as f:
        f.write("\n".join(sentences) + "\n")
    documents = None
    if prof.lm_doc_questions is not None:
        documents = world.corpus_documents(prof.lm_documents, seed=seed + 3, questions_per_doc=prof.lm_doc_questions)
    # the decoder-only LMs' pre-training text, a line each (the converter reports its quality
    # on the tokens that occur in it)
    with open(os.path.join(data_dir, LM_TEXT_NAME), "w") as f:
        f.write(lm_text(sentences if documents is None else [line for doc in documents for line in doc]))
    report("data", 1, 1)

    def lm_pretraining(name, model, tokenizer, lm_seed, decoder_only=True):
        steps = prof.lm_steps if decoder_only else PROFILES[DEFAULT_PROFILE].lm_steps
        report(f"{name} LM", 0, steps)
        pretrain_lm(model, tokenizer, sentences, seed=lm_seed, steps=steps,
                    lr=prof.lm_lr if decoder_only else PROFILES[DEFAULT_PROFILE].lm_lr,
                    documents=documents if decoder_only else None,
                    warmup_steps=prof.lm_warmup_steps if documents is not None else 0,
                    clip_norm=1.0 if documents is not None else None,
                    on_step=lambda done: report(f"{name} LM", done, steps))

    # OPT family: one tokenizer (trained on the LMs' text: every line ends with "\n"), two sizes.
    opt_tok = _byte_level_bpe([lm_text([s]) for s in sentences], vocab_size=400)
    first = None
    for i, (name, size) in enumerate(prof.opt_sizes.items()):
        lm_seed = seed + 10 + (0 if prof.related_opt_init else i)
        torch.manual_seed(seed + 10 + i)
        cfg = OPTConfig(vocab_size=len(opt_tok), word_embed_proj_dim=size["hidden_size"],
                        max_position_embeddings=128, pad_token_id=opt_tok.pad_token_id,
                        bos_token_id=opt_tok.bos_token_id, eos_token_id=opt_tok.eos_token_id,
                        dropout=0.0, attention_dropout=0.0, **size)
        d = os.path.join(out, name)
        model = OPTForCausalLM(cfg)
        if first is not None and prof.related_opt_init:
            model.get_input_embeddings().weight.data.copy_(
                related_embeddings(first.get_input_embeddings().weight.detach(), size["hidden_size"], seed + 10 + i))
        lm_pretraining(name, model, opt_tok, lm_seed)
        if first is None:
            first = model
        model.save_pretrained(d)
        opt_tok.save_pretrained(d)

    with tempfile.TemporaryDirectory() as tmp:
        # LLaMA family: SentencePiece BPE with byte fallback, <unk>=0 <s>=1 </s>=2, no pad.
        # LLaMA's own normalisation (none): "\n" is not folded into a space but reaches the
        # byte fallback as <0x0A>, as in the released LLaMA tokenizers
        spm_file = _sentencepiece_model(sentences, os.path.join(tmp, "llama"), 400, "bpe",
                                        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                        normalization_rule_name="identity", remove_extra_whitespaces=False)
        d = os.path.join(out, "llama")
        llama_tok = _save_sentencepiece_tokenizer(LlamaTokenizer, LlamaTokenizerFast, spm_file, d,
                                                  legacy=False)
        torch.manual_seed(seed + 20)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(llama_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
        if prof.related_llama_init:
            _relate_to(model, llama_tok, first, opt_tok, seed + 20)
        lm_pretraining("llama", model, llama_tok, seed + 10 if prof.related_llama_init else seed + 20)
        model.save_pretrained(d)

        # T5 (Flan-T5 layout): SentencePiece unigram, <pad>=0 </s>=1 <unk>=2.
        spm_file = _sentencepiece_model(sentences, os.path.join(tmp, "t5"), 64, "unigram",
                                        pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
        d = os.path.join(out, "t5")
        t5_tok = _save_sentencepiece_tokenizer(T5Tokenizer, T5TokenizerFast, spm_file, d,
                                               extra_ids=0, legacy=False)
        torch.manual_seed(seed + 30)
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(t5_tok), d_model=48, d_kv=12, d_ff=96, num_layers=2,
            num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0))
        lm_pretraining("t5", model, t5_tok, seed + 30, decoder_only=False)
        model.save_pretrained(d)

    # Q-Former initialisation: a tiny BERT with the masked-LM head, as bert-base-uncased ships.
    d = os.path.join(out, "bert")
    bert_tok = _wordpiece(sentences, d)
    torch.manual_seed(seed + 40)
    BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=64,
                               initializer_range=prof.qformer_init_range)).save_pretrained(d)

    report("ViT", 0, 1)
    save_toy_vit(os.path.join(out, "eva-vit"), seed=seed + 50, pretrain=prof.pretrain_vit, steps=prof.vit_steps)
    report("ViT", 1, 1)

    with open(os.path.join(out, KERNELS_NAME), "w") as f:
        f.write(kernels.describe() + "\n")
    with open(os.path.join(out, STAMP_NAME), "w") as f:
        f.write(_stamp(prof.name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    parser.add_argument("--out", default=None, help="zoo directory (default: $VPGTRANS_TOY_ZOO, else "
                                                    "<cache>/toy_zoo or, for the demo profile, <cache>/toy_zoo_demo)")
    # ensure_zoo's pinned child process: build into this (new) directory, nothing else
    parser.add_argument("--build-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.build_dir:
        build_zoo(args.build_dir, profile=args.profile)
        return
    print(ensure_zoo(args.out, profile=args.profile))


if __name__ == "__main__":
    main()

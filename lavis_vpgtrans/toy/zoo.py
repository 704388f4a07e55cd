"""The offline tiny zoo: real model formats at toy sizes, built locally.

    python -m lavis_vpgtrans.toy.zoo --out DIR

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
"""

import argparse
import json
import logging
import os
import shutil
import tempfile

import torch

from lavis_vpgtrans.toy import benchmarks as toy_benchmarks
from lavis_vpgtrans.toy import instruct, shards, world

ZOO_VERSION = "5"  # bump when the zoo's content changes; stale zoos are rebuilt
TOY_PREFIX = "toy:"
VIT_CONFIG_NAME = "config.json"
VIT_WEIGHTS_NAME = "model.safetensors"

# Tiny but structurally faithful sizes: two OPT widths so that cross-size transfer changes
# the LLM hidden size, as OPT-2.7B -> 6.7B does.
OPT_SIZES = {"opt-small": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2),
             "opt-large": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4)}
TOY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True)


def default_zoo_dir() -> str:
    if os.environ.get("VPGTRANS_TOY_ZOO"):
        return os.environ["VPGTRANS_TOY_ZOO"]
    cache = os.environ.get("VPGTRANS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lavis_vpgtrans"))
    return os.path.join(cache, "toy_zoo")


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


def ensure_zoo(root: str = None) -> str:
    """Builds the zoo at `root` unless a complete one of this version is there.

    Safe under torchrun: a file lock serialises builders, and the zoo is built in a temporary
    directory that is renamed into place only when complete.
    """
    from filelock import FileLock

    root = os.path.abspath(root or default_zoo_dir())
    stamp = os.path.join(root, "ZOO_VERSION")

    def ready():
        return os.path.isfile(stamp) and open(stamp).read().strip() == ZOO_VERSION

    if ready():
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with FileLock(root + ".lock"):
        if ready():
            return root
        tmp = tempfile.mkdtemp(prefix=".toy_zoo_build_", dir=os.path.dirname(root))
        try:
            build_zoo(tmp)
            if os.path.exists(root):
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
    return root


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
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=path_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, num_threads=1, minloglevel=2,
        hard_vocab_limit=False, **ids)
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
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(sentences, vocab_size=300, min_frequency=1, show_progress=False)
    os.makedirs(out_dir, exist_ok=True)
    wp.save_model(out_dir)
    tok = BertTokenizer(os.path.join(out_dir, "vocab.txt"))
    tok.save_pretrained(out_dir)
    return tok


# --------------------------------------------------------------------------- models


def pretrain_lm(model, tokenizer, sentences, steps=200, batch_size=32, lr=3e-3, seed=0):
    """A short language-model pre-training on the toy world's text, so that the frozen LLMs
    of the zoo speak its language (as a real LLM speaks English) before any VL training.
    Decoder-only: next-token prediction. Encoder-decoder: a random word split, the first
    part encoded and the rest decoded (prefix LM, as BLIP-2 trains Flan-T5)."""
    import random

    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = rng.sample(sentences, batch_size)
        if model.config.is_encoder_decoder:
            cuts = [rng.randint(1, max(1, len(s.split()) - 1)) for s in batch]
            sources = [" ".join(s.split()[:c]) for s, c in zip(batch, cuts)]
            targets = [" ".join(s.split()[c:]) for s, c in zip(batch, cuts)]
            enc = tokenizer(sources, return_tensors="pt", padding=True)
            dec = tokenizer(targets, return_tensors="pt", padding=True)
            labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
            loss = model(**enc, labels=labels).loss
        else:
            rows = [tokenizer(s).input_ids + [tokenizer.eos_token_id] for s in batch]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    logging.info("pre-trained %s: final LM loss %.3f", type(model).__name__, loss.item())
    return loss.item()


def save_toy_vit(out_dir, seed=0, **overrides):
    """A tiny EVA ViT with LAVIS's own VisionTransformer class, stored as config + weights."""
    from safetensors.torch import save_file

    cfg = {**TOY_VIT, **overrides}
    torch.manual_seed(seed)
    vit = build_eva_vit(cfg)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, VIT_CONFIG_NAME), "w") as f:
        json.dump({"architecture": "eva_vit", **cfg}, f, indent=2)
    save_file(vit.state_dict(), os.path.join(out_dir, VIT_WEIGHTS_NAME))


def build_eva_vit(cfg, drop_path_rate=0.0, use_checkpoint=False):
    from functools import partial

    from lavis.models.eva_vit import VisionTransformer

    return VisionTransformer(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg.get("qkv_bias", True), use_mean_pooling=False, drop_path_rate=drop_path_rate,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_checkpoint=use_checkpoint)


def build_zoo(out: str, seed: int = 0) -> None:
    from transformers import (BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM,
                              LlamaTokenizer, LlamaTokenizerFast, OPTConfig, OPTForCausalLM,
                              T5Config, T5ForConditionalGeneration, T5Tokenizer, T5TokenizerFast)

    logging.info("building the toy zoo in %s", out)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    world.write_dataset(data_dir, seed=seed)
    toy_benchmarks.write_benchmarks(os.path.join(out, "benchmarks"), seed=seed)
    shards.write_caption_shards(os.path.join(out, "laion_coco"), seed=seed + 2)
    instruct.write_instruct_set(os.path.join(out, "instruct"), seed=seed + 7)
    sentences = world.corpus_sentences(2000, seed=seed + 1)
    with open(os.path.join(data_dir, "corpus.txt"), "w") as f:
        f.write("\n".join(sentences) + "\n")

    # OPT family: one tokenizer, two sizes.
    opt_tok = _byte_level_bpe(sentences, vocab_size=400)
    for i, (name, size) in enumerate(OPT_SIZES.items()):
        torch.manual_seed(seed + 10 + i)
        cfg = OPTConfig(vocab_size=len(opt_tok), word_embed_proj_dim=size["hidden_size"],
                        max_position_embeddings=128, pad_token_id=opt_tok.pad_token_id,
                        bos_token_id=opt_tok.bos_token_id, eos_token_id=opt_tok.eos_token_id,
                        dropout=0.0, attention_dropout=0.0, **size)
        d = os.path.join(out, name)
        model = OPTForCausalLM(cfg)
        pretrain_lm(model, opt_tok, sentences, seed=seed + 10 + i)
        model.save_pretrained(d)
        opt_tok.save_pretrained(d)

    with tempfile.TemporaryDirectory() as tmp:
        # LLaMA family: SentencePiece BPE with byte fallback, <unk>=0 <s>=1 </s>=2, no pad.
        spm_file = _sentencepiece_model(sentences, os.path.join(tmp, "llama"), 400, "bpe",
                                        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        d = os.path.join(out, "llama")
        llama_tok = _save_sentencepiece_tokenizer(LlamaTokenizer, LlamaTokenizerFast, spm_file, d,
                                                  legacy=False)
        torch.manual_seed(seed + 20)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(llama_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
        pretrain_lm(model, llama_tok, sentences, seed=seed + 20)
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
        pretrain_lm(model, t5_tok, sentences, seed=seed + 30)
        model.save_pretrained(d)

    # Q-Former initialisation: a tiny BERT with the masked-LM head, as bert-base-uncased ships.
    d = os.path.join(out, "bert")
    bert_tok = _wordpiece(sentences, d)
    torch.manual_seed(seed + 40)
    BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=64)).save_pretrained(d)

    save_toy_vit(os.path.join(out, "eva-vit"), seed=seed + 50)

    with open(os.path.join(out, "ZOO_VERSION"), "w") as f:
        f.write(ZOO_VERSION)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="zoo directory (default: %s)" % default_zoo_dir())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(ensure_zoo(args.out))


if __name__ == "__main__":
    main()

"""Wall time and peak memory of the word-embedding converter CLI at real LLM sizes.

    python benchmarks/converter_benchmark.py [--workdir DIR] [--json results.json] [-- extra CLI args]

Writes, for each transfer below, the files the CLI reads from a real Hugging Face LLM
directory, at real sizes but with synthetic content:
  - tokenizer.json: a byte-level BPE vocabulary of 50265 entries (OPT) or a SentencePiece-style
    BPE of 32000 with byte fallback (LLaMA), with merges, built from one pool of pseudo-words;
  - config.json and the input embeddings as fp16 safetensors in two shards with an index json
    (the embedding shard also holds a decoder layer, the other an lm_head-sized tensor);
  - a source projector checkpoint with a Q-Former-sized payload (~107M fp32 parameters).
Source embeddings are random (std 0.02); target rows of the tokens both vocabularies share
(known here by construction, not from the converter's pairing) are A x + b plus 30% noise,
the rest random, so the reported held-out quality has a known ceiling.

    OPT-2.7B (50272 x 2560) -> OPT-6.7B (50272 x 4096)
    OPT-6.7B (50272 x 4096) -> LLaMA-7B (32000 x 4096)

Each CLI run is a subprocess; its wall time (including Python start-up and imports) and peak
RSS (ru_maxrss from os.wait4) are printed.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

OPT_VOCAB, OPT_ROWS = 50265, 50272  # OPT pads its embedding matrix past the vocabulary
LLAMA_VOCAB = 32000
Q_DIM = 768
SPACE_BL, SPACE_SP = "\u0120", "\u2581"  # 'Ġ' (byte-level), '▁' (SentencePiece)
TRANSFERS = [
    dict(name="opt-2.7b -> opt-6.7b", src=("opt", 2560), tgt=("opt", 4096), src_arch="blip2_opt",
         tgt_arch="blip2_opt"),
    dict(name="opt-6.7b -> llama-7b", src=("opt", 4096), tgt=("llama", 4096), src_arch="blip2_opt",
         tgt_arch="blip2_llama"),
]


# --------------------------------------------------------------------------- tokenizers


def pseudo_words(seed):
    """An endless, deterministic stream of pronounceable lowercase words."""
    rng = random.Random(seed)
    onsets = list("bcdfghjklmnprstvwz") + ["br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
    vowels = list("aeiou") + ["ai", "ea", "ee", "oo", "ou"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "ng", "st"]
    while True:
        yield "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                      for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4])))


def _add_chain(piece, vocab, merges, limit):
    """Adds `piece` and its prefixes as left-to-right BPE merges; stops at `limit` entries."""
    for end in range(2, len(piece) + 1):
        if len(vocab) >= limit:
            return
        if piece[:end] not in vocab:
            vocab[piece[:end]] = len(vocab)
            merges.append((piece[:end - 1], piece[end - 1]))


def build_vocabularies(seed=0):
    """OPT-like and LLaMA-like vocabularies (token -> id) with merges, drawn from one word pool
    (LLaMA takes 60% of the words OPT takes, plus its own), and the pairs of ids whose text is
    the same, known by construction."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_chars = bytes_to_unicode()  # byte -> printable char; ASCII letters map to themselves
    opt = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        opt[byte_chars[b]] = len(opt)
    llama = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        llama[f"<0x{b:02X}>"] = len(llama)
    for c in [SPACE_SP] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]:
        llama[c] = len(llama)
    opt_merges, llama_merges = [], []
    rng = random.Random(seed + 1)
    shared_words, own_words = pseudo_words(seed), pseudo_words(seed + 2)
    while len(opt) < OPT_VOCAB or len(llama) < LLAMA_VOCAB:
        word = next(shared_words)
        start = rng.random() < 0.7  # word-initial piece or a word-internal one
        _add_chain((SPACE_BL if start else "") + word, opt, opt_merges, OPT_VOCAB)
        llama_word = word if rng.random() < 0.6 else next(own_words)
        _add_chain((SPACE_SP if start else "") + llama_word, llama, llama_merges, LLAMA_VOCAB)

    # Pairs by construction: same text after the word-start marker; every byte; roles.
    opt_text = {tok.replace(SPACE_BL, " "): i for tok, i in opt.items() if i >= 4 + 256}
    llama_text = {tok.replace(SPACE_SP, " "): i for tok, i in llama.items() if i >= 3 + 256}
    pairs = [(opt_text[t], llama_text[t]) for t in opt_text.keys() & llama_text.keys()]
    for b in range(256):  # a regular LLaMA piece for the byte if there is one, else its fallback piece
        regular = SPACE_SP if b == 0x20 else chr(b) if chr(b).isascii() and chr(b).isalpha() else None
        pairs.append((opt[byte_chars[b]], llama[regular] if regular else llama[f"<0x{b:02X}>"]))
    pairs += [(2, 1), (2, 2), (3, 0)]  # bos, eos, unk
    return opt, opt_merges, llama, llama_merges, sorted(set(pairs))


def save_opt_tokenizer(vocab, merges, out_dir):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<pad>", "</s>", "<unk>")])
    GPT2TokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                      pad_token="<pad>").save_pretrained(out_dir)


def save_llama_tokenizer(vocab, merges, out_dir):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_SP, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE_SP, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       legacy=False).save_pretrained(out_dir)


# --------------------------------------------------------------------------- weights


def save_llm(out_dir, family, embeddings):
    """config.json + two fp16 safetensors shards + index, laid out as HF's save_pretrained does."""
    from safetensors.torch import save_file

    rows, hidden = embeddings.shape
    os.makedirs(out_dir, exist_ok=True)
    if family == "opt":
        key, layer = "model.decoder.embed_tokens.weight", "model.decoder.layers.0.self_attn.{}_proj.weight"
        config = {"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": rows,
                  "hidden_size": hidden, "word_embed_proj_dim": hidden, "torch_dtype": "float16"}
    else:
        key, layer = "model.embed_tokens.weight", "model.layers.0.self_attn.{}_proj.weight"
        config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": rows,
                  "hidden_size": hidden, "torch_dtype": "float16"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shard1 = {key: embeddings.half().contiguous()}
    for p in "qkvo":
        shard1[layer.format(p)] = torch.zeros(hidden, hidden, dtype=torch.float16)
    shard2 = {"lm_head.weight": torch.zeros(rows, hidden, dtype=torch.float16)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, shard in zip(names, (shard1, shard2)):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * 2 for s in (shard1, shard2) for t in s.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_projector(path, name, out_dim, seed):
    """A trainable-parameters BLIP-2 checkpoint: the projector plus a Q-Former-sized payload."""
    from lavis_vpgtrans.common.checkpoint import save_checkpoint_atomic

    g = torch.Generator().manual_seed(seed)
    state = {f"{name}.weight": torch.randn(out_dim, Q_DIM, generator=g) * 0.02,
             f"{name}.bias": torch.zeros(out_dim), "query_tokens": torch.zeros(1, 32, Q_DIM)}
    for i in range(12):  # ~107M parameters, as BLIP-2's Q-Former
        state[f"Qformer.bert.encoder.layer.{i}.payload"] = torch.zeros(Q_DIM, 11_600)
    save_checkpoint_atomic({"model": state}, path)


def related(src, pairs, tgt_rows, tgt_hidden, seed):
    """Target embeddings: A x + b + 30% noise on the paired rows, random elsewhere."""
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randn(tgt_rows, tgt_hidden, generator=g) * 0.02
    A = torch.randn(tgt_hidden, src.shape[1], generator=g) / math.sqrt(src.shape[1])
    b = torch.randn(tgt_hidden, generator=g) * 0.005
    s_ids, t_ids = (torch.tensor(x) for x in zip(*pairs))
    clean = src[s_ids].float() @ A.t() + b
    tgt[t_ids] = clean + 0.3 * clean.std() * torch.randn(clean.shape, generator=g)
    return tgt


# --------------------------------------------------------------------------- runs


# Measures the CLI from a small intermediate process: Linux carries a process's peak RSS across
# fork and exec, so a child forked straight from this (large) process would report our peak.
_TRAMPOLINE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write("\\nPEAK_RSS_KIB %d CPU_S %.2f\\n" % (usage.ru_maxrss, usage.ru_utime + usage.ru_stime))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd, env):
    """(wall seconds, CPU seconds (user + system), peak RSS of the command in MiB, exit code,
    stdout, stderr). CPU time does not grow when other processes share the cores; wall does."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _TRAMPOLINE, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    marks = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB ")]
    rss = int(marks[-1].split()[1]) / 1024 if marks else float("nan")
    cpu = float(marks[-1].split()[3]) if marks else float("nan")
    return wall, cpu, rss, proc.returncode, proc.stdout, proc.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write the synthetic models (default: a temporary dir)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("cli_args", nargs="*", help="extra arguments for the converter CLI (after --)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="converter_bench_")
    os.makedirs(workdir, exist_ok=True)

    t0 = time.perf_counter()
    opt_vocab, opt_merges, llama_vocab, llama_merges, cross_pairs = build_vocabularies()
    save_opt_tokenizer(opt_vocab, opt_merges, os.path.join(workdir, "tok_opt"))
    save_llama_tokenizer(llama_vocab, llama_merges, os.path.join(workdir, "tok_llama"))
    print(f"tokenizers: OPT-like {len(opt_vocab)} tokens / {len(opt_merges)} merges, LLaMA-like "
          f"{len(llama_vocab)} tokens / {len(llama_merges)} merges; {len(cross_pairs)} shared by construction "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    results = []
    for i, spec in enumerate(TRANSFERS):
        case = os.path.join(workdir, f"case{i}")
        (sfam, sdim), (tfam, tdim) = spec["src"], spec["tgt"]
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(100 + i)
        src = (torch.randn(OPT_ROWS, sdim, generator=g) * 0.02).half()
        if tfam == "opt":
            pairs, tgt_rows = [(t, t) for t in range(OPT_VOCAB)], OPT_ROWS
        else:
            pairs, tgt_rows = cross_pairs, LLAMA_VOCAB
        tgt = related(src, pairs, tgt_rows, tdim, seed=200 + i)
        save_llm(os.path.join(case, "src"), sfam, src)
        save_llm(os.path.join(case, "tgt"), tfam, tgt)
        del src, tgt
        for side, fam in (("src", sfam), ("tgt", tfam)):
            tok_dir = os.path.join(workdir, f"tok_{fam}")
            for f in os.listdir(tok_dir):
                with open(os.path.join(tok_dir, f), "rb") as a, open(os.path.join(case, side, f), "wb") as b:
                    b.write(a.read())
        save_projector(os.path.join(case, "proj.pth"), "opt_proj", sdim, seed=300 + i)
        print(f"[{spec['name']}] inputs written ({time.perf_counter() - t0:.1f}s)", flush=True)

        out = os.path.join(case, "init.pth")
        cmd = [sys.executable, "-m", "lavis_vpgtrans.transfer.converter", "--src", os.path.join(case, "src"),
               "--tgt", os.path.join(case, "tgt"), "--projector", os.path.join(case, "proj.pth"), "--out", out,
               "--src-arch", spec["src_arch"], "--tgt-arch", spec["tgt_arch"], *args.cli_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        load_before = os.getloadavg()[0]
        wall, cpu, rss, code, stdout, stderr = run_measured(cmd, env)
        load_after = os.getloadavg()[0]
        if code != 0:
            print(stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"[{spec['name']}] the CLI failed with exit code {code}")
        meta = torch.load(out, map_location="cpu", weights_only=True)["metadata"]
        result = {"transfer": spec["name"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                  "peak_rss_mib": round(rss), "load_avg": [round(load_before, 2), round(load_after, 2)], "overlap": meta["overlap"],
                  "shared_by_construction": len(pairs), "quality": meta["quality"], "fit": meta["fit"],
                  "timings_s": meta["timings_s"], "cpu_count": os.cpu_count()}
        results.append(result)
        print(f"[{spec['name']}] wall {wall:.1f} s, CPU {cpu:.1f} s, peak RSS {rss:.0f} MiB; overlap {meta['overlap']['pairs']} pairs "
              f"({meta['overlap']['text_pairs']} text + {meta['overlap']['special_pairs']} special; {len(pairs)} shared "
              f"by construction); held-out mean cosine {meta['quality']['held_out_mean_cosine']:.4f}, top-1 NN "
              f"{meta['quality']['held_out_top1_nn_accuracy']:.4f}; phases {meta['timings_s']}; "
              f"load average before / after {load_before:.2f} / {load_after:.2f}", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

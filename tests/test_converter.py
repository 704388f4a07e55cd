"""Word-embedding converter and projector initialisation (VPGTrans stage 1 b).

Tiny HF model directories are written with the toy zoo's real tokenizers and input embeddings
chosen here, so that the target embeddings are exactly A x + b of the source ones on the
shared tokens; the converter must recover that map and the merged projector must equal the
composition of the map with the source projector.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from lavis_vpgtrans.common.checkpoint import save_checkpoint_atomic
from lavis_vpgtrans.transfer.converter import (ConverterConfig, LinearMap, convert, fit_converter, least_squares,
                                               main, mean_cosine, merge_projector, top1_accuracy)
from lavis_vpgtrans.transfer.embeddings import TransferError, embedding_shape, load_input_embeddings
from lavis_vpgtrans.transfer.pairing import (frequency_weights, load_tokenizer, pair_tokens, read_captions,
                                             token_bytes, token_counts)

Q_DIM = 8  # the Q-Former width of these tiny projectors (768 in BLIP-2)


# --------------------------------------------------------------------------- helpers


def write_llm(path, family, tokenizer, hidden, embeddings=None, fmt="safetensors", seed=0):
    """A one-layer OPT or LLaMA saved with save_pretrained, input embeddings set to `embeddings`."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    rows = len(tokenizer) if embeddings is None else embeddings.shape[0]
    torch.manual_seed(seed)
    if family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=rows, hidden_size=hidden, word_embed_proj_dim=hidden,
                                         ffn_dim=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=32, tie_word_embeddings=False))
    if embeddings is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(embeddings)
    kwargs = {"safetensors": {}, "sharded": dict(max_shard_size="20KB"),
              "bin": dict(safe_serialization=False),
              "bin_sharded": dict(safe_serialization=False, max_shard_size="20KB")}[fmt]
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return str(path)


def write_projector(path, name, out_dim, seed=1, extra=None):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_dim, Q_DIM, generator=g) * 0.1
    bias = torch.randn(out_dim, generator=g) * 0.1
    state = {f"{name}.weight": weight, f"{name}.bias": bias, "Qformer.bert.dummy": torch.zeros(3)}
    state.update(extra or {})
    save_checkpoint_atomic({"model": state}, str(path))
    return weight, bias


def affine(in_dim, out_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_dim, in_dim, generator=g) / math.sqrt(in_dim), torch.randn(out_dim, generator=g) * 0.02


@pytest.fixture(scope="module")
def tokenizers(toy_zoo):
    return {name: load_tokenizer(os.path.join(toy_zoo, name)) for name in ("opt-small", "llama", "t5")}


# --------------------------------------------------------------------------- acceptance: A x + b recovered


def test_same_tokenizer_recovers_map_and_merges(tmp_path, tokenizers):
    tok = tokenizers["opt-small"]
    src_emb = torch.randn(len(tok), 16, generator=torch.Generator().manual_seed(0)) * 0.05
    A, b = affine(16, 24, seed=2)
    tgt_emb = src_emb @ A.t() + b
    src = write_llm(tmp_path / "src", "opt", tok, 16, src_emb, fmt="sharded")
    tgt = write_llm(tmp_path / "tgt", "opt", tok, 24, tgt_emb, fmt="safetensors")
    ws, bs = write_projector(tmp_path / "proj.pth", "opt_proj", 16)

    out = tmp_path / "init.pth"
    convert(ConverterConfig(src=src, tgt=tgt, projector=str(tmp_path / "proj.pth"), out=str(out),
                            src_arch="blip2_opt", tgt_arch="blip2_opt_transfer"))
    ck = torch.load(out, map_location="cpu", weights_only=True)
    meta = ck["metadata"]
    assert set(ck["model"]) == {"opt_proj.weight", "opt_proj.bias"}
    assert meta["overlap"]["same_tokenizer"] and meta["overlap"]["pairs"] == len(tok)
    assert meta["overlap"]["held_out"] == round(0.1 * (len(tok) - len(tok.all_special_ids)))
    assert meta["quality"]["held_out_mean_cosine"] > 0.99
    assert meta["quality"]["held_out_top1_nn_accuracy"] > 0.95
    assert meta["loss"] == "cosine" and meta["source_hidden"] == 16 and meta["target_hidden"] == 24
    torch.testing.assert_close(ck["model"]["opt_proj.weight"], A @ ws, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(ck["model"]["opt_proj.bias"], A @ bs + b, atol=2e-4, rtol=1e-3)


def test_byte_level_bpe_to_sentencepiece_recovers_map_and_merges(tmp_path, tokenizers):
    src_tok, tgt_tok = tokenizers["opt-small"], tokenizers["llama"]
    g = torch.Generator().manual_seed(3)
    src_emb = torch.randn(len(src_tok), 16, generator=g) * 0.05
    tgt_emb = torch.randn(len(tgt_tok), 24, generator=g) * 0.05  # unshared tokens: unrelated
    pairs = pair_tokens(src_tok, tgt_tok, len(src_tok), len(tgt_tok))
    A, b = affine(16, 24, seed=4)
    tgt_emb[pairs.tgt_ids] = src_emb[pairs.src_ids] @ A.t() + b
    src = write_llm(tmp_path / "opt", "opt", src_tok, 16, src_emb, fmt="bin")
    tgt = write_llm(tmp_path / "llama", "llama", tgt_tok, 24, tgt_emb, fmt="bin_sharded")
    ws, bs = write_projector(tmp_path / "proj.pth", "opt_proj", 16)

    ck = convert(ConverterConfig(src=src, tgt=tgt, projector=str(tmp_path / "proj.pth"), tgt_arch="blip2_llama"))
    meta = ck["metadata"]
    assert meta["source_projector_name"] == "opt_proj"  # found as the one known projector in the file
    assert meta["target_projector_name"] == "llama_proj"
    assert meta["overlap"]["pairs"] == len(pairs) > 300
    assert meta["overlap"]["source_scheme"] == "byte_level" and meta["overlap"]["target_scheme"] == "sentencepiece"
    assert meta["quality"]["held_out_mean_cosine"] > 0.99
    torch.testing.assert_close(ck["model"]["llama_proj.weight"], A @ ws, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(ck["model"]["llama_proj.bias"], A @ bs + b, atol=2e-4, rtol=1e-3)


def test_cli_writes_a_weights_only_checkpoint(tmp_path, tokenizers):
    tok = tokenizers["opt-small"]
    src = write_llm(tmp_path / "src", "opt", tok, 16)
    tgt = write_llm(tmp_path / "tgt", "llama", tokenizers["llama"], 24)
    write_projector(tmp_path / "proj.pth", "opt_proj", 16)
    out = tmp_path / "out" / "init.pth"
    run = subprocess.run(
        [sys.executable, "-m", "lavis_vpgtrans.transfer.converter", "--src", src, "--tgt", tgt,
         "--projector", str(tmp_path / "proj.pth"), "--out", str(out), "--tgt-projector-key", "llama_proj",
         "--loss", "euclidean", "--seed", "3"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "overlap:" in run.stdout and "held-out quality" in run.stdout
    ck = torch.load(out, map_location="cpu", weights_only=True)
    assert ck["model"]["llama_proj.weight"].shape == (24, Q_DIM)
    assert ck["metadata"]["loss"] == "euclidean" and ck["metadata"]["seed"] == 3
    fit = ck["metadata"]["fit"]
    assert fit["kept"] == "closed_form" and fit["epoch_losses"] == [] and fit["final_loss"] is None


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "bin_sharded"])
def test_loads_exactly_the_input_embeddings(tmp_path, tokenizers, fmt):
    emb = torch.randn(len(tokenizers["llama"]), 24)
    path = write_llm(tmp_path / "m", "llama", tokenizers["llama"], 24, emb, fmt=fmt)
    loaded = load_input_embeddings(path)
    assert loaded.key == "model.embed_tokens.weight"
    torch.testing.assert_close(loaded.weight, emb, atol=0, rtol=0)
    assert embedding_shape(path) == tuple(emb.shape)


@pytest.mark.parametrize("name,key,hidden", [("opt-small", "model.decoder.embed_tokens.weight", 32),
                                             ("llama", "model.embed_tokens.weight", 64), ("t5", "shared.weight", 48)])
def test_finds_the_input_embeddings_of_each_family(toy_zoo, tokenizers, name, key, hidden):
    loaded = load_input_embeddings(os.path.join(toy_zoo, name))
    assert loaded.key == key and loaded.weight.shape == (len(tokenizers[name]), hidden)


def test_unknown_model_types_and_explicit_keys(tmp_path, tokenizers):
    import json

    path = write_llm(tmp_path / "m", "llama", tokenizers["llama"], 24)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "model_type": "mystery"}, f)
    assert load_input_embeddings(path).key == "model.embed_tokens.weight"  # the one *embed_tokens.weight
    assert load_input_embeddings(path, key="lm_head.weight").key == "lm_head.weight"
    with pytest.raises(TransferError, match="'model.wte.weight' not found"):
        load_input_embeddings(path, key="model.wte.weight")


class _Pickled:
    """Any class: pickled by reference, which a weights-only load must refuse."""


def test_legacy_and_unsafe_bin_files(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    emb = torch.randn(5, 3)
    torch.save({"model.embed_tokens.weight": emb}, str(tmp_path / "pytorch_model.bin"),
               _use_new_zipfile_serialization=False)  # cannot be memory-mapped: read whole
    torch.testing.assert_close(load_input_embeddings(str(tmp_path)).weight, emb, atol=0, rtol=0)
    # an arbitrary pickled object is refused (weights_only), not executed
    torch.save({"model.embed_tokens.weight": emb, "x": _Pickled()}, str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(TransferError, match="weights-only"):
        load_input_embeddings(str(tmp_path))


def test_ambiguous_embeddings_list_the_candidates(tmp_path):
    import json

    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "vocab_size": 4}))
    save_file({"enc.embed_tokens.weight": torch.zeros(4, 2), "dec.wte.weight": torch.zeros(4, 2),
               "enc.layer.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TransferError, match="candidates: dec.wte.weight, enc.embed_tokens.weight"):
        load_input_embeddings(str(tmp_path))


def test_sharded_load_opens_only_the_shard_holding_the_embeddings(tmp_path, tokenizers):
    import json

    path = write_llm(tmp_path / "m", "llama", tokenizers["llama"], 24, fmt="sharded")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    needed = weight_map["model.embed_tokens.weight"]
    others = set(weight_map.values()) - {needed}
    assert others  # the model really is split
    for shard in others:
        os.remove(os.path.join(path, shard))
    assert load_input_embeddings(path).weight.shape == (len(tokenizers["llama"]), 24)


def test_text_pairs_read_the_same_in_both_tokenizers(tokenizers):
    src = tokenizers["opt-small"]
    for tgt_name in ("llama", "t5"):
        tgt = tokenizers[tgt_name]
        pairs = pair_tokens(src, tgt, len(src), len(tgt))
        assert not pairs.same_tokenizer and pairs.n_text > 40
        for s, t, special in zip(pairs.src_ids.tolist(), pairs.tgt_ids.tolist(), pairs.special.tolist()):
            if not special:  # HF's own decoding agrees on every text pair
                assert src.decode([s]).strip() == tgt.decode([t]).strip(), (s, t)


def test_single_token_words_are_paired(toy_zoo, tokenizers):
    src, tgt = tokenizers["opt-small"], tokenizers["llama"]
    found = pair_tokens(src, tgt, len(src), len(tgt))
    pairs = set(zip(found.src_ids.tolist(), found.tgt_ids.tolist()))
    with open(os.path.join(toy_zoo, "data", "corpus.txt")) as f:
        words = {w for line in f for w in line.split()}
    checked = 0
    for word in sorted(words):
        s = src.encode(" " + word, add_special_tokens=False)
        t = tgt.encode(word, add_special_tokens=False)  # LLaMA marks the first word '▁' itself
        if len(s) == 1 and len(t) == 1:
            assert (s[0], t[0]) in pairs, word
            checked += 1
    assert checked > 10


def test_special_tokens_pair_by_role_and_regular_pieces_beat_byte_fallback(tokenizers):
    src, tgt = tokenizers["opt-small"], tokenizers["llama"]
    pairs = pair_tokens(src, tgt, len(src), len(tgt))
    special = {(s, t) for s, t, sp in zip(pairs.src_ids.tolist(), pairs.tgt_ids.tolist(), pairs.special.tolist()) if sp}
    # OPT: </s> is bos and eos, <unk>=3, <pad>=1; LLaMA: <s>=1, </s>=2, <unk>=0, no pad
    assert special == {(2, 1), (2, 2), (3, 0)} and pairs.roles == ["bos", "eos", "unk"]
    text = dict(zip(pairs.src_ids.tolist(), pairs.tgt_ids.tolist()))
    g_src, g_tgt = src.convert_tokens_to_ids("g"), tgt.convert_tokens_to_ids("g")
    assert text[g_src] == g_tgt  # not '<0x67>'
    bang = src.convert_tokens_to_ids("!")
    assert tgt.convert_ids_to_tokens(text[bang]) == "<0x21>"  # no regular '!' piece: the byte piece
    assert token_bytes("Ġdog", "byte_level") == token_bytes("\u2581dog", "sentencepiece")


def test_same_tokenizer_pairs_every_token(tokenizers):
    tok = tokenizers["llama"]
    pairs = pair_tokens(tok, tok, len(tok), len(tok) - 5)  # rows past the matrix are skipped
    assert pairs.same_tokenizer and torch.equal(pairs.src_ids, torch.arange(len(tok) - 5))
    fit, held = pairs.split(0.2, seed=7)
    fit2, held2 = pairs.split(0.2, seed=7)
    assert torch.equal(held, held2) and torch.equal(fit, fit2)  # deterministic with the seed
    assert set(fit.tolist()).isdisjoint(held.tolist()) and len(fit) + len(held) == len(pairs)
    assert not pairs.special[held].any()


def test_least_squares_weights_match_the_normal_equations():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, 6, generator=g), torch.randn(200, 4, generator=g)
    w = torch.rand(200, generator=g) * 3
    ids = torch.arange(200)
    got = least_squares(x, y, ids, ids, weights=w, ridge=0.0)
    xb = torch.cat([x, torch.ones(200, 1)], 1).double() * w.double().sqrt()[:, None]
    sol = torch.linalg.lstsq(xb, y.double() * w.double().sqrt()[:, None]).solution  # (7, 4)
    torch.testing.assert_close(got.weight, sol[:6].t().float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.bias, sol[6].float(), atol=1e-5, rtol=1e-4)


def test_least_squares_without_ridge_handles_fewer_pairs_than_dimensions():
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(10, 16, generator=g), torch.randn(10, 5, generator=g)
    ids = torch.arange(10)
    got = least_squares(x, y, ids, ids, ridge=0.0)  # singular normal equations: the lstsq path
    torch.testing.assert_close(got(x), y, atol=1e-4, rtol=1e-4)  # underdetermined: fits exactly


def test_cosine_epochs_improve_on_the_closed_form_when_norms_vary():
    # Per-token norms that the cosine ignores but least squares does not: the epochs must help.
    g = torch.Generator().manual_seed(6)
    n, A = 3000, torch.randn(48, 32, generator=g) / math.sqrt(32)
    x = torch.randn(n, 32, generator=g)
    scale = torch.exp(torch.randn(n, 1, generator=g))
    y = (x @ A.t() + 0.5 * torch.randn(n, 48, generator=g)) * scale
    fit, held = torch.arange(2700), torch.arange(2700, n)
    closed = fit_converter(x, y, fit, fit, epochs=0)
    tuned = fit_converter(x, y, fit, fit, epochs=3, seed=1)
    assert tuned.kept == "epochs" and tuned.final_loss < tuned.closed_form_loss == pytest.approx(closed.loss)
    assert mean_cosine(tuned.converter, x, y, held, held) > mean_cosine(closed.converter, x, y, held, held)


def test_epochs_that_do_not_help_are_discarded():
    # Exactly linear targets: the closed form is exact, Adam's steps can only move away from it.
    g = torch.Generator().manual_seed(12)
    x, A = torch.randn(2000, 16, generator=g), torch.randn(24, 16, generator=g)
    ids = torch.arange(2000)
    closed = fit_converter(x, x @ A.t(), ids, ids, epochs=0)
    tuned = fit_converter(x, x @ A.t(), ids, ids, epochs=2)
    assert tuned.kept == "closed_form" and tuned.final_loss > tuned.closed_form_loss
    assert torch.equal(tuned.converter.weight, closed.converter.weight)


def test_nearest_neighbour_accuracy_is_chunk_independent():
    g = torch.Generator().manual_seed(8)
    src, tgt = torch.randn(50, 5, generator=g), torch.randn(97, 7, generator=g).half()
    conv = LinearMap(torch.randn(7, 5, generator=g), torch.randn(7, generator=g))
    s_ids, t_ids = torch.arange(50), torch.randint(0, 97, (50,), generator=g)
    pred = torch.nn.functional.normalize(conv(src), dim=1)
    brute = (pred @ torch.nn.functional.normalize(tgt.float(), dim=1).t()).argmax(1)
    t_ids[:20] = brute[:20]  # make some of them hits
    expected = float((brute == t_ids).float().mean())
    small = top1_accuracy(conv, src, tgt, s_ids, t_ids, chunk_rows=6, chunk_vocab=11)
    assert small == top1_accuracy(conv, src, tgt, s_ids, t_ids) == pytest.approx(expected)
    brute50 = (pred @ torch.nn.functional.normalize(tgt[:50].float(), dim=1).t()).argmax(1)  # first 50 rows only
    assert top1_accuracy(conv, src, tgt, s_ids, t_ids, candidates=50) == pytest.approx(
        float((brute50 == t_ids).float().mean()))


def test_merge_is_the_composition():
    g = torch.Generator().manual_seed(9)
    conv = LinearMap(torch.randn(6, 4, generator=g), torch.randn(6, generator=g))
    ws, bs = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    wt, bt = merge_projector(conv, ws, bs)
    x = torch.randn(10, 3, generator=g)
    torch.testing.assert_close(x @ wt.t() + bt, conv(x @ ws.t() + bs), atol=1e-5, rtol=1e-5)


def test_caption_corpus_weights(tmp_path, tokenizers):
    import json

    tok = tokenizers["opt-small"]
    (tmp_path / "caps.json").write_text(json.dumps([{"caption": "a red circle"}, {"caption": ["a red", "a"]}]))
    (tmp_path / "caps.txt").write_text("a red circle\n\na red\na\n")
    caps = read_captions(str(tmp_path / "caps.json"))
    assert caps == read_captions(str(tmp_path / "caps.txt")) == ["a red circle", "a red", "a"]
    counts = token_counts(tok, caps, len(tok))
    expected = torch.zeros(len(tok), dtype=torch.float64)
    for c in caps:
        for i in tok(c, add_special_tokens=False)["input_ids"]:
            expected[i] += 1
    assert torch.equal(counts, expected) and counts.sum() > 0
    w = frequency_weights(counts)
    assert float(w.min()) == 1.0 and float(w[counts.argmax()]) == pytest.approx(1 + math.log1p(counts.max()))


def test_corpus_weighted_run_records_the_corpus(tmp_path, toy_zoo, tokenizers):
    tok = tokenizers["opt-small"]
    src_emb = torch.randn(len(tok), 16, generator=torch.Generator().manual_seed(10))
    A, b = affine(16, 24, seed=11)
    src = write_llm(tmp_path / "src", "opt", tok, 16, src_emb)
    tgt = write_llm(tmp_path / "tgt", "opt", tok, 24, src_emb @ A.t() + b)
    write_projector(tmp_path / "proj.pth", "opt_proj", 16)
    corpus = os.path.join(toy_zoo, "data", "corpus.txt")
    ck = convert(ConverterConfig(src=src, tgt=tgt, projector=str(tmp_path / "proj.pth"), tgt_arch="blip2_opt",
                                 corpus=corpus, epochs=1, nn_sample=10))
    assert ck["metadata"]["corpus"] == corpus and ck["metadata"]["quality"]["nn_pairs"] == 10
    assert ck["metadata"]["quality"]["held_out_mean_cosine"] > 0.99


def test_quality_is_also_reported_on_the_tokens_of_a_text(tmp_path, tokenizers, capsys):
    """--quality-text: the held-out quality again, on the held-out pairs whose tokens both occur
    in that text (the demo: the LMs' pre-training text)."""
    tok = tokenizers["opt-small"]
    text = ["a red circle at the top left", "Question: how many shapes are there? Answer: 2"]
    (tmp_path / "text.txt").write_text("\n".join(text) + "\n")
    src_emb = torch.randn(len(tok), 16, generator=torch.Generator().manual_seed(5))
    A, b = affine(16, 24, seed=6)
    src = write_llm(tmp_path / "src", "opt", tok, 16, src_emb)
    tgt = write_llm(tmp_path / "tgt", "opt", tok, 24, src_emb @ A.t() + b)
    write_projector(tmp_path / "proj.pth", "opt_proj", 16)
    out = tmp_path / "init.pth"
    assert main(["--src", src, "--tgt", tgt, "--projector", str(tmp_path / "proj.pth"), "--out", str(out),
                 "--tgt-arch", "blip2_opt", "--held-out", "0.5", "--epochs", "0",
                 "--quality-text", str(tmp_path / "text.txt")]) == 0
    quality = torch.load(out, weights_only=True)["metadata"]["quality"]
    # the expected subset, from the same seeded split
    pairs = pair_tokens(tok, tok, len(tok), len(tok))
    _, held = pairs.split(0.5, seed=0)
    in_text = set(token_counts(tok, text, len(tok)).nonzero().flatten().tolist())
    expected = sum(int(i) in in_text for i in pairs.src_ids[held])
    assert 0 < expected < held.numel()
    assert quality["held_out_in_text"] == quality["nn_in_text_pairs"] == expected
    assert quality["held_out_in_text_mean_cosine"] > 0.99 and quality["held_out_in_text_top1_nn_accuracy"] == 1.0
    assert f"held-out pairs in --quality-text: {expected}, mean cosine" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def small_pair(tmp_path, tokenizers):
    src = write_llm(tmp_path / "src", "opt", tokenizers["opt-small"], 16)
    tgt = write_llm(tmp_path / "tgt", "llama", tokenizers["llama"], 24)
    return src, tgt


def test_hidden_size_mismatch_names_both_sizes_and_the_file(tmp_path, small_pair):
    src, tgt = small_pair
    write_projector(tmp_path / "proj.pth", "opt_proj", 20)
    with pytest.raises(TransferError) as e:
        convert(ConverterConfig(src=src, tgt=tgt, projector=str(tmp_path / "proj.pth"), tgt_arch="blip2_llama"))
    msg = str(e.value)
    assert "20" in msg and "16" in msg and str(tmp_path / "proj.pth") in msg and "hidden-size mismatch" in msg


def test_empty_overlap_names_both_tokenizers(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def sp_tokenizer(pieces, path):
        t = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
        t.pre_tokenizer = pre_tokenizers.Metaspace()
        t.decoder = decoders.Metaspace()
        PreTrainedTokenizerFast(tokenizer_object=t).save_pretrained(path)
        return load_tokenizer(str(path))

    a = sp_tokenizer(["\u2581a", "\u2581b"], tmp_path / "tok_a")
    b = sp_tokenizer(["\u2581x", "\u2581y", "z"], tmp_path / "tok_b")
    with pytest.raises(TransferError, match="empty overlap") as e:
        pair_tokens(a, b, 2, 3)
    assert str(tmp_path / "tok_a") in str(e.value) and str(tmp_path / "tok_b") in str(e.value)


def test_missing_files_are_named(tmp_path, small_pair):
    src, tgt = small_pair
    missing = str(tmp_path / "nowhere" / "opt")
    with pytest.raises(TransferError, match="not found: " + missing):
        load_input_embeddings(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TransferError, match="no weights found .*model.safetensors"):
        load_input_embeddings(str(empty))
    os.remove(os.path.join(src, "config.json"))
    with pytest.raises(TransferError, match="config.json"):
        load_input_embeddings(src)
    with pytest.raises(FileNotFoundError, match="proj_missing.pth"):
        convert(ConverterConfig(src=tgt, tgt=tgt, projector=str(tmp_path / "proj_missing.pth"),
                                tgt_arch="blip2_llama"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TransferError, match="no-such-org/no-such-llm"):
        load_input_embeddings("no-such-org/no-such-llm")


def test_projector_is_chosen_by_name(tmp_path, small_pair):
    src, tgt = small_pair
    proj = str(tmp_path / "proj.pth")
    write_projector(proj, "opt_proj", 16, extra={"llama_proj.weight": torch.zeros(24, Q_DIM),
                                                 "llama_proj.bias": torch.zeros(24)})
    with pytest.raises(TransferError, match="several projectors"):
        convert(ConverterConfig(src=src, tgt=tgt, projector=proj, tgt_arch="blip2_llama"))
    ck = convert(ConverterConfig(src=src, tgt=tgt, projector=proj, src_arch="blip2_opt", tgt_arch="blip2_vicuna",
                                 epochs=0))
    assert ck["metadata"]["source_projector_name"] == "opt_proj" and set(ck["model"]) == {
        "llama_proj.weight", "llama_proj.bias"}
    write_projector(proj, "my_proj", 16)
    with pytest.raises(TransferError, match="none of the known projectors"):
        convert(ConverterConfig(src=src, tgt=tgt, projector=proj, tgt_arch="blip2_llama"))
    ck = convert(ConverterConfig(src=src, tgt=tgt, projector=proj, src_projector_key="my_proj",
                                 tgt_projector_key="llama_proj", epochs=0))
    assert ck["metadata"]["source_projector_name"] == "my_proj"
    with pytest.raises(TransferError, match="unknown model architecture 'blip2_nope'"):
        convert(ConverterConfig(src=src, tgt=tgt, projector=proj, src_projector_key="my_proj", tgt_arch="blip2_nope"))


@pytest.mark.parametrize("model_type,arch", [("opt", "blip2_opt_transfer"), ("t5", "blip2_t5_transfer"),
                                             ("llama", "blip2_llama"), ("qwen2", "blip2_causal_lm"),
                                             ("mistral", "blip2_causal_lm"), ("gemma", "blip2_causal_lm")])
def test_target_class_is_chosen_by_model_type(tmp_path, model_type, arch):
    from transformers import AutoConfig

    from lavis_vpgtrans.transfer.converter import target_arch_for

    AutoConfig.for_model(model_type).save_pretrained(tmp_path / model_type)  # config.json alone is read
    assert target_arch_for(str(tmp_path / model_type)) == arch


@pytest.mark.parametrize("model_type,error", [
    ("bart", "an encoder-decoder LLM"),  # transformers omits is_encoder_decoder here: its class default
    ("whisper", "an encoder-decoder LLM"),
    ("vit", "not a causal LM"),
    ("no_such_type", "not a model type this transformers knows")])
def test_target_class_errors_name_the_model_type(tmp_path, model_type, error):
    import json

    from transformers import AutoConfig

    from lavis_vpgtrans.transfer.converter import target_arch_for

    path = tmp_path / model_type
    if model_type == "no_such_type":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    else:
        AutoConfig.for_model(model_type).save_pretrained(path)
    with pytest.raises(TransferError, match=error) as e:
        target_arch_for(str(path))
    assert f"model_type={model_type!r}" in str(e.value) and str(path) in str(e.value)
    assert "--tgt-arch" in str(e.value)


def test_omitted_target_arch_follows_the_target_config(tmp_path, small_pair, caplog):
    import json

    src, tgt = small_pair
    write_projector(tmp_path / "proj.pth", "opt_proj", 16)
    with caplog.at_level("INFO", logger="lavis_vpgtrans.transfer.converter"):
        ck = convert(ConverterConfig(src=src, tgt=tgt, projector=str(tmp_path / "proj.pth"), epochs=0))
    assert set(ck["model"]) == {"llama_proj.weight", "llama_proj.bias"}  # tgt is a LlamaForCausalLM
    meta = ck["metadata"]
    assert meta["target_arch"] == "blip2_llama" and meta["target_arch_detected"]
    assert any("llama_proj of blip2_llama" in r.getMessage() and tgt in r.getMessage() for r in caplog.records)
    # the same directory as another decoder-only family: the generic class
    with open(os.path.join(tgt, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(tgt, "config.json"), "w") as f:
        json.dump({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}, f)
    ck = convert(ConverterConfig(src=src, tgt=tgt, projector=str(tmp_path / "proj.pth"), epochs=0))
    assert set(ck["model"]) == {"llm_proj.weight", "llm_proj.bias"}
    assert ck["metadata"]["target_arch"] == "blip2_causal_lm"
    # an explicit --tgt-arch wins and is recorded as given
    ck = convert(ConverterConfig(src=src, tgt=tgt, projector=str(tmp_path / "proj.pth"), tgt_arch="blip2_vicuna",
                                 epochs=0))
    assert set(ck["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    assert not ck["metadata"]["target_arch_detected"]


def test_cli_reports_bad_input_without_traceback(tmp_path, small_pair, capsys):
    src, tgt = small_pair
    write_projector(tmp_path / "proj.pth", "opt_proj", 20)
    code = main(["--src", src, "--tgt", tgt, "--projector", str(tmp_path / "proj.pth"),
                 "--out", str(tmp_path / "o.pth"), "--tgt-arch", "blip2_llama"])
    err = capsys.readouterr().err
    assert code == 2 and "error: hidden-size mismatch" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o.pth")
    code = main(["--src", str(tmp_path / "absent"), "--tgt", tgt, "--projector", str(tmp_path / "proj.pth"),
                 "--out", str(tmp_path / "o.pth"), "--tgt-arch", "blip2_llama"])
    assert code == 2 and str(tmp_path / "absent") in capsys.readouterr().err
    from transformers import AutoConfig

    AutoConfig.for_model("bart").save_pretrained(tmp_path / "bart")
    write_projector(tmp_path / "proj.pth", "opt_proj", 16)
    code = main(["--src", src, "--tgt", str(tmp_path / "bart"), "--projector", str(tmp_path / "proj.pth"),
                 "--out", str(tmp_path / "o.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and "encoder-decoder" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the models read the output


def test_models_load_the_output_as_projector_checkpoint(tmp_path, toy_zoo, plugin):
    from lavis.models import load_model

    source = load_model("blip2_opt_transfer", "tiny_opt_small")
    trained = {k: v for k, v in source.state_dict().items() if k.startswith("opt_proj.")}
    save_checkpoint_atomic({"model": trained}, str(tmp_path / "stage2.pth"))
    out = str(tmp_path / "init.pth")
    ck = convert(ConverterConfig(src=os.path.join(toy_zoo, "opt-small"), tgt=os.path.join(toy_zoo, "llama"),
                                 projector=str(tmp_path / "stage2.pth"), out=out, src_arch="blip2_opt_transfer",
                                 tgt_arch="blip2_llama", epochs=1))
    target = load_model("blip2_llama", "tiny_llama")
    target.load_projector(out)
    assert torch.equal(target.llama_proj.weight.detach(), ck["model"]["llama_proj.weight"])
    assert torch.equal(target.llama_proj.bias.detach(), ck["model"]["llama_proj.bias"])

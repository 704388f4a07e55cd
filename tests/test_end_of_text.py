"""End of text and BOS, the conventions of the released checkpoints (issue 12):

  - decoder-only targets end with end_sym ("\\n" by default, LAVIS's BLIP-2 OPT and VPGTrans),
    generation stops at it however the tokenizer splits it, and the text is cut there;
  - Flan-T5 ends at its EOS; `end_sym: null` selects the EOS for any model;
  - BOS only if the tokenizer itself adds one (Qwen2 adds none), the same in every path.
"""

import os

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StopStringCriteria

from helpers import load_tiny

IMAGES = torch.zeros(2, 3, 32, 32)


@pytest.fixture(scope="module")
def opt_model(plugin):
    return load_tiny("blip2_opt_transfer", "tiny_opt_small").eval()


@pytest.fixture(scope="module")
def llama_model(plugin):
    return load_tiny("blip2_llama", "tiny_llama").eval()


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


class Script(LogitsProcessor):
    """Forces the generated tokens: `script` step by step, then `then` forever."""

    def __init__(self, script, then):
        self.script, self.then = script, then

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]  # tokens generated so far (the prompt is embeddings)
        out = torch.full_like(scores, float("-inf"))
        out[:, self.script[step] if step < len(self.script) else self.then] = 0
        return out


def scripted_generate(model, script, then, max_new_tokens=12):
    """generate() with the LLM steered; returns (captions, number of LLM forward passes)."""
    steps = []
    handle = model.llm_model.register_forward_hook(lambda *a: steps.append(1))
    try:
        out = model._generate(IMAGES, ["", ""], num_beams=1, do_sample=False, max_new_tokens=max_new_tokens,
                              logits_processor=LogitsProcessorList([Script(script, then)]))
    finally:
        handle.remove()
    return out, len(steps)


# --------------------------------------------------------------------------- defaults


def test_end_of_text_per_model_type(opt_model, llama_model, plugin):
    tok = opt_model.llm_tokenizer
    assert opt_model.end_sym == "\n" and opt_model.end_token_id == ids(tok, "\n")[0]  # LAVIS's eos_token_id
    tok = llama_model.llm_tokenizer
    assert llama_model.end_sym == "\n" and tok.convert_ids_to_tokens(llama_model.end_token_id) == "<0x0A>"
    vicuna = load_tiny("blip2_vicuna", "tiny_vicuna")
    assert vicuna.end_sym == "\n" and vicuna.end_token_id == llama_model.end_token_id
    t5 = load_tiny("blip2_t5_transfer", "tiny_t5")
    assert t5.end_sym is None and t5.end_token_id == t5.llm_tokenizer.eos_token_id

    # the config overrides the class default: null is the tokenizer's EOS
    eos = load_tiny("blip2_opt_transfer", "tiny_opt_small", end_sym=None)
    assert eos.end_sym is None and eos.end_token_id == eos.llm_tokenizer.eos_token_id
    # an end the tokenizer splits has no single id: generation stops on text
    hashes = load_tiny("blip2_llama", "tiny_llama", end_sym="###")
    assert len(ids(hashes.llm_tokenizer, "a###")) > len(ids(hashes.llm_tokenizer, "a")) + 1
    assert hashes.end_token_id is None
    # transformers' stop strings, the criterion built once per model (models/llm.py stop_on_text)
    assert [type(c) for c in hashes._stop_kwargs()["stopping_criteria"]] == [StopStringCriteria]
    assert hashes._stop_kwargs()["stopping_criteria"][0] is hashes._stop_kwargs()["stopping_criteria"][0]
    with pytest.raises(ValueError, match="end_sym must be a non-empty string or null"):
        load_tiny("blip2_opt_transfer", "tiny_opt_small", end_sym="")


def test_release_yamls_end_as_their_checkpoints_were_trained(plugin):
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    # VL-Vicuna's conversations end with the template's "###" (test_vicuna_chat.py)
    expected = {("blip2_vicuna", "vl_vicuna7b"): "\n", ("blip2_llama", "vl_llama7b"): "\n",
                ("blip2_opt_transfer", "pretrain_opt2.7b"): "\n", ("blip2_t5_transfer", "pretrain_flant5xl"): None}
    for (name, model_type), end in expected.items():
        cfg = OmegaConf.load(registry.get_model_class(name).default_config_path(model_type)).model
        assert cfg.get("end_sym", "absent") == end, (name, model_type)


# --------------------------------------------------------------------------- training targets


def test_training_targets_end_with_end_sym_as_lavis_tokenizes_them(opt_model, llama_model):
    for model in (opt_model, llama_model):
        tok = model.llm_tokenizer
        captions = ["a red square at the top left", "two blue circles"]
        input_ids, mask, labels = model._tokenize_prefix_target(["", ""], captions)
        # LAVIS's blip2_opt: tokenizer(caption + "\n") with the tokenizer's own special tokens,
        # labels on every non-pad token (BOS included when there is no prompt)
        lavis = tok([c + "\n" for c in captions], padding="longest", padding_side="right", return_tensors="pt")
        assert torch.equal(input_ids, lavis.input_ids) and torch.equal(mask, lavis.attention_mask)
        assert torch.equal(labels, lavis.input_ids.masked_fill(lavis.attention_mask == 0, -100))
        assert input_ids[0, 0] == tok.bos_token_id and labels[0, -1] == model.end_token_id

        # truncation at max_txt_len counts BOS and may cut the end, as LAVIS's tokenizer call does
        long = " ".join(["a red square"] * 30)
        cut, _, _ = model._tokenize_prefix_target([""], [long])
        assert cut[0].tolist() == tok([long + "\n"], truncation=True, max_length=model.max_txt_len).input_ids[0]

        # prefix-LM: labels only on the target and its end
        _, _, labels = model._tokenize_prefix_target(["Question: what is it? Answer:"], ["a red square"])
        labelled = [i for i in labels[0].tolist() if i != -100]
        assert tok.decode(labelled).strip() == "a red square" and labelled[-1] == model.end_token_id

    saved = opt_model.label_bos
    try:
        opt_model.label_bos = False
        _, _, labels = opt_model._tokenize_prefix_target([""], ["a red square"])
        assert labels[0, 0] == -100 and labels[0, 1] != -100
    finally:
        opt_model.label_bos = saved


# --------------------------------------------------------------------------- generation


def test_captions_stop_at_the_newline_and_are_cut_there(opt_model):
    """Issue 12: with </s> as the only end, a caption ran on past the "\\n" its checkpoint was
    trained to end with ('a red square at the top left ...\\nthere is a red square at ...')."""
    tok = opt_model.llm_tokenizer
    red, newline, there = ids(tok, " red")[0], ids(tok, "\n")[0], ids(tok, " there")[0]
    captions, steps = scripted_generate(opt_model, [red, newline], then=there)
    assert captions == ["red", "red"]
    assert steps == 2  # stopped at the "\n" token, not after max_new_tokens


def test_an_end_of_several_tokens_stops_on_text_and_is_cut(plugin):
    model = load_tiny("blip2_llama", "tiny_llama", end_sym="###").eval()
    tok = model.llm_tokenizer
    red, = ids(tok, "red")
    hash_id = ids(tok, "###")[-1]
    assert tok.decode([hash_id]) == "#"
    captions, steps = scripted_generate(model, [red, hash_id, hash_id, hash_id], then=red)
    assert captions == ["red", "red"] and steps == 4


def test_end_sym_null_stops_at_eos(plugin):
    model = load_tiny("blip2_opt_transfer", "tiny_opt_small", end_sym=None).eval()
    tok = model.llm_tokenizer
    red, newline = ids(tok, " red")[0], ids(tok, "\n")[0]
    captions, steps = scripted_generate(model, [red, newline, red, tok.eos_token_id], then=red)
    assert captions == ["red\n red"] * 2 and steps == 4


def test_min_length_counts_the_prompt_tokens_as_in_lavis(opt_model):
    """LAVIS hands HF generate min_length with the prompt's ids (BOS): min_length=1 never
    constrains, min_length=4 asks for 3 new tokens after a lone BOS."""
    tok = opt_model.llm_tokenizer
    red, newline = ids(tok, " red")[0], ids(tok, "\n")[0]

    class NewlineFirst(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, -10.0)
            out[:, red] = -1.0
            out[:, newline] = 0.0
            return torch.where(torch.isinf(scores), scores, out)  # keeps what min_length forbids

    def caption(min_length):
        return opt_model._generate(IMAGES[:1], [""], min_length=min_length, num_beams=1, do_sample=False,
                                   max_new_tokens=6, logits_processor=LogitsProcessorList([NewlineFirst()]))

    assert caption(1) == [""]
    assert caption(4) == ["red red red"]
    assert caption(2) == ["red"]


# --------------------------------------------------------------------------- no BOS (Qwen2)


@pytest.fixture(scope="module")
def qwen_dir(plugin, tmp_path_factory):
    """A tiny Qwen2 whose byte-level BPE tokenizer, like Qwen2's / Qwen3's, adds no BOS."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from lavis_vpgtrans.toy import zoo

    with open(os.path.join(zoo.resolve("toy:data"), "corpus.txt")) as f:
        sentences = f.read().splitlines()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    out = str(tmp_path_factory.mktemp("qwen") / "qwen2")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, tie_word_embeddings=True)).save_pretrained(out)
    return out


def test_llm_without_bos_generates_trains_and_answers(qwen_dir):
    """Issue 12: generate() crashed with the default empty prompt: tok(["", ""]) gives a float
    (B, 0) tensor and the embedding lookup fails."""
    model = load_tiny("blip2_causal_lm", "tiny_causal_lm", llm_model=qwen_dir).eval()
    tok = model.llm_tokenizer
    assert tok.bos_token_id is None and tok("a").input_ids == ids(tok, "a")
    assert tok(["", ""], return_tensors="pt").input_ids.dtype == torch.float32  # the trap

    captions = model.generate({"image": IMAGES}, num_beams=2, max_length=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert model.bos_ids == []
    sampled = model.generate({"image": IMAGES}, use_nucleus_sampling=True, max_length=4, num_captions=2)
    assert len(sampled) == 4
    answers = model.predict_answers({"image": IMAGES, "text_input": ["what is it?", "where?"]}, num_beams=2,
                                    max_len=3)
    assert len(answers) == 2

    input_ids, _, labels = model._tokenize_prefix_target(["", "Question: what? Answer:"], ["a red square"] * 2)
    assert input_ids[0].tolist()[: len(ids(tok, "a red square\n"))] == ids(tok, "a red square\n")
    loss = model({"image": IMAGES, "text_input": ["a red square", "two blue circles"]})["loss"]
    assert torch.isfinite(loss)


def test_chat_adds_bos_exactly_when_the_tokenizer_does(qwen_dir, plugin):
    """The conversation path uses the same BOS rule as captions: none for Qwen2, <s> for LLaMA."""
    qwen_chat = load_tiny("blip2_vicuna", "tiny_vl_vicuna", llm_model=qwen_dir).eval()
    tok = qwen_chat.llm_tokenizer
    turn = [("What is it?", None)]
    assert qwen_chat.tokenize_conversation(turn).ids[0] == ids(tok, "###")[0]
    assert isinstance(qwen_chat.chat(IMAGES[0], "What is it?", max_new_tokens=3), str)

    llama_chat = load_tiny("blip2_vicuna", "tiny_vl_vicuna").eval()
    row = llama_chat.tokenize_conversation(turn).ids
    assert row[0] == llama_chat.llm_tokenizer.bos_token_id == llama_chat.bos_ids[0]
    assert llama_chat._prefix_rows(["What is it?"])[0][:1] == llama_chat.bos_ids

"""Equivalence with stock LAVIS: a BLIP-2 trained by LAVIS's own Blip2OPT / Blip2T5 (imported,
built from the toy zoo's parts; only LAVIS's download helpers are replaced) and loaded into our
classes through vpg_checkpoint + projector_checkpoint gives the same soft prompts, the same loss
on the same samples and the same greedy and beam-5 generations.

Test-side shims on the STOCK side, none on ours:
  - LAVIS loads OPT in fp16 and Flan-T5 in bf16; on CPU both sides run in fp32, so the stock LLM
    is cast to fp32 and its weights reloaded from the same files (the casts rounded them).
  - LAVIS 1.0.2's beam search under transformers 4.51: Blip2OPT.generate repeats the soft prompts
    num_beams times and transformers expands them again (transformers#21713), so the stock OPT's
    generate is handed the unrepeated ones. Its vendored OPT also never receives the KV cache
    (its prepare_inputs_for_generation takes `past`): it recomputes every step, slower, same math.
  - The toy OPT tokenizer gets OPT's `add_bos_token: true` (facebook/opt-*'s tokenizer config),
    which LAVIS's slow GPT2Tokenizer (use_fast=False) needs to prepend </s> as BOS.
"""

import json
import os
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import load_tiny

N_IMAGES = 32
STEPS = 30
VQA_PROMPT = "Question: {} Short answer:"


@pytest.fixture(scope="module")
def lavis_download_helpers_replaced(plugin):
    """LAVIS's Blip2Base downloads EVA ViT-g and bert-base-uncased: point those (and only those)
    at the toy zoo's ViT and BERT."""
    from lavis_vpgtrans.models.stock_lavis import local_blip2_parts
    from lavis_vpgtrans.toy import zoo

    with local_blip2_parts(zoo.resolve("toy:eva-vit"), zoo.resolve("toy:bert")):
        yield


@pytest.fixture(scope="module")
def caption_batches(plugin):
    from lavis.common.registry import registry

    train = registry.get_builder_class("toy_caption")().build_datasets()["train"]
    loader = DataLoader(train, batch_size=16, shuffle=False, collate_fn=train.collater)
    return [batch for _, batch in zip(range(2), loader)]


@pytest.fixture(scope="module")
def vqa_batches(plugin):
    from lavis.common.registry import registry

    train = registry.get_builder_class("toy_vqa")().build_datasets()["train"]
    loader = DataLoader(train, batch_size=16, shuffle=False, collate_fn=train.collater)
    batches = []
    for _, batch in zip(range(2), loader):
        firsts, i = [], 0
        for n in batch["n_answers"].tolist():  # answers come flattened, n per question
            firsts.append(batch["answer"][i])
            i += n
        batches.append({"image": batch["image"], "questions": list(batch["text_input"]),
                        "text_input": [VQA_PROMPT.format(q) for q in batch["text_input"]], "text_output": firsts})
    return batches


def train_stock(model, batches, steps=STEPS, lr=5e-3):
    """A few steps of LAVIS's own forward (its train mode, its loss)."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        model(dict(batches[step % len(batches)]))["loss"].backward()
        optimizer.step()
    return model.eval()


def captured_projection(projector):
    """Records the stock projector's output (the soft prompts) during LAVIS's own forward."""
    seen = []
    projector.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    return seen


def load_ours(tmp_path, stock, name, model_type, **overrides):
    path = tmp_path / "lavis_trained.pth"
    torch.save({"model": stock.state_dict()}, path)
    return load_tiny(name, model_type, vpg_checkpoint=str(path), projector_checkpoint=str(path), **overrides).eval()


def assert_same_vpg_and_loss(stock, ours, projector, samples):
    seen = captured_projection(projector)
    with torch.no_grad():
        stock_loss = stock(dict(samples))["loss"].item()
        our_loss = ours(dict(samples))["loss"].item()
        our_prompts = ours.encode_image(samples["image"])
    assert torch.equal(seen[-1], our_prompts)
    assert our_loss == pytest.approx(stock_loss, abs=1e-5)
    return stock_loss


# --------------------------------------------------------------------------- OPT


@pytest.fixture(scope="module")
def stock_opt(lavis_download_helpers_replaced, caption_batches, tmp_path_factory):
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from transformers import OPTForCausalLM

    from lavis_vpgtrans.toy import zoo

    opt_dir = str(tmp_path_factory.mktemp("opt") / "opt-small")
    shutil.copytree(zoo.resolve("toy:opt-small"), opt_dir)
    with open(os.path.join(opt_dir, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    with open(os.path.join(opt_dir, "tokenizer_config.json"), "w") as f:
        json.dump({**tok_cfg, "add_bos_token": True}, f)

    torch.manual_seed(0)
    model = Blip2OPT(img_size=32, vit_precision="fp32", num_query_token=8, opt_model=opt_dir, prompt="",
                     max_txt_len=48)
    model.opt_model.float().load_state_dict(OPTForCausalLM.from_pretrained(opt_dir).state_dict())

    real_generate = model.opt_model.generate

    def generate_without_double_expansion(*, query_embeds, num_beams=1, **kwargs):
        return real_generate(query_embeds=query_embeds[::num_beams], num_beams=num_beams, **kwargs)

    model.opt_model.generate = generate_without_double_expansion
    return train_stock(model, caption_batches)


@pytest.fixture(scope="module")
def our_opt(stock_opt, tmp_path_factory):
    return load_ours(tmp_path_factory.mktemp("ours_opt"), stock_opt, "blip2_opt_transfer", "tiny_opt_small")


def test_opt_soft_prompts_and_loss_equal_stock_lavis(stock_opt, our_opt, caption_batches):
    for batch in caption_batches:
        loss = assert_same_vpg_and_loss(stock_opt, our_opt, stock_opt.opt_proj, batch)
        assert loss < 3.0  # trained: the comparison is on a model that learned the captions


def test_opt_captions_equal_stock_lavis_greedy_and_beam(stock_opt, our_opt, caption_batches):
    """LAVIS trains `caption + "\\n"` and stops at the "\\n" token; a model that stops only at
    </s> runs on past the newline (issue 12: 0 of 32 beam captions identical)."""
    images = torch.cat([b["image"] for b in caption_batches])[:N_IMAGES]
    tok = our_opt.llm_tokenizer
    max_length = 20
    for num_beams in (1, 5):
        kwargs = dict(num_beams=num_beams, max_length=max_length, min_length=1)
        stock = stock_opt.generate({"image": images}, **kwargs)
        ours = our_opt.generate({"image": images}, **kwargs)
        assert ours == stock, num_beams
        # the comparison covers the end of text: most stock captions stopped at "\n" before max_length
        stopped = sum(len(tok(c, add_special_tokens=False).input_ids) < max_length - 1 for c in stock)
        assert stopped >= N_IMAGES // 4, (num_beams, stock)


def test_opt_with_prompt_masks_like_lavis(stock_opt, our_opt, caption_batches):
    """With a prompt, LAVIS's processor prepends it to the caption and the model masks its tokens
    (BOS included); ours prepends it itself: the same rows, the same labels, the same loss."""
    prompt = "a photo of"
    batch = caption_batches[0]
    saved = stock_opt.prompt, stock_opt.prompt_length, our_opt.prompt
    try:
        stock_opt.prompt = prompt
        stock_opt.prompt_length = stock_opt.opt_tokenizer(prompt, return_tensors="pt").attention_mask.sum(1)
        our_opt.prompt = prompt
        with torch.no_grad():
            stock_loss = stock_opt({"image": batch["image"],
                                    "text_input": [f"{prompt} {c}" for c in batch["text_input"]]})["loss"].item()
            our_loss = our_opt(dict(batch))["loss"].item()
    finally:
        stock_opt.prompt, stock_opt.prompt_length, our_opt.prompt = saved
    assert our_loss == pytest.approx(stock_loss, abs=1e-5)


# --------------------------------------------------------------------------- Flan-T5


def new_stock_t5():
    """Stock Blip2T5 (seed 0) with the toy T5's weights in fp32, untrained."""
    from lavis.models.blip2_models.blip2_t5 import Blip2T5
    from transformers import T5ForConditionalGeneration

    from lavis_vpgtrans.toy import zoo

    t5_dir = zoo.resolve("toy:t5")
    torch.manual_seed(0)
    model = Blip2T5(img_size=32, vit_precision="fp32", num_query_token=8, t5_model=t5_dir, prompt="",
                    max_txt_len=48)
    model.t5_model.float().load_state_dict(T5ForConditionalGeneration.from_pretrained(t5_dir).state_dict())
    return model


@pytest.fixture(scope="module")
def stock_t5(lavis_download_helpers_replaced, vqa_batches):
    model = new_stock_t5()
    return train_stock(model, [{k: b[k] for k in ("image", "text_input", "text_output")} for b in vqa_batches])


@pytest.fixture(scope="module")
def our_t5(stock_t5, tmp_path_factory):
    # the config sets no max_output_txt_len: LAVIS truncates inputs and outputs at max_txt_len
    return load_ours(tmp_path_factory.mktemp("ours_t5"), stock_t5, "blip2_t5_transfer", "tiny_t5")


def t5_caption_samples(batch):
    """A caption batch as LAVIS's Blip2T5 trains captions: an empty input, the caption as output."""
    return {"image": batch["image"], "text_input": [""] * len(batch["text_input"]),
            "text_output": list(batch["text_input"])}


@pytest.fixture(scope="module")
def stock_t5_captions(lavis_download_helpers_replaced, caption_batches):
    """Stock Blip2T5 trained on toy captions, many of them longer than 32 T5 tokens."""
    model = new_stock_t5()
    return train_stock(model, [t5_caption_samples(b) for b in caption_batches], steps=10)


def test_t5_runs_with_lavis_exact_gelu_and_its_eos(our_t5):
    # LAVIS: t5_config.dense_act_fn = "gelu"; with transformers' gelu_new the loss below differs
    # from stock LAVIS by ~3e-5 on the toy T5
    assert our_t5.llm_model.config.dense_act_fn == "gelu"
    assert our_t5.end_sym is None and our_t5.end_token_id == our_t5.llm_tokenizer.eos_token_id


def test_t5_prefix_lm_loss_and_answers_equal_stock_lavis(stock_t5, our_t5, vqa_batches):
    for batch in vqa_batches:
        samples = {k: batch[k] for k in ("image", "text_input", "text_output")}
        assert assert_same_vpg_and_loss(stock_t5, our_t5, stock_t5.t5_proj, samples) < 3.0

    batch = vqa_batches[0]
    kwargs = dict(num_beams=5, max_len=10, min_len=1, prompt=VQA_PROMPT)
    stock = stock_t5.predict_answers({"image": batch["image"], "text_input": list(batch["questions"])}, **kwargs)
    ours = our_t5.predict_answers({"image": batch["image"], "text_input": list(batch["questions"])}, **kwargs)
    assert ours == stock
    assert sum(a in batch["text_output"] for a in ours) > 0  # answers from the training vocabulary

    for num_beams in (1, 5):
        kwargs = dict(num_beams=num_beams, max_length=12, min_length=1)
        assert our_t5.generate({"image": batch["image"]}, **kwargs) == \
            stock_t5.generate({"image": batch["image"]}, **kwargs)


def test_t5_caption_targets_are_cut_where_lavis_cuts_them(stock_t5_captions, caption_batches, tmp_path):
    """LAVIS's Blip2T5 cuts decoder targets at max_txt_len (48 in tiny_t5.yaml), not at 32: a
    default of 32 for max_output_txt_len trained on shorter captions than LAVIS (issue 23: 240 of
    the 1,280 toy training captions, caption loss 0.1 off)."""
    ours = load_ours(tmp_path, stock_t5_captions, "blip2_t5_transfer", "tiny_t5")
    assert ours.max_output_txt_len == ours.max_txt_len == 48
    tok = ours.llm_tokenizer
    for batch in caption_batches:
        lengths = [len(ids) for ids in tok(list(batch["text_input"])).input_ids]
        assert 32 < max(lengths) <= 48, lengths  # the targets LAVIS keeps whole and a cut at 32 would not
        # captioning (no text_output): our prompt "" is the encoder's input, the caption the target
        stock_loss = assert_same_vpg_and_loss(stock_t5_captions, ours, stock_t5_captions.t5_proj,
                                              t5_caption_samples(batch))
        with torch.no_grad():
            assert ours(dict(batch))["loss"].item() == pytest.approx(stock_loss, abs=1e-5)

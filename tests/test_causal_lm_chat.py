"""blip2_causal_lm chats in the chat template it trained on (models/chat_template.py,
Blip2CausalLM.chat): the generation prompt is the training row's prefix up to the answer, token
for token (real Llama-3 / Qwen3 templates, and templates set on the toy LLaMA), the soft prompts
go where training put them, the answer ends at the template's end of turn; a toy model overfit
on one two-turn conversation through forward() answers both turns back through chat(), the
chat CLI and the web demo's engine, loaded from its checkpoint."""

import io
import os
import sys

import pytest
import torch

# Vicuna-v1-like: answers end with the tokenizer's EOS (</s>), generation stops at its id
VICUNA_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
               "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Qwen's ChatML (Qwen2.5's tokenizer_config.json, without tools / system default)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a turn that ends in plain text, no special token: generation stops on the text
PLAIN_END = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' END\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")

# the toy world's image 1, in words its toy LLaMA tokenizer knows (each answer's first token
# carries the space before it, so the prompt is the training row's prefix exactly)
TURNS = [("Describe this image.", "two shapes: yellow circle, blue circle"),
         ("How many shapes?", "there are two shapes"), ("Where is the blue circle?", "at the bottom right.")]
# LoRA on every linear layer of the toy LLaMA: the overfit takes 100 steps (0.1 s each)
LORA = {"r": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]}


def assert_generation_is_training_prefix(tok, turns=TURNS, **kwargs):
    """For each turn k: the prompt that asks for answer k after turns 1..k-1 equals the ids of the
    conversation answered up to turn k, as training renders it, up to answer k's first token."""
    from lavis_vpgtrans.models.chat_template import answer_start, chat_template_tokens, generation_prompt_tokens

    prompts = []
    for k in range(len(turns)):
        prompt = generation_prompt_tokens(tok, turns[:k] + [(turns[k][0], None)], 8, -200, **kwargs)
        ids, labels = chat_template_tokens(tok, turns[:k + 1], 8, -200, **kwargs)
        assert prompt == ids[:answer_start(labels)], f"turn {k + 1}"
        assert prompt.count(-200) == 8 and ids[len(prompt):len(prompt) + 1] == labels[len(prompt):len(prompt) + 1]
        prompts.append(prompt)
    return prompts


def toy_tokenizer(toy_zoo, template, specials=()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(toy_zoo, "llama"))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    return tok


def test_generation_prompt_is_the_training_prefix_on_toy_templates(plugin, toy_zoo):
    from lavis_vpgtrans.models.chat_template import cut_answer, end_of_turn_stop

    tok = toy_tokenizer(toy_zoo, VICUNA_LIKE)
    prompts = assert_generation_is_training_prefix(tok)
    (q1, a1), (q2, _) = TURNS[:2]
    at = prompts[1].index(-200)
    assert tok.decode(prompts[1][:at]) == "<s>USER: "  # BOS as the template writes it, once
    assert tok.decode(prompts[1][at + 8:]).strip() == f"{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"
    assert end_of_turn_stop(tok) == ([tok.eos_token_id], None)

    tok = toy_tokenizer(toy_zoo, CHATML, ["<|im_start|>", "<|im_end|>"])
    assert_generation_is_training_prefix(tok)
    assert end_of_turn_stop(tok) == ([tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id], None)

    tok = toy_tokenizer(toy_zoo, PLAIN_END)
    assert_generation_is_training_prefix(tok)
    assert end_of_turn_stop(tok) == ([tok.eos_token_id], " END\n")
    generated = tok(f"{TURNS[0][1]} END\nuser: more", add_special_tokens=False).input_ids
    assert cut_answer(tok, generated, [tok.eos_token_id], " END\n") == TURNS[0][1]


def test_generation_prompt_is_the_training_prefix_on_real_templates(plugin, caplog):
    """Llama-3's and Qwen3's tokenizers with the chat templates they ship. Qwen3's generation
    prompt leaves out the empty <think> block its training rendering puts before the last answer
    (unless enable_thinking=False): the prompt is the training layout's, and that is logged."""
    import real_tokenizers

    from lavis_vpgtrans.models.chat_template import cut_answer, end_of_turn_stop

    llama3 = real_tokenizers.hf_tokenizer("llama3")
    prompts = assert_generation_is_training_prefix(llama3)
    assert llama3.decode(prompts[0][-4:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    eot, eos = llama3.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert end_of_turn_stop(llama3) == ([eot, eos], None)
    answer = llama3("Two shapes.", add_special_tokens=False).input_ids
    assert cut_answer(llama3, answer + [eot] + answer, [eot, eos], None) == "Two shapes."

    qwen = real_tokenizers.hf_tokenizer("qwen3")
    with caplog.at_level("WARNING", logger="lavis_vpgtrans.models.chat_template"):
        prompts = assert_generation_is_training_prefix(qwen)
    assert "generating after the training layout" in caplog.text
    for prompt in prompts:
        assert qwen.decode(prompt[-8:]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="lavis_vpgtrans.models.chat_template"):
        no_think = assert_generation_is_training_prefix(qwen, enable_thinking=False)
    assert no_think == prompts and not caplog.text  # its own generation prompt is the training prefix
    assert end_of_turn_stop(qwen) == ([qwen.convert_tokens_to_ids("<|im_end|>")], None)


# --------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def trained(plugin, toy_zoo, tmp_path_factory):
    """The tiny blip2_causal_lm with the Vicuna-like template (model.chat_template, a file) and
    LoRA on its LLM, overfit through forward() on one two-turn conversation about the toy
    world's image 1; its checkpoint with the run config train.py writes there."""
    from PIL import Image

    from lavis_vpgtrans.models.loading import load_chat_model

    tmp = tmp_path_factory.mktemp("causal_chat")
    template = tmp / "vicuna_like.jinja"
    template.write_text(VICUNA_LIKE)
    options = [f"chat_template={template}", f"llm_lora.r={LORA['r']}", f"llm_lora.dropout={LORA['dropout']}",
               f"llm_lora.target_modules=[{','.join(LORA['target_modules'])}]"]
    torch.manual_seed(0)
    model, vis = load_chat_model("blip2_causal_lm", "tiny_causal_lm", device="cpu", options=options)
    image_path = os.path.join(toy_zoo, "instruct", "image", "1.jpg")
    image = vis(Image.open(image_path).convert("RGB"))
    conversation = [list(t) for t in TURNS[:2]]
    # (eval mode: no Q-Former dropout; the VPG, projector and adapters still train)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = model({"image": image[None], "conversation": [conversation]})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    checkpoint = tmp / "checkpoint_0.pth"
    torch.save({"model": model.trainable_state_dict(),
                "config": {"model": {"arch": "blip2_causal_lm", "chat_template": str(template), "llm_lora": LORA}}},
               checkpoint)
    return model, vis, image, image_path, checkpoint, losses


def test_chat_answers_in_the_template_it_trained_on(trained):
    """chat() gives both answers back (stopping at </s>, which is cut), and the embeddings it
    generates after are the training row's up to the answer: the soft prompts where training
    put them."""
    from lavis_vpgtrans.models.chat_template import IMAGE_SLOT, answer_start, chat_template_tokens, embed_rows

    model, _, image, _, _, losses = trained
    assert losses[-1] < losses[0] / 3
    (q1, a1), (q2, a2) = TURNS[:2]
    seen = []
    hook = model.llm_model.get_base_model().register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("inputs_embeds", None)), with_kwargs=True)
    try:
        first = model.chat(image, q1, max_new_tokens=16)
        second = model.chat(image, q2, history=[(q1, first)], max_new_tokens=16)
    finally:
        hook.remove()
    assert (first, second) == (a1, a2)
    model.chat_mode = True  # (model.chat_mode: true) VQA asks in the template too
    try:
        assert model.predict_answers({"image": image[None], "text_input": [q1]}, prompt="{}", num_beams=1,
                                     max_len=16) == [a1]
        with pytest.raises(ValueError, match="with chat_mode use inference_method 'generate'"):
            model.predict_answers({"image": image[None], "text_input": [q1]}, inference_method="rank",
                                  answer_list=[a1, a2])
    finally:
        model.chat_mode = False
    ids, labels = chat_template_tokens(model.llm_tokenizer, TURNS[:2], 8, IMAGE_SLOT)
    with torch.no_grad():
        embeds, _ = embed_rows(model, [ids], model.encode_image(image[None]))
    chat_prompt = [e for e in seen if e is not None][-1]  # the second chat's prompt pass
    assert chat_prompt.shape[1] == answer_start(labels)
    torch.testing.assert_close(chat_prompt[0], embeds[0, :answer_start(labels)])


def run_cli(argv, stdin, monkeypatch, capsys):
    from lavis_vpgtrans.chat.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    return code, capsys.readouterr()


def test_cli_and_web_engine_chat_from_the_checkpoint(trained, monkeypatch, capsys):
    """`python -m lavis_vpgtrans.chat --model blip2_causal_lm --checkpoint CKPT`: the template and
    the LoRA shape come from the checkpoint's run config; the web demo's engine the same way."""
    from lavis_vpgtrans.chat.session import add_generation_args, engine_from_args

    _, _, _, image_path, checkpoint, _ = trained
    (q1, a1), (q2, a2) = TURNS[:2]
    argv = ["--model", "blip2_causal_lm", "--model-type", "tiny_causal_lm", "--checkpoint", str(checkpoint),
            "--device", "cpu", "--max-new-tokens", "16"]
    code, out = run_cli(argv + ["--image", image_path], f"{q1}\n{q2}\n", monkeypatch, capsys)
    assert code == 0 and out.out.splitlines() == [f"Assistant: {a1}", f"Assistant: {a2}"]

    import argparse

    from lavis_vpgtrans.chat import web

    parser = argparse.ArgumentParser()
    add_generation_args(parser)
    engine = engine_from_args(parser.parse_args(argv))  # what web.main serves
    assert web.demo_title(engine) == "VPGTrans chat (toy:llama)"
    state = web.on_upload(engine, image_path, None)[0]
    for q in (q1, q2):
        state, chat, box, status = web.on_message(engine, q, state)
        assert box == "" and "Error" not in status
    assert chat == [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                    {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]


def test_chat_leaves_out_old_turns_that_do_not_fit(trained, caplog):
    """A history over the LLM's context: turn 2 is left out (turn 1 holds the image), and the
    prompt is the training layout of turns 1 and 3."""
    model, _, image, _, _, _ = trained
    (q1, a1), (q2, a2), (q3, _) = TURNS
    short = len(model._conversation_row([TURNS[0], (q3, None)]))
    assert len(model._conversation_row([TURNS[0], TURNS[1], (q3, None)])) > short
    seen = []
    hook = model.llm_model.get_base_model().register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("inputs_embeds", None)), with_kwargs=True)
    config = model.llm_model.config
    limit = config.max_position_embeddings
    config.max_position_embeddings = short + 4
    try:
        with caplog.at_level("INFO", logger="lavis_vpgtrans.models.blip2_transfer"):
            model.chat(image, q3, history=[(q1, a1), (q2, a2)], max_new_tokens=4)
        with pytest.raises(ValueError, match=r"the conversation is \d+ tokens \(image included\), over the LLM's "
                                             r"context of 10"):
            config.max_position_embeddings = 10
            model.chat(image, q3, max_new_tokens=4)
    finally:
        config.max_position_embeddings = limit
        hook.remove()
    assert "leaving out turn 2 of 3" in caplog.text
    assert [e.shape[1] for e in seen if e is not None] == [short]


def test_chat_without_a_template_says_how_to_set_one(plugin):
    from helpers import load_tiny

    from lavis_vpgtrans.models.chat_template import ChatTemplateError

    model = load_tiny("blip2_causal_lm", "tiny_causal_lm").eval()
    with pytest.raises(ChatTemplateError, match="has no chat template.*model.chat_template"):
        model.chat(torch.zeros(3, 32, 32), "Hello?", max_new_tokens=2)
    with pytest.raises(ValueError, match="model.chat_template='USER: hi': neither a file nor a Jinja template"):
        model.set_chat_template("USER: hi")
    with pytest.raises(ValueError, match="chat_mode is set but toy:llama's tokenizer has no chat template"):
        load_tiny("blip2_causal_lm", "tiny_causal_lm", chat_mode=True)

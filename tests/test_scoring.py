"""Log-likelihood scoring (models/scoring.py): the scores equal a direct computation with the
transformers LLM on the same inputs, for a decoder-only LLM and for Flan-T5, and
`predict_answers(inference_method="rank")` picks the candidate those direct scores rank first."""

import random

import pytest
import torch

# (context, continuation) rows of different lengths, lmms-eval's convention (the space in the continuation)
ROWS = [("Question: what color is the circle? Answer:", " red"),
        ("Question: how many squares are there? Answer:", " 2"),
        ("Question: is there a triangle? Answer:", " yes"),
        ("a photo of", " a green square and a blue circle")]
CANDIDATES = ["red", "green", "blue", "circle", "square", "1", "2", "3", "yes", "no"]


@pytest.fixture(scope="module", params=[("blip2_opt_transfer", "tiny_opt_small"), ("blip2_t5_transfer", "tiny_t5")],
                ids=["opt", "t5"])
def loaded(request, plugin):
    from lavis_vpgtrans.models.loading import load_chat_model
    from lavis_vpgtrans.toy import world

    model, vis = load_chat_model(*request.param, device="cpu")
    rng = random.Random(0)
    images = torch.stack([vis(world.render(world.sample_scene(rng))) for _ in range(2)])
    return model, images


def direct_logprob(model, prompts, context, continuation, end_of_text):
    """log P(continuation [+ end of text] | soft prompts, context) from the LLM's logits, with
    the inputs written out here by hand (one row, no padding)."""
    tok, llm = model.llm_tokenizer, model.llm_model
    embed = llm.get_input_embeddings()
    if model.is_encoder_decoder:
        enc = torch.tensor([tok(context).input_ids])  # T5 closes the encoder text with </s>
        dec = tok(continuation.strip()).input_ids  # ... and the answer with </s> (its end of text)
        if not end_of_text:
            dec = dec[:-1]
        logits = llm(inputs_embeds=torch.cat([prompts, embed(enc)], 1), labels=torch.tensor([dec])).logits[0]
        targets = dec
    else:
        ctx = tok.bos_token_id, *tok(context, add_special_tokens=False).input_ids
        full = tok(context + continuation + (model.end_sym if end_of_text else ""), add_special_tokens=False).input_ids
        ids = [tok.bos_token_id, *full]
        assert tuple(ids[:len(ctx)]) == ctx  # the continuation starts a new token
        out = llm(inputs_embeds=torch.cat([prompts, embed(torch.tensor([ids]))], 1)).logits[0]
        q = prompts.shape[1]
        logits, targets = out[q + len(ctx) - 1:q + len(ids) - 1], ids[len(ctx):]
    lp = torch.log_softmax(logits.float(), -1)
    return float(sum(lp[i, t] for i, t in enumerate(targets))), bool((logits.argmax(-1) == torch.tensor(targets)).all())


@pytest.mark.parametrize("end_of_text", [False, True], ids=["continuation", "with_end"])
def test_scores_equal_a_direct_computation(loaded, end_of_text):
    model, images = loaded
    prompts = model.encode_image(images)
    index = [0, 1, 0, 1]
    got = model.score_continuations(prompts, [c for c, _ in ROWS], [t[1:] for _, t in ROWS],
                                    end_of_text=end_of_text, prompt_index=index)
    with torch.no_grad():
        want = [direct_logprob(model, prompts[i:i + 1], c, t, end_of_text) for i, (c, t) in zip(index, ROWS)]
    diff = max(abs(g[0] - w[0]) for g, w in zip(got, want))
    print(f"{type(model).__name__} end_of_text={end_of_text}: max abs diff {diff:.2e} over {len(ROWS)} rows")
    assert diff < 1e-4, (got, want)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert all(g[0] < 0 for g in got)


def test_rank_picks_the_best_direct_score(loaded):
    model, images = loaded
    questions = ["what color is the circle", "how many squares are there"]
    prompt = model.vqa_prompt
    answers = model.predict_answers({"image": images, "text_input": questions}, inference_method="rank",
                                    answer_list=CANDIDATES, prompt=prompt)
    prompts = model.encode_image(images)
    with torch.no_grad():
        for i, question in enumerate(questions):
            scores = [direct_logprob(model, prompts[i:i + 1], prompt.format(question), " " + a, True)[0]
                      for a in CANDIDATES]
            assert answers[i] == CANDIDATES[max(range(len(CANDIDATES)), key=scores.__getitem__)]
    # a chunk size that splits a question's candidates gives the same answers
    model.score_batch_size = 3
    try:
        again = model.predict_answers({"image": images, "text_input": questions}, inference_method="rank",
                                      answer_list=CANDIDATES, prompt=prompt)
    finally:
        model.score_batch_size = type(model).score_batch_size
    assert again == answers


def test_rank_refuses_what_it_cannot_score(loaded):
    model, images = loaded
    with pytest.raises(ValueError, match="answer_list"):
        model.predict_answers({"image": images[:1], "text_input": ["q"]}, inference_method="rank", answer_list=None)
    with pytest.raises(ValueError, match="max_txt_len"):  # never a score of a cut text
        model.predict_answers({"image": images[:1], "text_input": ["what color " * 40]}, inference_method="rank",
                              answer_list=CANDIDATES)
    with pytest.raises(ValueError, match="empty continuation"):
        model.score_continuations(model.encode_image(images[:1]), ["Question: q"], [" "])


def test_conversation_mode_scores_with_the_training_loss(plugin):
    """VL-Vicuna in conversation mode scores the answer in its conversation layout: with its
    closing "###", the sum equals the training loss of that one-turn conversation times its
    labelled tokens; without it, the "###" tokens' log-probability is left out."""
    from lavis_vpgtrans.models.loading import load_chat_model
    from lavis_vpgtrans.toy import world

    model, vis = load_chat_model("blip2_vicuna", "tiny_vl_vicuna", device="cpu")
    image = vis(world.render(world.sample_scene(random.Random(2)))).unsqueeze(0)
    prompts = model.encode_image(image)
    question, answers = "Question: what color is the circle? Answer:", ["red", "green square"]
    with_end = model.score_continuations(prompts, [question] * 2, answers, end_of_text=True, prompt_index=[0, 0])
    bare = model.score_continuations(prompts, [question] * 2, answers, end_of_text=False, prompt_index=[0, 0])
    with torch.no_grad():
        for answer, (logprob, _), (logprob_bare, _) in zip(answers, with_end, bare):
            labelled = sum(label != -100 for label in model.tokenize_conversation([(question, answer)]).labels)
            loss = model.conversation_loss(image, [[(question, answer)]])
            assert abs(logprob + float(loss) * labelled) < 1e-4
            assert logprob_bare > logprob  # the "###" tokens have a probability < 1
    ranked = model.predict_answers({"image": image, "text_input": ["what color is the circle"]},
                                   inference_method="rank", answer_list=answers)
    assert ranked == [answers[0] if with_end[0][0] >= with_end[1][0] else answers[1]]

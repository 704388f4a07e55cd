"""A conversation about an image in a tokenizer's own chat template, labels on the answers only.

For a generic causal LM (blip2_causal_lm on an instruct model: Llama-3, Qwen, Mistral, ...) an
instruction conversation [(user, assistant), ...] is rendered by the tokenizer's
`apply_chat_template` (as the model was tuned), and the image's soft prompts go at the start of
the first user message, followed by "\\n" (where LLaVA puts its <image>):

    ids     the rendered text's tokens, with `num_query` image slots (image_token_id) where the
            placeholder was
    labels  -100 everywhere but on each answer's tokens and the end of turn the template
            writes right after it, up to its first special token ("<|im_end|>", "<|eot_id|>",
            "</s>"): what the model has to generate to answer and stop

The answers are found in the rendered text itself (in order, after the messages before them), so
templates that render a message differently as the last one (Qwen3's empty <think> block) or
change the system prompt are handled; a template that rewrites a message's text is an error.
Needs a fast tokenizer (offsets).

Generation (Blip2CausalLM.chat) renders the history and the new message with
add_generation_prompt=True; those ids must be the training row's up to the answer
(generation_prompt_tokens checks it), and the answer ends at the template's end of turn
(end_of_turn_stop).
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER_TEXT = "<ImageHere>"


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render with answer-only labels."""


def chat_messages(turns: Sequence[Tuple[str, Optional[str]]], with_image: bool = True) -> List[Dict[str, str]]:
    messages = []
    for i, (user, assistant) in enumerate(turns):
        user = str(user).strip()
        if i == 0 and with_image:
            user = f"{IMAGE_PLACEHOLDER_TEXT}\n{user}"
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": str(assistant).strip()})
    return messages


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


PROBE = [{"role": "user", "content": "Probe question one?"}, {"role": "assistant", "content": "Probe answer one."},
         {"role": "user", "content": "Probe question two?"}, {"role": "assistant", "content": "Probe answer two."}]


def end_of_turn(tokenizer, **template_kwargs) -> str:
    """The text the chat template writes right after an answer, up to and including its first
    special token ("<|im_end|>", "<|eot_id|>", "</s>", "<end_of_turn>"): what follows an answer
    both before the next user turn and at the end of the conversation."""
    key = (tokenizer.chat_template, repr(sorted(template_kwargs.items())))
    cache = tokenizer.__dict__.setdefault("_vpgtrans_end_of_turn", {})  # one probe per template
    if key not in cache:
        cache[key] = _probe_end_of_turn(tokenizer, **template_kwargs)
    return cache[key]


def _probe_end_of_turn(tokenizer, **template_kwargs) -> str:
    text = tokenizer.apply_chat_template(PROBE, tokenize=False, **template_kwargs)
    first = text.index(PROBE[1]["content"]) + len(PROBE[1]["content"])
    last = text.index(PROBE[3]["content"], first) + len(PROBE[3]["content"])
    common = text[last:][:_common_prefix(text[first:], text[last:])]
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    ends = [common.find(t) + len(t) for t in specials if t and t in common]
    return common[:min(ends)] if ends else common


def answer_spans(text: str, messages: List[Dict[str, str]], eot: str) -> List[Tuple[int, int]]:
    """Character spans of the answers in `text`, each with the end of turn `eot` after it."""
    cursor, found = 0, []
    for m in messages:
        at = text.find(m["content"], cursor)
        if at < 0:
            raise ChatTemplateError(f"the chat template does not write the {m['role']} message "
                                    f"{m['content'][:60]!r} as given")
        cursor = at + len(m["content"])
        if m["role"] == "assistant":
            found.append((at, cursor + (len(eot) if text.startswith(eot, cursor) else 0)))
    return found


def chat_template_tokens(tokenizer, turns: Sequence[Tuple[str, Optional[str]]], num_query: int,
                         image_token_id: int, with_image: bool = True, max_answer_tokens: Optional[int] = None,
                         **template_kwargs) -> Tuple[List[int], List[int]]:
    """(ids, labels) of a conversation rendered by the tokenizer's chat template; a last turn
    with answer None gives the generation prompt (add_generation_prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no chat template (tokenizer_config.json "
                                "chat_template): use a chat / instruct model's tokenizer")
    if not turns:
        raise ChatTemplateError("a conversation needs at least one turn")
    if any(a is None for _, a in turns[:-1]):
        raise ChatTemplateError("only the last turn may be unanswered")
    messages = chat_messages(turns, with_image)
    for m in messages:
        if IMAGE_PLACEHOLDER_TEXT in m["content"][len(IMAGE_PLACEHOLDER_TEXT):] or not m["content"]:
            raise ChatTemplateError(f"a {m['role']} message is empty or holds {IMAGE_PLACEHOLDER_TEXT!r}")
    generation = turns[-1][1] is None
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                         **template_kwargs)
    spans = answer_spans(text, messages, end_of_turn(tokenizer, **template_kwargs))
    parts = text.split(IMAGE_PLACEHOLDER_TEXT) if with_image else [text]
    if len(parts) != (2 if with_image else 1):
        raise ChatTemplateError("the chat template did not write the image placeholder exactly once")
    ids: List[int] = []
    labels: List[int] = []
    offset = 0
    for k, part in enumerate(parts):
        if k:
            ids += [image_token_id] * num_query
            labels += [-100] * num_query
            offset += len(IMAGE_PLACEHOLDER_TEXT)
        enc = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
        span_tokens = {}
        for tid, (start, end) in zip(enc.input_ids, enc.offset_mapping):
            # a token overlapping an answer is the answer's ("▁two" starts at the space before it)
            start, end = offset + start, offset + max(end, start + 1)
            span = next((i for i, (s, e) in enumerate(spans) if start < e and end > s), None)
            if span is not None and max_answer_tokens is not None:
                span_tokens[span] = span_tokens.get(span, 0) + 1
                keep = span_tokens[span] <= max_answer_tokens
            else:
                keep = True
            if keep:
                ids.append(tid)
                labels.append(tid if span is not None else -100)
        offset += len(part)
    return ids, labels


IMAGE_SLOT = -200  # marks the soft-prompt positions in a row of ids; never a vocabulary id
# The answer of the training row that a generation prompt is checked against: it opens with a word
# that every vocabulary holds with its leading space ("▁a", "Ġa"), so its first token is where the
# labels start, and goes on with text no template writes (answer_spans finds it in the rendering).
PROBE_ANSWER = "a 1729 reply."


def answer_start(labels: Sequence[int]) -> int:
    """Index of the first labelled token of the last answer."""
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] != -100 and (i == 0 or labels[i - 1] == -100):
            return i
    raise ChatTemplateError("the conversation has no labelled answer")


def generation_prompt_tokens(tokenizer, turns: Sequence[Tuple[str, Optional[str]]], num_query: int,
                             image_token_id: int, with_image: bool = True, **template_kwargs) -> List[int]:
    """Ids of the prompt that asks for the answer of the last turn (its answer None): the
    conversation rendered with add_generation_prompt=True, which must equal the ids of the same
    conversation answered, as training renders it, up to the answer's first token. A template
    whose generation prompt is not that prefix (Qwen3's, unless enable_thinking=False, writes an
    empty <think> block before an answered last turn but none after its generation prompt) gets
    the training row's prefix instead: the model learned to answer after that. A prompt that
    stops before a whitespace token the tokenizer keeps apart from some answers' first word (the
    toy LLaMA's "▁" before "T") is still that prefix: the answer's own tokens decide."""
    turns = [tuple(t) for t in turns]
    if not turns or turns[-1][1] is not None:
        raise ChatTemplateError("a generation prompt needs a last turn without an answer")
    prompt, _ = chat_template_tokens(tokenizer, turns, num_query, image_token_id, with_image, **template_kwargs)
    ids, labels = chat_template_tokens(tokenizer, turns[:-1] + [(turns[-1][0], PROBE_ANSWER)], num_query,
                                       image_token_id, with_image, **template_kwargs)
    trained = ids[:answer_start(labels)]
    if trained[:len(prompt)] == prompt and not tokenizer.decode(trained[len(prompt):]).strip():
        return prompt
    if prompt != trained:
        key = (tokenizer.chat_template, repr(sorted(template_kwargs.items())))
        warned = tokenizer.__dict__.setdefault("_vpgtrans_prompt_warned", set())
        if key not in warned:
            warned.add(key)
            logger.warning("the chat template's generation prompt ends %r where training puts the answer "
                           "after %r: generating after the training layout", tokenizer.decode(prompt[-6:]),
                           tokenizer.decode(trained[-6:]))
    return trained


def end_of_turn_stop(tokenizer, **template_kwargs) -> Tuple[List[int], Optional[str]]:
    """How a generated answer ends: (token ids generation stops at: the end of turn's special
    token, e.g. <|im_end|> or Llama-3's <|eot_id|>, and the tokenizer's EOS; the end-of-turn text
    to stop on and cut at when the template ends a turn with no special token, else None)."""
    eot = end_of_turn(tokenizer, **template_kwargs)
    specials = [t for t in set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()) if t and eot.endswith(t)]
    ids = [tokenizer.convert_tokens_to_ids(max(specials, key=len))] if specials else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    text = None if specials else (eot or None)
    if not ids and text is None:
        raise ChatTemplateError(f"{type(tokenizer).__name__}: the chat template ends a turn with {eot!r} and the "
                                "tokenizer has no EOS: nothing to stop generation at")
    return ids, text


def cut_answer(tokenizer, ids: Sequence[int], stop_ids: Sequence[int], stop_text: Optional[str]) -> str:
    """A generated answer's text up to (not including) its end of turn, stripped."""
    ids = list(ids)
    for k, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:k]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if stop_text:
        text = text.split(stop_text, 1)[0]
    return text.strip()


def embed_rows(model, rows: Sequence[Sequence[int]], prompts, left: bool = False):
    """(inputs_embeds, attention_mask) of padded rows of ids with each row's soft prompts
    (`prompts`, (B, num_query, D)) at its IMAGE_SLOT positions. `model` is a Blip2VLLLM."""
    from lavis_vpgtrans.models.llm import pad_rows

    pad = model.llm_tokenizer.pad_token_id
    ids, mask = (t.to(prompts.device) for t in pad_rows(rows, pad, left=left))
    is_image = ids == IMAGE_SLOT
    embeds = model.llm_model.get_input_embeddings()(ids.masked_fill(is_image, pad))
    embeds[is_image] = prompts.reshape(-1, prompts.shape[-1]).to(embeds.dtype)
    return embeds, mask


def chat_template_loss(model, image, conversations, max_answer_tokens: Optional[int] = None,
                       **template_kwargs):
    """Causal-LM loss of whole conversations (one image each) rendered by the model's tokenizer's
    chat template, on the answers (and their end of turn) only. `model` is a Blip2VLLLM."""
    import torch

    prompts = model.encode_image(image)
    num_query = prompts.shape[1]
    rows = [chat_template_tokens(model.llm_tokenizer, [tuple(t) for t in turns], num_query, IMAGE_SLOT,
                                 max_answer_tokens=max_answer_tokens, **template_kwargs) for turns in conversations]
    embeds, mask = embed_rows(model, [r[0] for r in rows], prompts)
    labels = torch.full(mask.shape, -100, dtype=torch.long)
    for i, (_, row_labels) in enumerate(rows):
        labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
    with model.maybe_autocast():
        return model.llm_model(inputs_embeds=embeds, attention_mask=mask, labels=labels.to(mask.device),
                               return_dict=True).loss

"""VL-Vicuna: the paper's multimodal chatbot (VPG transferred to Vicuna, then instruction-tuned).

Without `conv_template` the model trains and generates like Blip2LLaMA (stages 1 and 2 of the
transfer: captions ending in end_sym, "\n"). With `conv_template: minigpt4` (stage 3 and the released VL-Vicuna) every
sample is a conversation rendered by lavis_vpgtrans.models.conversation:

    <s>###Human: <Img>[32 soft prompts]</Img> {instruction} ###Assistant: {answer}###

  - BOS once, at the very start, in training and in generation alike (if the tokenizer adds
    one: the same `bos_ids` as every other path);
  - the soft prompts are spliced in at <ImageHere>;
  - labels on the answer tokens and the closing "###" only (every turn's, for multi-turn
    samples {"image", "conversation": [[instruction, answer], ...]} such as own_instruct's);
  - generation gets the same token ids up to "###Assistant:", then stops as soon as the
    generated text contains "###" (however the tokenizer splits it), and the "###" is cut.

    >>> answer = model.chat(image, "What is in the picture?", history=[])
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry

from lavis_vpgtrans.models.blip2_transfer import Blip2LLaMA
from lavis_vpgtrans.models.conversation import (ANSWER, DEFAULT_TEMPLATE, IMAGE, ConversationError,
                                                ConversationTemplate, Turn, get_template)
from lavis_vpgtrans.models.llm import pad_rows

logger = logging.getLogger(__name__)

# Marks the soft-prompt positions in a row of token ids; never a vocabulary id.
IMAGE_TOKEN_ID = -200


@dataclass
class ConversationTokens:
    """One tokenized conversation: `ids` with IMAGE_TOKEN_ID where the soft prompts go, and
    `labels` (-100 except on answer tokens)."""
    ids: List[int]
    labels: List[int]


@registry.register_model("blip2_vicuna")
@registry.register_model("blip2_vicuna_vpgtrans")
class Blip2Vicuna(Blip2LLaMA):
    """VL-Vicuna: BLIP-2 with a Vicuna LLM, the paper's multimodal chatbot."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "vicuna7b": "models/configs/vicuna/vicuna7b.yaml",
        "vl_vicuna7b": "models/configs/vicuna/vl_vicuna7b.yaml",
        "tiny_vicuna": "models/configs/vicuna/tiny_vicuna.yaml",
        "tiny_vl_vicuna": "models/configs/vicuna/tiny_vl_vicuna.yaml",
    }

    # Set by set_conversation (from the `conv_template` / `max_context_len` config keys).
    conv_template: Optional[ConversationTemplate] = None
    max_context_len: Optional[int] = None

    @classmethod
    def from_config(cls, cfg):
        model = super().from_config(cfg)
        model.set_conversation(cfg.get("conv_template", None), cfg.get("max_context_len", None))
        return model

    def set_conversation(self, template=None, max_context_len: Optional[int] = None) -> None:
        """Turns conversation mode on (a template name, e.g. "minigpt4") or off (None).
        `max_context_len` caps prompt + answer tokens (default: the LLM's position limit)."""
        self.conv_template = get_template(template) if template else None
        limit = max_context_len or getattr(self.llm_model.config, "max_position_embeddings", None)
        self.max_context_len = int(limit) if limit else None

    # ------------------------------------------------------------------ tokenization

    def _encode_piece(self, text: str) -> List[int]:
        """A piece's ids without special tokens. SentencePiece tokenizers ("▁") add the word
        boundary themselves, and a legacy LLaMA tokenizer would turn a leading space into an
        extra "▁" token, so the piece's leading space is left to the tokenizer there."""
        tok = self.llm_tokenizer
        if not hasattr(self, "_adds_prefix_space"):
            first = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False).input_ids)[0]
            self._adds_prefix_space = first.startswith("\u2581")
        if self._adds_prefix_space:
            text = text.lstrip(" ")
        return tok(text, add_special_tokens=False).input_ids if text else []

    def tokenize_conversation(self, turns: Sequence[Turn], template: ConversationTemplate = None,
                              max_answer_tokens: Optional[int] = None) -> ConversationTokens:
        """Token ids and labels of one conversation; a last turn with answer None gives the
        generation prompt, which is a prefix of the ids of the same conversation answered.
        `max_answer_tokens` cuts each answer (its tokens and the closing separator): training
        uses max_output_txt_len; a chat history is never cut."""
        template = template or self.conv_template
        if template is None:
            raise ValueError("no conversation template: set the model's conv_template (e.g. minigpt4)")
        num_query = self.query_tokens.shape[1]
        ids = list(self.bos_ids)
        labels = [-100] * len(ids)
        for piece in template.pieces(turns):
            if piece.kind == IMAGE:
                ids += [IMAGE_TOKEN_ID] * num_query
                labels += [-100] * num_query
                continue
            piece_ids = self._encode_piece(piece.text)
            if piece.kind == ANSWER:
                piece_ids = piece_ids[:max_answer_tokens]
                labels += piece_ids
            else:
                labels += [-100] * len(piece_ids)
            ids += piece_ids
        return ConversationTokens(ids, labels)

    def _embed_rows(self, rows: List[List[int]], image_prompts: torch.Tensor, left_pad: bool):
        """Pads the rows, embeds the tokens and splices each row's soft prompts in at its
        IMAGE_TOKEN_ID positions. Returns (inputs_embeds, attention_mask)."""
        device = image_prompts.device
        pad = self.llm_tokenizer.pad_token_id
        ids, mask = (t.to(device) for t in pad_rows(rows, pad, left=left_pad))
        is_image = ids == IMAGE_TOKEN_ID
        num_query = image_prompts.shape[1]
        if not torch.equal(is_image.sum(1), torch.full((len(rows),), num_query, device=device)):
            raise ValueError(f"every conversation needs exactly one image ({num_query} soft-prompt slots)")
        embeds = self.llm_model.get_input_embeddings()(ids.masked_fill(is_image, pad))
        embeds[is_image] = image_prompts.reshape(-1, image_prompts.shape[-1]).to(embeds.dtype)
        return embeds, mask

    # ------------------------------------------------------------------ training

    def forward(self, samples):
        if self.conv_template is None:
            return super().forward(samples)
        if self.pformer is not None:
            raise ValueError("align_weight > 0 (P-Former alignment) is for caption training; "
                             "turn it off for conversation (instruction) tuning")
        if "conversation" in samples:  # multi-turn: [[user, assistant], ...] per sample (own_instruct)
            conversations = [[(q, a) for q, a in turns] for turns in samples["conversation"]]
            return {"loss": self.conversation_loss(samples["image"], conversations)}
        # LAVIS's samples contract: text_input = instruction, text_output = answer; caption
        # samples (no text_output) use the model's `prompt` as the instruction.
        instructions, answers = self._prefixes_and_targets(samples)
        conversations = [[(q, a)] for q, a in zip(instructions, answers, strict=True)]
        return {"loss": self.conversation_loss(samples["image"], conversations)}

    def conversation_loss(self, image: torch.Tensor, conversations: Sequence[Sequence[Turn]]) -> torch.Tensor:
        """Causal-LM loss of whole conversations (one image each), on answer tokens only."""
        prompts = self.encode_image(image)
        tokens = [self._fit_training_row(self.tokenize_conversation(turns, max_answer_tokens=self.max_output_txt_len))
                  for turns in conversations]
        embeds, mask = self._embed_rows([t.ids for t in tokens], prompts, left_pad=False)
        labels = torch.full(mask.shape, -100, dtype=torch.long)
        for i, t in enumerate(tokens):
            labels[i, : len(t.labels)] = torch.tensor(t.labels, dtype=torch.long)
        with self.maybe_autocast():
            return self.llm_model(inputs_embeds=embeds, attention_mask=mask, labels=labels.to(mask.device),
                                  return_dict=True).loss

    def _fit_training_row(self, tokens: ConversationTokens) -> ConversationTokens:
        """Cuts a training conversation longer than max_context_len at its end (as answers
        are cut at max_output_txt_len); a cut into the image is an error."""
        limit = self.max_context_len
        if not limit or len(tokens.ids) <= limit:
            return tokens
        if IMAGE_TOKEN_ID in tokens.ids[limit:]:
            raise ConversationError(f"a training conversation's image ends after token {limit}, the "
                                    f"model's max_context_len")
        logger.warning("a training conversation of %d tokens is cut to max_context_len=%d",
                       len(tokens.ids), limit)
        return ConversationTokens(tokens.ids[:limit], tokens.labels[:limit])

    def _check_context(self, rows: List[List[int]], max_new_tokens: int) -> None:
        longest = max(len(r) for r in rows)
        if self.max_context_len and longest + max_new_tokens > self.max_context_len:
            raise ConversationError(
                f"the conversation is {longest} tokens (image included)"
                + (f" + {max_new_tokens} new tokens" if max_new_tokens else "")
                + f", over the model's max_context_len of {self.max_context_len}")

    # ------------------------------------------------------------------ generation

    def _generate(self, image, prefixes: List[str], min_length: int = 1, **gen_kwargs) -> List[str]:
        """generate() / predict_answers(): in conversation mode each prefix (the caption prompt
        or the formatted question) is the user's message of a one-turn conversation, and
        min_length counts new tokens (the prompt is embeddings only, as in VPGTrans's VL-Vicuna)."""
        if self.conv_template is None:
            return super()._generate(image, prefixes, min_length=min_length, **gen_kwargs)
        return self.generate_conversations(image, [[(p, None)] for p in prefixes], min_new_tokens=min_length,
                                           **gen_kwargs)

    @torch.no_grad()
    def generate_conversations(self, image: torch.Tensor, conversations: Sequence[Sequence[Turn]],
                               template: ConversationTemplate = None, **gen_kwargs) -> List[str]:
        """The assistant's next answer for each conversation (last turn's answer None), with
        `gen_kwargs` for HF generate (max_new_tokens, num_beams, do_sample, ...)."""
        template = template or self.conv_template or get_template(DEFAULT_TEMPLATE)
        tok = self.llm_tokenizer
        prompts = self.encode_image(image)
        rows = [self.tokenize_conversation(turns, template).ids for turns in conversations]
        self._check_context(rows, int(gen_kwargs.get("max_new_tokens", 0)))
        # Left padding keeps every prompt adjacent to the tokens being generated.
        embeds, mask = self._embed_rows(rows, prompts, left_pad=True)
        with self.maybe_autocast():
            out = self.llm_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                          stopping_criteria=self.stop_on_text(template.sep), **gen_kwargs)
        return [template.cut_answer(t) for t in tok.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def chat(
        self,
        image: torch.Tensor,
        message: str,
        history: Sequence[Tuple[str, str]] = (),
        max_new_tokens: int = 300,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        min_new_tokens: int = 1,
    ) -> str:
        """The assistant's answer to `message` about `image` (a processed image, (3, H, W) or
        (1, 3, H, W)) after the earlier (user, assistant) turns in `history`. The caller keeps
        the history: append (message, answer) for the next turn. When the conversation no
        longer fits in max_context_len, the oldest turns after the first (which holds the
        image) are left out, then the answer is allowed fewer tokens; a message that does not
        fit at all is a ConversationError."""
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.shape[0] != 1:
            raise ValueError(f"chat takes one image, got a batch of {image.shape[0]}")
        template = self.conv_template
        if template is None:
            template = get_template(DEFAULT_TEMPLATE)
            logger.warning("this model has no conv_template (not instruction-tuned); chatting with %r",
                           template.name)
        turns = [tuple(t) for t in history] + [(message, None)]
        turns = self.fit_history(turns, max_new_tokens, template)
        if self.max_context_len:
            room = self.max_context_len - len(self.tokenize_conversation(turns, template).ids)
            if 0 < room < max_new_tokens:  # no older turn left to drop: answer shorter
                logger.warning("only %d tokens left in the context: max_new_tokens %d -> %d", room,
                               max_new_tokens, room)
                max_new_tokens, min_new_tokens = room, min(min_new_tokens, room)
        gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                   do_sample=do_sample, repetition_penalty=repetition_penalty, length_penalty=length_penalty)
        if do_sample:
            gen.update(temperature=temperature, top_p=top_p)
        return self.generate_conversations(image.to(self.device), [turns], template, **gen)[0]

    def fit_history(self, turns: List[Turn], max_new_tokens: int, template: ConversationTemplate = None) -> List[Turn]:
        """Drops the oldest turns after the first (which holds the image) until the prompt and
        max_new_tokens fit; if the first and the last turn alone do not, generation says so."""
        turns = list(turns)
        while self.max_context_len and len(turns) > 2:
            length = len(self.tokenize_conversation(turns, template).ids)
            if length + max_new_tokens <= self.max_context_len:
                break
            logger.info("conversation too long (%d tokens): leaving out turn 2 of %d", length, len(turns))
            del turns[1]
        return turns

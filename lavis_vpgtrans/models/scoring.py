"""Log-likelihood scoring of continuations after soft prompts + context: ranks VQA answer
candidates (`predict_answers(..., inference_method="rank")`) and serves lmms-eval's
`loglikelihood` (lavis_vpgtrans/lmms/) with the same code.

A (prefix, target) pair is laid out exactly as training lays it out, by the functions training
uses (models/llm.py's llm_forward; VL-Vicuna's conversation rows in conversation mode):
  - decoder-only: [soft prompts] BOS prefix " " target end_sym;
  - Flan-T5: encoder [soft prompts] prefix </s>, decoder target </s>;
  - VL-Vicuna with conv_template: "###Human: <Img>[soft prompts]</Img> prefix ###Assistant: target###".
The score is the sum of the log-probabilities of the target's tokens, and with `end_of_text`
of its end of text too (end_sym / EOS / "###"): a complete answer, as the model was trained to
give one and as `rank` compares candidates (without it, "red" always outscores "red car").
lmms-eval's loglikelihood is the continuation alone (end_of_text=False).
"""

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch

# Scoring never cuts text: a continuation cut at max_txt_len would be scored on part of itself.
_UNCUT = 1 << 30


class LogLikelihoodScorer:
    """Mixin of the VL-LLMs (before Blip2PluginBase in the bases)."""

    # Rows (prefix, target pairs) per LLM forward pass: the logits of a pass are rows x length x vocab.
    score_batch_size: int = 32

    # ------------------------------------------------------------------ ranking

    @torch.no_grad()
    def rank_answers(self, image, prefixes: Sequence[str], answer_list: Optional[Sequence[str]],
                     num_ans_candidates: Optional[int] = None) -> List[str]:
        """For each image and prefix, the candidate of `answer_list` with the highest
        log-likelihood as a complete answer (end of text included); the first one on a tie.
        Every candidate is scored (`num_ans_candidates`, LAVIS's pre-selection by the first
        token, is not applied)."""
        if not answer_list:
            raise ValueError(f"{type(self).__name__}: inference_method='rank' needs an answer_list (the VQA "
                             f"dataset's answer_list.json, the second `storage` path of its eval split)")
        answers = [str(a) for a in answer_list]
        prompts = self.encode_image(image)
        prefixes = list(prefixes)
        if len(prefixes) != prompts.shape[0]:
            raise ValueError(f"{len(prefixes)} prefixes for {prompts.shape[0]} images")
        n = len(answers)
        index = [i for i in range(len(prefixes)) for _ in range(n)]
        scores = self.score_continuations(prompts, [prefixes[i] for i in index], answers * len(prefixes),
                                          end_of_text=True, prompt_index=index)
        logprobs = torch.tensor([s for s, _ in scores], dtype=torch.float64).view(len(prefixes), n)
        return [answers[int(j)] for j in logprobs.argmax(dim=1)]

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score_continuations(self, prompts: torch.Tensor, prefixes: Sequence[str], targets: Sequence[str],
                            end_of_text: bool = False,
                            prompt_index: Optional[Sequence[int]] = None) -> List[Tuple[float, bool]]:
        """(log-probability, is_greedy) of each target after soft prompts + prefix, in the
        training layout. `prompts`: soft prompts (encode_image), one per row, or one per image
        with `prompt_index` giving each row's image. is_greedy: every scored token is the
        argmax of the LLM's distribution at its position (greedy decoding would produce it)."""
        prefixes, targets = list(prefixes), list(targets)
        if len(prefixes) != len(targets):
            raise ValueError(f"{len(prefixes)} prefixes for {len(targets)} targets")
        index = list(range(len(targets))) if prompt_index is None else list(prompt_index)
        if len(index) != len(targets) or (index and not 0 <= min(index) <= max(index) < prompts.shape[0]):
            raise ValueError(f"prompt_index must give one of the {prompts.shape[0]} soft prompts per row")
        for i, target in enumerate(targets):
            if not target.strip():
                raise ValueError(f"row {i}: an empty continuation has no log-likelihood to score")
        out: List[Tuple[float, bool]] = []
        step = max(1, int(self.score_batch_size))
        for start in range(0, len(targets), step):
            rows = slice(start, start + step)
            chunk_prompts = prompts[torch.as_tensor(index[rows], device=prompts.device)]
            out += self._score_chunk(chunk_prompts, prefixes[rows], targets[rows], end_of_text)
        return out

    def _score_chunk(self, prompts, prefixes, targets, end_of_text):
        if getattr(self, "conv_template", None) is not None:
            logits, labels = self._conversation_logits(prompts, prefixes, targets, end_of_text)
        else:
            with self._uncut_layout(end_of_text):
                out, labels = self.llm_forward(prompts, prefixes, targets)
                encoder_len = max(len(r) for r in self._encoder_rows(prefixes)) if self.is_encoder_decoder else 0
            self._check_uncut(prompts, labels, encoder_len)
            logits = out.logits
            if not self.is_encoder_decoder:
                # BOS is not part of a continuation (training labels it only for captions without prompt)
                labels = labels.clone()
                labels[:, prompts.shape[1]:prompts.shape[1] + len(self.bos_ids)] = -100
            if not end_of_text:
                labels = _drop_last_label(labels)  # the EOS id that _uncut_layout put at the end
        if not self.is_encoder_decoder:  # logits at position t predict the token at t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        scored = labels != -100
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_lp = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = (token_lp * scored).sum(dim=1)
        greedy = ((logits.argmax(dim=-1) == labels) | ~scored).all(dim=1)
        return [(float(t), bool(g)) for t, g in zip(total.tolist(), greedy.tolist())]

    @contextlib.contextmanager
    def _uncut_layout(self, end_of_text: bool):
        """llm_forward's layout, with nothing cut at max_txt_len / max_output_txt_len and, without
        `end_of_text`, with the EOS id in place of end_sym: always one token, the last one, which
        the score then leaves out (end_sym may merge with the text's last token: ".\\n")."""
        saved = (self.end_sym, self.max_txt_len, self.max_output_txt_len)
        if not end_of_text and self.llm_tokenizer.eos_token_id is None:
            raise ValueError(f"{type(self).__name__}: the LLM's tokenizer has no EOS token, which scoring "
                             f"a continuation without its end of text relies on")
        try:
            if not end_of_text:
                self.end_sym = None
            self.max_txt_len = self.max_output_txt_len = _UNCUT
            yield
        finally:
            self.end_sym, self.max_txt_len, self.max_output_txt_len = saved

    def _check_uncut(self, prompts, labels, encoder_len):
        """A row longer than the model cuts text in training and generation is an error, not a
        score of part of it."""
        if self.is_encoder_decoder:
            dec = int((labels != -100).sum(dim=1).max())
            too_long = [(encoder_len, self.max_txt_len, "max_txt_len (context)")] + [
                (dec, self.max_output_txt_len, "max_output_txt_len (continuation)")]
        else:
            text = labels.shape[1] - prompts.shape[1]
            too_long = [(text, self.max_txt_len, "max_txt_len (context + continuation)")]
        for length, limit, what in too_long:
            if length > limit:
                raise ValueError(f"{type(self).__name__}: a row of {length} tokens is longer than the model's "
                                 f"{what} = {limit}: raise max_txt_len (config key, or the lmms-eval model "
                                 f"arg) rather than score a cut text")

    def _conversation_logits(self, prompts, prefixes, targets, end_of_text):
        """VL-Vicuna in conversation mode: one turn (prefix as the user's message, target as the
        assistant's answer) rendered as training renders it; labels on the answer and, with
        end_of_text, its closing separator."""
        sep = self.conv_template.sep
        rows, label_rows = [], []
        for prefix, target in zip(prefixes, targets):
            tokens = self.tokenize_conversation([(prefix, target)])
            labels = list(tokens.labels)
            if not end_of_text:
                answer = self.conv_template.check_message(target, "assistant")
                with_sep, bare = self._encode_piece(f" {answer}{sep}"), self._encode_piece(f" {answer}")
                if with_sep[:len(bare)] != bare:
                    raise ValueError(f"the tokenizer merges the answer {answer!r} with the separator {sep!r}: "
                                     f"its log-likelihood without the separator is not a sum over its tokens")
                scored = [i for i, label in enumerate(labels) if label != -100]
                for i in scored[len(scored) - (len(with_sep) - len(bare)):]:
                    labels[i] = -100
            rows.append(tokens.ids)
            label_rows.append(labels)
        self._check_context(rows, 0)
        embeds, mask = self._embed_rows(rows, prompts, left_pad=False)
        labels = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
        for i, row in enumerate(label_rows):
            labels[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        with self.maybe_autocast():
            logits = self.llm_model(inputs_embeds=embeds, attention_mask=mask, return_dict=True).logits
        return logits, labels


def _drop_last_label(labels: torch.Tensor) -> torch.Tensor:
    """Labels with each row's last scored position set to -100."""
    scored = labels != -100
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last = torch.where(scored, positions, -1).max(dim=1).values
    out = labels.clone()
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] = -100
    return out

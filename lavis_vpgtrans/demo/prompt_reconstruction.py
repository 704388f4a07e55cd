"""How well a trained P-Former's prompts make its frozen LLM reproduce a sentence: the
reconstruction the P-Former method relies on (without it, L_align has nothing to align to).

For held-out sentences, the frozen LLM is given (a) the sentence's own P-Former prompts and
(b) another sentence's (the list rolled by one), laid out exactly as stage 0 / stage 2 lay out
soft prompts (FrozenLLM.llm_forward: prompts, BOS, sentence, end of text). Scored:

- teacher-forced token accuracy (argmax = the next token), on all sentence tokens and on the
  tokens of content words only (colours, shapes, positions: what an image would have to tell);
- greedy decoding from the prompts: the fraction of the sentence's content words that the
  generated text has at the same word position.

Own far above other: the prompts carry the sentence's content. Own near other: they carry only
what every sentence shares (the LLM's prior), and aligning image queries to them teaches
nothing about the image.
"""

import re
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from lavis_vpgtrans.models.llm import FrozenLLM, pad_rows
from lavis_vpgtrans.toy.world import CELLS, COLORS, SHAPES

CONTENT_WORDS = frozenset(set(COLORS) | set(SHAPES) | {w for cell in CELLS for w in cell.split()})
WORD = re.compile(r"[A-Za-z]+")
BATCH = 64


class PromptedLM(FrozenLLM, nn.Module):
    """A frozen LLM that takes soft prompts, as the P-Former's training model holds it."""

    def __init__(self, llm_model: str, max_txt_len: int = 48):
        nn.Module.__init__(self)
        self.init_llm(llm_model, "fp32")
        self.max_txt_len = max_txt_len
        self.max_output_txt_len = max_txt_len
        self.llm_model.eval()

    @property
    def device(self):
        return torch.device("cpu")


def content_mask(lm: FrozenLLM, texts: Sequence[str], labels: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Bool mask over `labels` (as llm_forward returns them) of the tokens overlapping a content word."""
    rows = []
    for text in texts:
        spans = [(m.start(), m.end()) for m in WORD.finditer(text) if m.group(0) in CONTENT_WORDS]
        enc = lm.llm_tokenizer(text + (lm.end_sym or ""), add_special_tokens=False, return_offsets_mapping=True)
        flags = [any(s < e2 and s2 < e for s2, e2 in spans) for s, e in enc["offset_mapping"]]
        if lm.is_encoder_decoder:
            rows.append((flags + [False])[: lm.max_output_txt_len])
        else:
            rows.append(([False] * len(lm.bos_ids) + flags)[: lm.max_txt_len])
    mask = pad_rows(rows, 0)[0].bool()
    if not lm.is_encoder_decoder:
        mask = torch.cat([torch.zeros(mask.shape[0], n_prompt, dtype=torch.bool), mask], 1)
    if mask.shape != labels.shape:
        raise ValueError(f"content mask {tuple(mask.shape)} does not match the labels {tuple(labels.shape)}")
    return mask


@torch.no_grad()
def teacher_forced_counts(lm: FrozenLLM, prompts: torch.Tensor, texts: Sequence[str]) -> Dict[str, int]:
    out, labels = lm.llm_forward(prompts, [""] * len(texts), list(texts))
    content = content_mask(lm, texts, labels, prompts.shape[1])
    logits = out.logits
    if not lm.is_encoder_decoder:  # position t predicts token t + 1
        logits, labels, content = logits[:, :-1], labels[:, 1:], content[:, 1:]
    scored = labels != -100
    right = logits.argmax(-1).eq(labels)
    return {"tokens_right": int((right & scored).sum()), "tokens": int(scored.sum()),
            "content_right": int((right & content).sum()), "content": int(content.sum())}


@torch.no_grad()
def greedy_texts(lm: FrozenLLM, prompts: torch.Tensor, max_new_tokens: int = 40) -> List[str]:
    embed = lm.llm_model.get_input_embeddings()
    n = prompts.shape[0]
    if lm.is_encoder_decoder:
        start = torch.full((n, 1), lm.llm_tokenizer.eos_token_id)  # the empty text prompt's EOS
    else:
        start = torch.tensor([lm.bos_ids] * n, dtype=torch.long)
    inputs = torch.cat([prompts, embed(start)], 1)
    out = lm.llm_model.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=lm.llm_tokenizer.pad_token_id, **lm.generation_end())
    return [lm.cut_at_end(t) for t in lm.llm_tokenizer.batch_decode(out, skip_special_tokens=True)]


def greedy_content_counts(generated: Sequence[str], texts: Sequence[str]) -> Dict[str, int]:
    """Content words of each text that its generated text has at the same word position."""
    right = total = exact = 0
    for gen, text in zip(generated, texts):
        gen_words, words = gen.split(), text.split()
        exact += gen.strip() == text.strip()
        for i, word in enumerate(words):
            if word.strip(",:?") in CONTENT_WORDS:
                total += 1
                right += i < len(gen_words) and gen_words[i].strip(",:?") == word.strip(",:?")
    return {"greedy_content_right": right, "greedy_content": total, "greedy_exact": exact}


@torch.no_grad()
def reconstruction(encoder: nn.Module, lm: FrozenLLM, sentences: Sequence[str], greedy: bool = True) -> dict:
    """Own vs another sentence's prompts on `sentences` (see the module docstring); also the
    mean cosine between different sentences' [CLS] (1.0: the encoder tells none apart)."""
    texts = list(sentences)
    if len(texts) < 2:
        raise ValueError("reconstruction needs at least two sentences (another sentence's prompts)")
    encoder.eval()
    outputs = [encoder(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]
    prompts = torch.cat([p for p, _ in outputs]).float()
    cls = nn.functional.normalize(torch.cat([c for _, c in outputs]).float(), dim=-1)
    result = {"sentences": len(texts)}
    for name, used in (("own", prompts), ("other", prompts.roll(1, 0))):
        counts: Dict[str, int] = {}
        for i in range(0, len(texts), BATCH):
            part = teacher_forced_counts(lm, used[i:i + BATCH], texts[i:i + BATCH])
            if greedy:
                part.update(greedy_content_counts(greedy_texts(lm, used[i:i + BATCH]), texts[i:i + BATCH]))
            counts = {k: counts.get(k, 0) + v for k, v in part.items()}
        scores = {"token_acc": counts["tokens_right"] / counts["tokens"],
                  "content_acc": counts["content_right"] / max(counts["content"], 1)}
        if greedy:
            scores["greedy_content_acc"] = counts["greedy_content_right"] / max(counts["greedy_content"], 1)
            scores["greedy_exact"] = counts["greedy_exact"] / len(texts)
        result[name] = scores
    sim = cls @ cls.T
    result["cls_cosine_between_sentences"] = float(sim[~torch.eye(len(texts), dtype=torch.bool)].mean())
    return result

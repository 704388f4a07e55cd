"""lmms-eval's requests served by our models, without importing lmms-eval (model.py adds its
base class), so the same code runs in the plugin's own environment and tests.

Model args (`--model_args k=v,...`):
  arch           a registered model class (fixed by the per-class model names, e.g. vpgtrans_opt)
  model_type     its model type (default yaml), e.g. pretrain_opt2.7b, vl_llama7b, tiny_opt_small
  checkpoint     a trained checkpoint (trainable parameters only: a transfer run's checkpoint_best.pth)
  llm_model      the LLM (hub id or local dir) in place of the model type's
  prompt         "" (default): the task's text as the prefix; "vqa": the model's vqa_prompt
                 (its eval protocol, e.g. "Question: {} Answer:"); or a template with "{}"
  max_txt_len    text tokens the model takes (default: its config's); a longer context is an error
  score_end_of_text  loglikelihood scores the continuation and its end of text (a complete
                 answer, as predict_answers(inference_method="rank") does); default false
  loglikelihood_as   "loss" (default): loglikelihood returns -log P(continuation), what
                 lmms-eval 0.7.3's multiple_choice ranks by (the argmin: its own models return
                 their loss, EvolvingLMMs-Lab/lmms-eval#370); "logprob": log P(continuation), the
                 documented contract (its perplexity aggregation expects that)
  batch_size, device (as lmms-eval passes them)
"""

import json
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lavis_vpgtrans.models.loading import load_chat_model

logger = logging.getLogger(__name__)

# lmms-eval generation_kwargs -> our generate arguments (transformers generate(), LAVIS's min_length)
GENERATION_KEYS = {"max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "length_penalty",
                   "repetition_penalty", "min_length"}
DEFAULT_MAX_NEW_TOKENS = 128
IMAGE_TAG = "<image>"  # some tasks put it in the text; our soft prompts come first, always


class VPGTransAdapter:
    arch: Optional[str] = None  # set by the per-class subclasses

    def __init__(self, arch: str = None, model_type: str = None, checkpoint: str = None, llm_model: str = None,
                 prompt: str = "", max_txt_len: int = None, score_end_of_text: bool = False,
                 loglikelihood_as: str = "loss", batch_size=1, device: str = None, max_batch_size=None):
        if self.arch and arch and arch != self.arch:
            raise ValueError(f"{type(self).__name__} is {self.arch}; drop arch={arch} or use the model name vpgtrans")
        arch = self.arch or arch
        if not arch or not model_type:
            raise ValueError("model args: arch (for the model name vpgtrans) and model_type are required, "
                             "e.g. --model vpgtrans_opt --model_args model_type=pretrain_opt2.7b")
        if loglikelihood_as not in ("loss", "logprob"):
            raise ValueError(f"model arg loglikelihood_as must be loss or logprob, got {loglikelihood_as!r}")
        self.loglikelihood_sign = -1.0 if loglikelihood_as == "loss" else 1.0
        device = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
        options = [f"max_txt_len={int(max_txt_len)}"] if max_txt_len else []
        self.model, self.vis_processor = load_chat_model(arch, model_type, llm_model=llm_model, checkpoint=checkpoint,
                                                         device=device, options=options)
        self.prompt = self.model.vqa_prompt if prompt == "vqa" else str(prompt or "")
        self.score_end_of_text = _flag("score_end_of_text", score_end_of_text)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self._device = torch.device(device)
        if not hasattr(self, "task_dict"):  # lmms-eval's base class sets it (outside lmms-eval: tests)
            self.task_dict = {}
        self._warned = set()
        logger.info("lmms-eval model %s %s: prompt %r, max_txt_len %d", arch, model_type, self.prompt,
                    self.model.max_txt_len)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    # ------------------------------------------------------------------ inputs

    def _image(self, doc_to_visual, task, split, doc_id) -> torch.Tensor:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1:
            raise ValueError(f"{task} doc {doc_id}: {len(visuals)} images; our models take exactly one per request")
        return self.vis_processor(visuals[0].convert("RGB"))

    def _images(self, args_list) -> torch.Tensor:
        return torch.stack([self._image(*args) for args in args_list]).to(self.device)

    def prefix(self, context: str) -> str:
        """The text after the soft prompts: the task's context, in the model's prompt if one is set."""
        context = context.replace(IMAGE_TAG, "").strip()
        if not self.prompt:
            return context
        return self.prompt.format(context) if "{}" in self.prompt else self.prompt + context

    def _check_length(self, prefixes: Sequence[str]) -> None:
        """Training and generation cut text at max_txt_len; an evaluation prompt cut at its end
        (where the question is) would be scored silently wrong, so it is an error here."""
        model, tok = self.model, self.model.llm_tokenizer
        if getattr(model, "conv_template", None) is not None:
            return  # conversation mode: the model checks max_context_len itself
        for p in prefixes:
            if model.is_encoder_decoder:  # with T5's closing </s>
                n = len(tok(p).input_ids)
            else:
                n = len(model.bos_ids) + len(tok(p, add_special_tokens=False).input_ids)
            if n > model.max_txt_len:
                raise ValueError(f"a context of {n} tokens is longer than the model's max_txt_len "
                                 f"{model.max_txt_len}: pass max_txt_len=N in --model_args")

    # ------------------------------------------------------------------ generate_until

    def generation_args(self, gen_kwargs: Optional[dict]) -> Tuple[dict, List[str]]:
        """(our generate arguments, `until` stop strings) from a request's generation_kwargs."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        unknown = sorted(set(gen_kwargs) - GENERATION_KEYS)
        if unknown and tuple(unknown) not in self._warned:
            self._warned.add(tuple(unknown))
            logger.warning("generation_kwargs %s are not generate() arguments of ours: ignored", unknown)
        args = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                "num_beams": int(gen_kwargs.get("num_beams") or 1),
                "length_penalty": float(gen_kwargs.get("length_penalty", 1.0)),
                "repetition_penalty": float(gen_kwargs.get("repetition_penalty") or 1.0),
                "min_length": int(gen_kwargs.get("min_length") or 1)}
        temperature = float(gen_kwargs.get("temperature") or 0)
        if gen_kwargs.get("do_sample") or temperature > 0:
            args.update(do_sample=True, temperature=temperature or 1.0)
            if gen_kwargs.get("top_p") is not None:
                args["top_p"] = float(gen_kwargs["top_p"])
        else:
            args["do_sample"] = False
        return args, until

    @torch.no_grad()
    def generate_until(self, requests) -> List[str]:
        """Each request: (context, generation_kwargs, doc_to_visual, doc_id, task, split). Requests
        with the same generation_kwargs run in batches of batch_size (left-padded, as our
        generate does); the text is cut at the model's end of text and at the first `until`."""
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            args, until = self.generation_args(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prefixes = [self.prefix(requests[i].args[0]) for i in chunk]
                self._check_length(prefixes)
                images = self._images([_visual_args(requests[i].args) for i in chunk])
                texts = self.model._generate(images, prefixes, num_return_sequences=1, **args)
                for i, text in zip(chunk, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop, 1)[0]
                    results[i] = text
        return results

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("lavis-vpgtrans models: multi-round generation is not supported")

    # ------------------------------------------------------------------ loglikelihood

    def split_continuation(self, prefix: str, continuation: str) -> str:
        """The answer text of the training layout (prefix + " " + answer for a decoder-only LLM;
        the decoder's text for Flan-T5; the assistant's turn for VL-Vicuna) from lmms-eval's
        continuation, which carries the word boundary (" red")."""
        conversation = getattr(self.model, "conv_template", None) is not None
        if self.model.is_encoder_decoder or conversation or not prefix:
            return continuation[1:] if continuation.startswith(" ") else continuation
        if not continuation.startswith(" "):
            raise ValueError(f"continuation {continuation!r}: our decoder-only models score an answer as they "
                             f"were trained, after the prefix and one space (set target_delimiter: \" \")")
        return continuation[1:]

    @torch.no_grad()
    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        """Each request: (context, continuation or doc_to_target, doc_to_visual, doc_id, task,
        split) -> (-log P(continuation | soft prompts, context), or + with loglikelihood_as=logprob;
        is greedy), by the model's scorer (models/scoring.py), each image encoded once per batch."""
        results: List[Tuple[float, bool]] = []
        rows = self.batch_size * 16  # scored rows (e.g. the choices of a question) per batch of images
        for start in range(0, len(requests), rows):
            chunk = [r.args for r in requests[start:start + rows]]
            docs: Dict[tuple, int] = {}
            index, prefixes, answers = [], [], []
            for context, target, doc_to_visual, doc_id, task, split in chunk:
                key = (task, split, doc_id)
                docs.setdefault(key, len(docs))
                index.append(docs[key])
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                prefix = self.prefix(context)
                prefixes.append(prefix)
                answers.append(self.split_continuation(prefix, continuation))
            first = {}
            for args in chunk:
                first.setdefault((args[4], args[5], args[3]), _visual_args(args))
            images = self._images(list(first.values()))
            prompts = self.model.encode_image(images)
            scores = self.model.score_continuations(prompts, prefixes, answers, end_of_text=self.score_end_of_text,
                                                    prompt_index=index)
            results += [(self.loglikelihood_sign * logprob, greedy) for logprob, greedy in scores]
        return results


def _visual_args(args) -> tuple:
    """(doc_to_visual, task, split, doc_id) of a request's args (context, x, doc_to_visual, doc_id, task, split)."""
    return args[2], args[4], args[5], args[3]


def _flag(name: str, value) -> bool:
    """A boolean model arg (lmms-eval parses true / false; a string that is neither is an error)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"model arg {name} must be true or false, got {value!r}")

"""Per rank: weights, gradients, optimizer state and activations of one training step, and the
verdict for a card.

What a training step keeps (bytes), from the config's numbers -- B = run.batch_size_train,
q = num_query_token, text = max_txt_len, T = q + text tokens through a decoder-only LLM:

  weights      weights.py, exact; with run.fsdp each FSDP unit (LLM / ViT block) and the root
               (everything else) are sharded over the ranks at rest, but the root is gathered for
               the whole step and two blocks at a time (the one running and the one prefetched)
  gradients    fp32, as the trainable parameters (the projector; in stage 2 also the Q-Former,
               query tokens, ln_vision and LoRA adapters); DDP keeps a second copy in its buckets
  optimizer    AdamW's exp_avg and exp_avg_sq, fp32 (LAVIS keeps the trainable parts in fp32: no
               master copy); sharded with run.fsdp
  activations  what autograd keeps for the backward pass. The LLM is frozen, so its linear
               layers keep no input (the gradient to their input needs only the weight), yet
               gradients flow through it to the soft prompts, so the rest is kept. Per LLM layer and
               token (h hidden, f MLP width, a heads, s bytes of the compute dtype), as measured
               on one layer of each family (tests/test_plan.py re-measures them):
                 OPT          2 layer-norm inputs + q, k, v, out of SDPA + ReLU's output:
                              2h s_res + 4h s + f s + 4 a (SDPA's fp32 log-sum-exp)
                 LLaMA-like   2 RMSNorm inputs in fp32 + q, k, v (k / v repeated to all heads),
                 (Qwen2,      out + the gated MLP's gate, SiLU and up outputs:
                 Mistral)     8h + 4h s + 3f s + 4 a
                 Flan-T5      T5LayerNorm's fp32 copy (+ its input below fp32), q, k, v, the
                              attention probabilities (eager: fp32 and in s, per head and key),
                              the gated MLP; the decoder's cross-attention keys and values
                 int8         Linear8bitLt keeps its inputs: +3h s_res (+f s_res gated)
                 LoRA         each adapter's dropout output (+ mask) and its r-wide middle
               run.activation_checkpointing.llm: one hidden state per layer and token, plus one
               layer recomputed in backward. Backward's working set: the hidden states' gradients
               in flight, and for eager attention (T5) the probabilities' and scores' gradients. The head: log-softmax of the logits in fp32 (4 B V per
               token) kept, and 8 B V per token more at the start of backward (the gradients of the
               log-probabilities and of the logits). The Q-Former (stage 2) is counted op by op
               (dropout masks included), the ViT runs without a graph (its forward peak is one
               block's working set, reached before the LLM runs).
  peak         the largest of: the start of backward (weights, optimizer, activations, and the
               gradients when accumulation keeps them), the moment the VPG's gradients appear (the
               LLM's activations freed), the ViT's forward; the card
               needs it x (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB (assumptions about the CUDA
               caching allocator and the context, not measured here: no GPU was lent).
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from lavis_vpgtrans.plan.weights import PlanError, model_parts

GIB = 2 ** 30
ALLOCATOR_SLACK = 0.10  # CUDA caching allocator rounding and fragmentation (assumed)
CUDA_CONTEXT_GIB = 0.75  # CUDA context, cuBLAS / cuDNN workspaces, outside torch's allocator (assumed)
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per trainable parameter
LOGSOFTMAX_KEPT = 4  # bytes per token per vocabulary entry kept: the fp32 log-probabilities
LOSS_BACKWARD_EXTRA = 8  # ... and transient at the start of backward: their gradient and the logits'
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass
class Setting:
    """What the plan is for, besides the model config."""

    batch: int
    gpus: int = 1
    fsdp: Optional[dict] = None  # run.fsdp: {shard_llm, shard_vit} or None (DDP / one process)
    checkpointing: Optional[dict] = None  # run.activation_checkpointing: {llm, qformer} or None
    amp_on_gpu: bool = True  # run.amp on CUDA: the Q-Former's linears run in fp16 under autocast
    on_gpu: bool = True  # CUDA keeps dropout masks as bool, the CPU as fp32
    accum: int = 1  # run.accum_grad_iters: above 1, the gradients live through the next micro-steps
    text_len: Optional[int] = None  # text tokens (default: max_txt_len, the longest a batch pads to)


@dataclass
class StagePlan:
    stage: int
    parts: list
    info: object  # weights.LLMInfo
    rows: Dict[str, float]  # per-rank bytes by component
    activations_per_sample: float
    activation_detail: Dict[str, float]
    fixed: float  # everything but the activations
    peak: float
    phases: list = field(default_factory=list)  # (moment, bytes, bytes per sample) of each candidate peak
    batch: int = 1

    @property
    def peak_at(self) -> str:
        """The moment of the peak."""
        return max(self.phases, key=lambda ph: ph[1] + ph[2] * self.batch)[0]


def flag_config(value, defaults):
    """run.fsdp / run.activation_checkpointing as common/sharding.py reads them: None, or the flags."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(defaults)
    return {**defaults, **dict(value)}


def stages_of(cfg) -> List[int]:
    """The VPGTrans stages a run trains (runners/runner_vpgtrans.py), else by model.train_vpg."""
    run = cfg.run_cfg
    if run.get("runner", None) == "runner_vpgtrans":
        warmup = int(run.get("warmup_epochs", 1))
        max_epoch = run.get("max_epoch", None)
        stages = ([1] if warmup > 0 else []) + ([2] if max_epoch is None or int(max_epoch) > warmup else [])
        return stages or [1]
    return [2] if cfg.model_cfg.get("train_vpg", True) else [1]


def llm_activations(info, batch: int, q: int, text: int, output_text: int, checkpointing: bool,
                    mask_bytes: int = 1, lora_trains: bool = True) -> Dict[str, float]:
    """Bytes the LLM keeps for backward (per component), and the transient at the start of backward
    (`mask_bytes`: of a dropout mask element, the adapters' only dropout: bool on CUDA, fp32 on CPU)."""
    s_llm = info.llm_dtype_bytes
    quant = info.quant
    s = DTYPE_BYTES[quant["compute_dtype"]] if quant and quant["bits"] == 4 else s_llm  # matmul outputs
    s_res = 4 if info.qlora else s_llm  # residual stream: QLoRA's embeddings are fp32
    h, f, a, V = info.hidden, info.intermediate, info.heads, info.vocab
    out = {}
    if info.encoder_decoder:
        inner = info.inner
        te, td = q + text, output_text + 1  # encoder: queries + prefix; decoder: target + EOS
        ne, nd = batch * te, batch * td
        ff = (3 if info.gated else 1) * f * s
        probs = 4 + (s if s != 4 else 0)  # softmax in fp32, and its cast to the compute dtype
        norm = 4 * h + 4 + (s * h if s != 4 else 0)  # T5LayerNorm: fp32 copy + rsqrt, and its input below fp32
        enc_layer = ne * (2 * norm + 3 * inner * s + a * te * probs + ff)
        dec_layer = nd * (3 * norm + 4 * inner * s + a * td * probs + a * te * probs + ff) + ne * 2 * inner * s
        if checkpointing:
            out["LLM layers (checkpointed)"] = info.layers * ne * h * s_res + info.decoder_layers * nd * h * s_res \
                + max(enc_layer, dec_layer)
        else:
            out["LLM layers"] = info.layers * enc_layer + info.decoder_layers * dec_layer
        tokens = nd
        out["LLM final norms"] = (ne + nd) * norm
        # backward: the hidden states' gradients in flight (the encoder output's accumulates over
        # the decoder's cross-attentions)
        out["hidden-state gradients (transient)"] = 2 * (ne + nd) * h * s_res
        # eager attention's backward: the gradients of the probabilities and of the scores, fp32
        out["attention backward (transient)"] = batch * a * max(te * te, td * te) * 8
    else:
        t = q + text
        n = batch * t
        # QLoRA's fp32 residual stream: bitsandbytes returns its matmuls in their input's dtype, so
        # the MLP's activations are fp32 too; SDPA runs under autocast in the compute dtype
        s_mlp = s_res
        if info.model_type == "opt":
            per_token = 2 * h * s_res + 4 * h * s + f * s_mlp + 4 * s_res + 4 * a
        else:
            per_token = 8 * h + 4 * h * s + 3 * f * s_mlp + 8 + 4 * a
        if quant and quant["bits"] == 8:
            # Linear8bitLt keeps each linear layer's input (not its fp16 cast): the layer's distinct
            # inputs not kept otherwise, the two normed hidden states and attention's output, and
            # the gated MLP's product (ReLU's output is kept already)
            per_token += (3 * h + (f if info.gated else 0)) * s_res
        layer = n * per_token
        if checkpointing:
            out["LLM layers (checkpointed)"] = info.layers * n * h * s_res + layer
        else:
            out["LLM layers"] = info.layers * layer
        out["attention mask"] = batch * t * t * s  # the 4-D padding mask SDPA gets, shared by the layers
        tokens = n
        out["LLM final norm"] = n * 4 * h
        out["hidden-state gradients (transient)"] = 2 * n * h * s_res  # the one arriving and the one leaving a layer
    if info.lora_rank_total:
        lora_tokens = tokens if not info.encoder_decoder else batch * (q + text + output_text + 1) / 2
        dropout = info.lora_dropout > 0
        # training adapters keep their dropout's output (in the residual stream's dtype) and mask, and
        # their r-wide middle; frozen ones (stage 1) only the mask, for the gradient to their input
        if lora_trains:
            kept = lora_tokens * (info.lora_in_total * ((s_res + mask_bytes) if dropout else 0) + info.lora_rank_total * s)
        else:
            kept = lora_tokens * info.lora_in_total * (mask_bytes if dropout else 0)
        out["LoRA adapters"] = kept / (1 if not checkpointing else max(1, info.layers + info.decoder_layers))
    out["log-probabilities (fp32)"] = tokens * V * LOGSOFTMAX_KEPT
    out["loss backward (transient)"] = tokens * V * LOSS_BACKWARD_EXTRA
    return out


def text_tokens(model_cfg) -> int:
    """Text tokens per row: max_txt_len (rows are cut there); VL-Vicuna's conversations (stage 3,
    conv_template) hold the template and question (~max_txt_len) and an answer cut at max_output_txt_len."""
    text = int(model_cfg.get("max_txt_len", 32))
    if model_cfg.get("conv_template", None):
        text += int(model_cfg.get("max_output_txt_len", None) or 32)
    return text


def qformer_activations(d, batch: int, image_tokens: int, vit_width: int, trains: bool, checkpointing: bool,
                        amp: bool, mask_bytes: int = 1) -> Dict[str, float]:
    """Bytes the Q-Former keeps when it trains (stage 2), as measured on LAVIS's BertModel in train
    mode (tests/test_plan.py): per layer, self-attention + query FFN keep 8 q x d, 2 H x q x q and
    2 q x I fp32 tensors, plus dropout masks on 2 q x d and H x q x q (bool on CUDA, fp32 on CPU) and
    the layer norms' statistics; a cross-attention layer 4 q x d, its keys and values 2 n x d, 2
    H x q x n, masks on q x d and H x q x n; the image features (n x W, fp32) once. In stage 1 only
    the projector's input. Under CUDA amp the linear layers keep fp16 copies of their inputs: half
    the q x d / n x d / q x I bytes, and one fp16 copy of the image features per key / value layer."""
    q, hd, H, I = d["queries"], d["hidden"], d["heads"], d["intermediate"]
    if not trains:
        return {"projector input": batch * q * hd * 4}
    n, m = image_tokens, mask_bytes
    s = 2 if amp else 4
    self_ffn = (8 * q * hd + 2 * q * I) * s + 2 * H * q * q * 4 + (2 * q * hd + H * q * q) * m + 16 * q
    cross = (4 * q * hd + 2 * n * hd) * s + 2 * H * q * n * 4 + (q * hd + H * q * n) * m + 8 * q \
        + (2 * n * vit_width * 2 if amp else 0)
    n_cross = math.ceil(d["layers"] / d["every"])
    per_sample = d["layers"] * self_ffn + n_cross * cross
    # the image features (fp32 after ln_vision), read by every cross-attention, and the query
    # embeddings' layer norm input and dropout mask
    shared = n * vit_width * 4 + q * hd * (4 + m) + 8 * q
    if checkpointing:
        per_sample = d["layers"] * q * hd * 4 + (self_ffn + cross)
    return {"Q-Former": batch * (per_sample + shared),
            # backward through a layer needs the gradients of what it kept: about its size again
            "Q-Former backward (transient)": batch * (self_ffn + cross),
            "projector input": batch * q * hd * 4}


def vit_forward_peak(d, batch: int, amp: bool = False) -> float:
    """The frozen ViT's working set within one block (no graph is kept): the larger of its attention
    (x, its norm, qkv, scaled q, scores and probabilities, fp32 under autocast) and its MLP (x, norm,
    fc1 and GELU outputs)."""
    n, w, H, mlp, s = d["tokens"], d["width"], d["heads"], d["mlp"], d["bytes_per_el"]
    attention = n * 6 * w * s + H * n * n * (s + (4 if amp or s == 4 else s))
    return batch * max(attention, n * (2 * w + 2 * mlp) * s)


def plan_stage(model_cfg, setting: Setting, stage: int, parts_cache: dict) -> StagePlan:
    key = (repr(sorted(_flat(model_cfg).items())), stage)
    if key not in parts_cache:
        parts_cache[key] = model_parts(model_cfg, stage)
    built = parts_cache[key]
    parts = copy.deepcopy(built["parts"])
    info = built["llm"]
    n = max(1, setting.gpus)
    fsdp = setting.fsdp
    rows = {}
    # weights
    total_weights = sum(p.bytes for p in parts)
    if fsdp:
        units = [p for p in parts if (p.name == "LLM" and fsdp.get("shard_llm", True))
                 or (p.name == "ViT" and fsdp.get("shard_vit", True))]
        unit_bytes = sum(p.blocks_bytes for p in units)
        root = total_weights - unit_bytes
        rows["weights (sharded units, 1/N each)"] = unit_bytes / n
        rows["weights (root, gathered for the step)"] = root
        rows["weights (2 gathered blocks)"] = 2 * max([p.block_bytes for p in units], default=0) * (1 - 1 / n)
    else:
        rows["weights"] = total_weights
    trainable = sum(p.trainable_params for p in parts)
    rows["gradients (fp32)"] = trainable * 4  # FSDP: the root's unsharded gradients exist until reduce-scatter
    if not fsdp and n > 1:
        rows["DDP gradient buckets"] = trainable * 4
    rows["AdamW state (fp32 m, v)"] = trainable * ADAMW_STATE_BYTES / (n if fsdp else 1)

    ck = setting.checkpointing or {}
    q = int(model_cfg.get("num_query_token", 32))
    text = int(setting.text_len or text_tokens(model_cfg))
    output_text = int(model_cfg.get("max_output_txt_len", None) or text)
    act = {}
    act.update(llm_activations(info, 1, q, text, output_text, bool(ck.get("llm")), mask_bytes=1 if setting.on_gpu else 4,
                               lora_trains=stage == 2))
    act.update(qformer_activations(built["qformer_dims"], 1, built["vit_dims"]["tokens"], built["vit_dims"]["width"],
                                   trains=stage == 2, checkpointing=bool(ck.get("qformer")), amp=setting.amp_on_gpu,
                                   mask_bytes=1 if setting.on_gpu else 4))
    per_sample = sum(act.values())
    fixed = sum(rows.values())
    b = setting.batch
    rows["activations"] = per_sample * b
    # The peak is the largest of three moments, each a base plus bytes per sample:
    #   backward starts: every activation kept, the loss's transients; gradients only if they
    #     survive from the previous micro-step (accum_grad_iters > 1; LAVIS's loop sets them to None
    #     after each optimizer step) and the adapters' (made while the LLM's activations live)
    #   the VPG's gradients all made: the activations are gone
    #   the ViT's forward (no graph, one block's working set)
    grads = rows["gradients (fp32)"]
    lora_grads = sum(p.trainable_params for p in parts if p.name == "LoRA") * 4
    kept_grads = grads if setting.accum > 1 else lora_grads
    base = fixed - grads
    # (as the Q-Former's backward runs, its gradients replace its activations layer by layer: at
    # most all of one or all of the other, besides the base)
    phases = [("the start of backward", base + kept_grads, per_sample),
              ("all gradients made", base + grads, 0),
              ("the ViT's forward", base + kept_grads, vit_forward_peak(built["vit_dims"], 1, amp=setting.on_gpu))]
    peak = max(base_ + b * per for _, base_, per in phases)
    return StagePlan(stage, parts, info, rows, per_sample, act, fixed, peak, phases, b)


def _flat(cfg) -> dict:
    from omegaconf import OmegaConf

    return {k: repr(v) for k, v in OmegaConf.to_container(cfg, resolve=True).items()} if not isinstance(cfg, dict) \
        else {k: repr(v) for k, v in cfg.items()}


def card_bytes(gpu_gib: float) -> float:
    """The tensor bytes a card of `gpu_gib` holds after the context and the allocator's slack."""
    return (gpu_gib - CUDA_CONTEXT_GIB) * GIB / (1 + ALLOCATOR_SLACK)


def largest_batch(stage_plan: StagePlan, gpu_gib: float) -> int:
    """The largest batch whose every candidate peak fits the card."""
    room = card_bytes(gpu_gib)
    return max(0, min(int((room - base) // per) if per > 0 else (10 ** 9 if room >= base else 0)
                      for _, base, per in stage_plan.phases))


@dataclass
class Plan:
    setting: Setting
    stages: List[StagePlan]
    info: object
    gpu_gib: Optional[float] = None
    alternatives: List[tuple] = field(default_factory=list)  # (label, peak at the config's batch, largest batch)

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak)

    def fits(self) -> Optional[bool]:
        if self.gpu_gib is None:
            return None
        return self.worst.peak <= card_bytes(self.gpu_gib)

    def largest_batch(self) -> Optional[int]:
        if self.gpu_gib is None:
            return None
        return min(largest_batch(s, self.gpu_gib) for s in self.stages)


def make_plan(model_cfg, setting: Setting, stages: List[int], gpu_gib: Optional[float] = None,
              parts_cache: Optional[dict] = None, alternatives: bool = True) -> Plan:
    parts_cache = {} if parts_cache is None else parts_cache
    if setting.fsdp and (model_cfg.get("llm_quantization", None) or model_cfg.get("llm_lora", None) not in (None, False)):
        raise PlanError("run.fsdp with model.llm_quantization or model.llm_lora: the runner refuses it "
                        "(common/sharding.py); remove run.fsdp (one process, or DDP)")
    stage_plans = [plan_stage(model_cfg, setting, s, parts_cache) for s in stages]
    plan = Plan(setting, stage_plans, stage_plans[0].info, gpu_gib)
    if gpu_gib is not None and alternatives:
        plan.alternatives = _alternatives(model_cfg, setting, stages, gpu_gib, parts_cache)
    return plan


def _alternatives(model_cfg, setting: Setting, stages, gpu_gib, parts_cache):
    """Settings that change what a rank holds, each planned at the config's batch."""
    from omegaconf import OmegaConf

    ck_on = {"llm": True, "qformer": True}
    quantized = bool(model_cfg.get("llm_quantization", None))
    lora = model_cfg.get("llm_lora", None) not in (None, False)
    options = []
    if setting.checkpointing != ck_on:
        options.append(("activation checkpointing (run.activation_checkpointing: true)", model_cfg,
                        dict(checkpointing=ck_on)))
    if not quantized:
        q4 = OmegaConf.merge(model_cfg, {"llm_quantization": {"bits": 4}})
        options.append(("4-bit LLM (model.llm_quantization.bits=4)", q4, {}))
        options.append(("4-bit LLM + activation checkpointing", q4, dict(checkpointing=ck_on)))
    if lora:
        no_lora = OmegaConf.merge(model_cfg, {"llm_lora": None})
        options.append(("LoRA off (model.llm_lora=null)", no_lora, {}))
    if not setting.fsdp and not quantized and not lora:  # (the runner refuses fsdp with either)
        gpus = setting.gpus if setting.gpus > 1 else 8
        options.append((f"run.fsdp on {gpus} GPUs", model_cfg, dict(fsdp={"shard_llm": True, "shard_vit": True},
                                                                     gpus=gpus)))
    out = []
    for label, cfg, change in options:
        alt = copy.copy(setting)
        for k, v in change.items():
            setattr(alt, k, v)
        try:
            p = make_plan(cfg, alt, stages, gpu_gib, parts_cache, alternatives=False)
        except PlanError:
            continue
        out.append((label, p.worst.peak, p.largest_batch()))
    return out

"""What a training step actually allocates, on any device torch runs on (CPU included): every
tensor storage created while the tracker is active is counted from its creation until it is
freed, once however many views share it, and the peak of the live total is kept.

Storages are tracked by a TorchDispatchMode (each op's outputs) and released by a weakref
finalizer on the storage (torch keeps one Python object per storage while it lives), which is
what torch.distributed._tools.mem_tracker does; that tool itself refuses frozen parameters.
Tensors allocated outside torch's dispatcher (none in these models) would be missed; the
allocator's rounding and caching are not counted (a CPU has no caching allocator).
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorBytes(TorchDispatchMode):
    """`with tracker:` counts the storages ops create; `track(t)` adds one created before."""

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self.current += nbytes
        weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.current)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


def quantization_state(param) -> list:
    """The tensors a bitsandbytes parameter holds beside its data: Params4bit's quant state (absmax,
    code, nested absmax, offset), Int8Params' per-row scales (SCB)."""
    out = []
    state = getattr(param, "quant_state", None)
    if state is not None:
        out += [state.absmax, state.code]
        if getattr(state, "nested", False):
            out += [state.state2.absmax, state.offset]  # (state2.code: one table shared by every layer)
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return [t for t in out if isinstance(t, torch.Tensor)]


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_training_steps(model, samples, steps: int = 2, lr: float = 1e-5, wrap=None) -> dict:
    """Bytes of a training step as LAVIS's loop runs it (forward, backward, AdamW step, gradients
    set to None), measured over the last of `steps` steps, so that the optimizer state exists as in
    every step after the first. Returns weights (parameters + buffers), gradients, optimizer state,
    and the peak of everything live (the samples' own tensors excluded)."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.05)
    tracker = LiveTensorBytes()
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t)
        for extra in quantization_state(t):
            tracker.track(extra)
    weights = tracker.current
    grads = optimizer_state = 0
    with tracker:
        if wrap is not None:  # e.g. DDP, whose gradient buckets are allocated when it wraps
            model = wrap(model)
        for step in range(steps):
            if step == steps - 1:
                tracker.reset_peak()
            loss = model(samples)["loss"]
            loss.backward()
            grads = _storage_bytes([p.grad for p in trainable if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimizer_state = _storage_bytes([v for state in optimizer.state.values() for v in state.values()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0])
    return dict(weights=weights, gradients=grads, optimizer=optimizer_state, peak=tracker.peak, loss=float(loss))


def long_text_samples(batch: int, image_size: int, encoder_decoder: bool, seed: int = 0) -> dict:
    """Random images and texts longer than any max_txt_len, so that every row is cut at it (the
    length the plan assumes); an encoder-decoder LLM gets a prefix-LM pair of such texts."""
    g = torch.Generator().manual_seed(seed)
    words = ["a red square", "next to", "the small blue circle", "on a green field"]
    text = " ".join(words[i % len(words)] for i in range(120))
    samples = {"image": torch.randn(batch, 3, image_size, image_size, generator=g), "text_input": [text] * batch}
    if encoder_decoder:
        samples["text_output"] = [text] * batch
    return samples


def plan_vs_measured(arch: str, model_cfg, batch: int, stage: int, steps: int = 2, seed: int = 0,
                     ddp: bool = False) -> dict:
    """One model config planned (weights.py / estimate.py, as on CPU: no autocast for the Q-Former)
    and measured over a real training step of the model it builds, in stage 1 (projector) or 2;
    `ddp`: this rank of a DDP run (torch.distributed initialised, gloo), planned per rank."""
    from lavis.common.registry import registry

    from lavis_vpgtrans.plan.estimate import Setting, make_plan

    torch.manual_seed(seed)
    model = registry.get_model_class(arch).from_config(model_cfg)
    model.set_trainable(train_vpg=stage == 2)
    samples = long_text_samples(batch, int(model_cfg.get("image_size", 224)), model.is_encoder_decoder, seed)
    gpus, wrap = 1, None
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        gpus, wrap = dist.get_world_size(), DistributedDataParallel
    measured = measure_training_steps(model, samples, steps=steps, wrap=wrap)
    plan = make_plan(model_cfg, Setting(batch=batch, gpus=gpus, amp_on_gpu=False, on_gpu=False), [stage],
                     alternatives=False)
    sp = plan.stages[0]
    planned = dict(weights=sum(p.bytes for p in sp.parts), gradients=sp.rows["gradients (fp32)"],
                   optimizer=sp.rows["AdamW state (fp32 m, v)"], peak=sp.peak, activations=sp.rows["activations"])
    return dict(planned=planned, measured=measured, detail=sp.activation_detail)


def random_llm_dir(hub_id: str, out_dir: str, tokenizer_dir: str, seed: int = 0, dtype=torch.float32) -> str:
    """A local HF directory holding `hub_id`'s architecture (plan/known.py) with random weights in
    `dtype`, and the tokenizer of `tokenizer_dir` (a smaller vocabulary whose ids fit the model's):
    a real-sized LLM to measure without downloading one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lavis_vpgtrans.plan.known import KNOWN_LLM_CONFIGS

    fields = dict(KNOWN_LLM_CONFIGS[hub_id][0])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, torch_dtype=dtype).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def random_vpg_dirs(out_dir: str, tokenizer_dir: str, vit_depth: int = 2, seed: int = 0) -> dict:
    """A BLIP-2-sized VPG with random weights, as local directories the model configs can name:
    a bert-base-sized BERT for the Q-Former (with `tokenizer_dir`'s WordPiece vocabulary) and an
    EVA ViT of ViT-g's width, heads and 224-pixel / 14-pixel patches (257 image tokens) but only
    `vit_depth` blocks (the ViT keeps no activations; its width and token count are what the
    Q-Former's cross-attention sees). Returns the model-config overrides naming them."""
    import os

    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    from lavis_vpgtrans.models.eva_vit import build_eva_vit, save_eva_vit_dir
    from lavis_vpgtrans.plan.known import EVA_VIT_G, KNOWN_BERT_CONFIGS

    torch.manual_seed(seed)
    bert_dir, vit_dir = os.path.join(out_dir, "bert-base"), os.path.join(out_dir, "vit-g-width")
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(KNOWN_BERT_CONFIGS["bert-base-uncased"][0], vocab_size=len(tokenizer))
    BertForMaskedLM(BertConfig(**fields)).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    vit_cfg = dict(img_size=224, **{**EVA_VIT_G, "depth": vit_depth})
    save_eva_vit_dir(build_eva_vit(vit_cfg), vit_cfg, vit_dir)
    return {"qformer_model": bert_dir, "vit_model": vit_dir, "image_size": 224, "num_query_token": 32}

"""The lmms-eval model classes (subclasses of lmms_eval.api.model.lmms): the adapter's
requests -> model calls, one class per registered model class of ours."""

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms

from lavis_vpgtrans.lmms.adapter import VPGTransAdapter


class VPGTransLMM(VPGTransAdapter, lmms):
    """Any registered VL-LLM of this plugin (model arg `arch`, e.g. blip2_opt_transfer)."""

    is_simple = True

    def __init__(self, **model_args):
        lmms.__init__(self)  # rank / world size, cache hook, task_dict
        VPGTransAdapter.__init__(self, **model_args)

    def loglikelihood(self, requests):
        # lmms-eval 0.7.3's evaluator turns every response but a str or a GenerationResult into
        # str(response) (api/instance.py, unwrap_generation_output), a (score, greedy) pair too;
        # a GenerationResult's text reaches the task as it is.
        return [GenerationResult(text=pair) for pair in VPGTransAdapter.loglikelihood(self, requests)]


class VPGTransOPT(VPGTransLMM):
    arch = "blip2_opt_transfer"


class VPGTransT5(VPGTransLMM):
    arch = "blip2_t5_transfer"


class VPGTransLLaMA(VPGTransLMM):
    arch = "blip2_llama"


class VPGTransVicuna(VPGTransLMM):
    arch = "blip2_vicuna"


class VPGTransCausalLM(VPGTransLMM):
    arch = "blip2_causal_lm"

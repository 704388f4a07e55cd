"""Log-likelihood scoring of continuations after soft prompts + context: ranks VQA answer
candidates (`predict_answers(..., inference_method="rank")`) and serves lmms-eval's
`loglikelihood` (lavis_vpgtrans/lmms.py) with the same code."""


class LogLikelihoodScorer:
    """Mixin of the VL-LLMs (before Blip2PluginBase in the bases)."""

    def rank_answers(self, image, prefixes, answer_list, num_ans_candidates=None):
        raise NotImplementedError("inference_method='rank': not yet implemented (issue 26)")

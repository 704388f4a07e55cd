"""lavis-vpgtrans models in lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval, 0.7.x).

    python -m lmms_eval --model vpgtrans_opt \
        --model_args model_type=pretrain_opt2.7b,checkpoint=CKPT,prompt=vqa --tasks ... --device cuda

  adapter.py  the requests -> our models (generate_until, loglikelihood); no lmms-eval import
  model.py    the lmms-eval model classes, one per registered class of ours
  tasks.py    functions the local task YAMLs (projects/lmms_eval/tasks/) name with !function
  docs.py     a LAVIS VQA eval split -> the documents those tasks read (JSON lines)

lmms-eval finds the models through the entry point group `lmms_eval.models` (setup.py), which
calls `manifests()`. lmms-eval 0.7.3 and its dependencies live in a separate environment
layered over .venv (.venv/tools: scripts/setup_tools_env.sh says why).
"""

# lmms-eval model name -> class in model.py
MODEL_CLASSES = {
    "vpgtrans": "VPGTransLMM",  # any registered arch (model arg `arch`)
    "vpgtrans_opt": "VPGTransOPT",
    "vpgtrans_t5": "VPGTransT5",
    "vpgtrans_llama": "VPGTransLLaMA",
    "vpgtrans_vicuna": "VPGTransVicuna",
    "vpgtrans_causal_lm": "VPGTransCausalLM",
}


def manifests():
    """The `lmms_eval.models` entry point: one ModelManifest per model name."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=f"lavis_vpgtrans.lmms.model.{cls}")
            for name, cls in MODEL_CLASSES.items()]

"""VL-Vicuna chat (and blip2_causal_lm's, in its LLM's chat template): the terminal chat (`python -m lavis_vpgtrans.chat`) and the web demo
(`python -m lavis_vpgtrans.chat.web`); the conversation template they share with training is
models/conversation.py, the model loading models/loading.py (re-exported here).

    from lavis_vpgtrans.chat import load_chat_model
    model, vis_processor = load_chat_model("blip2_vicuna", "vl_vicuna7b", llm_model=VICUNA_DIR,
                                           checkpoint="vl-vicuna.pth")
    answer = model.chat(vis_processor(pil_image), "Describe this image in detail.")
"""

from lavis_vpgtrans.chat.session import ChatEngine, ChatState
from lavis_vpgtrans.models.loading import load_chat_model

__all__ = ["ChatEngine", "ChatState", "load_chat_model"]

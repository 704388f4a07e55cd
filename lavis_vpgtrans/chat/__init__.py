"""VL-Vicuna chat: the conversation template (shared with training), the terminal chat
(`python -m lavis_vpgtrans.chat`) and the web demo (`python -m lavis_vpgtrans.chat.web`).

    from lavis_vpgtrans.chat import load_chat_model
    model, vis_processor = load_chat_model("blip2_vicuna", "vl_vicuna7b", llm_model=VICUNA_DIR,
                                           checkpoint="vl-vicuna.pth")
    answer = model.chat(vis_processor(pil_image), "Describe this image in detail.")
"""

from lavis_vpgtrans.chat.session import ChatEngine, ChatState, load_chat_model

__all__ = ["ChatEngine", "ChatState", "load_chat_model"]

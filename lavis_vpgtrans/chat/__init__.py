"""VL-Vicuna chat: the conversation template (shared with training), the terminal chat
(`python -m lavis_vpgtrans.chat`) and the web demo (`python -m lavis_vpgtrans.chat.web`)."""

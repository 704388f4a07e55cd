r"""Web demo of VL-Vicuna (Gradio): upload an image, then chat about it.

    python -m lavis_vpgtrans.chat.web --model-type vl_vicuna7b --llm-model VICUNA_DIR \
        --checkpoint vl-vicuna.pth [--host 127.0.0.1] [--port 7860] [--max-image-mb 10]

A blip2_causal_lm instruction-tuned on own_instruct chats in its LLM's own chat template:
`--model blip2_causal_lm --model-type qwen2.5_7b --llm-model QWEN_INSTRUCT_DIR --checkpoint CKPT`.

It listens on 127.0.0.1 (this machine only) unless --host says otherwise; it has no
authentication, so think before exposing it. Uploads over --max-image-mb are refused by the
server before they reach the model, and a file that is not an image gets a clear message.

The handlers (`on_upload`, `on_message`, `on_reset`) are plain functions of a ChatEngine and
the per-browser ChatState, so they work (and are tested) without a browser.
"""

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Tuple

from lavis_vpgtrans.chat.session import (ChatEngine, ChatState, ImageInputError, add_generation_args,
                                         engine_from_args)

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
READY = "Image **{}** loaded. Ask a question about it."
NO_IMAGE = "Upload an image (JPEG, PNG, WebP, ...) to start."
UPLOAD_MAX_AGE_S = 600


def error_text(message: str) -> str:
    return f"**Error:** {message}"


def chat_messages(state: Optional[ChatState]) -> List[dict]:
    """The history in Gradio's "messages" format."""
    out = []
    for user, assistant in (state.history if state else []):
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


def on_upload(engine: ChatEngine, file_path: Optional[str], state: Optional[ChatState]
              ) -> Tuple[Optional[ChatState], Optional[str], str, List[dict], None]:
    """A new upload: (state, preview image path, status, chat, upload box). The upload box is
    emptied either way (the preview shows the image in use), so another file can be dropped
    in; a bad file also clears the image."""
    if not file_path:
        return None, None, NO_IMAGE, [], None
    try:
        new_state = engine.open_image(file_path)
    except ImageInputError as e:
        return None, None, error_text(str(e)), [], None
    return new_state, file_path, READY.format(new_state.image_name), [], None


def on_message(engine: ChatEngine, message: str, state: Optional[ChatState]
               ) -> Tuple[Optional[ChatState], List[dict], str, str]:
    """A user message: (state, chat, textbox content, status). On an error the message stays
    in the textbox."""
    if state is None or state.image is None:
        return state, chat_messages(state), message, error_text("upload an image first.")
    try:
        engine.reply(state, message)
    except ValueError as e:  # empty message, template characters, context too long
        return state, chat_messages(state), message, error_text(str(e))
    return state, chat_messages(state), "", READY.format(state.image_name)


def on_reset(state: Optional[ChatState]) -> Tuple[Optional[ChatState], List[dict], str]:
    """Forgets the conversation, keeps the image: (state, chat, status)."""
    if state is None or state.image is None:
        return None, [], NO_IMAGE
    state.history.clear()
    return state, [], READY.format(state.image_name)


def demo_title(engine: ChatEngine) -> str:
    if hasattr(engine.model, "conv_template"):  # Blip2Vicuna
        return "VL-Vicuna"
    return f"VPGTrans chat ({os.path.basename(str(getattr(engine.model, 'llm_model_name', '')).rstrip('/'))})"


def build_demo(engine: ChatEngine, title: Optional[str] = None):
    title = title or demo_title(engine)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    limit_mb = engine.max_image_bytes / 2**20
    # uploads older than UPLOAD_MAX_AGE_S are deleted every minute (the image in use is in memory)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(60, UPLOAD_MAX_AGE_S)) as demo:
        gr.Markdown(f"# {title}\nUpload an image (at most {limit_mb:.3g} MB), then ask about it.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", type="filepath", elem_id="upload")
                preview = gr.Image(label="Current image", interactive=False, elem_id="preview")
                status = gr.Markdown(NO_IMAGE, elem_id="status")
                reset = gr.Button("New conversation", elem_id="reset")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(type="messages", label="Conversation", elem_id="chatbot")
                text = gr.Textbox(label="Message", placeholder="Ask about the image and press Enter",
                                  elem_id="message")
                send = gr.Button("Send", variant="primary", elem_id="send")

        upload.upload(lambda f, s: on_upload(engine, f, s), [upload, state],
                      [state, preview, status, chatbot, upload])
        for trigger in (text.submit, send.click):
            trigger(lambda m, s: on_message(engine, m, s), [text, state], [state, chatbot, text, status])
        reset.click(on_reset, [state], [state, chatbot, status])
    return demo


def launch(engine: ChatEngine, host: str = DEFAULT_HOST, port: Optional[int] = DEFAULT_PORT,
           block: bool = True, **launch_kwargs):
    """Serves the demo on host:port (127.0.0.1 by default). With block=False it returns the
    running Blocks (demo.local_url, demo.close())."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can use the model "
                       "(there is no authentication)", host)
    # this server's own upload folder (Gradio's default, /tmp/gradio, is shared and never emptied),
    # removed by shutdown() and at exit
    upload_dir = tempfile.mkdtemp(prefix="vpgtrans_web_")
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    atexit.register(shutil.rmtree, upload_dir, True)
    demo = build_demo(engine)
    demo.upload_dir = upload_dir
    demo.queue(default_concurrency_limit=1)  # one generation at a time on the shared model
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_api=False,
                max_file_size=engine.max_image_bytes, prevent_thread_lock=not block, quiet=True,
                **launch_kwargs)
    return demo


def shutdown(demo) -> None:
    """Stops the server and deletes its uploads."""
    demo.close()
    shutil.rmtree(demo.upload_dir, ignore_errors=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lavis_vpgtrans.chat.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    add_generation_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = engine_from_args(args)
    demo = launch(engine, host=args.host, port=args.port, block=False)
    print(f"serving on {demo.local_url}", file=sys.stderr, flush=True)
    try:
        demo.block_thread()
    finally:
        shutdown(demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())

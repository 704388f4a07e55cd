r"""Terminal chat with VL-Vicuna (or an instruction-tuned blip2_causal_lm) about an image.

    python -m lavis_vpgtrans.chat --model-type vl_vicuna7b --llm-model VICUNA_DIR \
        --checkpoint vl-vicuna.pth --image photo.jpg

A blip2_causal_lm instruction-tuned on own_instruct (LLaVA-format conversations) chats in its
LLM's own chat template, the one it trained in (the run's model.chat_template, if it set one,
comes from the checkpoint):

    python -m lavis_vpgtrans.chat --model blip2_causal_lm --model-type qwen2.5_7b \
        --llm-model QWEN_INSTRUCT_DIR --checkpoint checkpoint_3.pth --image photo.jpg

A checkpoint of a run with LoRA adapters on the LLM (llm_lora) loads with that run's llm_lora;
`--options llm_quantization.bits=4` (or 8) puts the LLM in 4-bit (8-bit) for a smaller GPU.

Type a message and press Enter; the answer is printed as "Assistant: ...". Commands:
/image PATH (new image, new conversation), /reset (forget the conversation), /quit (or EOF).
Reads stdin line by line, so it can be scripted: printf 'Describe it.\n' | python -m ...
"""

import argparse
import logging
import sys

from lavis_vpgtrans.chat.session import ImageInputError, add_generation_args, engine_from_args
from lavis_vpgtrans.models.conversation import ConversationError

HELP = "commands: /image PATH, /reset, /quit"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lavis_vpgtrans.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the image to talk about")
    add_generation_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    engine = engine_from_args(args)
    try:
        state = engine.open_image(args.image)
    except ImageInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    print(f"Chatting about {state.image_name} ({HELP})", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("You: " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            state.history.clear()
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                state = engine.open_image(path)
                print(f"(new conversation about {state.image_name})", file=sys.stderr, flush=True)
            except ImageInputError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if line.startswith("/"):
            print(f"error: unknown command {line.split()[0]!r} ({HELP})", file=sys.stderr, flush=True)
            continue
        try:
            answer = engine.reply(state, line)
        except (ConversationError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        print(f"Assistant: {answer}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

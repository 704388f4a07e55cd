"""What the terminal chat and the web demo share: a chat model (models/loading.py loads a
released checkpoint with a local LLM dir), checking user images, and one conversation's state."""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from lavis_vpgtrans.models.loading import load_chat_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_MB = 10.0
DEFAULT_MAX_PIXELS = 40_000_000  # decoded size cap (a small file can decode to gigabytes)


class ImageInputError(ValueError):
    """A user's file that is not a usable image; the message says why, for the user."""


def open_image(path: str, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The RGB image at `path`, or ImageInputError: too large, or not an image."""
    name = os.path.basename(str(path))
    if not os.path.isfile(path):
        raise ImageInputError(f"{name}: no such file")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ImageInputError(f"{name} is {size / 2**20:.3g} MB; the upload limit is {max_bytes / 2**20:.3g} MB")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageInputError(f"{name} is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
            probe.verify()  # reads the whole file: catches truncated / corrupt images
        with Image.open(path) as image:
            return image.convert("RGB")
    except ImageInputError:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses to open far over its own pixel limit
        raise ImageInputError(f"{name} has too many pixels (the limit is {max_pixels:,} pixels): {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{name} is not an image file that can be read (JPEG, PNG, WebP, ...): "
                              f"{type(e).__name__}") from None


@dataclass
class ChatState:
    """One conversation: the processed image and the (user, assistant) turns so far."""
    image: Optional[torch.Tensor] = None
    image_name: str = ""
    history: List[Tuple[str, str]] = field(default_factory=list)


class ChatEngine:
    """A chat model with its image processor, upload limits and generation settings."""

    def __init__(self, model, vis_processor, max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
                 max_pixels: int = DEFAULT_MAX_PIXELS, **generation):
        if not hasattr(model, "chat"):
            raise TypeError(f"{type(model).__name__} has no chat(); use a blip2_vicuna (VL-Vicuna's ###Human template) "
                            f"or a blip2_causal_lm (its tokenizer's chat template) model")
        self.model = model
        self.vis_processor = vis_processor
        self.max_image_bytes = int(max_image_mb * 2**20)
        self.max_pixels = max_pixels
        self.generation = generation

    def open_image(self, path: str) -> ChatState:
        """A new conversation about the image at `path` (ImageInputError if unusable)."""
        image = open_image(path, self.max_image_bytes, self.max_pixels)
        return ChatState(image=self.vis_processor(image), image_name=os.path.basename(str(path)))

    def reply(self, state: ChatState, message: str) -> str:
        """The model's answer; the turn is added to the state's history."""
        if state is None or state.image is None:
            raise ImageInputError("upload an image first")
        message = str(message).strip()
        if not message:
            raise ValueError("empty message")
        answer = self.model.chat(state.image.to(self.model.device), message, history=state.history,
                                 **self.generation)
        state.history.append((message, answer))
        return answer


def add_generation_args(parser) -> None:
    group = parser.add_argument_group("model and generation")
    group.add_argument("--model", default="blip2_vicuna", help="registered model name: blip2_vicuna (default; VL-Vicuna's ###Human template) or "
                       "blip2_causal_lm (an instruct LLM's own chat template)")
    group.add_argument("--model-type", default="vl_vicuna7b",
                       help="model type: vl_vicuna7b (released VL-Vicuna), tiny_vl_vicuna (toy), qwen2.5_7b, "
                       "llama3_8b (blip2_causal_lm), ...")
    group.add_argument("--llm-model", default=None, help="local LLM directory (e.g. your Vicuna-7B v0)")
    group.add_argument("--checkpoint", default=None,
                       help="trained checkpoint (trainable parameters only), e.g. vl-vicuna.pth")
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    group.add_argument("--options", nargs="+", default=[], help="model config overrides, key=value")
    group.add_argument("--max-new-tokens", type=int, default=300)
    group.add_argument("--num-beams", type=int, default=1)
    group.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy/beam search")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top-p", type=float, default=0.9)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max-image-mb", type=float, default=DEFAULT_MAX_IMAGE_MB, help="image size limit")


def engine_from_args(args) -> ChatEngine:
    torch.manual_seed(args.seed)
    model, vis_processor = load_chat_model(args.model, args.model_type, args.llm_model, args.checkpoint,
                                           args.device, args.options)
    return ChatEngine(model, vis_processor, max_image_mb=args.max_image_mb,
                      max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.sample,
                      temperature=args.temperature, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty)

"""The VL-Vicuna conversation template, one rendering for training and for generation.

A conversation of turns (instruction, answer) renders as

    ###Human: <Img><ImageHere></Img> {instruction} ###Assistant: {answer}###Human: {instruction} ###Assistant: ...

(the MiniGPT-4 / VL-Vicuna template). The "###" that closes an answer is part of the answer:
the model learns to emit it, generation stops on it, and it opens the next human turn. The
image appears once, in the first human turn, where `<ImageHere>` is replaced by the soft
prompts. A generation prompt is the same rendering with the last answer left out, so it is a
prefix of the training text: the piece list below is the single source of both.

Pieces are tokenized one by one (never across a boundary), which keeps that prefix property
at the token level too. Whitespace between pieces is carried at the start of the following
piece (" {answer}###"), never at the end of a prompt piece, so no prompt ends in a lone space
token that training would never have put there.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

IMAGE_PLACEHOLDER = "<ImageHere>"

PROMPT, IMAGE, ANSWER = "prompt", "image", "answer"

Turn = Tuple[str, Optional[str]]


class ConversationError(ValueError):
    """A message that cannot be rendered (empty, or containing the separator / placeholder)."""


@dataclass(frozen=True)
class Piece:
    text: str
    kind: str  # PROMPT, IMAGE or ANSWER


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str = ""
    sep: str = "###"
    user: str = "Human"
    assistant: str = "Assistant"
    image: str = "<Img><ImageHere></Img>"

    def check_message(self, text: str, who: str) -> str:
        text = str(text).strip()
        for bad in (self.sep, IMAGE_PLACEHOLDER):
            if bad in text:
                raise ConversationError(f"the {who} message may not contain {bad!r} (it is part of the "
                                        f"conversation template)")
        return text

    def pieces(self, turns: Sequence[Turn], with_image: bool = True) -> List[Piece]:
        """The conversation as pieces. Every turn but the last needs an answer; a last turn
        without one (None) ends the pieces with the generation prompt "... ###Assistant:"."""
        if not turns:
            raise ConversationError("a conversation needs at least one turn")
        out: List[Piece] = []
        for i, (question, answer) in enumerate(turns):
            question = self.check_message(question, "user")
            if i == 0:
                human = " ".join(p for p in (self.image if with_image else "", question) if p)
                prompt = f"{self.system}{self.sep}{self.user}: {human} {self.sep}{self.assistant}:"
            else:
                if not question:
                    raise ConversationError(f"turn {i + 1}: empty user message")
                prompt = f"{self.user}: {question} {self.sep}{self.assistant}:"
            if with_image and i == 0:
                before, after = prompt.split(IMAGE_PLACEHOLDER)
                out += [Piece(before, PROMPT), Piece(IMAGE_PLACEHOLDER, IMAGE), Piece(after, PROMPT)]
            else:
                out.append(Piece(prompt, PROMPT))
            if answer is None:
                if i != len(turns) - 1:
                    raise ConversationError(f"turn {i + 1} has no answer but is not the last turn")
                break
            out.append(Piece(" " + self.check_message(answer, "assistant") + self.sep, ANSWER))
        return out

    def render(self, turns: Sequence[Turn], with_image: bool = True) -> str:
        """The conversation as one string (what the pieces spell)."""
        return "".join(p.text for p in self.pieces(turns, with_image))

    def cut_answer(self, generated: str) -> str:
        """A generated continuation up to (not including) the separator."""
        return generated.split(self.sep, 1)[0].strip()


TEMPLATES = {
    # VL-Vicuna / MiniGPT-4: "###Human: <Img><ImageHere></Img> {} ###Assistant: {}###"
    "minigpt4": ConversationTemplate(name="minigpt4"),
}
DEFAULT_TEMPLATE = "minigpt4"


def get_template(name_or_template: Union[str, ConversationTemplate]) -> ConversationTemplate:
    if isinstance(name_or_template, ConversationTemplate):
        return name_or_template
    try:
        return TEMPLATES[name_or_template]
    except KeyError:
        raise KeyError(f"unknown conversation template {name_or_template!r}; known: {sorted(TEMPLATES)}") from None

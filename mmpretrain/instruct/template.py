"""LLaVA-style conversations -> (input_ids, labels): the chat template and the loss mask.

A conversation is LLaVA's JSON record::

    {"id": "0001", "image": "a.jpg" | ["a.jpg", "b.jpg"],
     "conversations": [{"from": "system", "value": "..."},            # optional, first
                       {"from": "human", "value": "<image>\\nWhat color is the shape?"},
                       {"from": "gpt", "value": "Red."}, ...]}

Roles: "system"; "human" / "user"; "gpt" / "assistant". Turns alternate user, assistant, user, ... after the
optional system turn. Every `<image>` in a user turn becomes `num_image_tokens` copies of `image_token_id` (the
projected patch features take their places in the model, in the order the placeholders appear); the record names
exactly as many images as there are placeholders.

The sequence is built piece by piece, each piece tokenized on its own (so the mask is exact and needs no offset
mapping; generation builds its prompt with the same pieces, `encode_prompt`):

    [bos] system_prefix system system_suffix
    user_prefix <user text, images expanded> user_suffix
    assistant_prefix <answer> eos                       <- only `<answer> eos` carries labels
    user_prefix ...

Labels are the input ids where the assistant speaks (its answer and the eos that ends it, so the model learns to
stop) and -100 (IGNORE_INDEX) everywhere else: system, user turns, image tokens, role prefixes. The model shifts
them by one (position t predicts token t + 1), as Hugging Face causal LMs do.

Bad records raise BadConversation (a ValueError) with a short `reason` key, which the data pipeline counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class TextTokenizer(Protocol):
    """What the template needs from a tokenizer (HFTokenizer adapts a transformers one)."""

    bos_id: int | None  # prepended once, or None
    eos_id: int  # ends every assistant turn

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no special tokens added."""
        ...


@dataclass
class HFTokenizer:
    """A transformers tokenizer as a TextTokenizer (bos/eos from the tokenizer unless given)."""

    tokenizer: object
    bos_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self):
        if self.bos_id is None:
            self.bos_id = getattr(self.tokenizer, "bos_token_id", None)
        if self.eos_id is None:
            self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token_id: pass eos_id")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class ChatTemplate:
    """The text around each turn (defaults: LLaVA-1.5's "vicuna_v1" conversation, one piece per role)."""

    system: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )  # used when a record has no system turn; "" for none
    system_prefix: str = ""
    system_suffix: str = " "
    user_prefix: str = "USER: "
    user_suffix: str = " "
    assistant_prefix: str = "ASSISTANT:"  # the answer piece is tokenized on its own, after this
    answer_prefix: str = " "  # prepended to each answer's text (inside the trained span)


@dataclass
class Encoded:
    """One tokenized conversation; input_ids and labels have the same length."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    num_images: int  # placeholders expanded (each num_image_tokens long)


class BadConversation(ValueError):
    """A record the data pipeline skips and counts under `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def normalize_turns(record: dict) -> list[tuple[str, str]]:
    """[(role, text)] with roles system/user/assistant, checked for order; BadConversation otherwise."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadConversation("no_conversation", "the record has no 'conversations' list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise BadConversation("bad_turn", f"turn {i} is not {{'from': one of {sorted(ROLES)}, 'value': str}}")
        out.append((ROLES[turn["from"]], turn["value"]))
    body = out[1:] if out[0][0] == "system" else out
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise BadConversation("bad_order", f"turn {i + len(out) - len(body)} is {role}, expected {expected}")
    if not any(role == "assistant" for role, _ in body):
        raise BadConversation("no_assistant_turn", "the conversation has no assistant turn")
    return out


def record_images(record: dict) -> list[str]:
    """The image names a record gives ("image": a name or a list of names; absent: none)."""
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise BadConversation("bad_image_field", "'image' is neither a file name nor a list of them")
    return images


class ConversationEncoder:
    """Tokenizes conversations with a ChatTemplate; `num_image_tokens` = the model's patch tokens per image."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        image_token_id: int,
        num_image_tokens: int,
        template: ChatTemplate = ChatTemplate(),
        max_length: int | None = None,
    ):
        self.tok, self.template = tokenizer, template
        self.image_token_id, self.num_image_tokens, self.max_length = image_token_id, num_image_tokens, max_length

    def _user(self, text: str) -> tuple[list[int], int]:
        """A user turn's ids (placeholders expanded) and its number of images."""
        t = self.template
        pieces = text.split(IMAGE_PLACEHOLDER)
        ids = self.tok.encode(t.user_prefix) if t.user_prefix else []
        for k, piece in enumerate(pieces):
            if k > 0:
                ids += [self.image_token_id] * self.num_image_tokens
            if piece:
                ids += self.tok.encode(piece)
        if t.user_suffix:
            ids += self.tok.encode(t.user_suffix)
        return ids, len(pieces) - 1

    def _head(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[tuple[str, str]]]:
        """bos + the system piece; the remaining turns."""
        t = self.template
        system, rest = (turns[0][1], turns[1:]) if turns and turns[0][0] == "system" else (t.system, turns)
        ids = [self.tok.bos_id] if self.tok.bos_id is not None else []
        if system:
            ids += self.tok.encode(t.system_prefix + system + t.system_suffix)
        return ids, rest

    def encode(self, record: dict) -> Encoded:
        """A LLaVA record -> Encoded; BadConversation for what the pipeline must skip."""
        turns = normalize_turns(record)
        images = record_images(record)
        input_ids, rest = self._head(turns)
        labels = [IGNORE_INDEX] * len(input_ids)
        num_images = 0
        for role, text in rest:
            if role == "user":
                ids, n = self._user(text)
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
                num_images += n
            else:
                if IMAGE_PLACEHOLDER in text:
                    raise BadConversation("image_in_answer", "an assistant turn holds an <image> placeholder")
                prefix = self.tok.encode(self.template.assistant_prefix) if self.template.assistant_prefix else []
                answer = self.tok.encode(self.template.answer_prefix + text) + [self.tok.eos_id]
                input_ids += prefix + answer
                labels += [IGNORE_INDEX] * len(prefix) + answer
        if num_images != len(images):
            raise BadConversation(
                "image_count_mismatch", f"{num_images} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images"
            )
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise BadConversation("too_long", f"{len(input_ids)} tokens > max_length {self.max_length}")
        return Encoded(input_ids, labels, num_images)

    def encode_prompt(self, turns: list[tuple[str, str]]) -> list[int]:
        """Ids of a conversation that ends with a user turn, followed by the assistant prefix: what generation
        continues (the same pieces as training, so the answer starts where the trained span starts)."""
        input_ids, rest = self._head(turns)
        for role, text in rest:
            if role == "user":
                input_ids += self._user(text)[0]
            else:
                prefix = self.tok.encode(self.template.assistant_prefix) if self.template.assistant_prefix else []
                input_ids += prefix + self.tok.encode(self.template.answer_prefix + text) + [self.tok.eos_id]
        if self.template.assistant_prefix:
            input_ids += self.tok.encode(self.template.assistant_prefix)
        return input_ids

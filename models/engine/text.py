"""Text around the engine: the chat template, and streaming detokenization with stop strings.

Chat template (ChatML, the format SmolLM2-Instruct was trained on; used because our tokenizer
files carry no template):

    <|im_start|>{role}\\n{content}<|im_end|>\\n     for each message, then
    <|im_start|>assistant\\n                       to open the reply

Generation stops at "<|im_end|>" (its token id when the vocabulary has it, else the text).
"""

from __future__ import annotations

CHAT_END = "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")


def render_chat(messages: list[dict]) -> str:
    parts = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {CHAT_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        parts.append(f"<|im_start|>{role}\n{content}{CHAT_END}\n")
    if not parts:
        raise ValueError("messages is empty")
    return "".join(parts) + "<|im_start|>assistant\n"


def chat_stop_token_ids(tokenizer) -> tuple[int, ...]:
    tid = tokenizer.tok.token_to_id(CHAT_END)
    return () if tid is None else (tid,)


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back what could still change:
    an incomplete UTF-8 character, or the start of a stop string. `stopped` turns True once a stop
    string appears; the text before it is the completion."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0            # characters of the text already returned
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        self.ids += token_ids
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        safe = len(text)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            safe = len(text.rstrip("\ufffd"))
        head = text[:safe]  # a suffix that may still grow into a stop string stays back
        hold = max((k for s in self.stop for k in range(1, min(len(s), safe + 1)) if head.endswith(s[:k])),
                   default=0)
        return self._emit(head[:safe - hold])

    def flush(self) -> str:
        """The held-back rest, once generation has ended without a stop string."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        piece = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return piece

"""From the cumulative text of Triton's streamed responses to OpenAI deltas that never have to be taken back.

The ``tensorrt_llm`` model streams the whole text so far in every response and cuts it at a stop string once one
has appeared, so a tail that could still become a stop string must not be sent yet; nor a trailing U+FFFD (a
character whose bytes are not all generated), nor part of a marker the chat split needs whole (``</think>``, the
start of a tool-call block). For chat, each safe stretch of text goes to ``reasoning_content`` (thinking mode,
before ``</think>``) or ``content`` (before a tool-call block); the block itself is parsed once the reply is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from builder.model.chat_encoding import ChatEncoding, Reply


def held_tail(text: str, markers: Sequence[str]) -> int:
    """How many trailing characters of ``text`` must wait: an incomplete character, or the longest proper prefix
    of a marker that the text ends with."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    body = text[:len(text) - hold]
    longest = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(body)), longest, -1):
            if body.endswith(m[:k]):
                longest = k
                break
    return hold + longest


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning)


class TextDeltas:
    """Completions: the text after what was already sent, held back as ``held_tail`` says."""

    def __init__(self, *, stop: Sequence[str] = ()):
        self.markers = list(stop)
        self.sent = ""

    def update(self, text: str) -> str:
        safe = text[:len(text) - held_tail(text, self.markers)]
        return self._advance(safe)

    def finish(self, text: str) -> str:
        return self._advance(text)

    def _advance(self, safe: str) -> str:
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta


class ChatDeltas:
    """Chat: safe text split into reasoning and content deltas; the tool-call block is held for ``finish``."""

    def __init__(self, encoding: ChatEncoding, *, thinking: bool, tools: bool, stop: Sequence[str] = ()):
        self.encoding = encoding
        self.thinking = thinking
        self.tools = tools
        t = encoding.tokens
        self.markers = [*stop, t.eos, *([t.end_think] if thinking else []), *([t.tool_calls_start] if tools else [])]
        self.sent = 0  # characters of the raw reply text already handed out

    def update(self, text: str) -> Delta:
        text = text.split(self.encoding.tokens.eos, 1)[0]
        return self._emit(text, len(text) - held_tail(text, self.markers), final=False)

    def finish(self, text: str) -> tuple[Delta, Reply]:
        text = text.split(self.encoding.tokens.eos, 1)[0]
        reply = self.encoding.parse_reply(text, thinking=self.thinking, tools=self.tools)
        return self._emit(text, len(text), final=True, tool_calls_parsed=bool(reply.tool_calls)), reply

    def _emit(self, text: str, end: int, *, final: bool, tool_calls_parsed: bool = False) -> Delta:
        """Hand out ``text[self.sent:end]`` by region: reasoning (thinking mode, up to ``</think>``), the marker
        itself (never sent), content (up to a tool-call block, which is held unless it fails to parse at the end)."""
        t = self.encoding.tokens
        delta = Delta()
        content_start = 0
        if self.thinking:
            at = text.find(t.end_think, 0, end)
            reasoning_end = end if at < 0 else at
            if self.sent < reasoning_end:
                delta.reasoning = text[self.sent:reasoning_end]
            if at < 0:
                self.sent = max(self.sent, reasoning_end)
                return delta
            content_start = at + len(t.end_think)
        content_end = end
        if self.tools:
            at = text.find(t.tool_calls_start, content_start, end)
            if at >= 0 and (not final or tool_calls_parsed):
                content_end = at
        lo = max(self.sent, content_start)
        if lo < content_end:
            delta.content = text[lo:content_end]
        self.sent = max(self.sent, content_end)
        return delta

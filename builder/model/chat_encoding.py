"""DeepSeek-V3.2's chat encoding: OpenAI-style messages to the prompt text the model was trained on, and the
model's reply text back to reasoning, content and tool calls.

The release ships no Jinja chat template; it ships its encoding as rules (``encoding/`` in the model repository,
with golden test files). The rules, the token strings and where each was read are written down in
docs/serving-openai.md ("DeepSeek-V3.2 chat encoding"); this module follows them and is tested against hand-written
expected strings and DeepSeek's own golden conversation. The token strings come from the checkpoint's tokenizer
files where they say (BOS/EOS in ``tokenizer_config.json``), the rest are the release's fixed markers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from builder.errors import ChatFormatError

MODEL_TYPES = ("deepseek_v32",)
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"

# The tools section the encoding puts into a system (or developer) message; {calls}/{invoke}/{param} are the DSML
# tags, {schemas} one JSON object per tool. Blank lines as in DeepSeek's golden test_output.txt (docs: Sources).
_TOOLS_TEXT = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{calls}>" block like the following as part of your reply to the user:
<{calls}>
<{invoke} name="$FUNCTION_NAME">
<{param} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{param}>
...
</{invoke}>
<{invoke} name="$FUNCTION_NAME2">
...
</{invoke}>
</{calls}>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:

<{calls}>
...
</{calls}>

<function_results>
...
</function_results>

{think}...thinking about results{end_think}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""
_RESPONSE_FORMAT_TEXT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
_DEVELOPER_LEAD = "\n\n# The user's message is: "


@dataclass(frozen=True)
class ChatTokens:
    """The strings the encoding is made of. ``bos``/``eos`` are the checkpoint's (``tokenizer_config.json``)."""

    bos: str = BOS
    eos: str = EOS
    user: str = USER
    assistant: str = ASSISTANT
    think: str = THINK
    end_think: str = END_THINK
    dsml: str = DSML

    @property
    def calls_tag(self) -> str:
        return f"{self.dsml}function_calls"

    @property
    def tool_calls_start(self) -> str:
        """What a reply's tool-call block starts with (the encoding separates it from the content by a blank line)."""
        return f"\n\n<{self.calls_tag}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's ``function.arguments``


@dataclass(frozen=True)
class Reply:
    """A generated assistant turn split by the encoding's markers."""

    content: str
    reasoning: str | None = None  # thinking mode only
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ChatEncoding:
    """DeepSeek-V3.2's encoding for one checkpoint. ``model_adds_bos``: the served model prepends BOS when it
    tokenizes a prompt (``add_bos_token`` in the checkpoint's tokenizer config), so the rendered text must not."""

    tokens: ChatTokens = field(default_factory=ChatTokens)
    model_adds_bos: bool = False

    # -- messages -> prompt ------------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], *, thinking: bool = False,
               tools: Sequence[Mapping[str, Any]] | None = None,
               response_format: Mapping[str, Any] | None = None, for_reply: bool = True) -> str:
        """The prompt for ``messages`` (OpenAI chat format), ending where the model's reply begins.

        ``tools`` (OpenAI ``tools``) and ``response_format`` go into the leading system message, a new empty one
        when the conversation has none. The text starts with BOS unless the model adds it itself.
        ``for_reply=False`` renders a finished transcript (its last message may be the assistant's)."""
        msgs = [dict(m) for m in messages]
        if not msgs:
            raise ChatFormatError("messages must hold at least one message")
        if tools or response_format:
            if msgs[0].get("role") != "system":
                msgs.insert(0, {"role": "system", "content": ""})
            if tools:
                msgs[0]["tools"] = list(tools)
            if response_format:
                msgs[0]["response_format"] = dict(response_format)
        if for_reply and msgs[-1].get("role") not in ("user", "developer", "tool"):
            raise ChatFormatError(f"the last message must come from user, developer or tool, not "
                                  f"{msgs[-1].get('role')!r}: the encoding closes every assistant turn with "
                                  "end-of-sentence, so nothing would follow it")
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") in ("user", "developer")), default=-1)
        prompt = "" if self.model_adds_bos else self.tokens.bos
        return prompt + "".join(self._message(i, msgs, last_user, thinking) for i in range(len(msgs)))

    def _message(self, i: int, msgs: list[dict], last_user: int, thinking: bool) -> str:
        t = self.tokens
        msg = msgs[i]
        role = msg.get("role")
        if role == "system":
            return _text(msg, i, required=False) + self._instructions(msg, i)
        if role in ("user", "developer"):
            if role == "user":
                body = _text(msg, i, required=True)
            else:
                body = self._instructions(msg, i) + _DEVELOPER_LEAD + _text(msg, i, required=True)
            opens_thinking = thinking and i == last_user
            return t.user + body + t.assistant + (t.think if opens_thinking else t.end_think)
        if role == "assistant":
            calls = _tool_calls(msg, i)
            reasoning = msg.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatFormatError(f"messages[{i}].reasoning_content must be a string")
            thought = ""
            if thinking and i > last_user:
                if not (reasoning or calls):
                    raise ChatFormatError(f"messages[{i}]: in thinking mode an assistant turn after the last user "
                                          "message needs reasoning_content or tool_calls")
                thought = (reasoning or "") + t.end_think
            block = "\n\n" + self.tool_calls_text(calls) if calls else ""
            return thought + _text(msg, i, required=False) + block + t.eos
        if role == "tool":
            return self._tool_result(i, msgs, last_user, thinking)
        raise ChatFormatError(f"messages[{i}].role {role!r} is not one the encoding knows "
                              "(system, user, developer, assistant, tool)")

    def _instructions(self, msg: Mapping[str, Any], i: int) -> str:
        out = ""
        tools = msg.get("tools")
        if tools:
            out += "\n\n" + self.tools_text(tools, where=f"messages[{i}].tools")
        if msg.get("response_format"):
            schema = json.dumps(msg["response_format"], ensure_ascii=False)
            out += "\n\n" + _RESPONSE_FORMAT_TEXT.format(schema=schema)
        return out

    def _tool_result(self, i: int, msgs: list[dict], last_user: int, thinking: bool) -> str:
        owner = i - 1
        while owner >= 0 and msgs[owner].get("role") == "tool":
            owner -= 1
        if owner < 0 or msgs[owner].get("role") != "assistant":
            raise ChatFormatError(f"messages[{i}] is a tool result that follows no assistant message")
        calls = msgs[owner].get("tool_calls") or []
        order = i - owner  # 1 for the first result of this assistant turn
        if order > len(calls):
            raise ChatFormatError(f"messages[{i}] is tool result {order} of an assistant turn that made "
                                  f"{len(calls)} tool call(s)")
        out = "\n\n<function_results>" if order == 1 else ""
        out += f"\n<result>{_text(msgs[i], i, required=False)}</result>"
        if order == len(calls):
            opens_thinking = thinking and i >= last_user
            out += "\n</function_results>\n\n" + (self.tokens.think if opens_thinking else self.tokens.end_think)
        return out

    def tools_text(self, tools: Sequence[Mapping[str, Any]], *, where: str = "tools") -> str:
        schemas = []
        for k, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(function, Mapping) or not function.get("name"):
                raise ChatFormatError(f"{where}[{k}] must be a function tool with a name "
                                      '({"type": "function", "function": {"name": ...}})')
            schemas.append(json.dumps(function, ensure_ascii=False))
        calls, t = self.tokens.calls_tag, self.tokens
        return _TOOLS_TEXT.format(calls=calls, invoke=f"{t.dsml}invoke", param=f"{t.dsml}parameter", think=t.think,
                                  end_think=t.end_think, schemas="\n".join(schemas))

    def tool_calls_text(self, calls: Sequence[ToolCall]) -> str:
        d = self.tokens.dsml
        invokes = []
        for call in calls:
            params = []
            for key, value in _arguments(call).items():
                is_str = isinstance(value, str)
                text = value if is_str else json.dumps(value, ensure_ascii=False)
                params.append(f'<{d}parameter name="{key}" string="{"true" if is_str else "false"}">{text}'
                              f"</{d}parameter>")
            invokes.append(f'<{d}invoke name="{call.name}">\n' + "\n".join(params) + f"\n</{d}invoke>")
        return f"<{d}function_calls>\n" + "\n".join(invokes) + f"\n</{d}function_calls>"

    # -- reply text -> message ---------------------------------------------------------------------------------
    def parse_reply(self, text: str, *, thinking: bool, tools: bool) -> Reply:
        """Split a generated reply. Lenient where generation stopped early: thinking text without its closing
        ``</think>`` is all reasoning, and a tool-call block that does not parse stays in the content."""
        t = self.tokens
        text = text.split(t.eos, 1)[0]
        reasoning = None
        if thinking:
            reasoning, sep, text = text.partition(t.end_think)
            if not sep:
                return Reply(content="", reasoning=reasoning)
        if tools:
            at = text.find(t.tool_calls_start)
            if at >= 0:
                calls = self._parse_calls(text[at + 2:])
                if calls is not None:
                    return Reply(content=text[:at], reasoning=reasoning, tool_calls=calls)
        return Reply(content=text, reasoning=reasoning)

    def _parse_calls(self, block: str) -> tuple[ToolCall, ...] | None:
        """``<DSML function_calls>`` ... ``</DSML function_calls>`` to tool calls; None when it is malformed."""
        d = self.tokens.dsml
        head, tail = f"<{d}function_calls>\n", f"</{d}function_calls>"
        if not block.startswith(head) or not block.rstrip().endswith(tail):
            return None
        body = block[len(head):block.rstrip().rfind(tail)]
        calls = []
        for chunk in body.split(f"</{d}invoke>")[:-1]:
            chunk = chunk.strip("\n")
            name_open = f'<{d}invoke name="'
            if not chunk.startswith(name_open) or '">' not in chunk:
                return None
            name, _, params = chunk[len(name_open):].partition('">')
            args: dict[str, Any] = {}
            for item in filter(None, params.strip("\n").split(f"</{d}parameter>")):
                item = item.strip("\n")
                opener = f'<{d}parameter name="'
                if not item.startswith(opener):
                    return None
                rest = item[len(opener):]
                key, _, rest = rest.partition('" string="')
                kind, _, value = rest.partition('">')
                if kind not in ("true", "false") or key in args:
                    return None
                if kind == "true":
                    args[key] = value
                else:
                    try:
                        args[key] = json.loads(value)
                    except json.JSONDecodeError:
                        return None
            calls.append(ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False)))
        return tuple(calls) if calls else None

    # -- the checkpoint ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "ChatEncoding":
        """The encoding a checkpoint's files call for: ``config.json``'s ``model_type`` (DeepSeek-V3.2 family),
        and from ``tokenizer_config.json`` the BOS/EOS strings and whether tokenizing adds BOS."""
        directory = Path(directory)
        config = _read_json(directory / "config.json")
        # A dsbuild engine bundle's config.json carries the model's config under "model".
        model_type = config.get("model_type", (config.get("model") or {}).get("model_type"))
        if model_type not in MODEL_TYPES:
            raise ChatFormatError(f"{directory}/config.json has model_type {model_type!r}; dsbuild implements the "
                                  f"chat encoding of {', '.join(MODEL_TYPES)} only")
        tok_config = _read_json(directory / "tokenizer_config.json")
        if tok_config.get("chat_template"):
            raise ChatFormatError(f"{directory}/tokenizer_config.json carries a Jinja chat_template; DeepSeek-V3.2 "
                                  "ships none (its encoding rules replace it), so this is not a checkpoint whose "
                                  "encoding dsbuild knows")
        tokens = ChatTokens(bos=_token_text(tok_config.get("bos_token")) or BOS,
                            eos=_token_text(tok_config.get("eos_token")) or EOS)
        return cls(tokens=tokens, model_adds_bos=bool(tok_config.get("add_bos_token", False)))

    def marker_strings(self) -> dict[str, str]:
        t = self.tokens
        return {"bos": t.bos, "eos": t.eos, "user": t.user, "assistant": t.assistant, "think": t.think,
                "end_think": t.end_think}


def _text(msg: Mapping[str, Any], i: int, *, required: bool) -> str:
    content = msg.get("content")
    if content is None:
        if required:
            raise ChatFormatError(f"messages[{i}] ({msg.get('role')}) needs content")
        return ""
    if not isinstance(content, str):
        raise ChatFormatError(f"messages[{i}].content must be text")
    if required and not content:
        raise ChatFormatError(f"messages[{i}] ({msg.get('role')}) has empty content")
    return content


def _tool_calls(msg: Mapping[str, Any], i: int) -> list[ToolCall]:
    calls = []
    for k, call in enumerate(msg.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ChatFormatError(f"messages[{i}].tool_calls[{k}] must have function.name and function.arguments")
        args = function.get("arguments", "{}")
        calls.append(ToolCall(name=function["name"], arguments=args if isinstance(args, str) else json.dumps(args)))
    return calls


def _arguments(call: ToolCall) -> dict[str, Any]:
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        raise ChatFormatError(f"tool call {call.name!r}: arguments are not JSON: {call.arguments[:80]!r}") from None
    if not isinstance(args, dict):
        raise ChatFormatError(f"tool call {call.name!r}: arguments must be a JSON object")
    return args


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatFormatError(f"{path} is missing; the chat encoding is read from the checkpoint's files") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ChatFormatError(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ChatFormatError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A token as ``tokenizer_config.json`` writes it: a string or an AddedToken object with ``content``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None

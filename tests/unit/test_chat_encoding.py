"""DeepSeek-V3.2's chat encoding (builder/model/chat_encoding.py) against hand-written expected prompts for each rule
(docs/serving-openai.md), and against DeepSeek's own golden conversation (tests/data/deepseek-v3.2-encoding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.errors import ChatFormatError
from builder.model.chat_encoding import ChatEncoding, ChatTokens, ToolCall

DATA = Path(__file__).resolve().parent.parent / "data" / "deepseek-v3.2-encoding"
B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
ENC = ChatEncoding()


def weather_call(**args) -> dict:
    return {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}


@pytest.mark.parametrize("thinking, tail", [(False, "</think>"), (True, "<think>")])
def test_one_user_message(thinking, tail):
    assert ENC.render([{"role": "user", "content": "Hi"}], thinking=thinking) == f"{B}{U}Hi{A}{tail}"


def test_system_prompt_is_plain_text_before_the_first_user_turn():
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert ENC.render(msgs) == f"{B}You are terse.{U}Hi{A}</think>"


def test_model_that_adds_bos_gets_none_in_the_text():
    assert ChatEncoding(model_adds_bos=True).render([{"role": "user", "content": "Hi"}]) == f"{U}Hi{A}</think>"


@pytest.mark.parametrize("thinking", [False, True])
def test_multi_turn_earlier_turns_close_thinking_and_drop_reasoning(thinking):
    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first answer", "reasoning_content": "old thoughts"},
            {"role": "user", "content": "two"}]
    last = "<think>" if thinking else "</think>"
    assert ENC.render(msgs, thinking=thinking) == f"{B}S{U}one{A}</think>first answer{E}{U}two{A}{last}"


def test_tool_call_history_in_chat_mode():
    msgs = [{"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": None,
             "tool_calls": [weather_call(city="Paris", days=3, units=["C"], exact=True)]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    calls = ("\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
             "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
             "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
             "<｜DSML｜parameter name=\"units\" string=\"false\">[\"C\"]</｜DSML｜parameter>\n"
             "<｜DSML｜parameter name=\"exact\" string=\"false\">true</｜DSML｜parameter>\n"
             "</｜DSML｜invoke>\n</｜DSML｜function_calls>")
    assert ENC.render(msgs) == (f"{B}{U}Paris?{A}</think>{calls}{E}"
                                "\n\n<function_results>\n<result>sunny</result>\n</function_results>\n\n</think>")


def test_tool_results_in_thinking_mode_reopen_thinking_and_group_in_one_block():
    msgs = [{"role": "user", "content": "Both?"},
            {"role": "assistant", "reasoning_content": "need two",
             "tool_calls": [weather_call(city="A"), weather_call(city="B")]},
            {"role": "tool", "content": "ra"},
            {"role": "tool", "content": "rb"}]
    out = ENC.render(msgs, thinking=True)
    assert out.startswith(f"{B}{U}Both?{A}<think>need two</think>\n\n<｜DSML｜function_calls>\n")
    assert out.count("<｜DSML｜invoke name=\"get_weather\">") == 2
    assert out.endswith(f"</｜DSML｜function_calls>{E}\n\n<function_results>\n<result>ra</result>\n"
                        "<result>rb</result>\n</function_results>\n\n<think>")


def test_tools_without_a_system_message_get_an_empty_one():
    tools = [{"type": "function", "function": {"name": "now", "description": "clock", "parameters": {}}}]
    out = ENC.render([{"role": "user", "content": "time?"}], tools=tools)
    assert out.startswith(f"{B}\n\n## Tools\n\nYou have access to a set of tools")
    assert out.endswith('<functions>\n{"name": "now", "description": "clock", "parameters": {}}\n</functions>\n'
                        f"{U}time?{A}</think>")


def test_developer_message_is_a_user_turn_with_its_instructions_first():
    fmt = {"type": "json_object"}
    out = ENC.render([{"role": "developer", "content": "hello", "response_format": fmt}], thinking=True)
    assert out == (f"{B}{U}\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                   f'{{"type": "json_object"}}\n\n# The user\'s message is: hello{A}<think>')


def test_response_format_goes_into_the_system_message():
    out = ENC.render([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
                     response_format={"type": "json_object"})
    assert out == (f"{B}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                   f'{{"type": "json_object"}}{U}q{A}</think>')


def test_deepseek_golden_conversation():
    """DeepSeek's own test pair from the release's encoding/ folder: tools on the system message, thinking mode."""
    data = json.loads((DATA / "test_input.json").read_text(encoding="utf-8"))
    messages = data["messages"]
    messages[0] = {**messages[0], "tools": data["tools"]}
    expected = (DATA / "test_output.txt").read_text(encoding="utf-8")
    assert ENC.render(messages, thinking=True, for_reply=False) == expected.rstrip("\n")


@pytest.mark.parametrize("messages, thinking, words", [
    ([{"role": "tool", "content": "r"}], False, "follows no assistant"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}],
     False, "made 0 tool call"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [weather_call(city="x")]},
      {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}], False, "tool result 2"),
    ([{"role": "function", "content": "x"}, {"role": "user", "content": "q"}], False, "not one the encoding knows"),
    ([{"role": "user", "content": None}], False, "needs content"),
    ([{"role": "user", "content": ""}], False, "empty content"),
    ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], False, "must be text"),
    ([{"role": "developer", "content": ""}], False, "empty content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], False, "last message"),
    ([], False, "at least one"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}],
     True, "needs reasoning_content or tool_calls"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
      {"role": "tool", "content": "r"}], False, "JSON object"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]},
      {"role": "tool", "content": "r"}], False, "not JSON"),
])
def test_conversations_the_encoding_cannot_express(messages, thinking, words):
    with pytest.raises(ChatFormatError, match=words):
        ENC.render(messages, thinking=thinking)


def test_bad_tool_definition_is_named():
    with pytest.raises(ChatFormatError, match=r"tools\[1\]"):
        ENC.render([{"role": "user", "content": "q"}],
                   tools=[{"type": "function", "function": {"name": "ok"}}, {"type": "function"}])


@pytest.mark.parametrize("text, thinking, tools, content, reasoning, ncalls", [
    ("Hello there.", False, False, "Hello there.", None, 0),
    (f"Hello{E}", False, False, "Hello", None, 0),
    ("I should greet.</think>Hello!", True, False, "Hello!", "I should greet.", 0),
    ("still thinking when max_tokens hit", True, False, "", "still thinking when max_tokens hit", 0),
    ("text\n\n<｜DSML｜function_calls>\nnot a call", False, True, "text\n\n<｜DSML｜function_calls>\nnot a call",
     None, 0),
    ("a\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
     False, False, "a\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n"
     "</｜DSML｜function_calls>", None, 0),
])
def test_parse_reply(text, thinking, tools, content, reasoning, ncalls):
    reply = ENC.parse_reply(text, thinking=thinking, tools=tools)
    assert (reply.content, reply.reasoning, len(reply.tool_calls)) == (content, reasoning, ncalls)


def test_tool_calls_round_trip_through_the_encoding():
    calls = (ToolCall("get_weather", json.dumps({"city": "Paris", "days": 3, "alerts": {"wind": True}})),
             ToolCall("now", "{}"))
    reply_text = "Checking.</think>Let me look." + "\n\n" + ENC.tool_calls_text(calls) + E
    reply = ENC.parse_reply(reply_text, thinking=True, tools=True)
    assert reply.reasoning == "Checking." and reply.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == \
        [("get_weather", {"city": "Paris", "days": 3, "alerts": {"wind": True}}), ("now", {})]


def test_from_checkpoint_reads_the_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True}))
    enc = ChatEncoding.from_checkpoint(tmp_path)
    assert enc.tokens == ChatTokens(bos="<s>", eos="</s>") and enc.model_adds_bos
    assert enc.render([{"role": "assistant", "content": "x"}], for_reply=False) == "x</s>"


@pytest.mark.parametrize("config, tok_config, words", [
    ({"model_type": "llama"}, {}, "model_type 'llama'"),
    ({"model_type": "deepseek_v32"}, {"chat_template": "{{ messages }}"}, "Jinja chat_template"),
    ({"model_type": "deepseek_v32"}, None, "tokenizer_config.json is missing"),
])
def test_from_checkpoint_refuses_what_it_does_not_know(tmp_path, config, tok_config, words):
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tok_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ChatFormatError, match=words):
        ChatEncoding.from_checkpoint(tmp_path)


def test_tiny_checkpoint_declares_the_release_encoding(tiny_ckpt):
    enc = ChatEncoding.from_checkpoint(tiny_ckpt)
    assert (enc.tokens.bos, enc.tokens.eos) == (B, E)

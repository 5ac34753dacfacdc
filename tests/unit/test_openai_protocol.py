"""The OpenAI endpoint's pure parts: request validation (errors name the field), and turning Triton's cumulative
streamed text into deltas that never need taking back (stop strings, split characters, chat markers)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from builder.model.chat_encoding import ChatEncoding
from triton_repo.openai_api.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from triton_repo.openai_api.text_stream import ChatDeltas, TextDeltas, held_tail

ENC = ChatEncoding()
CALLS = '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'


def error_for(model, body) -> APIError:
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc)
    with pytest.raises(APIError) as err:
        req.check_fields()
    return err.value


@pytest.mark.parametrize("model, body, param, words", [
    (CompletionRequest, {"model": "m", "prompt": "p", "colour": 1}, "colour", "Unrecognized request argument"),
    (CompletionRequest, {"prompt": "p"}, "model", "Missing required parameter"),
    (CompletionRequest, {"model": "m", "prompt": "p", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    (CompletionRequest, {"model": "m", "prompt": "p", "stop": [""]}, "stop", "non-empty"),
    (CompletionRequest, {"model": "m", "prompt": "p", "stream": True, "stream_options": {"usage": True}},
     "stream_options.usage", "Unrecognized"),
    (CompletionRequest, {"model": "m", "prompt": "p", "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed when stream"),
    (CompletionRequest, {"model": "m", "prompt": "p", "best_of": 3}, "best_of", "not supported"),
    (CompletionRequest, {"model": "m", "prompt": "p", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "Invalid value"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs", "not supported"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                             "reasoning_effort": "high"}, "reasoning_effort", "chat_template_kwargs"),
])
def test_request_errors_name_the_field(model, body, param, words):
    err = error_for(model, body)
    assert (err.status, err.param) == (400, param) and words in err.message
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": param,
                                    "code": err.code}}


def test_neutral_values_of_refused_fields_are_accepted():
    req = CompletionRequest.model_validate({"model": "m", "prompt": ["p"], "n": 1, "logprobs": None, "best_of": 1,
                                            "echo": False, "logit_bias": {}, "user": "u"})
    req.check_fields()
    assert req.prompt_text() == "p"


def test_chat_switches():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "chat_template_kwargs": {"enable_thinking": True},
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"})
    req.check_fields()
    assert req.thinking and req.completion_limit == 7 and req.tool_list == []
    assert req.messages[0].as_encoding_input() == {"role": "user", "content": "ab"}


@pytest.mark.parametrize("text, markers, held", [
    ("hello wor", ["world"], 3),
    ("hello", ["world"], 0),
    ("ab\ufffd", [], 1),
    ("x</thi", ["</think>"], 5),
    ("x</think>", ["</think>"], 0),  # a whole marker is not held: the split handles it
    ("say STO", ["STOP", "TOP"], 3),
])
def test_held_tail(text, markers, held):
    assert held_tail(text, markers) == held


def test_text_deltas_never_send_a_stop_prefix_that_the_model_later_cuts():
    d = TextDeltas(stop=["END"])
    # The model's cumulative text while it writes "one two EN" and then matches "END" and cuts there.
    out = [d.update(t) for t in ["one", "one two", "one two E", "one two EN"]]
    out.append(d.finish("one two "))
    assert "".join(out) == "one two " and "E" not in "".join(out)


def test_text_deltas_hold_an_incomplete_character():
    d = TextDeltas()
    assert [d.update("caf"), d.update("caf\ufffd"), d.finish("café")] == ["caf", "", "é"]


def test_chat_deltas_split_reasoning_from_content_at_think_end():
    d = ChatDeltas(ENC, thinking=True, tools=False)
    seen = [d.update(t) for t in ["Let", "Let me</th", "Let me</think>Hi", "Let me</think>Hi there"]]
    last, reply = d.finish("Let me</think>Hi there!")
    reasoning = "".join(x.reasoning for x in seen + [last])
    content = "".join(x.content for x in seen + [last])
    assert (reasoning, content) == ("Let me", "Hi there!") == (reply.reasoning, reply.content)
    assert all("<" not in x.reasoning + x.content for x in seen)


def test_chat_deltas_hold_a_tool_call_block_and_return_it_parsed():
    d = ChatDeltas(ENC, thinking=False, tools=True)
    text = "Checking." + CALLS
    seen = [d.update(text[:k]) for k in range(1, len(text) + 1)]
    last, reply = d.finish(text)
    assert "".join(x.content for x in seen + [last]) == "Checking."
    assert [c.name for c in reply.tool_calls] == ["f"]


def test_chat_deltas_release_a_malformed_tool_block_as_content_at_the_end():
    d = ChatDeltas(ENC, thinking=False, tools=True)
    text = "Checking.\n\n<｜DSML｜function_calls>\nnonsense"
    seen = [d.update(text[:k]) for k in range(1, len(text) + 1)]
    last, reply = d.finish(text)
    assert "".join(x.content for x in seen + [last]) == text == reply.content and not reply.tool_calls


def test_chat_deltas_drop_end_of_sentence():
    d = ChatDeltas(ENC, thinking=False, tools=False)
    seen = [d.update("Hi<｜end"), d.update("Hi<｜end▁of▁sentence｜>")]
    last, reply = d.finish("Hi<｜end▁of▁sentence｜>")
    assert "".join(x.content for x in seen + [last]) == "Hi" == reply.content

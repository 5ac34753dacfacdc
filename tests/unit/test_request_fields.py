"""Request fields that are not model inputs (Triton passes them as request parameters): TensorRT-LLM's
ensemble/BLS names are aliases, Triton's own names pass, anything else is refused naming the field (issue 21
item 1)."""

from __future__ import annotations

import pytest

from builder.errors import RequestError
from builder.sampling_params import REQUEST_ALIASES, SamplingParams, inputs_from_parameters
from triton_repo.interface import INPUTS

INPUT_NAMES = tuple(t.name for t in INPUTS)


def test_every_alias_names_an_input_of_the_interface():
    assert set(REQUEST_ALIASES.values()) <= set(INPUT_NAMES)
    # TensorRT-LLM's ensemble names (docs/request-fields.md, TRI-1/TRI-4) for the inputs llmapi has.
    assert REQUEST_ALIASES["max_tokens"] == "sampling_param_max_tokens"
    assert REQUEST_ALIASES["stop_words"] == "sampling_param_stop"
    assert REQUEST_ALIASES["exclude_input_in_output"] == "sampling_param_exclude_input_from_output"
    assert REQUEST_ALIASES["stream"] == "streaming"


@pytest.mark.parametrize("params,expected", [
    ({"max_tokens": 64}, {"sampling_param_max_tokens": 64}),
    ({"temperature": 0.5, "top_k": 4, "top_p": 0.9, "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2},
     {"sampling_param_temperature": 0.5, "sampling_param_top_k": 4, "sampling_param_top_p": 0.9,
      "sampling_param_seed": 3, "sampling_param_presence_penalty": 0.1, "sampling_param_frequency_penalty": 0.2}),
    ({"stop_words": "."}, {"sampling_param_stop": "."}),
    ({"sampling_param_max_tokens": 5}, {"sampling_param_max_tokens": 5}),  # an input name sent as a parameter
    ({"id": "abc", "priority": 1, "timeout": 10, "triton_enable_empty_final_response": True}, {}),  # Triton's own
    ({"beam_width": 1, "num_return_sequences": 1}, {}),  # the values that change nothing
])
def test_aliases_and_triton_names(params, expected):
    assert inputs_from_parameters(params, inputs=INPUT_NAMES) == expected


@pytest.mark.parametrize("params,message", [
    ({"max_token": 4}, "unknown request field 'max_token' (did you mean 'max_tokens'?)"),
    ({"sampling_param_max_token": 4}, "(did you mean 'sampling_param_max_tokens'?)"),
    ({"foo": 1}, "unknown request field 'foo'; the model's inputs are "),
    ({"repetition_penalty": 1.2}, "repetition_penalty is not supported"),
    ({"min_tokens": 2}, "min_tokens is not supported"),
    ({"beam_width": 4}, "beam_width 4 is not supported"),
    ({"num_return_sequences": 2}, "num_return_sequences 2 is not supported"),
    ({"max_tokens": 4, "sampling_param_max_tokens": 4}, "both given"),
])
def test_fields_the_model_would_drop_are_refused_by_name(params, message):
    with pytest.raises(RequestError) as err:
        inputs_from_parameters(params, inputs=INPUT_NAMES)
    assert message in str(err.value)


@pytest.mark.parametrize("value", ["5", True, [5]])
def test_a_request_field_of_the_wrong_type_is_refused(value):
    fields = inputs_from_parameters({"max_tokens": value}, inputs=INPUT_NAMES)
    with pytest.raises(RequestError, match="sampling_param_max_tokens must be"):
        SamplingParams.from_triton(lambda name, default: fields.get(name, default), lambda name: [])

"""The sampling parameters of one generation request: the one record used by ``dsbuild generate`` (its flags are
derived from the fields), the Triton clients (the inputs they send), the CPU Triton model (the inputs it parses)
and the reference engine (``builder.engine.sampling``).

Each field carries its Triton input name (TensorRT-LLM's ``llmapi`` model: ``sampling_param_*``, see
``triton_repo.interface``), its type there and its help text; :meth:`SamplingParams.validate` is the one place
that checks the values. Torch-free, so clients import it without paying for torch.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from builder.errors import RequestError, did_you_mean

UINT64_MAX = (1 << 64) - 1
INT32_MAX = (1 << 31) - 1
# The FP32 range: every float field travels to Triton as FP32, so a value must survive that conversion (no
# overflow to infinity, no underflow of a non-zero value to 0). docs/sampling.md states every range and why.
FP32_MAX = 3.4028234663852886e38
FP32_TINY = 2.0 ** -149  # the smallest positive FP32 (a subnormal)
DEFAULT_MAX_TOKENS = 16  # what a request that names no max_tokens gets (TensorRT-LLM's llmapi model likewise)


def _param(default: Any, *, triton: str, dtype: str, help: str, always_sent: bool = False,
           legacy: str | None = None) -> Any:
    """A field: ``triton`` is its input name and ``dtype`` its Triton type; ``always_sent``: clients send it even
    at its default (the others only when set, so a server whose model lacks them still takes plain requests);
    ``legacy``: its request name in TensorRT-LLM's ``ensemble``/``tensorrt_llm_bls`` models, accepted as an alias
    (docs/request-fields.md)."""
    return field(default=default, metadata={"triton": triton, "dtype": dtype, "help": help,
                                            "always_sent": always_sent, "legacy": legacy or triton.removeprefix(
                                                "sampling_param_")})


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = _param(DEFAULT_MAX_TOKENS, triton="sampling_param_max_tokens", dtype="INT32",
                             help="Tokens to generate at most.", always_sent=True)
    temperature: float = _param(0.0, triton="sampling_param_temperature", dtype="FP32",
                                help="Sampling temperature; 0 = greedy.", always_sent=True)
    top_k: int = _param(0, triton="sampling_param_top_k", dtype="INT32",
                        help="Sample among the k most likely tokens; 0 = off.", always_sent=True)
    top_p: float = _param(1.0, triton="sampling_param_top_p", dtype="FP32",
                          help="Sample among the most likely tokens whose probabilities reach p (0 < p <= 1).",
                          always_sent=True)
    seed: int | None = _param(None, triton="sampling_param_seed", dtype="UINT64",
                              help="Sampling seed (same seed, same tokens).")
    # TensorRT-LLM's SamplingParams: subtracted from a token's logit once it occurs at all (presence) and per
    # occurrence (frequency), counting the prompt and the generated tokens (prompt_ignore_length 0).
    presence_penalty: float = _param(0.0, triton="sampling_param_presence_penalty", dtype="FP32",
                                     help="Subtracted from the logit of every token already in the prompt or output "
                                          "(negative: favour them).")
    frequency_penalty: float = _param(0.0, triton="sampling_param_frequency_penalty", dtype="FP32",
                                      help="Subtracted from a token's logit once per occurrence in the prompt and "
                                           "output.")
    stop: tuple[str, ...] = _param((), triton="sampling_param_stop", dtype="BYTES", legacy="stop_words",
                                   help="Stop strings: the output ends before the first one it contains.")

    # ----- the one validation point -----
    def validate(self) -> "SamplingParams":
        """Raise RequestError naming the first bad field; returns self.

        TensorRT-LLM's C++ SamplingConfig checks temperature >= 0, top_k >= 0 and top_p in (0, 1], and leaves the
        penalties unchecked (docs/sampling.md, with the source); dsbuild adds what its wire types need: integers
        within their Triton type, floats finite and neither overflowing nor vanishing in FP32. Every value these
        rules accept is safe for the engine's sampling arithmetic (``builder.engine.sampling``: float64, bounded)."""
        def bad(name: str, rule: str) -> RequestError:
            return RequestError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and not _is_int(value) or f.type == "float" and not _is_number(value):
                raise bad(f.name, f"a{'n integer' if f.type == 'int' else ' number'}")
            if f.type == "float" and not _fits_fp32(value):
                raise bad(f.name, f"a finite number that FP32 can carry (0, or a magnitude from about "
                                  f"{FP32_TINY:.2g} to {FP32_MAX:.3g})")
        if self.max_tokens < 1:
            raise bad("max_tokens", "at least 1")
        if self.max_tokens > INT32_MAX:
            raise bad("max_tokens", f"at most {INT32_MAX} (INT32)")
        if self.temperature < 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if not 0 <= self.top_k <= INT32_MAX:
            raise bad("top_k", f"in [0, {INT32_MAX}] (0 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= UINT64_MAX):
            raise bad("seed", f"an integer in [0, {UINT64_MAX}]")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    # ----- JSON (the engine's broadcast to its ranks) -----
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        data = dict(data)
        if "stop" in data:
            data["stop"] = tuple(data["stop"])
        return cls(**data)

    # ----- Triton inputs -----
    def triton_inputs(self) -> dict[str, Any]:
        """The model inputs for these parameters (name -> value; lists for ``-1`` dims)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["always_sent"] or value != f.default:
                out[f.metadata["triton"]] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_triton(cls, scalar: Callable[[str, Any], Any], strings: Callable[[str], list[str]]) -> "SamplingParams":
        """Parse a request's inputs: ``scalar(name, default)`` reads a one-value input, ``strings(name)`` a string
        list. Types are checked here (an FP32 max_tokens is refused, not truncated); then :meth:`validate`."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name, dtype = f.metadata["triton"], f.metadata["dtype"]
            if dtype == "BYTES":
                values[f.name] = tuple(s for s in strings(name) if s)
                continue
            value = scalar(name, f.default)
            if value is None or value is f.default:
                values[f.name] = f.default
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"{name} must be a number, got {value!r}")
            elif dtype.startswith(("INT", "UINT")):
                if not float(value).is_integer():
                    raise RequestError(f"{name} must be an integer, got {value!r}")
                values[f.name] = int(value)
            else:
                values[f.name] = float(value)
        try:
            return cls(**values).validate()
        except RequestError as exc:  # name the input the client sent
            raise RequestError(_triton_names(str(exc))) from None


def triton_input_types() -> dict[str, str]:
    """Triton type of every sampling input (the clients' encoders read it)."""
    return {f.metadata["triton"]: f.metadata["dtype"] for f in fields(SamplingParams)}


def _triton_names(message: str) -> str:
    for f in fields(SamplingParams):
        if message.startswith(f.name + " "):
            return f.metadata["triton"] + message[len(f.name):]
    return message


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fits_fp32(v: float) -> bool:
    """Finite, and FP32 (round to nearest, as the clients' numpy conversion does) neither overflows it nor turns a
    non-zero value into 0."""
    if not math.isfinite(v):
        return False
    try:
        as_fp32 = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # some Python builds raise instead of rounding to infinity
        return False
    return math.isfinite(as_fp32) and (as_fp32 == 0) == (v == 0)


# ----- request fields that are not inputs: aliases and refusals (docs/request-fields.md) -----
# Triton's generate extension turns every top-level JSON key that is not a model input into a request *parameter*
# (as do clients that send parameters), so a field the model does not read would be dropped silently. The model
# reads them here: TensorRT-LLM's ensemble/BLS names of inputs it has are aliases; names Triton reserves for itself
# pass; everything else is refused, naming the field.
REQUEST_ALIASES: dict[str, str] = {
    **{f.metadata["legacy"]: f.metadata["triton"] for f in fields(SamplingParams)},
    "stream": "streaming",
    "exclude_input_in_output": "sampling_param_exclude_input_from_output",  # "in" there, "from" here
    "return_perf_metrics": "sampling_param_return_perf_metrics",
}
# Ensemble/BLS fields the llmapi interface has no input for, accepted only at the value that changes nothing.
NEUTRAL_ONLY: dict[str, Any] = {"beam_width": 1, "num_return_sequences": 1}
# Ensemble/BLS fields the llmapi interface (either flavour) cannot honour: refused with this reason.
UNSUPPORTED = ("repetition_penalty", "min_tokens", "length_penalty", "bad_words", "end_id", "pad_id",
               "return_log_probs", "return_context_logits", "return_generation_logits", "embedding_bias_words",
               "embedding_bias_weights", "lora_task_id", "lora_weights", "lora_config", "prompt_embedding_table",
               "guided_decoding_guide_type", "guided_decoding_guide")
# Triton's own request parameters (its parameters extension reserves these and the triton_ prefix; the generate
# extension passes the request "id" on as a parameter too).
TRITON_RESERVED = frozenset({"sequence_id", "priority", "timeout", "sequence_start", "sequence_end", "headers", "id",
                             "binary_data_output"})


def inputs_from_parameters(parameters: dict[str, Any], *, inputs: tuple[str, ...]) -> dict[str, Any]:
    """The model inputs a request's parameters stand for (input name -> value), from the aliases above; raises
    RequestError naming the first field the model would otherwise drop. ``inputs``: the model's input names
    (a parameter spelled like one of them is taken as that input)."""
    out: dict[str, Any] = {}
    known = set(inputs)
    for name, value in parameters.items():
        if name in TRITON_RESERVED or name.startswith("triton_"):
            continue
        if name in NEUTRAL_ONLY:
            if value != NEUTRAL_ONLY[name] or isinstance(value, bool):
                raise RequestError(f"{name} {value!r} is not supported (TensorRT-LLM's llmapi model has no such "
                                   f"input); only {NEUTRAL_ONLY[name]} is accepted")
            continue
        if name in UNSUPPORTED:
            raise RequestError(f"{name} is not supported: TensorRT-LLM's llmapi model (this deployment's "
                               "interface) has no input for it")
        target = name if name in known else REQUEST_ALIASES.get(name)
        if target is None:
            close = did_you_mean(name, [*known, *REQUEST_ALIASES])
            raise RequestError(f"unknown request field {name!r}{close}; the model's inputs are "
                               f"{', '.join(sorted(known))} (TensorRT-LLM ensemble names "
                               f"{', '.join(sorted(REQUEST_ALIASES))} are accepted too)")
        if target in out:
            raise RequestError(f"{name} and another name of {target} are both given")
        out[target] = value
    return out

"""The one registry of weight formats (``--quant``): what each is, which GPUs run it, how dsbuild makes it.

Everything else derives from this table: the spec's accepted values and help, the planner's compute dtype and
per-architecture support, ``hf_quant_config.json``'s ``quant_algo``, the ModelOpt preset, and the refusals of a
format on a GPU that cannot run it. The stored tensor layout of each format is ``quantize.formats``. Imports
nothing from dsbuild: it sits at the bottom of the import graph.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_ARCHS = ("ampere", "ada", "hopper", "blackwell")


@dataclass(frozen=True)
class QuantFormat:
    name: str
    summary: str
    quant_algo: str | None  # hf_quant_config.json quantization.quant_algo (TensorRT-LLM QuantAlgo name)
    compute_dtype: str  # what the GEMMs run in on a GPU: "fp8" | "fp4" | "bf16"
    archs: frozenset[str]  # GPU architectures whose TensorRT-LLM kernels run it
    calibrated: bool  # needs calibration data (model in memory) rather than a streaming conversion
    modelopt_cfg: str | None = None  # ModelOpt ``mtq`` preset that produces it
    needs: str = ""  # the GPU architectures it needs, in words, for refusals
    cpu_builds: bool = True  # a CPU-only build (no --gpu) makes it for the reference engine
    # Why TensorRT-LLM cannot load this format for DeepSeek at all (then it is reference-engine only: CPU builds).
    not_loadable: str | None = None

    @property
    def reference_engine_only(self) -> bool:
        return self.not_loadable is not None

    def runs_on(self, arch: str) -> bool:
        if arch == "cpu":
            return self.cpu_builds
        return not self.not_loadable and arch in self.archs

    def refusal(self, *, gpu: str, arch: str, gpus: tuple[str, ...] = ()) -> str | None:
        """Why ``gpu`` (of ``arch``) cannot take this format, or None. ``gpus``: the GPUs dsbuild knows that can
        (the caller's GPU table), named in the sentence."""
        if self.runs_on(arch):
            return None
        if self.not_loadable and arch != "cpu":
            return f"{self.name} is reference-engine only: {self.not_loadable}"
        known = f" ({', '.join(gpus)})" if gpus else ""
        target = "this build targets no GPU (a CPU-only build)" if arch == "cpu" else f"{gpu} is {arch}"
        usable = [f.name for f in FORMATS.values() if f.runs_on(arch)]
        return f"{self.name} needs {self.needs}{known}; {target}, which takes --quant {', '.join(usable)}"


_HOPPER_ON = frozenset({"hopper", "blackwell"})

FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("fp8", "DeepSeek's 128x128 block FP8, verified and hard-linked", "FP8_BLOCK_SCALES", "fp8",
                _HOPPER_ON | {"ada"}, calibrated=False, needs="FP8 tensor cores: Ada, Hopper or Blackwell GPUs"),
    QuantFormat("fp8-tensor", "per-tensor FP8 (ModelOpt FP8_DEFAULT_CFG)", "FP8", "fp8", _HOPPER_ON | {"ada"},
                calibrated=True, modelopt_cfg="FP8_DEFAULT_CFG", needs="FP8 tensor cores: Ada, Hopper or Blackwell GPUs"),
    QuantFormat("w4afp8", "INT4 routed experts + FP8 activations, the rest block FP8 (TensorRT-LLM W4A8)",
                "MIXED_PRECISION", "fp8", frozenset({"hopper"}), calibrated=True, needs="Hopper GPUs"),
    QuantFormat("int4-awq", "W4A16 AWQ (ModelOpt INT4_AWQ_CFG), reference engine only", "W4A16_AWQ", "bf16",
                frozenset(GPU_ARCHS), calibrated=True, modelopt_cfg="INT4_AWQ_CFG", needs="a GPU",
                # docs/tensorrt-llm-contract.md#C-MOE-1, #C-MOE-2, #C-MOE-3
                not_loadable="TensorRT-LLM 1.2.1 serves any INT4-per-group DeepSeek MoE with its W4A8 method (SM89/SM90 "
                             "only), which needs FP8 input_scale/weight_scale_2 tensors that ModelOpt's INT4_AWQ export "
                             "does not write, so the checkpoint cannot load on a GPU; use --quant w4afp8 (INT4 experts "
                             "with FP8 activations, Hopper) for a TensorRT-LLM deployment"),
    QuantFormat("nvfp4", "NVFP4 MLPs, experts and o_proj, BF16 MLA projections (ModelOpt's DeepSeek recipe)", "NVFP4",
                "fp4", frozenset({"blackwell"}), calibrated=True, modelopt_cfg="NVFP4_DEFAULT_CFG", needs="Blackwell GPUs",
                cpu_builds=False),
    QuantFormat("bf16", "dequantized BF16", None, "bf16", frozenset(GPU_ARCHS), calibrated=False, needs="a GPU"),
)}

NAMES: tuple[str, ...] = tuple(FORMATS)
FORMAT_OF_ALGO: dict[str | None, QuantFormat] = {f.quant_algo: f for f in FORMATS.values()}


def get(name: str) -> QuantFormat:
    """The format called ``name`` (KeyError names the choices)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown quantization mode {name!r}; choose one of {', '.join(NAMES)}") from None

"""TensorRT-LLM LLM-API configuration for the GPU cluster: rendering (``llm_api``), the per-version allow-list
contract (``contract``), and validation against ``tensorrt_llm`` itself when it is importable (``validate``)."""

PINNED_VERSION = "1.2.1"

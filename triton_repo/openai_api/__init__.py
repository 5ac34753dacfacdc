"""An OpenAI-compatible HTTP endpoint (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) in front of a
Triton server that serves dsbuild's ``tensorrt_llm`` model, talking to it over gRPC streaming with tritonclient, so
what it answers is what Triton serves. Used by both flavours: Triton's own OpenAI frontend does not drive the
TensorRT-LLM ``llmapi`` model (docs/serving-openai.md says why)."""

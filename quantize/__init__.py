"""Quantization formats for DeepSeek-V3.2 checkpoints: block FP8 math, INT4 packing, ModelOpt flows."""

"""Triton model repositories for dsbuild: versioned templates, the strict renderer, the packager, the server
wrapper and the clients. Nothing here imports TensorRT-LLM; the GPU flavour's ``model.py`` does so only inside
Triton on a GPU host."""

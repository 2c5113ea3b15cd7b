"""Interop: checkpoints in from the original LLaVA layout and llava-hf, out to HF, GGUF (llama.cpp).

`legacy` reads the original layout, `convert` assembles llavakit models from it, `hf` imports and
exports Hugging Face llava dirs, `gguf` writes llama.cpp files. Nothing heavy is imported here.
"""

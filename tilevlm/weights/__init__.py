"""Weights in and out: tilevlm's own directories (native), Hugging Face SigLIP + Llama/SmolLM2
(huggingface), nanoVLM (nanovlm). Only safetensors and JSON are ever read (never a pickle)."""

"""Weights in and out: tilevlm's own directories (native), Hugging Face SigLIP + Llama/SmolLM2
(huggingface), nanoVLM (nanovlm), Idefics3 / SmolVLM in place (idefics3) and back out
(export_idefics3); run folders (run_folder) and what a --model path is (loading). Only
safetensors and JSON are ever read (never a pickle)."""

"""Inference: store a loaded model's weights for speed (quantize), sample, generate (prefill +
cached decode). Loading a model is `tilevlm.weights.loading`'s."""

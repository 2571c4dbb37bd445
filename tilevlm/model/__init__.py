"""The tilevlm model: SigLIP vision encoder, pixel-shuffle projector, Llama decoder, the VLM."""

from tilevlm.model.language import KVCache, LanguageModel
from tilevlm.model.projector import ModalityProjector, pixel_shuffle
from tilevlm.model.vision import VisionEncoder
from tilevlm.model.vlm import VisionLanguageModel, VLMOutput, causal_lm_loss, flatten_tiles

__all__ = [
    "KVCache",
    "LanguageModel",
    "ModalityProjector",
    "VLMOutput",
    "VisionEncoder",
    "VisionLanguageModel",
    "causal_lm_loss",
    "flatten_tiles",
    "pixel_shuffle",
]

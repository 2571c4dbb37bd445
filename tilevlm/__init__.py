"""tilevlm: a small, fast, pure-PyTorch tile-based vision-language model library."""

from tilevlm.config import PRESETS, VLMConfig, preset

__version__ = "0.1.0"
__all__ = ["PRESETS", "VLMConfig", "preset", "__version__"]

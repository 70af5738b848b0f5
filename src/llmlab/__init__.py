"""llmlab: build, pretrain, fine-tune, distill, evaluate, chat with and serve LLaMA-family models."""

from llmlab.config import PRESETS, ModelConfig
from llmlab.errors import LLMLabError

__all__ = ["PRESETS", "LLMLabError", "ModelConfig"]
__version__ = "0.1.0"

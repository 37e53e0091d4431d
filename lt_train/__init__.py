"""lt_train: turn long-context LLMs into hybrid streaming/full-attention models (LightTransfer)."""
from .cache import HybridCache
from .hybrid import HybridConfig, convert_to_hybrid, load_hybrid

__all__ = ["HybridCache", "HybridConfig", "convert_to_hybrid", "load_hybrid"]
__version__ = "0.1.0"

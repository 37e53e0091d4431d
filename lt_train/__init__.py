"""lt_train: turn long-context LLMs into hybrid streaming/full-attention models (LightTransfer)."""
from .cache import HybridCache
from .hybrid import HybridConfig, convert_to_hybrid, load_hybrid, revert_hybrid, set_lazy_layers
from .lazy import lazy_ratios, select_lazy_layers
from .online import OnlineHybridCache

__all__ = ["HybridCache", "OnlineHybridCache", "HybridConfig", "convert_to_hybrid", "load_hybrid",
           "revert_hybrid", "set_lazy_layers", "lazy_ratios", "select_lazy_layers"]
__version__ = "0.1.0"

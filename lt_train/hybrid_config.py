"""`HybridConfig`: which layers are lazy and how their streaming attention looks, and where a converted model keeps
it (`config.lt_hybrid`). On its own so that the cache can read a model's settings without the conversion code."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .attention import BACKENDS
from .lazy_ratio import resolve_num_lazy

CONFIG_KEY = "lt_hybrid"
ONLINE_CRITERIA = ("ratio", "error")


@dataclass
class HybridConfig:
    """Which layers are lazy and how their streaming attention looks (paper defaults: S=4, W=1020)."""

    lazy_layers: list[int] = field(default_factory=list)
    sink_tokens: int = 4
    window: int = 1020
    backend: str = "auto"
    # LightTransfer-Test: choose this many (or this fraction of) layers during each prefill instead
    online_num_lazy: int | float | None = None
    last_queries: int = 64  # queries whose attention decides online selection
    online_criterion: str = "error"  # how online selection ranks layers: "error" (output error, measured best) | "ratio" (attention mass, the paper)

    def validate(self, num_layers: int | None = None) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (the query itself counts), got {self.window}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        bad = [i for i in self.lazy_layers if not isinstance(i, int) or isinstance(i, bool)]
        if bad:
            raise ValueError(f"lazy_layers must be integers, got {bad}")
        dup = sorted({i for i in self.lazy_layers if self.lazy_layers.count(i) > 1})
        if dup:
            raise ValueError(f"lazy_layers has repeated indices {dup}")
        if self.online_num_lazy is not None and self.lazy_layers:
            raise ValueError("give either lazy_layers (chosen offline) or online_num_lazy (chosen during "
                             "prefill), not both")
        if self.online_criterion not in ONLINE_CRITERIA:
            raise ValueError(f"unknown online_criterion {self.online_criterion!r}; choose one of {ONLINE_CRITERIA}")
        if self.last_queries < 1:
            raise ValueError(f"last_queries must be >= 1, got {self.last_queries}")
        if num_layers is not None and self.online_num_lazy is not None:
            resolve_num_lazy(self.online_num_lazy, num_layers)
        if num_layers is not None:
            out = [i for i in self.lazy_layers if not 0 <= i < num_layers]
            if out:
                raise ValueError(f"lazy layer indices {out} out of range for a model with {num_layers} layers "
                                 f"(valid: 0..{num_layers - 1})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_model_config(cls, config) -> "HybridConfig":
        data = getattr(config.get_text_config(decoder=True), CONFIG_KEY, None)
        if data is None:
            raise ValueError("this model config has no hybrid settings; call convert_to_hybrid first")
        names = {f.name for f in dataclasses.fields(cls)}
        # saved before the criterion was a setting (or while "ratio" was the default): those ranked by ratio
        return cls(**{"online_criterion": "ratio", **{k: v for k, v in data.items() if k in names}})

"""One training / evaluation example before tokenisation: shared by the sources that read them and the demo
generator that makes them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Example:
    question: str
    response: str
    system: str | None = None
    answer: str | None = None
    id: str | None = None

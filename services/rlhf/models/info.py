"""Plain description of a loaded model: what every response names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRef:
    """One version of one model."""

    name: str
    version: str


@dataclass(frozen=True)
class ModelInfo:
    """What a service reports about the model it serves."""

    ref: ModelRef
    backend: str
    kind: str  # "policy" | "reward" | "reference"
    max_context: int
    vocab_size: int
    follows_registry: bool = False
    base: ModelRef | None = None  # an adapter version (LoRA): the base version it runs on

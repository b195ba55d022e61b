"""Precision: storage formats and the single dispatch points for dense and grouped GEMMs."""
from .linear import linear
from .moe import experts

__all__ = ["linear", "experts"]

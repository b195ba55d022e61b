"""Precision: MXFP8 format, the recipe, and the single dispatch points for dense and grouped GEMMs."""
from .linear import GemmConfig, linear, select_backend
from .moe import experts
from .mxfp8 import MXFP8Tensor, dequantize, quantize
from .recipe import Precision, Recipe, RecipeError, StoragePlan, storage_plan

__all__ = ["GemmConfig", "linear", "select_backend", "experts", "MXFP8Tensor", "dequantize", "quantize", "Precision", "Recipe",
           "RecipeError", "StoragePlan", "storage_plan"]

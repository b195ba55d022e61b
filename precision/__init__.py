"""Precision: MXFP8 format, the recipe, and the single dispatch points for dense and grouped GEMMs."""
from .linear import GemmConfig, linear, select_backend
from .moe import experts
from .mxfp8 import MXFP8Tensor, dequantize, quantize
from .qat import QATWeight, fake_quant_mxfp8
from .recipe import Precision, Recipe, RecipeError, StoragePlan, storage_plan

__all__ = ["GemmConfig", "linear", "select_backend", "experts", "MXFP8Tensor", "dequantize", "quantize", "QATWeight",
           "fake_quant_mxfp8", "Precision", "Recipe", "RecipeError", "StoragePlan", "storage_plan"]

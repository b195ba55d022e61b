"""The precision recipe: which weights are stored MXFP8 and which stay high precision.

MXFP8 (what TransformerEngine quantizes by default): q_proj / q_a_proj / q_b_proj,
kv_a_proj_with_mqa, o_proj, dense MLP, shared experts, routed experts.
High precision: kv_b_proj (absorbed MLA contracts it over the nope head dim, across the 1x32
blocks a trainer makes along kv_lora_rank), the router gate and its correction bias, norms,
embeddings and lm_head. `high_precision` extends the list (e.g. "shared_experts").

Storage is decided once per engine from the recipe, the checkpoint's own format and the
`quantization` argument (`storage_plan`); modules are named by their engine paths
(`layers.3.self_attn.q_proj`, `layers.3.mlp.experts`). The recipe's `high_precision` list and a
checkpoint's `modules_to_not_convert` are read by one rule, `in_module_list`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .linear import REFERENCE, GemmConfig
from .mxfp8 import BLOCK, SCALE_MODES

ACT_MODES = ("w8a8", "w8a16")
# Modules that may be stored MXFP8 at all; everything else is always high precision.
# kv_b_proj is absent on purpose: the absorbed MLA path needs it high precision (see above).
QUANTIZABLE = re.compile(r"layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)"
                         r"|mlp\.(gate_proj|up_proj|down_proj)"
                         r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj)|mlp\.experts)$")


class RecipeError(ValueError):
    """The recipe, or a checkpoint's quantization_config, cannot be honoured."""


@dataclass(frozen=True)
class Recipe:
    act_mode: str = "w8a8"  # w8a8: activations MXFP8 along K before each MXFP8 GEMM, as the trainer does
    scale_mode: str = "rceil"  # used when quantizing (activations; weights at load for quantization="mxfp8")
    high_precision: tuple[str, ...] = ("kv_b_proj",)

    def __post_init__(self):
        if self.act_mode not in ACT_MODES:
            raise RecipeError(f"recipe act_mode={self.act_mode!r}; supported: {ACT_MODES}")
        if self.scale_mode not in SCALE_MODES:
            raise RecipeError(f"recipe scale_mode={self.scale_mode!r}; supported: {SCALE_MODES}")
        hp = self.high_precision
        if not isinstance(hp, (tuple, list)) or not all(isinstance(m, str) and m for m in hp):
            raise RecipeError(f"recipe high_precision={hp!r}: must be a list of module names")

    def wants_mxfp8(self, module: str) -> bool:
        return bool(QUANTIZABLE.search(module)) and not in_module_list(module, self.high_precision)


def _components(name: str) -> list[str]:
    # Engine names are HF names without the `model.` prefix (lm_head has none in either).
    parts = name.split(".")
    return parts if parts[0] in ("model", "lm_head") else ["model"] + parts


def in_module_list(module: str, entries: Iterable[str]) -> bool:
    """True when an entry names `module` or one of its parents by whole dotted components, the way
    checkpoint producers read `modules_to_not_convert`: `shared_experts` and `mlp.shared_experts`
    match `layers.3.mlp.shared_experts.up_proj`; `layers.1` matches `layers.1.mlp.up_proj` but not
    `layers.12.mlp.up_proj`. Module and entries may be HF names (`model.`-prefixed) or engine names."""
    parts = _components(module)
    for entry in entries:
        want = entry.split(".")
        n = len(want)
        if any(parts[i:i + n] == want for i in range(len(parts) - n + 1)):
            return True
    return False


def _below(entry: str, module: str) -> bool:
    """`entry` is a full path strictly inside `module` (e.g. one expert of a layer's experts)."""
    inner, outer = _components(entry), _components(module)
    return len(inner) > len(outer) and inner[:len(outer)] == outer


@dataclass(frozen=True)
class StoragePlan:
    """Per-module storage decision for one engine."""

    mxfp8_modules: frozenset[str]
    source_mxfp8: bool  # the checkpoint itself carries MXFP8 tensors
    quantize_at_load: bool  # high-precision checkpoint tensors are quantized by the recipe on load
    recipe: Recipe
    # Modules stored high precision whose GEMM the trainer ran MXFP8 w8a8 (a kv_b_proj the checkpoint
    # did not exclude): their weight is dequantized exactly at load and their input is MXFP8
    # quantize-dequantized along K, as the trainer's forward did.
    quantized_inputs: frozenset[str] = frozenset()
    # The trainer's view of the same plan (`model.trainable`): its MXFP8 modules hold a trainable
    # high-precision master weight that the forward fake-quantizes (precision.qat), not stored bytes.
    qat: bool = False

    def is_mxfp8(self, module: str) -> bool:
        return module in self.mxfp8_modules


def checkpoint_is_mxfp8(quantization_config: dict | None) -> bool:
    """Validate a checkpoint's quantization_config; True for the MXFP8 convention, False for none."""
    if quantization_config is None:
        return False
    qc = quantization_config
    if not isinstance(qc, dict):
        raise RecipeError(f"quantization_config must be an object with quant_method 'mxfp8' and its fields, got "
                          f"{type(qc).__name__} {qc!r:.80}")
    if qc.get("quant_method") != "mxfp8":
        raise RecipeError(f"quantization_config.quant_method={qc.get('quant_method')!r}: only 'mxfp8' checkpoints "
                          "are supported")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise RecipeError(f"quantization_config.modules_to_not_convert must be a list of module names, "
                          f"got {skip!r:.80}")
    expected = {"fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [1, BLOCK], "activation_scheme": "dynamic"}
    for key, value in expected.items():
        if key in qc and qc[key] != value:
            raise RecipeError(f"quantization_config.{key}={qc[key]!r}; expected {value!r}")
    return True


def storage_plan(k_dims: dict[str, tuple[int, ...]], quantization_config: dict | None,
                 quantization: str | None, recipe: Recipe) -> StoragePlan:
    """Decide storage for every module in `k_dims` (module name -> its GEMMs' contraction dims)."""
    if quantization not in (None, "mxfp8"):
        raise RecipeError(f"quantization={quantization!r}; supported: None (keep the checkpoint's format), 'mxfp8'")
    source = checkpoint_is_mxfp8(quantization_config)
    not_converted = list((quantization_config or {}).get("modules_to_not_convert") or [])
    chosen, inputs = set(), set()
    for module, ks in k_dims.items():
        if module.endswith("kv_b_proj") and source and not in_module_list(module, not_converted):
            if recipe.act_mode == "w8a8":
                inputs.add(module)
            continue
        if not QUANTIZABLE.search(module):
            continue
        if module.endswith("mlp.experts") and any(_below(m, module) for m in not_converted):
            raise RecipeError(f"modules_to_not_convert excludes single experts of {module}; all experts of a layer "
                              "must share one format")
        in_checkpoint_mxfp8 = source and not in_module_list(module, not_converted)
        if recipe.wants_mxfp8(module) and (in_checkpoint_mxfp8 or quantization == "mxfp8"):
            if any(k % BLOCK for k in ks):
                raise RecipeError(f"{module}: contraction dim(s) {ks} not a multiple of {BLOCK}; "
                                  "add it to the recipe's high_precision list")
            chosen.add(module)
    return StoragePlan(frozenset(chosen), source, quantization == "mxfp8", recipe, frozenset(inputs))


@dataclass(frozen=True)
class Precision:
    """What the storage plan decided for one module, handed to it at construction (modules never
    probe or patch each other's storage afterwards). `child("q_proj")` scopes to a submodule."""

    plan: StoragePlan | None = None
    gemm: GemmConfig = REFERENCE
    name: str = ""

    def child(self, name: str) -> "Precision":
        return replace(self, name=f"{self.name}.{name}" if self.name else name)

    @property
    def mxfp8(self) -> bool:
        return self.plan is not None and self.plan.is_mxfp8(self.name)

    @property
    def qat(self) -> bool:
        """An MXFP8 module of a trainer's model: master weight, fake-quantized in the forward."""
        return self.mxfp8 and self.plan.qat

    @property
    def quantize_input(self) -> bool:
        """The trainer quantized this high-precision module's input (see StoragePlan.quantized_inputs)."""
        return self.plan is not None and self.name in self.plan.quantized_inputs

"""`Engine`: the Python API an RL loop calls (sglang-compatible names)."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from ..model import load_model
from ..model.tokenizer import load_tokenizer
from ..precision import GemmConfig, Recipe, select_backend
from ..precision.layout import LayoutCache

from .config import EngineConfig, check_engine_config, engine_config
from .presets import resolve_model_path
from .runner import generate_sequence
from .sampling_params import SamplingParams

log = logging.getLogger("mxroll")

# float64 is a CPU reference dtype (numerical checks); serving uses bfloat16 or float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Engine:
    def __init__(self, config: EngineConfig | dict | None = None, *, model_path: str | None = None,
                 device: str | None = None, dtype: str | None = None, quantization: str | None = None,
                 **overrides: Any):
        explicit = {k: v for k, v in dict(model_path=model_path, device=device, dtype=dtype,
                                            quantization=quantization).items() if v is not None}
        base = asdict(config) if is_dataclass(config) else config
        self.config = cfg = engine_config(base, explicit, overrides)
        check_engine_config(cfg)
        logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = cfg.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = DTYPES[dtype_name]
        self.recipe = Recipe(cfg.act_mode, cfg.scale_mode, tuple(cfg.high_precision))
        backend, why = select_backend(self.device, cfg.gemm_backend)
        if backend == "triton" and self.dtype == torch.float32:
            if cfg.gemm_backend == "triton":
                raise ValueError("gemm_backend='triton' takes bf16 activations; use dtype='bfloat16'")
            backend, why = "torch", "torch reference (float32 engine; the Triton kernel takes bf16)"
        self.gemm = GemmConfig(cfg.act_mode, cfg.scale_mode, backend)
        self.model_path = resolve_model_path(cfg.model_path, cfg.seed, cfg.cache_dir, cfg.progress)
        self.model = load_model(self.model_path, self.device, self.dtype, progress=cfg.progress,
                                quantization=cfg.quantization, recipe=self.recipe, gemm=self.gemm)
        self.layouts = LayoutCache()
        self.model.postprocess(self.layouts)
        self.model_config = self.model.cfg
        self.context_length = cfg.context_length or self.model_config.max_position_embeddings
        self.tokenizer = load_tokenizer(self.model_path, self.model_config.bos_token_id)
        self.weight_version = "default"
        self._generator = torch.Generator(self.device).manual_seed(cfg.seed)
        mx = "MXFP8 GEMMs: " + why if self.model.plan.mxfp8_modules else "no MXFP8 weights"
        moe = "Triton fused MoE" if backend == "triton" else "torch reference MoE"
        log.info("engine ready: %s on %s (%s); %s; %s; attention on the torch reference path",
                 self.model_path, self.device, dtype_name, mx, moe)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict | list[dict] | None = None, return_logprob: bool = False):
        """One prompt -> a dict (a list of n dicts when n > 1); a batch -> a list (prompt-major, n each)."""
        prompts, batched = self._prompt_ids(prompt, input_ids)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_dict(sampling_params)] * len(prompts)
        for ids, p in zip(prompts, params):
            if len(ids) + p.max_new_tokens > self.context_length:
                raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={p.max_new_tokens} exceeds the "
                                 f"context length {self.context_length}")
        outputs = []
        for ids, p in zip(prompts, params):
            for j in range(p.n):
                gen = self._generator if p.seed is None else torch.Generator(self.device).manual_seed(p.seed + j)
                seq = generate_sequence(self.model, ids, p, gen)
                outputs.append(self._format(ids, seq, return_logprob))
        if not batched and params[0].n == 1:
            return outputs[0]
        return outputs

    async def async_generate(self, *args, **kwargs):
        return await asyncio.to_thread(self.generate, *args, **kwargs)

    def _prompt_ids(self, prompt, input_ids) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt= or input_ids=")
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer (tokenizer.json); pass input_ids instead")
            batched = isinstance(prompt, list)
            texts = prompt if batched else [prompt]
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("prompt must be a string or a list of strings")
            prompts = [self.tokenizer.encode(t) for t in texts]
        else:
            batched = bool(input_ids) and isinstance(input_ids[0], list)
            prompts = input_ids if batched else [input_ids]
        if not prompts:
            raise ValueError("empty batch: no prompts given")
        V = self.model_config.vocab_size
        for i, ids in enumerate(prompts):
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"prompt {i}: needs at least one token")
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {V})")
        return prompts, batched

    def _format(self, prompt_ids: list[int], seq, return_logprob: bool) -> dict:
        meta = {"id": uuid.uuid4().hex, "finish_reason": seq.finish_reason, "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(seq.output_ids), "weight_version": self.weight_version}
        if return_logprob:
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(seq.output_logprobs, seq.output_ids)]
        out = {"output_ids": seq.output_ids, "meta_info": meta}
        if self.tokenizer is not None:
            out["text"] = self.tokenizer.decode(seq.output_ids)
        return out

    # ---- info / lifecycle -------------------------------------------------------------------
    def get_model_info(self) -> dict:
        return {"model_path": str(self.model_path), "is_generation": True, "weight_version": self.weight_version,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "quantization": "mxfp8" if self.model.plan.mxfp8_modules else None,
                "mxfp8_modules": len(self.model.plan.mxfp8_modules), "act_mode": self.recipe.act_mode,
                "gemm_backend": self.gemm.backend, "context_length": self.context_length}

    def shutdown(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

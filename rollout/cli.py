"""`mxroll` command line: make-checkpoint, generate, rollout."""
from __future__ import annotations

import argparse
import json
import sys

from .. import configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mxroll", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a seeded synthetic checkpoint of a preset (HF layout)")
    mk.add_argument("--preset", required=True, choices=configs.model_presets())
    mk.add_argument("--out", required=True)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="storage dtype (default: the preset's torch_dtype)")
    mk.add_argument("--mxfp8", action="store_true",
                    help="write an MXFP8 checkpoint (e4m3 weight + E8M0 weight_scale_inv, sglang/miles convention)")
    mk.add_argument("--scale-mode", choices=["rceil", "floor"], default="rceil")

    gen = sub.add_parser("generate", help="generate from one prompt and print the sglang-style output")
    gen.add_argument("--model-path", default="preset:tiny")
    gen.add_argument("--prompt", default=None)
    gen.add_argument("--input-ids", default=None, help="comma-separated token ids")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None)
    gen.add_argument("--quantization", default=None, choices=["mxfp8"])
    gen.add_argument("--sampling", default="{}", help='JSON sampling params, e.g. \'{"temperature": 0}\'')
    gen.add_argument("--logprobs", action="store_true")

    ro = sub.add_parser("rollout", help="run a W&B-logged rollout job (default: configs/rollout/default.yaml)")
    ro.add_argument("--config", default=None, help="YAML merged over the default job config")
    ro.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. sampling.n=8 engine.device=cpu")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mxroll {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.cmd == "make-checkpoint":
        from ..model.synthetic import make_checkpoint

        from ..precision import Recipe

        cfg = json.loads(configs.model_preset_path(args.preset).read_text())
        out = make_checkpoint(cfg, args.out, seed=args.seed, dtype=args.dtype, mxfp8=args.mxfp8,
                              recipe=Recipe(scale_mode=args.scale_mode))
        kind = f"MXFP8 ({args.scale_mode}) " if args.mxfp8 else ""
        print(f"wrote {kind}{args.preset} checkpoint (seed {args.seed}) to {out}")
        return 0
    if args.cmd == "generate":
        from .engine import Engine

        engine = Engine(model_path=args.model_path, device=args.device, dtype=args.dtype,
                        quantization=args.quantization)
        ids = [int(t) for t in args.input_ids.split(",")] if args.input_ids else None
        out = engine.generate(prompt=args.prompt, input_ids=ids, sampling_params=json.loads(args.sampling),
                              return_logprob=args.logprobs)
        print(json.dumps(out, indent=2))
        return 0
    from .config import rollout_config
    from .job import run_rollout_job

    run_rollout_job(rollout_config(args.config, list(args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

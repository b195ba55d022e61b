"""`mxroll` command line: make-checkpoint, generate, job (alias rollout), serve, rl."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from contextlib import contextmanager

from tqdm.contrib.logging import logging_redirect_tqdm

from .. import configs
from .reasoning import FORMATS as REASONING_FORMATS
from .tool_calls import FORMATS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOB_DESCRIPTION = """\
Generate n samples per prompt for a number of steps with the engine, compute rewards when a
reward function is given, and write to output_dir:
  rollouts.jsonl  one line per sample: step, prompt_index, sample_index, prompt, input_ids,
                  output_ids, text, logprobs, finish_reason, weight_version, reward, extra
                  (the prompt record's other fields), routed_experts + routed_expert_weights
                  (with return_routed_experts=true)
  metrics.jsonl   one line per step, also logged to W&B (offline unless wandb.mode=online)
Both replace the previous run's files only when the job completes. `rollout` is an alias."""
RL_DESCRIPTION = """\
Run an RL loop that learns, on the built-in tiny model by default. The trainer (this process) and the
rollout engine (a child process serving HTTP, storing MXFP8 weights) are connected by a weight update
group (gloo on CPU, NCCL between two GPUs). Each step: the engine samples n outputs per prompt with
their logprobs -> the task scores them (the fraction of output tokens in the prompt's character set,
lowercase or uppercase letters) -> the trainer recomputes the logprobs with its own MXFP8 w8a8 forward
and takes one GRPO step (group-normalised advantages, PPO-clipped ratio to the rollout logprobs, Adam)
-> the new MXFP8 weights are pushed and swapped in (weight version = step). A bf16 control engine holding
the same weights samples a few prompts per step, to show the mismatch without matched precision.
The engine.* keys configure the engine process (engine.quantization stays mxfp8: the engine stores
the trainer's bytes; engine.log_level is that process's log level).

Per step, to the terminal, W&B and output_dir/metrics.jsonl: reward_mean/std, mismatch_mean/max/frac
(|engine - trainer| logprob over the step's tokens; frac = share above 1e-4), control_mismatch_*,
sync_time_s (export + push + swap), sync_bytes, tokens_per_s (rollout), loss, grad_norm,
clip_fraction, phase times. At the end: a table of the steps, the reward trend (first vs last fifth
of the run), and output_dir/rl.png (reward and mismatch over steps) and output_dir/summary.json."""


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                        help="log level of the mxroll loggers (default INFO; job: the job's engine.log_level; rl: "
                             "the trainer's, the engine process logs at engine.log_level)")
    parser = Parser(prog="mxroll", description=__doc__, epilog="Run `mxroll COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="one of:")

    mk = sub.add_parser("make-checkpoint", parents=[common],
                        help="write a seeded synthetic checkpoint of a preset (HF layout)",
                        description="Write a checkpoint of a built-in model preset with seeded random weights "
                                    "(config.json, safetensors and, for small vocabularies, a byte tokenizer), "
                                    "high precision or MXFP8.")
    mk.add_argument("--preset", required=True, choices=configs.model_presets(),
                    help="the model preset (configs/models/NAME.json)")
    mk.add_argument("--out", required=True, help="directory to write (must be empty or new unless --overwrite)")
    mk.add_argument("--overwrite", action="store_true",
                    help="replace the checkpoint in a non-empty --out (its *.safetensors, index, config and "
                         "tokenizer files are removed first)")
    mk.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    mk.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="storage dtype (default: the preset's torch_dtype)")
    mk.add_argument("--mxfp8", action="store_true",
                    help="write an MXFP8 checkpoint (e4m3 weight + E8M0 weight_scale_inv, sglang/miles convention)")
    mk.add_argument("--scale-mode", choices=["rceil", "floor"], default="rceil",
                    help="E8M0 scale rule for --mxfp8 (default rceil, as TransformerEngine and torchao)")

    gen = sub.add_parser("generate", parents=[common],
                         help="generate from one prompt and print the sglang-style output",
                         description="Load a model, generate from one prompt and print the output dict "
                                     "(output_ids, text, meta_info) as JSON.")
    gen.add_argument("--model-path", default="preset:tiny",
                     help="checkpoint directory or preset:NAME (default preset:tiny)")
    gen.add_argument("--prompt", default=None, help="prompt text (needs a tokenizer; or use --input-ids)")
    gen.add_argument("--input-ids", default=None, help="comma-separated token ids")
    gen.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    gen.add_argument("--dtype", default=None,
                     help="high-precision dtype: float32 | bfloat16 (default float32 on cpu, bfloat16 on cuda)")
    gen.add_argument("--quantization", default=None, choices=["mxfp8"],
                     help="quantize a high-precision checkpoint to MXFP8 at load (default: keep its format)")
    gen.add_argument("--sampling", default="{}", help='JSON sampling params, e.g. \'{"temperature": 0}\'')
    gen.add_argument("--logprobs", action="store_true", help="include per-token logprobs in meta_info")

    job = sub.add_parser("job", aliases=["rollout"], parents=[common],
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="run a W&B-logged rollout job (default: configs/rollout/default.yaml)",
                         description=JOB_DESCRIPTION, epilog_fn=_job_epilog)
    job.add_argument("--config", default=None, help="YAML merged over the default job config")
    job.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotlist overrides of job config keys (listed below), e.g. sampling.n=8 engine.device=cpu")

    rl = sub.add_parser("rl", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="run the RL loop: GRPO with live MXFP8 weight sync (default: configs/rl/default.yaml)",
                        description=RL_DESCRIPTION, epilog_fn=_rl_epilog)
    rl.add_argument("--config", default=None, help="YAML merged over the default RL config")
    rl.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotlist overrides of RL config keys (listed below), e.g. steps=20 lr=3e-3 control=false")

    sv = sub.add_parser("serve", parents=[common],
                        help="serve the engine over HTTP (sglang endpoints, /v1/completions, weight sync)",
                        description="Serve the engine over HTTP. Settings, lowest precedence first: defaults, "
                                    "the MXROLL_ADMIN_TOKEN / MXROLL_API_KEY environment variables, --config, "
                                    "dotlist overrides, the flags below.")
    sv.add_argument("--config", default=None,
                    help="YAML with `server:` (host, port, admin_token, api_key) and `engine:` (EngineConfig) keys")
    sv.add_argument("--model-path", default=None, help="checkpoint directory or preset:NAME (= engine.model_path)")
    sv.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; any other host needs an "
                                                 "admin token)")
    sv.add_argument("--port", type=int, default=None, help="port to bind (default 30000)")
    sv.add_argument("--admin-token", default=None,
                    help="bearer token required by the weight-sync and control endpoints (default: "
                         "$MXROLL_ADMIN_TOKEN; the environment keeps it out of the process list)")
    sv.add_argument("--api-key", default=None,
                    help="bearer token required by the generation and info endpoints (default: $MXROLL_API_KEY)")
    sv.add_argument("--routed-experts-format", default=None, choices=["list", "base64"],
                    help="how /generate returns return_routed_experts: nested lists (default) or sglang's base64 "
                         "of int32 [tokens, num_hidden_layers, top_k]")
    sv.add_argument("--tool-call-parser", default=None, choices=sorted(FORMATS),
                    help="parse tool calls out of /v1/chat/completions replies in this model family's format "
                         "(sglang's names); default: replies stay text")
    sv.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_FORMATS),
                    help="return a thinking model's reasoning apart, as reasoning_content, in /v1/chat/completions "
                         "replies (sglang's names); default: it stays in the content")
    _engine_flags(sv)
    sv.add_argument("overrides", nargs="*",
                    help="dotlist overrides with their section, e.g. engine.device=cpu engine.max_total_tokens=4096 "
                         "server.port=8000")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _log_to_stderr(args.log_level or "INFO"):
        try:
            return _run(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"mxroll {args.cmd}: error: {e}", file=sys.stderr)
            return 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is shown (a config's key
    listing imports the config module, which the other commands need not pay for)."""

    def __init__(self, *args, epilog_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = self.epilog_fn()
        return super().format_help()


def config_epilog(what: str, defaults) -> str:
    """The help epilog of a command configured by a structured config (`defaults`: the dataclass with the
    packaged YAML merged in): how overrides work, then every key with its type, default and description."""
    from .config_help import format_config_keys

    return (f"{what} config, lowest precedence first: defaults, --config YAML, KEY=VALUE dotlist overrides\n"
            "(omegaconf: nested keys with dots, lists as [a,b], null for none). Unknown keys and wrongly\n"
            "typed values are errors naming the key.\n\n"
            f"{what} config keys ({type(defaults).__name__}; defaults as packaged):\n{format_config_keys(defaults)}")


def _job_epilog() -> str:
    from .config import rollout_config

    return config_epilog("job", rollout_config())


def _rl_epilog() -> str:
    from .rl.config import rl_config

    return config_epilog("rl", rl_config())


def _run(args) -> int:
    if args.cmd == "make-checkpoint":
        from ..model.synthetic import make_checkpoint

        from ..precision import Recipe

        cfg = json.loads(configs.model_preset_path(args.preset).read_text())
        out = make_checkpoint(cfg, args.out, seed=args.seed, dtype=args.dtype, mxfp8=args.mxfp8,
                              recipe=Recipe(scale_mode=args.scale_mode), overwrite=args.overwrite)
        kind = f"MXFP8 ({args.scale_mode}) " if args.mxfp8 else ""
        print(f"wrote {kind}{args.preset} checkpoint (seed {args.seed}) to {out}")
        return 0
    if args.cmd == "generate":
        request = _generate_request(args)  # before the model loads: a typo costs no loading time
        from .engine import Engine

        engine = Engine(model_path=args.model_path, device=args.device, dtype=args.dtype,
                        quantization=args.quantization, log_level=args.log_level or "INFO")
        print(json.dumps(engine.generate(**request, return_logprob=args.logprobs), indent=2))
        return 0
    if args.cmd == "serve":
        return _serve(args)
    if args.cmd == "rl":
        return _rl(args)
    from .config import rollout_config
    from .job import run_rollout_job

    cfg = rollout_config(args.config, list(args.overrides))
    if args.log_level:
        cfg.engine.log_level = args.log_level
    logging.getLogger("mxroll").setLevel(_level(cfg.engine.log_level))
    with logging_redirect_tqdm([logging.getLogger("mxroll")]):  # log lines print above the job's progress bar
        run_rollout_job(cfg)
    return 0


def _rl(args) -> int:
    from .rl.config import rl_config
    from .rl.engines import EngineStartError
    from .rl.loop import run_rl

    cfg = rl_config(args.config, list(args.overrides))
    with logging_redirect_tqdm([logging.getLogger("mxroll")]):
        try:
            run_rl(cfg)
        except EngineStartError as e:
            print(f"mxroll rl: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # the engine process was stopped on the way out
            print("mxroll rl: interrupted", file=sys.stderr)
            return 130
    return 0


ENGINE_FLAG_PREFIX = "engine_flag_"


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    """sglang-style flags for every engine option (--mem-fraction-static 0.8, --device cpu, ...), read
    from configs/engine.yaml (key, default, comment) so that building the parser imports no torch."""
    group = parser.add_argument_group("engine options (each = the dotlist key engine.NAME; configs/engine.yaml)")
    for line in (configs.ROOT / "engine.yaml").read_text().splitlines():
        m = re.match(r"^(\w+):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if not m or m.group(1) in ("model_path", "log_level"):  # --model-path and --log-level exist already
            continue
        name, default, doc = m.groups()
        group.add_argument(f"--{name.replace('_', '-')}", dest=ENGINE_FLAG_PREFIX + name, default=None,
                           metavar="VALUE", help=f"{doc or name} (default {default})".replace("%", "%%"))


def _serve(args) -> int:
    import os

    from .config import serve_config
    from .server import run_server

    env = {key: os.environ[var] for key, var in (("admin_token", "MXROLL_ADMIN_TOKEN"), ("api_key", "MXROLL_API_KEY"))
           if os.environ.get(var)}
    flags = {key: getattr(args, key) for key in ("host", "port", "admin_token", "api_key", "routed_experts_format",
                                                        "tool_call_parser", "reasoning_parser")
             if getattr(args, key) is not None}
    engine = {"model_path": args.model_path} if args.model_path is not None else {}
    if args.log_level:
        engine["log_level"] = args.log_level
    engine_flags = [f"engine.{key[len(ENGINE_FLAG_PREFIX):]}={value}" for key, value in vars(args).items()
                    if key.startswith(ENGINE_FLAG_PREFIX) and value is not None]
    cfg = serve_config({"server": env}, args.config, list(args.overrides) + engine_flags,
                       {"server": flags, "engine": engine})
    logging.getLogger("mxroll").setLevel(_level(cfg.engine.log_level))
    s = cfg.server
    run_server(cfg.engine, host=s.host, port=s.port, admin_token=s.admin_token, api_key=s.api_key,
               log_level=cfg.engine.log_level, routed_experts_format=s.routed_experts_format,
               tool_call_parser=s.tool_call_parser, reasoning_parser=s.reasoning_parser)
    return 0


def _generate_request(args) -> dict:
    from .sampling_params import SamplingParams

    if (args.prompt is None) == (args.input_ids is None):
        raise ValueError("pass exactly one of --prompt or --input-ids")
    ids = None
    if args.input_ids is not None:
        try:
            ids = [int(t) for t in args.input_ids.split(",")]
        except ValueError:
            ids = None
        if not ids or any(t < 0 for t in ids):
            raise ValueError(f"--input-ids {args.input_ids!r}: expected comma-separated token ids, e.g. 0,5,6")
    try:
        sampling = json.loads(args.sampling)
    except json.JSONDecodeError as e:
        raise ValueError(f"--sampling {args.sampling!r}: not valid JSON ({e})") from None
    try:
        SamplingParams.from_dict(sampling)
    except ValueError as e:
        raise ValueError(f"--sampling: {e}") from None
    return {"prompt": args.prompt, "input_ids": ids, "sampling_params": sampling}


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        raise ValueError(f"log_level={name!r}; supported: {list(LOG_LEVELS)}")
    return level


@contextmanager
def _log_to_stderr(level: str):
    """A stderr handler on the `mxroll` logger tree only, for the command's duration: the application
    configures logging, the library installs no handler."""
    logger = logging.getLogger("mxroll")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(_level(level))
    logger.propagate = False  # not a second time through a root handler someone else installed
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


if __name__ == "__main__":
    sys.exit(main())

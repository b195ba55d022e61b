"""CLI: flags checked before the model loads, logging set up by the CLI alone, make-checkpoint never clobbers,
every option of every command documented in --help."""
from __future__ import annotations

import argparse
import json
import logging

import pytest

from mxroll import configs
from mxroll.model import synthetic
from mxroll.rollout import engine as engine_module
from mxroll.rollout.cli import build_parser, main
from mxroll.rollout.config import rollout_config
from mxroll.rollout.config_help import config_keys, field_docs


@pytest.fixture
def no_engine(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(engine_module.Engine, "__init__", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--input-ids", "a,b"], "--input-ids 'a,b'"),
    (["--input-ids", "1,,2"], "--input-ids"),
    (["--input-ids", "-1"], "--input-ids"),
    (["--input-ids", "1", "--sampling", "{bad json"], "--sampling '{bad json': not valid JSON"),
    (["--input-ids", "1", "--sampling", '{"temperature": -1}'], "--sampling: sampling_params.temperature"),
    (["--input-ids", "1", "--sampling", '{"stop_token_ids": 5}'], "--sampling: sampling_params.stop_token_ids"),
    (["--input-ids", "1", "--sampling", "[1, 2]"], "--sampling: sampling_params must be a dict"),
    (["--input-ids", "1", "--sampling", '{"bogus": 1}'], "--sampling: sampling_params: unknown field"),
    ([], "exactly one of --prompt or --input-ids"),
    (["--prompt", "x", "--input-ids", "1"], "exactly one of --prompt or --input-ids"),
])
def test_generate_flags_are_checked_before_loading(no_engine, capsys, flags, message):
    assert main(["generate", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mxroll generate: error: ") and message in err


def test_cli_logs_through_the_mxroll_loggers_only(tiny_checkpoint, capsys):
    args = ["generate", "--model-path", str(tiny_checkpoint), "--device", "cpu", "--input-ids", "0,5",
            "--sampling", '{"max_new_tokens": 2}']
    assert main(args) == 0
    err = capsys.readouterr().err
    assert " mxroll.model.loader INFO loaded " in err and " mxroll.rollout.engine INFO engine ready" in err
    assert err.count("engine ready") == 1  # not again through a root handler
    assert main([*args, "--log-level", "warning"]) == 0
    assert "INFO" not in capsys.readouterr().err
    assert logging.getLogger("mxroll").handlers == []  # the handler lives as long as the command


def test_make_checkpoint_refuses_a_non_empty_dir(tmp_path, capsys, monkeypatch):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    monkeypatch.setattr(synthetic, "SHARD_BYTES", 200_000)
    out = synthetic.make_checkpoint(cfg, tmp_path / "ck", seed=1, progress=False)
    old = sorted(p.name for p in out.iterdir())
    assert len([n for n in old if n.endswith(".safetensors")]) > 2
    before = {n: (out / n).read_bytes() for n in old}
    monkeypatch.undo()
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in sorted(p.name for p in out.iterdir())} == before
    with pytest.raises(ValueError, match="overwrite=True"):
        synthetic.make_checkpoint(cfg, out, progress=False)
    (out / "notes.txt").write_text("mine")
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--overwrite", "--seed", "2"]) == 0
    # no shard or index of the old checkpoint is left beside the new one; other files are not touched
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "mxroll_tokenizer.json",
                                                     "notes.txt"]
    file = tmp_path / "a-file"
    file.write_text("x")
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(file), "--overwrite"]) == 2
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "empty")]) == 0


def test_rollout_log_level_follows_the_job_unless_given(tiny_checkpoint, tmp_path, capsys):
    job = ["rollout", f"engine.model_path={tiny_checkpoint}", f"output_dir={tmp_path}", "steps=1", "sampling.n=1",
           "sampling.max_new_tokens=2", "wandb.mode=disabled", "engine.progress=false", "engine.log_level=WARNING"]
    assert main(job) == 0
    assert "INFO" not in capsys.readouterr().err
    assert main(["rollout", "--log-level", "info", *job[1:]]) == 0
    assert " mxroll.job INFO step 0: " in capsys.readouterr().err


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand parser (aliases included), however many commands the CLI grows."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = subcommands(parser)
    assert {"make-checkpoint", "generate", "job", "rollout"} <= set(commands)
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {c.dest for c in action._choices_actions}
    assert listed == {name for name, p in commands.items() if p.prog.endswith(f" {name}")}  # aliases share a line
    assert all(c.help for c in action._choices_actions)
    for name, sub in [("mxroll", parser), *commands.items()]:
        for a in sub._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, f"{name} {'/'.join(a.option_strings) or a.dest}: no help"
        sub.format_help()  # renders (lazy epilogs included)


def test_help_exits_cleanly_for_every_command(capsys):
    for name in ["--help", *(f"{c} --help" for c in subcommands(build_parser()))]:
        with pytest.raises(SystemExit) as e:
            main(name.split())
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith("usage: mxroll")


def test_job_help_lists_every_config_key_with_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["job", "--help"])
    text = capsys.readouterr().out
    assert "KEY=VALUE" in text and "dotlist" in text and "rollouts.jsonl" in text
    keys = config_keys(rollout_config())
    assert {k for k, *_ in keys} >= {"prompts_file", "prompts_preset", "reward", "return_routed_experts",
                                     "sync.model_paths", "wandb.mode", "sampling.n", "engine.model_path"}
    for key, typ, _, doc in keys:
        assert doc, f"job config key {key} has no comment in its dataclass"
        assert f"  {key}: {typ} = " in text
    with pytest.raises(SystemExit):
        main(["rollout", "--help"])
    assert capsys.readouterr().out.replace("mxroll rollout", "mxroll job") == text


def test_field_docs_trailing_comment_wins_and_section_headings_are_not_docs():
    from dataclasses import dataclass

    @dataclass
    class Example:
        # the first field
        # on two lines
        a: int = 1
        b: str = "#not a comment"  # b's own

        # a section heading

        c: int = 3
        # above
        d: int = 4  # beside
    assert field_docs(Example) == {"a": "the first field on two lines", "b": "b's own", "d": "beside"}


def test_unknown_and_mistyped_job_keys_name_the_key(capsys, tmp_path):
    for override, named in (("bogus=1", "bogus"), ("sampling.tempreature=0", "tempreature"),
                            ("steps=two", "steps"), ("return_routed_experts=maybe", "return_routed_experts")):
        assert main(["job", f"output_dir={tmp_path}", override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mxroll job: error: ") and named in err
    assert list(tmp_path.iterdir()) == []

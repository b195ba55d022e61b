"""`mxroll rollout`: each run writes fresh outputs, and a failed run leaves the previous run's files as they were."""
from __future__ import annotations

import json
import shutil

import pytest

from mxroll.rollout.cli import main


def run(ck, out, *extra):
    return main(["rollout", f"engine.model_path={ck}", f"output_dir={out}", "steps=2", "sampling.n=2",
                 "sampling.max_new_tokens=3", "wandb.mode=disabled", "engine.progress=false", *extra])


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("previous")
    assert run(tiny_checkpoint, out, "sampling.seed=5") == 0
    return out


def outputs(out):
    return {name: (out / name).read_bytes() for name in ("rollouts.jsonl", "metrics.jsonl")}


def test_rerun_writes_both_files_fresh(tmp_path, tiny_checkpoint):
    assert run(tiny_checkpoint, tmp_path) == 0
    first = outputs(tmp_path)
    assert run(tiny_checkpoint, tmp_path) == 0
    again = outputs(tmp_path)
    assert again["rollouts.jsonl"] == first["rollouts.jsonl"]  # seeded job: the same rollouts, not appended ones
    for metrics in (first, again):
        assert [json.loads(line)["step"] for line in metrics["metrics.jsonl"].splitlines()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "rollouts.jsonl"]


@pytest.mark.parametrize("bad, named", [
    ("sampling.temperature=-1", "temperature"), ("sampling.top_p=0", "top_p"), ("sampling.seed=-3", "seed"),
    ("steps=0", "steps"), ("prompts=[]", "prompts"), ("wandb.mode=loud", "wandb.mode"),
    ("engine.device=bogus", "device"), ("engine.dtype=float16", "dtype"),
    ("sampling.max_new_tokens=5000", "context length"),  # fails in generate, after the model loaded
])
def test_failed_run_keeps_previous_outputs(tmp_path, tiny_checkpoint, previous_run, capsys, bad, named):
    shutil.copytree(previous_run, tmp_path, dirs_exist_ok=True)
    before = outputs(tmp_path)
    assert run(tiny_checkpoint, tmp_path, bad) == 2
    assert named in capsys.readouterr().err
    assert outputs(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "rollouts.jsonl"]  # no temp files left


def test_invalid_job_creates_nothing(tmp_path, tiny_checkpoint):
    assert run(tiny_checkpoint, tmp_path / "new", "sampling.n=0") == 2
    assert not (tmp_path / "new").exists()

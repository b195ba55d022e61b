"""`mxroll job` (alias `rollout`): prompts from the config, a jsonl file or a preset; rollouts with ids, logprobs,
rewards and routed experts; per-step metrics to metrics.jsonl and W&B; each run writes fresh outputs, and a
failed run leaves the previous run's files as they were."""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import types

import pytest

from mxroll import configs
from mxroll.model.synthetic import make_checkpoint
from mxroll.model.tokenizer import ByteTokenizer
from mxroll.rollout import rewards
from mxroll.rollout.cli import main
from mxroll.rollout.config import rollout_config
from mxroll.rollout.job import plan_rollout_job
from mxroll.rollout.prompts import load_prompts


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
    ("prompts_file=/no/such/prompts.jsonl", "prompts_file"), ("prompts_preset=nope", "unknown prompt preset"),
    ("reward=no_such_module:fn", "no_such_module"), ("sync.model_paths=[/no/such/ckpt]", "sync.model_paths[0]"),
    ("bogus_key=1", "bogus_key"), ("sampling.bogus=1", "bogus"), ("steps=many", "steps"),
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


# ---- mxroll job: prompts, rollouts, rewards, metrics ------------------------------------------------
METRICS = {"step", "samples", "prompts", "completion_tokens", "mean_completion_len", "max_completion_len",
           "min_completion_len", "mean_token_logprob", "stop_fraction", "length_fraction", "abort_fraction",
           "tokens_per_s", "samples_per_s", "step_time_s", "weight_version"}
REWARD_METRICS = {"reward_mean", "reward_std", "reward_positive_fraction"}
TOY_REWARD = """
def reward(prompt_record, output, bonus=0.0):
    # +1 for an even first output token, -1 otherwise; the record's "bonus" field and the keyword add to it
    return (1.0 if output["output_ids"][0] % 2 == 0 else -1.0) + prompt_record.get("bonus", 0) + bonus
"""


def job(ck, out, *extra):
    return main(["job", f"engine.model_path={ck}", f"output_dir={out}", "steps=2", "sampling.n=2",
                 "sampling.max_new_tokens=3", "wandb.mode=disabled", "progress=false", *extra])


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_prompts_rewards_and_metrics(tmp_path, tiny_checkpoint):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "2 + 2 =", "answer": "4", "bonus": 0.5}, "", {"input_ids": [0, 7, 9, 11]},
        {"prompt": "kept as text", "input_ids": [0, 5], "tag": ["x"]}])
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    out = tmp_path / "out"
    assert job(tiny_checkpoint, out, f"prompts_file={prompts}", f"reward={tmp_path / 'toy_reward.py'}:reward",
               "reward_args.bonus=0.25") == 0
    rows = lines(out / "rollouts.jsonl")
    assert [(r["step"], r["prompt_index"], r["sample_index"]) for r in rows] == [
        (s, p, j) for s in range(2) for p in range(3) for j in range(2)]
    tok = ByteTokenizer()
    for r in rows:
        assert len(r["output_ids"]) == len(r["logprobs"]) == 3 and r["weight_version"] == "default"
        assert r["finish_reason"]["type"] == "length" and r["text"] == tok.decode(r["output_ids"])
        assert "routed_experts" not in r
        extra = {0: {"answer": "4", "bonus": 0.5}, 1: None, 2: {"tag": ["x"]}}[r["prompt_index"]]
        assert r.get("extra") == extra
        expected = (1.0 if r["output_ids"][0] % 2 == 0 else -1.0) + (extra or {}).get("bonus", 0) + 0.25
        assert r["reward"] == pytest.approx(expected)
    assert rows[0]["prompt"] == "2 + 2 =" and rows[0]["input_ids"] == tok.encode("2 + 2 =")
    assert "prompt" not in rows[2] and rows[2]["input_ids"] == [0, 7, 9, 11]
    assert rows[4]["prompt"] == "kept as text" and rows[4]["input_ids"] == [0, 5]  # ids win, text kept
    metrics = lines(out / "metrics.jsonl")
    assert [set(m) for m in metrics] == [METRICS | REWARD_METRICS] * 2
    for m in metrics:
        step_rewards = [r["reward"] for r in rows if r["step"] == m["step"]]
        assert m["reward_mean"] == pytest.approx(statistics.fmean(step_rewards))
        assert m["reward_std"] == pytest.approx(statistics.pstdev(step_rewards))
        assert m["reward_positive_fraction"] == sum(x > 0 for x in step_rewards) / 6
        assert (m["samples"], m["prompts"], m["completion_tokens"]) == (6, 3, 18)
        assert m["mean_completion_len"] == m["max_completion_len"] == m["min_completion_len"] == 3
        assert (m["stop_fraction"], m["length_fraction"], m["abort_fraction"]) == (0, 1, 0)
        assert m["tokens_per_s"] == pytest.approx(18 / m["step_time_s"])
        assert m["samples_per_s"] == pytest.approx(6 / m["step_time_s"]) and m["weight_version"] == "default"


def test_preset_prompts_with_a_builtin_reward(tmp_path, tiny_checkpoint, capsys):
    assert job(tiny_checkpoint, tmp_path, "prompts_preset=arithmetic", "max_prompts=3", "steps=1",
               "reward=mxroll.rollout.rewards:contains_answer") == 0
    preset = lines(configs.prompt_preset_path("arithmetic"))[:3]
    rows = lines(tmp_path / "rollouts.jsonl")
    assert [(r["prompt"], r["extra"]) for r in rows] == [(p["prompt"], {"answer": p["answer"]})
                                                         for p in preset for _ in range(2)]
    assert all(r["reward"] in (0.0, 1.0) for r in rows)
    assert "reward" in capsys.readouterr().out  # the summary table has a reward column
    assert set(configs.prompt_presets()) >= {"arithmetic", "basic"}


def test_builtin_rewards():
    out = {"output_ids": [5, 6, 7, 8], "text": "A: 4 and 14"}
    assert rewards.contains_answer({"answer": "4"}, out) == 1.0
    assert rewards.contains_answer({"answer": "1"}, out) == 0.0  # not inside 14
    assert rewards.contains_answer({"answer": 14}, out) == 1.0
    assert rewards.length_penalty({}, out, target=4) == 0.0 and rewards.length_penalty({}, out, target=2) == -1.0
    with pytest.raises(ValueError, match="'answer' field"):
        rewards.contains_answer({"prompt": "x"}, out)
    with pytest.raises(ValueError, match="no text"):
        rewards.contains_answer({"answer": "4"}, {"output_ids": [1]})


def test_routed_experts_in_rollouts(tmp_path, tiny_checkpoint):
    assert job(tiny_checkpoint, tmp_path, "steps=1", "return_routed_experts=true", "prompts=[abc,hello world]") == 0
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    moe_layers, top_k = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"], cfg["num_experts_per_tok"]
    for r in lines(tmp_path / "rollouts.jsonl"):
        tokens = len(r["input_ids"]) + len(r["output_ids"]) - 1  # every token that went in as input
        ids, weights = r["routed_experts"], r["routed_expert_weights"]
        assert [len(ids), {len(t) for t in ids}, {len(k) for t in ids for k in t}] == [tokens, {moe_layers}, {top_k}]
        assert all(isinstance(e, int) and 0 <= e < cfg["n_routed_experts"] for t in ids for k in t for e in k)
        assert [len(weights), {len(t) for t in weights}] == [tokens, {moe_layers}]
        assert all(isinstance(w, float) and w > 0 for t in weights for k in t for w in k)


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "ok"', "not valid JSON"), ('["a list"]', "got list"), ('{"text": "x"}', "keys: ['text']"),
    ('{"prompt": 5}', '"prompt" must be a string'), ('{"input_ids": []}', '"input_ids" must be'),
    ('{"input_ids": [1, -2]}', '"input_ids" must be'), ('{"input_ids": [1, true]}', '"input_ids" must be'),
    ('{"input_ids": "1 2"}', '"input_ids" must be'), ('{"messages": []}', '"messages" must be'),
    ('{"messages": [{"content": "x"}]}', '"messages" must be'),
])
def test_bad_jsonl_line_is_named(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, "", line, {"prompt": "after"}])
    with pytest.raises(ValueError, match=f"^{path}:3: ") as e:
        load_prompts([], str(path), None)
    assert problem in str(e.value)


def test_bad_prompts_fail_before_anything_is_written(tmp_path, tiny_checkpoint, capsys):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "{oops"])
    assert job(tiny_checkpoint, tmp_path / "out", f"prompts_file={bad}") == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err and not (tmp_path / "out").exists()
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts([], str(empty), None)
    with pytest.raises(ValueError, match="set at most one"):
        load_prompts([], str(bad), "basic")
    with pytest.raises(ValueError, match="known presets: arithmetic, basic"):
        load_prompts([], None, "../models/tiny")


@pytest.mark.parametrize("spec, args, message", [
    ("no_colon", {}, "expected 'module.path:function'"), ("mxroll.rollout.rewards:", {}, "expected"),
    ("mxroll.rollout.no_such_module:fn", {}, "cannot import module 'mxroll.rollout.no_such_module'"),
    ("mxroll.rollout.rewards:no_such_fn", {}, "has no attribute 'no_such_fn'"),
    ("mxroll.rollout.rewards:FINISH", {}, "has no attribute"), ("json:__doc__", {}, "not a function"),
    ("/no/such/file.py:fn", {}, "no such file"),
    ("mxroll.rollout.rewards:length_penalty", {"tagret": 3}, "reward_args={'tagret': 3}"),
    ("mxroll.rollout.rewards:contains_answer", {}, None),
])
def test_reward_import_path_is_checked_before_loading(spec, args, message):
    cfg = rollout_config({"reward": spec, "reward_args": args})
    if message is None:
        assert plan_rollout_job(cfg).reward is rewards.contains_answer
        return
    with pytest.raises(ValueError, match="^reward") as e:
        plan_rollout_job(cfg)
    assert message in str(e.value)


def test_reward_must_return_a_finite_number(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "r.py").write_text("def nan(p, o):\n    return float('nan')\n\ndef text(p, o):\n    return 'good'\n")
    for fn, shown in (("nan", "returned nan"), ("text", "returned 'good'")):
        assert job(tiny_checkpoint, tmp_path / "out", "steps=1", f"reward={tmp_path / 'r.py'}:{fn}") == 2
        assert f"{shown} for step 0, prompt 0, sample 0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "rollouts.jsonl").exists()


def test_reward_args_need_a_reward():
    with pytest.raises(ValueError, match="reward_args"):
        plan_rollout_job(rollout_config(["reward_args.x=1"]))


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        wb = self

        class Run:
            def log(self, metrics, step):
                wb.calls.append(("log", step, dict(metrics)))

            def finish(self):
                wb.calls.append(("finish",))
        return Run()


def test_wandb_gets_the_config_and_every_steps_metrics(tmp_path, tiny_checkpoint, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert job(tiny_checkpoint, tmp_path, "wandb.mode=online", "wandb.project=p", "wandb.tags=[a,b]") == 0
    (_, init), *logs, finish = fake.calls
    assert (init["mode"], init["project"], init["tags"], init["dir"]) == ("online", "p", ["a", "b"], str(tmp_path))
    assert init["config"]["sampling"]["n"] == 2 and init["config"]["wandb"]["mode"] == "online"
    assert [(step, {"step", *m}) for _, step, m in logs] == [(0, METRICS), (1, METRICS)]
    assert [{"step": step, **m} for _, step, m in logs] == lines(tmp_path / "metrics.jsonl")
    assert finish == ("finish",)


def test_missing_wandb_is_said_once(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert job(tiny_checkpoint, tmp_path, "wandb.mode=offline") == 0
    assert capsys.readouterr().err.count("wandb is not installed") == 1
    assert len(lines(tmp_path / "metrics.jsonl")) == 2


def test_sync_swaps_checkpoints_between_steps(tmp_path, tiny_checkpoint):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    other = make_checkpoint(cfg, tmp_path / "other", seed=1, dtype="float32", progress=False)
    greedy = ("sampling.temperature=0", "sampling.n=1", "steps=3")
    assert job(tiny_checkpoint, tmp_path / "plain", *greedy) == 0
    assert job(tiny_checkpoint, tmp_path / "synced", *greedy, f"sync.model_paths=[null,{other},{tiny_checkpoint}]") == 0
    plain, synced = lines(tmp_path / "plain" / "rollouts.jsonl"), lines(tmp_path / "synced" / "rollouts.jsonl")
    outputs = [[r["output_ids"] for r in rows if r["step"] == s] for rows in (plain, synced) for s in range(3)]
    assert outputs[3] == outputs[0] and outputs[4] != outputs[1] and outputs[5] == outputs[2]  # back at step 2
    assert [r["weight_version"] for r in synced] == ["default"] * 3 + ["1"] * 3 + ["2"] * 3
    metrics = lines(tmp_path / "synced" / "metrics.jsonl")
    assert ["sync_time_s" in m for m in metrics] == [False, True, True]
    assert [m["weight_version"] for m in metrics] == ["default", "1", "2"]
    with pytest.raises(ValueError, match="sync.model_paths has 4 entries for 3 steps"):
        plan_rollout_job(rollout_config([*greedy, f"sync.model_paths=[null,null,null,{other}]"]))


def test_chat_messages_prompts_go_through_the_checkpoint_template(tmp_path, tiny_checkpoint):
    """A record's "messages" are rendered by the checkpoint's chat template (generation prompt on) and tokenized as
    written (no BOS added: the template spells its own); a model without a template names the prompt."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    template = "<s>{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant:{% endif %}"
    (ck / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    chat = [{"role": "user", "content": "2 + 2?"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "2 + "}, {"type": "text", "text": "2?"}]}]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": chat, "answer": "4"}, {"prompt": "plain"},
                                                 {"messages": parts}])
    out = tmp_path / "out"
    assert job(ck, out, f"prompts_file={prompts}") == 0
    rows = lines(out / "rollouts.jsonl")
    tok = ByteTokenizer()
    by_prompt = {r["prompt_index"]: r["input_ids"] for r in rows}
    assert by_prompt[0] == tok.encode("<s>user: 2 + 2?\nassistant:", add_bos=False)
    assert by_prompt[1] == tok.encode("plain")
    assert by_prompt[2] == by_prompt[0]  # text parts are joined, as /v1/chat/completions does
    assert job(tiny_checkpoint, tmp_path / "out2", f"prompts_file={prompts}") != 0  # no template: an error

"""sglang sampling keys that RL frameworks send with every request: accepted when they cannot change
the tokens, refused naming the key when they would."""
from __future__ import annotations

import pytest

from mxroll.rollout.output import trim_stop
from mxroll.rollout.sampling_params import SamplingParams


def test_text_only_and_neutral_sglang_keys_are_accepted():
    p = SamplingParams.from_dict({"temperature": 0.5, "skip_special_tokens": False, "no_stop_trim": True,
                                  "spaces_between_special_tokens": True, "repetition_penalty": 1.0,
                                  "frequency_penalty": 0.0, "presence_penalty": 0, "min_new_tokens": 0,
                                  "stop": [], "regex": None})
    assert p == SamplingParams(temperature=0.5, no_stop_trim=True)


def test_sglang_keys_of_its_current_sampling_params():
    """sglang's SamplingParams keys: `sampling_seed` is its name of the seed; null means the default for the keys
    its __post_init__ defaults; structural_tag / logit_bias / custom_params / stop_regex / stream_interval at their
    neutral values."""
    assert SamplingParams.from_dict({"sampling_seed": 7}) == SamplingParams(seed=7)
    assert SamplingParams.from_dict({"sampling_seed": 7, "seed": 7}) == SamplingParams(seed=7)
    assert SamplingParams.from_dict({"sampling_seed": None, "seed": 3}) == SamplingParams(seed=3)
    with pytest.raises(ValueError, match="seed=3 and sampling_seed=7 disagree"):
        SamplingParams.from_dict({"sampling_seed": 7, "seed": 3})
    nulls = {k: None for k in ("temperature", "top_p", "top_k", "min_p", "n", "ignore_eos", "no_stop_trim",
                               "skip_special_tokens", "repetition_penalty", "min_new_tokens")}
    assert SamplingParams.from_dict(dict(nulls, max_new_tokens=5)) == SamplingParams(max_new_tokens=5)
    assert SamplingParams.from_dict({"structural_tag": None, "logit_bias": {}, "custom_params": None,
                                     "stop_regex": [], "stream_interval": None}) == SamplingParams()
    assert SamplingParams.from_dict({"stream_interval": 4}).stream_interval == 4
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match="sampling_params.stream_interval"):
            SamplingParams.from_dict({"stream_interval": bad})


def test_null_max_new_tokens_runs_to_the_context_length():
    """sglang's max_new_tokens null: what the context leaves after the prompt (resolved per prompt)."""
    from mxroll.rollout.intake import build_requests
    p = SamplingParams.from_dict({"max_new_tokens": None})
    assert p.max_new_tokens is None and p.with_prompt(10, 64).max_new_tokens == 54
    reqs = build_requests([[1] * 10, [1] * 60], {"max_new_tokens": None}, False, 0, False, None, 100, 64)
    assert [r.params.max_new_tokens for r in reqs] == [54, 4]
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        SamplingParams.from_dict({"max_new_tokens": -1})


@pytest.mark.parametrize("key,value", [("repetition_penalty", 1.1), ("min_new_tokens", 4),
                                       ("presence_penalty", 0.5), ("json_schema", "{}"), ("logit_bias", {"5": 2.0}),
                                       ("stop_regex", "\\d+"), ("structural_tag", "{}"), ("custom_params", {"a": 1})])
def test_keys_that_would_change_tokens_are_refused(key, value):
    with pytest.raises(ValueError, match=f"sampling_params.{key}"):
        SamplingParams.from_dict({key: value})


def test_text_only_keys_must_be_bools():
    with pytest.raises(ValueError, match="skip_special_tokens"):
        SamplingParams.from_dict({"skip_special_tokens": "yes"})
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams.from_dict({"bogus": 1})


def test_stop_strings():
    """sglang's stop: a string or a list of strings (none: None, "" or []); anything else names the field."""
    assert SamplingParams.from_dict({"stop": "\n\n"}).stop == ("\n\n",)
    assert SamplingParams.from_dict({"stop": ["a", "bc"]}).stop == ("a", "bc")
    assert SamplingParams.from_dict({"stop": ("a",)}).stop == ("a",)
    for none in (None, "", []):
        assert SamplingParams.from_dict({"stop": none}).stop == ()
    assert SamplingParams.from_dict({"stop": ["é", "ab"]}).stop_tail == 3  # the longest in UTF-8 bytes, + 1
    for bad in (5, [""], ["a", 3], {"a": 1}):
        with pytest.raises(ValueError, match="sampling_params.stop="):
            SamplingParams.from_dict({"stop": bad})
    with pytest.raises(ValueError, match="sampling_params.no_stop_trim"):
        SamplingParams.from_dict({"no_stop_trim": "yes"})


def test_stop_trim_of_running_and_finished_text():
    """Finished on a stop string: the text ends before its first occurrence; running: an end that may begin a stop
    string is held back, so streamed texts only grow; no_stop_trim keeps everything."""
    p = SamplingParams(stop=("END", "\n\n"))
    assert trim_stop("abc EN", p, None) == "abc "
    assert trim_stop("abc E", p, None) == "abc "
    assert trim_stop("abc\n", p, None) == "abc"
    assert trim_stop("abc EX", p, None) == "abc EX"
    assert trim_stop("abc END", p, {"type": "stop", "matched": "END"}) == "abc "
    assert trim_stop("a\n\nb END", p, {"type": "stop", "matched": "\n\n"}) == "a"
    assert trim_stop("abc E", p, {"type": "length", "length": 5}) == "abc E"
    assert trim_stop("abc END", SamplingParams(stop=("END",), no_stop_trim=True), {"type": "stop", "matched": "END"}) \
        == "abc END"
    assert trim_stop("abc E", SamplingParams(), None) == "abc E"
    q = SamplingParams(stop=("<|im_end|>", "Q:"))  # stops of different lengths: the longest end that begins one
    assert trim_stop("x <|im_e", q, None) == "x " and trim_stop("x Q", q, None) == "x " and trim_stop("x <", q, None) == "x "
    assert trim_stop("x |im", q, None) == "x |im"


def test_null_max_new_tokens_in_the_engine(tiny_checkpoint):
    from mxroll import Engine
    e = Engine(model_path=str(tiny_checkpoint), device="cpu", progress=False, context_length=24)
    out = e.generate(input_ids=[3] * 10, sampling_params={"max_new_tokens": None, "ignore_eos": True,
                                                          "sampling_seed": 1})
    assert out["meta_info"]["completion_tokens"] == 14 and out["meta_info"]["finish_reason"]["type"] == "length"
    e.shutdown()

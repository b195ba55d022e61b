"""sglang sampling keys that RL frameworks send with every request: accepted when they cannot change
the tokens, refused naming the key when they would."""
from __future__ import annotations

import pytest

from mxroll.rollout.sampling_params import SamplingParams


def test_text_only_and_neutral_sglang_keys_are_accepted():
    p = SamplingParams.from_dict({"temperature": 0.5, "skip_special_tokens": False, "no_stop_trim": True,
                                  "spaces_between_special_tokens": True, "repetition_penalty": 1.0,
                                  "frequency_penalty": 0.0, "presence_penalty": 0, "min_new_tokens": 0,
                                  "stop": [], "regex": None})
    assert p == SamplingParams(temperature=0.5)


@pytest.mark.parametrize("key,value", [("repetition_penalty", 1.1), ("min_new_tokens", 4), ("stop", ["\n"]),
                                       ("presence_penalty", 0.5), ("json_schema", "{}")])
def test_keys_that_would_change_tokens_are_refused(key, value):
    with pytest.raises(ValueError, match=f"sampling_params.{key}"):
        SamplingParams.from_dict({key: value})


def test_text_only_keys_must_be_bools():
    with pytest.raises(ValueError, match="skip_special_tokens"):
        SamplingParams.from_dict({"skip_special_tokens": "yes"})
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams.from_dict({"bogus": 1})

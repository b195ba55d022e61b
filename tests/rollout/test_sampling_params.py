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


@pytest.mark.parametrize("key,value", [("repetition_penalty", 1.1), ("min_new_tokens", 4),
                                       ("presence_penalty", 0.5), ("json_schema", "{}")])
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

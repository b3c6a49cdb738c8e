"""SamplingParams normalises what clients send and names the bad field."""

from __future__ import annotations

import math

import pytest

from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams, parse_stop_strings


def test_loose_client_shapes_are_normalised():
    p = SamplingParams(stop="###", seed=-1, custom_token_bans="1, 2,3", dry_sequence_breakers='["\\n", ":"]',
                       logit_bias={"42": "-5"}, sampler_priority=["top_k", "quadratic_sampling", "temperature"])
    assert p.stop == ["###"]
    assert p.seed is None
    assert p.custom_token_bans == [1, 2, 3]
    assert p.dry_sequence_breakers == ["\n", ":"]
    assert p.logit_bias == {42: -5.0}
    assert p.sampler_priority == ["top_k", "temperature"]


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("temperature", math.nan), ("top_p", 1.5), ("max_new_tokens", 0),
    ("max_new_tokens", -5), ("mirostat_mode", 3), ("top_k", -1), ("repetition_penalty", 0.0),
    ("custom_token_bans", "1,x"), ("dry_sequence_breakers", "[unclosed"), ("temperature", "hot"),
])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


def test_active_samplers_follow_the_priority_and_skip_neutral_ones():
    p = SamplingParams(temperature=0.7, top_k=40, min_p=0.05, repetition_penalty=1.1,
                       sampler_priority=["min_p", "temperature", "top_k", "repetition_penalty"])
    assert p.active_samplers() == ["min_p", "temperature", "top_k", "repetition_penalty"]
    assert SamplingParams().active_samplers() == []
    assert SamplingParams(temperature=0.7, top_k=5, temperature_last=True).active_samplers() == ["top_k", "temperature"]


def test_greedy_at_temperature_zero():
    assert SamplingParams(temperature=0).greedy
    assert "temperature" not in SamplingParams(temperature=0).active_samplers()


def test_from_mapping_ignores_unknown_keys():
    p = SamplingParams.from_mapping({"temperature": 0.5, "api_type": "ooba", "rep_pen": 1.1})
    assert p.temperature == 0.5


def test_stop_strings_from_a_text_box():
    assert parse_stop_strings('"\\nUser:", "###"') == ["\nUser:", "###"]
    assert parse_stop_strings("END, STOP") == ["END", "STOP"]
    assert parse_stop_strings("") == []
    with pytest.raises(InvalidRequestError):
        parse_stop_strings('"unclosed')

"""FusionConfig validates every field and says what is allowed."""

from __future__ import annotations

import dataclasses
import re

import pytest

from braze import FusionConfig, TokenRange


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"verify": "always"}, "FusionConfig.verify='always': expected one of ('off', 'compile')"),
        ({"norm_quant": 1}, "FusionConfig.norm_quant=1: expected True or False"),
        ({"verify_rtol": 0}, "FusionConfig.verify_rtol=0: expected a number > 0"),
        ({"dump_dir": 3}, "FusionConfig.dump_dir=3: expected None or a path string"),
        ({"token_ranges": {"rope": TokenRange()}}, "unknown family 'rope'"),
        ({"token_ranges": {"norm_quant": 5}}, "FusionConfig.token_ranges['norm_quant']=5"),
        ({"token_ranges": 7}, "expected a mapping family -> TokenRange"),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FusionConfig(**kwargs)


def test_token_range():
    assert 5 in TokenRange(1, 8) and 9 not in TokenRange(1, 8) and 10**6 in TokenRange()
    with pytest.raises(ValueError, match="TokenRange.hi=0: expected None or an int >= lo"):
        TokenRange(1, 0)
    cfg = FusionConfig(token_ranges={"norm_quant": (2, 64)})
    assert cfg.token_range("norm_quant") == TokenRange(2, 64)


def test_frozen_hashable_and_fingerprinted():
    cfg = FusionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.verify = "compile"
    assert hash(cfg) == hash(FusionConfig())
    assert cfg.fingerprint() == FusionConfig().fingerprint()
    assert cfg.fingerprint() != FusionConfig(dump_dir="/tmp/x").fingerprint()

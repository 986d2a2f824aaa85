"""The PassManager's uuid keys Inductor's cache on braze's passes and config; a user's pass still runs."""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from braze import FusionConfig, TokenRange
from braze.passes.canonicalize import Canonicalize
from braze.passes.manager import PASSES, PassManager
from braze.passes.norm_quant import NormQuantFusion
from braze.testing import aten_graph


class OtherNormQuant(NormQuantFusion):
    """Same behaviour, different source: must not share a cache entry."""

    name = "norm-quant"


def test_uuid_is_stable_and_changes_with_config_and_passes():
    base = PassManager(FusionConfig()).uuid()
    assert base == PassManager(FusionConfig()).uuid()
    assert base != PassManager(FusionConfig(verify="compile")).uuid()
    assert base != PassManager(FusionConfig(norm_quant=False)).uuid()
    assert base != PassManager(FusionConfig(token_ranges={"norm_quant": TokenRange(1, 64)})).uuid()
    assert base != PassManager(FusionConfig(), passes=(Canonicalize, OtherNormQuant)).uuid()
    assert base != PassManager(FusionConfig(), passes=PASSES[:1]).uuid()


class UserPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "user-pass-1"


def test_user_pass_runs_first_and_joins_the_uuid():
    user = UserPass()
    pm = PassManager(FusionConfig(), user_pass=user)
    gm = aten_graph(lambda x: x * 2, torch.randn(3))
    pm(gm.graph)
    assert user.calls == 1
    assert pm.uuid() != PassManager(FusionConfig()).uuid()


def test_user_pass_without_uuid_turns_caching_off():
    assert PassManager(FusionConfig(), user_pass=lambda g: None).uuid() is None

"""Fixtures: the tiny ChatML tokenizer (session-wide)."""

from __future__ import annotations

import pytest
from rollout_helpers import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))

"""Shared fixtures. The package's tests never import each other as a `tests` package (lava's
wheels install a top-level `tests` package into site-packages)."""

from __future__ import annotations

import pytest
import torch

from stars_deploy.teacher_training import CACHE_ENV, train_digits_teacher


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stars-deploy-cache")


@pytest.fixture(scope="session")
def digits_teacher(cache_dir):
    """The digits teacher trained once per session into a private cache (about 8 s)."""
    path = cache_dir / "teachers" / "digits_cnn.pt"
    summary = train_digits_teacher(path, epochs=40, seed=0)
    return path, summary


@pytest.fixture(autouse=True)
def private_cache(cache_dir, monkeypatch):
    """Every test sees the session's private teacher cache, never the user's."""
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)

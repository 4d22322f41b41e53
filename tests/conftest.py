"""Shared test set-up: one torch thread, an isolated cache, offline hub, quiet Avalanche."""

import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup fails at once instead of retrying for a minute

import torch  # noqa: E402

import clcompose.strategies  # noqa: E402,F401  (installs the torchvision CPU fix before anything imports torchvision)

torch.set_num_threads(1)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Backbone checkpoints built by tests go to a per-session folder (content-addressed inside it)."""
    old = os.environ.get("BENCH_CACHE")
    os.environ["BENCH_CACHE"] = str(tmp_path_factory.mktemp("bench-cache"))
    yield
    if old is None:
        os.environ.pop("BENCH_CACHE", None)
    else:
        os.environ["BENCH_CACHE"] = old


def require_data(name: str):
    """Skip (outside CI) or fail (in CI, where the set-up installs everything) when a data set is missing."""
    from clcompose.bench.data.datasets import load_dataset
    from clcompose.strategies.core.registry import ConfigError

    try:
        return load_dataset(name)
    except ConfigError as exc:
        if IN_CI:
            pytest.fail(f"data set {name} missing in CI: {exc}")
        pytest.skip(f"data set {name} not installed: {exc}")


PYTHON = sys.executable

"""The committed main leaderboard's claims: recomputed from its per-run table, and re-checked on a fresh run.

The claims are the paired comparisons of examples/default.yaml's `compare:` pairs, as committed in
results/tables/split-fmnist-comparisons.csv. Here they are recomputed by hand from results/tables/runs.csv (one
row per run), and the slow test re-runs one seed of a claim's two rows from scratch (on CI: another machine)
and checks that the fresh difference lies inside the committed seeds' 95 % prediction interval.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t

from clcompose.bench.io import read_json
from clcompose.bench.sweeps.sweep import load_sweep
from clcompose.bench.sweeps.worker import run_cell

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
COMPARISONS = RESULTS / "tables" / "split-fmnist-comparisons.csv"
pytestmark = pytest.mark.skipif(not COMPARISONS.is_file(), reason="no committed comparisons yet")


def _per_seed(runs: pd.DataFrame, labels: str) -> pd.Series:
    rows = runs[runs["label"].isin([x.strip() for x in labels.split("; ")])]
    return rows.groupby("seed")["final_average_accuracy"].mean()


def _committed():
    runs = pd.read_csv(RESULTS / "tables" / "runs.csv")
    claims = pd.read_csv(COMPARISONS)
    return runs[runs["benchmark"] == "split-fmnist"], claims


def test_committed_claims_follow_from_the_committed_runs():
    runs, claims = _committed()
    assert len(claims) >= 5
    for claim in claims.to_dict("records"):
        a, b = _per_seed(runs, claim["label_a"]), _per_seed(runs, claim["label_b"])
        seeds = sorted(set(a.index) & set(b.index))
        diffs = np.array([a[s] - b[s] for s in seeds])
        half = t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        assert claim["n_seeds"] == len(seeds) >= 5
        assert claim["mean"] == pytest.approx(diffs.mean()) and claim["ci95"] == pytest.approx(half)
        expected = "higher" if diffs.mean() - half > 0 else "lower" if diffs.mean() + half < 0 else "no measurable"
        assert claim["verdict"].startswith(expected), claim
    page = (RESULTS / "README.md").read_text()
    assert "Controlled comparisons" in page and "How each row's hyperparameters were chosen" in page


@pytest.mark.slow
def test_a_claim_holds_on_a_fresh_run(tmp_path):
    """Seed 0 of `ita` and `linear-probe` from scratch: the fresh difference lies inside the committed seeds' 95 %
    prediction interval (mean ± t·s·√(1 + 1/n)), and keeps the claim's sign when that interval excludes 0."""
    runs, claims = _committed()
    claim = claims[(claims["a"] == "ita") & (claims["b"] == "linear-probe")].iloc[0]
    a, b = _per_seed(runs, claim["label_a"]), _per_seed(runs, claim["label_b"])
    diffs = np.array([a[s] - b[s] for s in sorted(set(a.index) & set(b.index))])
    n = len(diffs)
    half = t.ppf(0.975, n - 1) * diffs.std(ddof=1) * math.sqrt(1 + 1 / n)
    sweep = load_sweep(REPO / "examples" / "default.yaml", runs_dir=tmp_path / "runs")
    fresh = {}
    for cell in sweep.cells:
        if cell.entry in ("ita", "linear-probe") and cell.config["seed"] == 0:
            assert run_cell(cell.config, cell.hash, cell.run_dir)["status"] == "done"
            fresh[cell.entry] = read_json(cell.record_path)["metrics"]["final_average_accuracy"]
    value = fresh["ita"] - fresh["linear-probe"]
    assert diffs.mean() - half <= value <= diffs.mean() + half
    if diffs.mean() - half > 0:
        assert value > 0
    elif diffs.mean() + half < 0:
        assert value < 0

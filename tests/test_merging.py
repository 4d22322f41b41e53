"""Composition rules against their formulas worked out by hand on small tensors."""

import pytest
import torch

from clcompose.strategies.task_vectors.merging import fisher_merge, magmax_merge, ties_merge, trim, weighted_sum


def vec(*values, name="w"):
    return {name: torch.tensor(values, dtype=torch.float64)}


def test_ties_on_a_three_task_example_computed_by_hand():
    t1 = vec(0.5, -0.1, 0.3, 0.0, -0.8)
    t2 = vec(-0.4, 0.2, 0.6, 0.05, -0.1)
    t3 = vec(0.2, -0.3, -1.2, 0.1, 0.7)
    # trim to density 0.6 (3 of 5 entries per task vector, by magnitude):
    #   t1 keeps 0.5, 0.3, -0.8; t2 keeps -0.4, 0.2, 0.6; t3 keeps -0.3, -1.2, 0.7
    assert torch.equal(trim(t1, 0.6)["w"], torch.tensor([0.5, 0, 0.3, 0, -0.8], dtype=torch.float64))
    # elected signs of the trimmed sums: [0.5-0.4, 0.2-0.3, 0.3+0.6-1.2, 0, -0.8+0.7] = [+, -, -, 0, -]
    # disjoint means: coord 0 over {t1: 0.5} = 0.5; coord 1 over {t3: -0.3}; coord 2 over {t3: -1.2};
    # coord 3: nobody kept it → 0; coord 4 over {t1: -0.8} = -0.8
    merged = ties_merge([t1, t2, t3], density=0.6)["w"]
    assert torch.allclose(merged, torch.tensor([0.5, -0.3, -1.2, 0.0, -0.8], dtype=torch.float64), atol=1e-12)


def test_ties_disjoint_mean_averages_only_the_agreeing_tasks():
    merged = ties_merge([vec(1.0, 2.0), vec(3.0, -1.0), vec(-1.0, -4.0)], density=1.0)["w"]
    # coord 0: sum +3 → mean of 1 and 3 = 2; coord 1: sum -3 → mean of -1 and -4 = -2.5
    assert torch.allclose(merged, torch.tensor([2.0, -2.5], dtype=torch.float64))


def test_trim_is_over_the_whole_task_vector():
    v = {"a": torch.tensor([1.0, -5.0]), "b": torch.tensor([[0.5, 4.0], [-3.0, 0.1]])}
    t = trim(v, 0.5)  # 3 of 6 entries: -5, 4, -3
    assert torch.equal(t["a"], torch.tensor([0.0, -5.0])) and torch.equal(
        t["b"], torch.tensor([[0.0, 4.0], [-3.0, 0.0]])
    )
    with pytest.raises(ValueError):
        trim(v, 0.0)


def test_magmax_takes_the_largest_magnitude_entry():
    merged = magmax_merge([vec(0.5, -0.1, 0.3), vec(-0.7, 0.2, 0.3), vec(0.1, -0.9, -0.2)])["w"]
    assert torch.equal(merged, torch.tensor([-0.7, -0.9, 0.3], dtype=torch.float64))  # tie on coord 2: first task


def test_fisher_merge_is_the_fisher_weighted_average():
    taus = [vec(1.0, 2.0), vec(3.0, -2.0)]
    fishers = [vec(1.0, 0.0), vec(3.0, 0.0)]
    merged = fisher_merge(taus, fishers, eps=1e-12)["w"]
    assert torch.allclose(
        merged, torch.tensor([(1 * 1 + 3 * 3) / 4, 0.0], dtype=torch.float64)
    )  # uninformed: plain mean
    theta0 = vec(10.0, 10.0)["w"]  # the same on the parameters θ_t = θ0 + τ_t: Σ F_t θ_t / Σ F_t
    thetas = [theta0 + t["w"] for t in taus]
    f = [x["w"] + 1e-12 for x in fishers]
    assert torch.allclose(theta0 + merged, (f[0] * thetas[0] + f[1] * thetas[1]) / (f[0] + f[1]))


def test_weighted_sum_and_mismatches():
    assert torch.equal(weighted_sum([vec(1.0), vec(2.0)], [0.5, 0.0])["w"], torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError):
        weighted_sum([vec(1.0)], [1.0, 2.0])
    with pytest.raises(ValueError):
        magmax_merge([vec(1.0), vec(1.0, name="other")])

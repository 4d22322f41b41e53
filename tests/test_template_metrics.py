"""Program metrics (pure functions) and the domain stream's transforms, against explicit computations."""

import math

import numpy as np
import pytest
from scipy.stats import entropy

from clcompose.bench.data.domains import parse_domain, transform_images
from clcompose.strategies.core.registry import ConfigError
from clcompose.strategies.metrics import templates as TM


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_mixture_entropy_matches_scipy_and_its_limits():
    rng = np.random.default_rng(0)
    xi = rng.normal(size=(5, 4))
    expected = [entropy(p) for p in softmax(xi)]
    assert np.allclose(TM.mixture_entropy(xi, normalized=False), expected)
    assert np.allclose(TM.mixture_entropy(xi), np.array(expected) / math.log(4))
    assert np.allclose(TM.mixture_entropy(np.zeros((3, 4))), 1.0)  # uniform mixture
    assert np.allclose(TM.mixture_entropy(np.array([[50.0, 0, 0], [0, 0, 80.0]])), 0.0, atol=1e-15)  # one template
    assert TM.mixture_entropy(np.ones((2, 1))) == [0.0, 0.0]  # N = 1: nothing to choose


def test_overlaps_by_hand():
    a = np.log(np.array([[0.5, 0.5, 1e-300], [1.0, 1e-300, 1e-300]]))
    b = np.log(np.array([[0.5, 1e-300, 0.5], [1e-300, 1.0, 1e-300]]))
    # layer 0: min(.5,.5)+0+0 = .5; layer 1: 0 → mean .25
    assert TM.program_overlap(a, b) == pytest.approx(0.25)
    assert TM.program_overlap(a, a) == pytest.approx(1.0)
    # usage: ā = (.75, .25, 0), b̄ = (.25, .5, .25) → .25 + .25 + 0
    assert TM.template_usage_overlap(a, b) == pytest.approx(0.5)
    m = TM.overlap_matrix([a, b, a])
    assert m[0][2] == pytest.approx(1.0) and m[0][1] == pytest.approx(0.25)
    assert TM.mean_offdiagonal(m) == pytest.approx((0.25 * 4 + 1.0 * 2) / 6)
    assert TM.mean_offdiagonal([[1.0]]) is None
    with pytest.raises(ValueError):
        TM.program_overlap(a, np.zeros((3, 3)))


def test_template_usage_jsd_by_hand():
    one = np.log(np.array([[1.0, 1e-300], [1.0, 1e-300]]))  # usage (1, 0)
    other = np.log(np.array([[1e-300, 1.0], [1e-300, 1.0]]))  # usage (0, 1)
    half = np.log(np.array([[1.0, 1e-300], [1e-300, 1.0]]))  # usage (.5, .5)
    assert TM.template_usage_jsd(one, other) == pytest.approx(1.0)  # disjoint: 1 bit
    assert TM.template_usage_jsd(one, one) == pytest.approx(0.0, abs=1e-12)
    # m = (.75, .25): ½[.5 log2(.5/.75) + .5 log2(.5/.25)] + ½ log2(1/.75)
    by_hand = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert TM.template_usage_jsd(half, one) == pytest.approx(by_hand)
    assert TM.overlap_matrix([half, one], "jsd")[1][0] == pytest.approx(by_hand)
    with pytest.raises(ValueError):
        TM.template_usage_jsd(one, np.zeros((3, 2)))


def test_parameters_per_task_and_ladder_order():
    assert TM.parameters_per_task((8, 4), 64, 10) == 32 + 650
    assert TM.parameters_per_task(None, 64, 10) == 650
    assert TM.ladder_holds(0.3, 0.5, 0.6) and not TM.ladder_holds(0.5, 0.5, 0.6)
    assert not TM.ladder_holds(0.3, 0.7, 0.6) and TM.ladder_holds(0.3, 0.7, 0.6, margin=0.1)
    assert not TM.ladder_holds(0.3, None, 0.6)


def test_domain_transforms_are_exact_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 6, 6)).astype(np.float32)
    assert np.allclose(
        transform_images(x, "rot90"), np.rot90(x, 1, axes=(2, 3)), atol=1e-6
    )  # pixel centres map exactly
    assert np.allclose(transform_images(x, "rot0"), x, atol=1e-6) and np.array_equal(transform_images(x, "identity"), x)
    assert np.allclose(transform_images(x, "invert"), 1 - x)
    assert np.allclose(transform_images(x, "flip"), x[..., ::-1])
    assert np.allclose(transform_images(x, "rot90+invert"), 1 - np.rot90(x, 1, axes=(2, 3)), atol=1e-6)
    noisy = transform_images(x, "noise0.3")
    assert np.array_equal(noisy, transform_images(x, "noise0.3"))  # same domain, same noise
    assert not np.array_equal(noisy, transform_images(x, "noise0.3", salt=1))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not np.allclose(noisy, x)
    assert parse_domain("shear0.4+scale1.5") == [("shear", 0.4), ("scale", 1.5)]
    for bad in ("rotate30", "noise", "scale0", "rot30+blur"):
        with pytest.raises(ConfigError, match="domain transform"):
            parse_domain(bad)

"""Metric functions against hand-computed accuracy matrices."""

import math

import pytest

from clcompose.strategies.metrics import continual as M

# rows: after training step i; columns: experience j
ACC = [
    [0.90, 0.10, 0.00],
    [0.60, 0.80, 0.05],
    [0.30, 0.70, 0.95],
]


def test_average_accuracy_by_hand():
    assert M.average_accuracy(ACC) == pytest.approx((0.30 + 0.70 + 0.95) / 3)
    assert M.average_accuracy(ACC, step=0) == pytest.approx(0.90)
    assert M.average_accuracy(ACC, step=1) == pytest.approx((0.60 + 0.80) / 2)
    assert M.accuracy_curve(ACC) == pytest.approx([0.90, 0.70, (0.30 + 0.70 + 0.95) / 3])


def test_forgetting_by_hand():
    # exp 0: best of rows 0..1 is 0.90, final 0.30 → 0.60; exp 1: best of row 1 is 0.80, final 0.70 → 0.10
    assert M.forgetting(ACC) == pytest.approx((0.60 + 0.10) / 2)


def test_forgetting_uses_best_earlier_value_not_first():
    acc = [[0.5, 0.0], [0.9, 0.8]]  # exp 0 improved after step 1: nothing forgotten at the end
    assert M.forgetting(acc) == pytest.approx(0.5 - 0.9)  # max over rows < T-1 only: row 0 → 0.5 - 0.9
    acc3 = [[0.5, 0, 0], [0.9, 0.8, 0], [0.7, 0.8, 0.9]]
    assert M.forgetting(acc3) == pytest.approx(((0.9 - 0.7) + (0.8 - 0.8)) / 2)


def test_bwt_by_hand():
    assert M.backward_transfer(ACC) == pytest.approx(((0.30 - 0.90) + (0.70 - 0.80)) / 2)


def test_single_experience_and_perfect_memory():
    assert M.forgetting([[0.7]]) == 0.0 and M.backward_transfer([[0.7]]) == 0.0
    eye = [[1.0 if j <= i else 0.0 for j in range(4)] for i in range(4)]
    assert M.forgetting(eye) == 0.0 and M.backward_transfer(eye) == 0.0 and M.average_accuracy(eye) == 1.0


def test_naive_diagonal_matrix_is_the_one_experience_floor():
    t = 5
    diag = [[1.0 if i == j else 0.0 for j in range(t)] for i in range(t)]
    assert M.average_accuracy(diag) == pytest.approx(1 / t)
    assert M.forgetting(diag) == pytest.approx(1.0)
    assert M.backward_transfer(diag) == pytest.approx(-1.0)


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[0.1], [0.2]], [[math.nan]]])
def test_malformed_matrices_are_rejected(bad):
    with pytest.raises(ValueError):
        M.summarize(bad)

"""Offline loaders: shapes, class counts, fixed splits; stream construction and its seeds."""

import numpy as np
import pytest

from clcompose.bench.data.benchmarks import BENCHMARKS, build_benchmark, class_order, classes_per_experience
from clcompose.bench.data.datasets import load_dataset
from clcompose.strategies.core.registry import ConfigError
from tests.conftest import require_data

EXPECTED = {  # name: (train per class, test per class, image shape)
    "fmnist": (6000, 1000, (1, 28, 28)),
    "mnist5k": (400, 100, (1, 28, 28)),
    "animal": (800, 200, (1, 28, 28)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_datasets_shapes_and_class_counts(name):
    data = require_data(name)
    per_train, per_test, shape = EXPECTED[name]
    assert data.x_train.dtype == np.uint8 and data.x_train.shape[1:] == shape
    assert data.num_classes == 10
    assert np.bincount(data.y_train).tolist() == [per_train] * 10
    assert np.bincount(data.y_test).tolist() == [per_test] * 10
    assert 0 < data.x_train.mean() < 255  # real pixels, not a blank array


def test_fashion_mnist_matches_the_official_files():
    data = require_data("fmnist")
    assert data.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert data.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert data.x_train.mean() / 255 == pytest.approx(0.2860, abs=1e-3)


def test_fashion_mnist_from_a_torchvision_layout_root(tmp_path):
    data = require_data("fmnist")
    import gzip
    import shutil

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(f"/usr/share/datasets/fashion-mnist/{f}.gz") as src, open(raw / f, "wb") as dst:
            shutil.copyfileobj(src, dst)
    again = load_dataset("fmnist", data_root=str(tmp_path))
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y_train, data.y_train)


def test_digits_shapes():
    data = load_dataset("digits")
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == np.float32
    assert len(data.y_train) + len(data.y_test) == 1797 and data.num_classes == 10
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_missing_fashion_mnist_names_how_to_get_it(tmp_path, monkeypatch):
    import clcompose.bench.data.datasets as D

    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "nowhere")
    monkeypatch.delenv("BENCH_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fmnist", data_root=str(tmp_path))


def test_truncated_idx_file_is_reported(tmp_path):
    from clcompose.bench.data.datasets import _read_idx

    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(ConfigError, match="truncated"):
        _read_idx(p)


def test_stream_structure_and_subsample():
    bm = build_benchmark("split-digits", {"n_experiences": 5, "per_class": 20}, stream_seed=3)
    assert len(bm.train_stream) == 5 and len(bm.test_stream) == 5
    seen = []
    for exp in bm.train_stream:
        classes = sorted(exp.classes_in_this_experience)
        assert len(classes) == 2 and not set(classes) & set(seen)
        seen += classes
        assert len(exp.dataset) == 40
        x, y, t = exp.dataset[0]
        assert tuple(x.shape) == (1, 8, 8) and int(y) in classes and int(t) == 0
    assert sorted(seen) == list(range(10))
    assert bm.info["class_order"] == class_order(10, 3)


def test_class_order_depends_on_stream_seed_only():
    a = build_benchmark("split-digits", {"n_experiences": 5}, stream_seed=1)
    b = build_benchmark("split-digits", {"n_experiences": 5}, stream_seed=1)
    c = build_benchmark("split-digits", {"n_experiences": 5}, stream_seed=2)
    assert a.info["class_order"] == b.info["class_order"] != c.info["class_order"]
    assert class_order(10, None) == list(range(10))


def test_test_split_is_fixed_across_stream_seeds():
    a = build_benchmark("split-mnist5k", {"n_experiences": 2, "per_class": 5, "test_per_class": 7}, stream_seed=1)
    b = build_benchmark("split-mnist5k", {"n_experiences": 2, "per_class": 5, "test_per_class": 7}, stream_seed=2)
    ya = sorted(int(y) for e in a.test_stream for _, y, _ in e.dataset)
    assert ya == sorted(int(y) for e in b.test_stream for _, y, _ in e.dataset) and len(ya) == 70


def test_uneven_split_and_bounds():
    assert classes_per_experience(10, 3) == [4, 3, 3]
    with pytest.raises(ConfigError):
        classes_per_experience(10, 11)
    with pytest.raises(ConfigError):
        build_benchmark("split-digits", {"n_experiences": 0})


def test_cross_domain_stream_has_twenty_classes():
    require_data("mnist5k"), require_data("animal")
    bm = build_benchmark(
        "split-mnist5k-animal", {"n_experiences": 4, "per_class": 3, "test_per_class": 2}, stream_seed=0
    )
    classes = sorted(c for e in bm.train_stream for c in e.classes_in_this_experience)
    assert classes == list(range(20)) and bm.info["train_size"] == 60


def test_classic_benchmarks_are_registered_and_fail_clearly_offline(tmp_path):
    assert {"split-cifar100", "split-cifar10", "split-mnist"} <= set(BENCHMARKS.names())
    with pytest.raises(ConfigError, match="data_root|downloaded"):
        build_benchmark("split-cifar10", {"n_experiences": 5, "data_root": str(tmp_path)})


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ConfigError, match="valid: .*split-fmnist"):
        build_benchmark("split-imagenet-22k")

"""The paper's image benchmarks from tiny generated folders in each documented layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clcompose.bench.data.benchmarks import build_benchmark
from clcompose.bench.data.fake_folders import LAYOUTS, write_fake_dataset
from clcompose.bench.data.image_folders import ImageItems, seeded_split
from clcompose.bench.data.image_transforms import Recipe, eval_transform, train_transform
from clcompose.bench.runs.config import RunConfig
from clcompose.strategies.core.registry import ConfigError
from clcompose.strategies.task_vectors.consolidation import has_train_augmentation

# (experiences, classes of the first experience, classes of the last) as in the reference code
EXPECTED = {
    "split-cifar100-224": (10, 10, 10),
    "split-imagenet-r": (10, 20, 20),
    "split-cub200": (10, 20, 20),
    "split-caltech256": (10, 26, 25),
    "split-mit67": (10, 7, 6),
    "split-resisc45": (9, 5, 5),
    "split-cropdiseases": (7, 5, 5),
    "split-imagefolder": (5, 2, 1),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {name: write_fake_dataset(name, base / name, per_class=2) for name in LAYOUTS}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_gives_the_reference_stream(roots, name):
    bm = build_benchmark(name, {"data_root": str(roots[name]), "image_size": 16}, stream_seed=0)
    n_exp, first, last = EXPECTED[name]
    sizes = [len(e.classes_in_this_experience) for e in bm.train_stream]
    assert len(sizes) == n_exp and sizes[0] == first and sizes[-1] == last
    n_classes = sum(sizes)
    assert len(bm.info["class_names"]) == n_classes
    if name != "split-imagefolder":  # the reference's fixed label order: experience 0 holds labels 0..k-1
        assert sorted(bm.train_stream[0].classes_in_this_experience) == list(range(first))
    x, y, *_ = bm.train_stream[0].dataset[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert has_train_augmentation(bm.train_stream[0].dataset)  # ITA/IEL recompute θ0 features per probe epoch
    test_x, *_ = bm.test_stream[0].dataset.eval()[0]
    assert test_x.shape == (3, 16, 16)
    assert bm.info["train_size"] > 0 and bm.info["test_size"] > 0


def test_imagenet_r_labels_come_from_the_reference_split_files(roots):
    import json

    root = roots["split-imagenet-r"]
    listed = json.loads((root / "imagenet-r_train.yaml").read_text())
    bm = build_benchmark("split-imagenet-r", {"data_root": str(root), "image_size": 16}, 0)
    wnid_of = {t: Path(p).parent.name for p, t in zip(listed["data"], listed["targets"])}
    assert bm.info["class_names"] == [wnid_of[k] for k in range(200)]
    assert bm.info["class_names"] != sorted(bm.info["class_names"])  # not the sorted folders


def test_images_are_read_lazily(roots, monkeypatch):
    opened = []
    from PIL import Image

    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    bm = build_benchmark("split-mit67", {"data_root": str(roots["split-mit67"]), "image_size": 16}, 0)
    assert opened == []  # building the stream decodes nothing
    bm.train_stream[0].dataset[0]
    assert len(opened) == 1


def test_imagefolder_with_train_and_test_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        write_fake_dataset("split-imagefolder", tmp_path / "tmp" / split, per_class=n)
        (tmp_path / split).mkdir()
        for c in sorted((tmp_path / "tmp" / split).iterdir()):
            c.rename(tmp_path / split / c.name)
    bm = build_benchmark("split-imagefolder", {"data_root": str(tmp_path), "n_experiences": 3, "image_size": 16}, 1)
    assert bm.info["train_size"] == 6 * 6 and bm.info["test_size"] == 6 * 4
    assert [len(e.classes_in_this_experience) for e in bm.train_stream] == [2, 2, 2]


def test_seeded_split_is_per_class_reproducible_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    tr, te = seeded_split(labels, 0.2, seed=3)
    tr2, te2 = seeded_split(labels, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert not set(tr) & set(te) and len(tr) + len(te) == 40
    assert all((labels[te] == c).sum() == 2 for c in range(4))
    assert not np.array_equal(seeded_split(labels, 0.2, seed=4)[1], te)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("split-cifar100-224", "cifar-100-python"),
        ("split-imagenet-r", "imagenet-r"),
        ("split-cub200", "CUB_200_2011"),
        ("split-caltech256", "256_ObjectCategories"),
        ("split-mit67", "MIT67"),
        ("split-resisc45", "NWPU-RESISC45"),
        ("split-cropdiseases", "cropdisease"),
        ("split-imagefolder", "class folders"),
    ],
)
def test_missing_data_is_one_line_naming_what_to_get(tmp_path, name, where):
    with pytest.raises(ConfigError) as err:
        build_benchmark(name, {"data_root": str(tmp_path)}, 0)
    assert where in str(err.value) and "\n" not in str(err.value)


def test_missing_reference_split_names_the_files_and_the_alternative(tmp_path):
    write_fake_dataset("split-resisc45", tmp_path, per_class=2)
    (tmp_path / "NWPU-RESISC45" / "resisc45_test.yaml").unlink()
    with pytest.raises(ConfigError, match="resisc45_test.yaml.*split=seeded"):
        build_benchmark("split-resisc45", {"data_root": str(tmp_path)}, 0)
    bm = build_benchmark("split-resisc45", {"data_root": str(tmp_path), "split": "seeded", "image_size": 16}, 0)
    assert len(bm.train_stream) == 9


def test_bad_options_are_found_when_the_config_is_resolved():
    with pytest.raises(ConfigError, match=r"number of classes \(45\), got 46"):
        RunConfig(benchmark="split-resisc45", benchmark_options={"n_experiences": 46}).resolve()
    with pytest.raises(ConfigError, match="train_transform"):
        RunConfig(benchmark="split-cub200", benchmark_options={"train_transform": "mixup"}).resolve()


def test_transforms_are_the_reference_recipes_scaled_to_image_size():
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8), mode="RGB")
    got = eval_transform(Recipe("rrc", "center"), "reference", 28)(img)
    # by hand: Resize(256 · 28/224 = 32, bicubic) on the short side, then a centred 28 × 28 crop, to [0, 1]
    want = TF.to_tensor(TF.center_crop(TF.resize(img, 32, interpolation=InterpolationMode.BICUBIC), 28))
    assert torch.equal(got, want)
    torch.manual_seed(0)
    a = train_transform(Recipe("rrc", "center"), "reference", "reference", 28)(img)
    assert a.shape == (3, 28, 28)
    plain = train_transform(Recipe("rrc", "center"), "none", "reference", 28)(img)
    assert torch.equal(plain, want)  # no augmentation: the test transform


def test_image_items_hold_paths_not_pixels(roots):
    files = sorted((roots["split-imagefolder"]).rglob("*.png"))[:3]
    items = ImageItems(files, np.array([0, 0, 1]))
    assert items.targets == [0, 0, 1] and isinstance(items.items[0], Path)
    img, label = items[2]
    assert img.size == (8, 8) and label == 1

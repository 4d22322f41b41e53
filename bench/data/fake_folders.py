"""Tiny generated data sets in each paper layout (a few small PNGs per class), for the tests and the smoke scale.

The images are random colour fields with a per-class mean colour, so a model can learn something from them;
the point is the layout (folders, split files, label order) and the code path, not the data.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

# number of classes of each layout (the real data sets'), and the folder each one is generated in under root
LAYOUTS = {
    "split-cifar100-224": 100,
    "split-imagenet-r": 200,
    "split-cub200": 200,
    "split-caltech256": 256,
    "split-mit67": 67,
    "split-resisc45": 45,
    "split-cropdiseases": 35,
    "split-imagefolder": 6,
}


def _image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    base = np.asarray([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float64)
    return np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)


def _png(path: Path, array: np.ndarray) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="RGB").save(path)
    return str(path)


def write_fake_dataset(name: str, root: str | Path, per_class: int = 3, size: int = 8, seed: int = 0) -> Path:
    """Write ``per_class`` train and ``per_class`` test images of every class of ``name``'s layout under ``root``.

    Returns ``root`` (the ``data_root`` to give the benchmark). ``per_class`` >= 2.
    """
    root, rng, n = Path(root), np.random.default_rng(seed), LAYOUTS[name]
    root.mkdir(parents=True, exist_ok=True)
    classes = [f"class_{k:03d}" for k in range(n)]
    if name == "split-cifar100-224":
        folder = root / "cifar-100-python"
        folder.mkdir(exist_ok=True)
        for split in ("train", "test"):
            labels = [k for k in range(n) for _ in range(per_class)]
            data = np.stack([_image(rng, k, 32).transpose(2, 0, 1).reshape(-1) for k in labels])
            with open(folder / split, "wb") as f:
                pickle.dump({"data": data, "fine_labels": labels}, f)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": classes}, f)
    elif name == "split-imagenet-r":
        wnids = [f"n{k:08d}" for k in range(n)]
        order = np.random.default_rng(1).permutation(n)  # the reference's labels are not the sorted wnids
        for split in ("train", "test"):
            data, targets = [], []
            for k, w in enumerate(wnids):
                for j in range(per_class):
                    _png(root / "imagenet-r" / w / f"{split}_{j}.png", _image(rng, k, size))
                    data.append(f"data/imagenet-r/{w}/{split}_{j}.png")
                    targets.append(int(order[k]))
            (root / f"imagenet-r_{split}.yaml").write_text(json.dumps({"data": data, "targets": targets}))
    elif name == "split-cub200":
        folder = root / "CUB_200_2011"
        images, labels, splits = [], [], []
        for k in range(n):
            for j in range(2 * per_class):
                rel = f"{k + 1:03d}.{classes[k]}/img_{j}.png"
                _png(folder / "images" / rel, _image(rng, k, size))
                images.append(rel)
                labels.append(k + 1)
                splits.append(1 if j < per_class else 0)
        ids = range(1, len(images) + 1)
        (folder / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in zip(ids, images)))
        (folder / "image_class_labels.txt").write_text("".join(f"{i} {y}\n" for i, y in zip(ids, labels)))
        (folder / "train_test_split.txt").write_text("".join(f"{i} {s}\n" for i, s in zip(ids, splits)))
        (folder / "classes.txt").write_text("".join(f"{k + 1} {k + 1:03d}.{c}\n" for k, c in enumerate(classes)))
    elif name == "split-mit67":
        folder = root / "MIT67"
        lists = {"TrainImages.txt": [], "TestImages.txt": []}
        for k, c in enumerate(classes):
            for j in range(2 * per_class):
                _png(folder / "Images" / c / f"img_{j}.png", _image(rng, k, size))
                lists["TrainImages.txt" if j < per_class else "TestImages.txt"].append(f"{c}/img_{j}.png")
        for file, rows in lists.items():
            (folder / file).write_text("\n".join(rows) + "\n")
    elif name in ("split-resisc45", "split-cropdiseases"):
        base = root / ("NWPU-RESISC45" if name == "split-resisc45" else "cropdisease")
        images = base if name == "split-resisc45" else base / "images"
        lists = {"train": ([], []), "test": ([], [])}
        for k, c in enumerate(classes):
            for j in range(2 * per_class):
                _png(images / c / f"{c}_{j}.png", _image(rng, k, size))
                split = "train" if j < per_class else "test"
                lists[split][0].append(f"{c}/{c}_{j}.png")
                lists[split][1].append(k)
        for split, (data, labels) in lists.items():
            if name == "split-resisc45":
                (base / f"resisc45_{split}.yaml").write_text(json.dumps({"data": data, "targets": labels}))
            else:
                (base / f"{split}.json").write_text(json.dumps({"data": data, "labels": labels}))
    else:  # caltech256 (plus its clutter class, which is skipped) and a plain image folder
        folder = root / "256_ObjectCategories" if name == "split-caltech256" else root
        names = [f"{k + 1:03d}.{c}" for k, c in enumerate(classes)] + (["257.clutter"] if n == 256 else [])
        for k, c in enumerate(names):
            for j in range(2 * per_class):
                _png(folder / c / f"img_{j}.png", _image(rng, k, size))
    return root

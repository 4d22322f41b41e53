"""Train and test transforms of the paper's image benchmarks (the reference code's, per data set).

Every transform ends in ``ToTensor``: images reach the backbone in [0, 1], and the backbone normalises them
(the ViT with the in21k mean = std = 0.5, or ImageNet's statistics with ``backbone.normalization=imagenet``),
which is the same as the reference's ``Normalize`` after ``ToTensor``. Sizes scale with ``image_size``
(224 in the paper): a resize to 256 becomes round(256 · image_size / 224), so tests run the same recipe at 16 px.

Train recipes:
  ``rrc``          RandomResizedCrop(s, bicubic) + RandomHorizontalFlip (C-100, IN-R, RESISC45, CropDis.)
  ``resize-crop``  Resize(R, bicubic) + RandomCrop(s) + RandomHorizontalFlip (CUB: R = 300 square; MIT-67: 256)
  ``none``         the test transform (no augmentation)
Test recipes:
  ``center``       Resize(256, bicubic) + CenterCrop(s)
  ``resize``       Resize((s, s), bicubic)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

TrainRecipe = Literal["reference", "rrc", "resize-crop", "none"]
TestRecipe = Literal["reference", "center", "resize"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A data set's reference transforms: names of the train and test recipes and their resize sizes (at 224)."""

    train: str = "rrc"
    test: str = "center"
    train_resize: int | tuple[int, int] = 256  # only for resize-crop
    test_resize: int | tuple[int, int] = 256  # only for center


def _scaled(size: int | tuple[int, int], image_size: int) -> int | tuple[int, int]:
    if isinstance(size, tuple):
        return tuple(max(image_size, round(s * image_size / 224)) for s in size)
    return max(image_size, round(size * image_size / 224))


def eval_transform(recipe: Recipe, name: str, image_size: int):
    """The evaluation transform (PIL image → float tensor in [0, 1])."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    bicubic = InterpolationMode.BICUBIC
    name = recipe.test if name == "reference" else name
    if name == "center":
        steps = [T.Resize(_scaled(recipe.test_resize, image_size), interpolation=bicubic), T.CenterCrop(image_size)]
    else:
        steps = [T.Resize((image_size, image_size), interpolation=bicubic)]
    return T.Compose([*steps, T.ToTensor()])


def train_transform(recipe: Recipe, name: str, test_name: str, image_size: int):
    """The training transform (with augmentation unless ``name`` is ``none``)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    bicubic = InterpolationMode.BICUBIC
    name = recipe.train if name == "reference" else name
    if name == "none":
        return eval_transform(recipe, test_name, image_size)
    if name == "rrc":
        steps = [T.RandomResizedCrop(image_size, interpolation=bicubic)]
    else:
        steps = [T.Resize(_scaled(recipe.train_resize, image_size), interpolation=bicubic), T.RandomCrop(image_size)]
    return T.Compose([*steps, T.RandomHorizontalFlip(), T.ToTensor()])

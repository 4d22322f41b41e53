"""Make the CUDA-built torchvision wheel importable on a CPU-only torch.

The only torchvision 0.28.0 wheel is linked against CUDA libraries. On a CPU torch its ``_C`` extension
fails to load, torchvision then records that it has no C++ ops, yet ``torchvision/_meta_registrations.py``
still calls ``torch.library.register_fake("torchvision::nms")`` (and ``qnms``) unconditionally, which
raises ``operator torchvision::nms does not exist`` and breaks ``import torchvision`` and ``import avalanche``.

The fix defines the two operator schemas (no kernels) before torchvision's first import, but only when the
real extension cannot be loaded. It is installed as a one-shot ``sys.meta_path`` hook so that importing this
package stays cheap (torch is imported only when torchvision is).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive for the life of the process
_applied = False


def _extension_loads(package_dir: Path) -> bool:
    import torch

    for so in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(so))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def apply() -> None:
    """Register the schemas torchvision needs when its C++ extension cannot load. Idempotent."""
    global _library, _applied
    if _applied:
        return
    _applied = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    if _extension_loads(Path(spec.origin).parent):
        return
    import torch

    try:
        _library = torch.library.Library("torchvision", "DEF")
    except RuntimeError:  # another shim already owns the namespace
        return
    for schema in _SCHEMAS:
        _library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` just before the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            apply()
        return None


def install() -> None:
    """Apply now if torchvision is already imported-safe, else hook its first import."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())

"""The benchmark suite: streams, backbones, seeded runs, sweeps, result store, tables and plots."""

import strategies as _strategies  # noqa: F401  (installs the torchvision import fix first)

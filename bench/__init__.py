"""The benchmark harness: streams, backbones, seeded runs, sweeps, the result store, tables and plots.

Layers, each importing only those above it (and :mod:`clcompose.strategies`):

- :mod:`~clcompose.bench.io` — shared I/O: atomic JSON, JSON/YAML reading, time stamps, where files live;
- :mod:`~clcompose.bench.data` — data sets and benchmark streams; :mod:`~clcompose.bench.models` — backbones;
- :mod:`~clcompose.bench.runs` — one seeded run: config, execution, checkpoints, the record;
- :mod:`~clcompose.bench.sweeps` — sweep files, cluster profiles, the run-folder store, submitit fan-out;
- :mod:`~clcompose.bench.report` — aggregation, tables, plots, leaderboards; :mod:`~clcompose.bench.perf`;
- :mod:`~clcompose.bench.cli` — the ``bench`` command line.
"""

import clcompose.strategies as _strategies  # noqa: F401  (installs the torchvision import fix first)

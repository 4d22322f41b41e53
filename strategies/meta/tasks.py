"""Few-shot task sets: per task, support, query and held-out test points with soft targets.

The meta-learners (:mod:`.learner`) adapt on support sets and train on query sets; the benchmarks that make such
tasks (e.g. the hypernetwork-teacher streams of the harness) hand them over as ``experience.tasks``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

Combination = tuple[tuple[int, ...], ...]  # per generated layer, the sorted active modules


@dataclasses.dataclass
class TaskSet:
    """Tasks with their data: per task, ``n_support`` + ``n_query`` + ``n_test`` inputs in this order.

    ``z`` (N, L, M) is the teacher's code (ground truth, used only by metrics); ``combination`` (N,) indexes
    ``combinations``; ``soft`` (N, n, O) are the soft targets and ``hard`` (N, n) their argmax.
    """

    x: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor
    z: torch.Tensor
    combination: torch.Tensor
    combinations: list[Combination]
    n_support: int
    n_query: int
    n_test: int

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def _part(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[:, start:stop], self.soft[:, start:stop], self.hard[:, start:stop]

    def support(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, soft, hard) of the support sets: (N, n_support, ·)."""
        return self._part(0, self.n_support)

    def query(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._part(self.n_support, self.n_support + self.n_query)

    def test(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held-out points of each task (never trained on by any learner)."""
        return self._part(self.n_support + self.n_query, self.n_support + self.n_query + self.n_test)

    def subset(self, index: Sequence[int] | torch.Tensor) -> TaskSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(
            self,
            x=self.x[idx],
            soft=self.soft[idx],
            hard=self.hard[idx],
            z=self.z[idx],
            combination=self.combination[idx],
        )

    @staticmethod
    def concat(sets: Sequence[TaskSet]) -> TaskSet:
        if not sets:
            raise ValueError("no task sets to concatenate")
        first = sets[0]
        combos = list(first.combinations)
        index = []
        for s in sets:
            lookup = {c: i for i, c in enumerate(combos)}
            for c in s.combinations:
                if c not in lookup:
                    lookup[c] = len(combos)
                    combos.append(c)
            index.append(torch.tensor([lookup[s.combinations[int(i)]] for i in s.combination], dtype=torch.long))
        cat = lambda name: torch.cat([getattr(s, name) for s in sets])  # noqa: E731
        return dataclasses.replace(
            first,
            x=cat("x"),
            soft=cat("soft"),
            hard=cat("hard"),
            z=cat("z"),
            combination=torch.cat(index),
            combinations=combos,
        )

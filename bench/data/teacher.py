"""The modular hypernetwork teacher of Schug et al. (2024), *Discovering modular solutions that generalize
compositionally* (arXiv 2312.15001), as a deterministic offline generator.

Teacher network (the code's ``num_hidden = L + 1`` convention, no biases, ReLU)::

    h_0 = relu(W_in x / √D)                     fixed, shared by all tasks
    h_ℓ = relu(W_ℓ(z_ℓ) h_{ℓ-1} / √H)           ℓ = 1..L, generated:  W_ℓ(z_ℓ) = Σ_m z_{ℓ,m} Θ_{ℓ,m}
    o   = W_out h_L / √H                        fixed readout

All raw weights are TruncNormal(σ = 1) (truncated at ±2σ). The generated weights are exactly linear in the task
code z ∈ R^{L×M} (one hypernetwork direction per (layer, module): the reference's "no chunking" default).
The logits of each task are standardised per output unit with the mean and standard deviation over a fixed
set of reference inputs; soft targets are softmax(standardised / temperature), hard targets their argmax.
Because the network is positively homogeneous in z and the logits are standardised, the targets of c·z
equal those of z for every c > 0.

A task is a *combination*: per generated layer a set of 1..K active modules; its code is the k-hot matrix
(discrete) or, with continuous combinations, active entries 0.5 + 0.5·w with w ~ Exp(1)/(Σ Exp(1) + 1)
(the reference's uniform-on-simplex trick), so the support is fixed while z varies.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from clcompose.strategies.core.registry import ConfigError
from clcompose.strategies.meta.tasks import Combination, TaskSet


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """Sizes of the teacher (defaults: the §3.2 CPU variant, one generated layer, M = 6 modules)."""

    input_dim: int = 16
    output_dim: int = 8
    hidden_dim: int = 32
    n_modules: int = 6
    k_hot: int = 2
    generated_layers: int = 1
    temperature: float = 0.1
    n_reference: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("input_dim", "output_dim", "hidden_dim", "n_modules", "k_hot", "generated_layers", "n_reference"):
            if getattr(self, name) < 1:
                raise ConfigError(f"teacher {name} must be >= 1, got {getattr(self, name)}")
        if self.output_dim < 2:
            raise ConfigError(f"teacher output_dim must be >= 2, got {self.output_dim}")
        if self.k_hot > self.n_modules:
            raise ConfigError(f"teacher k_hot must be <= n_modules ({self.n_modules}), got {self.k_hot}")
        if not self.temperature > 0:
            raise ConfigError(f"teacher temperature must be > 0, got {self.temperature}")


def _trunc_normal(shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(*shape)
    torch.nn.init.trunc_normal_(out, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=gen)
    return out


class HyperTeacher:
    """The teacher: fixed input/readout layers and L generated layers W_ℓ(z_ℓ) = Σ_m z_{ℓ,m} Θ_{ℓ,m}."""

    def __init__(self, spec: TeacherSpec):
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        d, h, o, m, n_gen = spec.input_dim, spec.hidden_dim, spec.output_dim, spec.n_modules, spec.generated_layers
        self.w_in = _trunc_normal((h, d), gen)
        self.modules = _trunc_normal((n_gen, m, h, h), gen)  # Θ_{ℓ,m}
        self.w_out = _trunc_normal((o, h), gen)
        self.reference = torch.rand(spec.n_reference, d, generator=gen) * 2 - 1

    def generated_weights(self, z: torch.Tensor) -> torch.Tensor:
        """W(z) = Σ_m z_{ℓ,m} Θ_{ℓ,m}: codes (..., L, M) → weights (..., L, H, H)."""
        return torch.einsum("...lm,lmij->...lij", z, self.modules)

    def raw_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised teacher outputs: x (N, n, D), z (N, L, M) → (N, n, O)."""
        s = self.spec
        weights = self.generated_weights(z)
        h = torch.relu(x @ self.w_in.T / math.sqrt(s.input_dim))
        for layer in range(s.generated_layers):
            h = torch.relu(torch.einsum("nij,nkj->nki", weights[:, layer], h) / math.sqrt(s.hidden_dim))
        return h @ self.w_out.T / math.sqrt(s.hidden_dim)

    def logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits standardised per task and output unit with the statistics over the reference inputs."""
        ref = self.raw_logits(self.reference.expand(z.shape[0], -1, -1), z)
        mean, std = ref.mean(dim=1, keepdim=True), ref.std(dim=1, keepdim=True).clamp_min(1e-12)
        return (self.raw_logits(x, z) - mean) / std

    def targets(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft targets softmax(logits / temperature) and hard targets (their argmax)."""
        soft = torch.softmax(self.logits(x, z) / self.spec.temperature, dim=-1)
        return soft, soft.argmax(dim=-1)


# --------------------------------------------------------------------------- combinations and task pools


def layer_codes(n_modules: int, k_hot: int) -> list[tuple[int, ...]]:
    """All sets of 1..K of the M modules (one generated layer): Σ_{h=1..K} binom(M, h) codes."""
    return [c for h in range(1, k_hot + 1) for c in itertools.combinations(range(n_modules), h)]


def task_pool(n_modules: int, k_hot: int, generated_layers: int) -> list[Combination]:
    """Every combination: the product of the per-layer codes over the L generated layers."""
    return list(itertools.product(layer_codes(n_modules, k_hot), repeat=generated_layers))


def _connected_codes(n_modules: int) -> set[tuple[int, ...]]:
    """One-hots plus ring pairs (i, i+1) and skip pairs (i, i+2) (mod M): 3M codes per layer."""
    m = n_modules
    pairs = {tuple(sorted((i, (i + d) % m))) for i in range(m) for d in (1, 2)}
    return {(i,) for i in range(m)} | pairs


def halves(n_modules: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two module groups of the disconnected support: {0..⌊M/2⌋−1} and the rest."""
    cut = n_modules // 2
    return tuple(range(cut)), tuple(range(cut, n_modules))


def _disconnected(n_modules: int, generated_layers: int) -> set[Combination]:
    """Per layer 1-hot or 2-hot codes inside one half; all layers use the same half and the same hotness."""
    out: set[Combination] = set()
    for half in halves(n_modules):
        for hot in (1, 2):
            codes = list(itertools.combinations(half, hot))
            out |= set(itertools.product(codes, repeat=generated_layers))
    return out


SUPPORTS = ("random", "non_compositional", "connected", "disconnected")


def split_pool(
    n_modules: int, k_hot: int, generated_layers: int, support: str, ood_fraction: float = 0.25, seed: int = 0
) -> tuple[list[Combination], list[Combination]]:
    """(in-distribution, out-of-distribution) combinations of the reference's task supports.

    - ``random``: a seeded permutation of the pool; the last ``ood_fraction`` is OOD.
    - ``non_compositional``: OOD = every combination with the last module active in the last generated layer.
    - ``connected`` (K ≥ 2, M ≥ 5): per layer the one-hots, ring pairs and skip pairs.
    - ``disconnected`` (K ≥ 2, M ≥ 4): per layer 1- or 2-hot codes inside one half of the modules, every layer
      the same half and hotness. For both of these the OOD set is the combinations in *neither* of them.
    """
    pool = task_pool(n_modules, k_hot, generated_layers)
    if support == "random":
        if not 0 < ood_fraction < 1:
            raise ConfigError(f"ood_fraction must be in (0, 1), got {ood_fraction}")
        perm = np.random.default_rng(seed).permutation(len(pool))
        n_ood = int(round(len(pool) * ood_fraction))
        shuffled = [pool[i] for i in perm]
        return shuffled[: len(pool) - n_ood], shuffled[len(pool) - n_ood :]
    if support == "non_compositional":
        last = n_modules - 1
        ood = [c for c in pool if last in c[-1]]
        return [c for c in pool if last not in c[-1]], ood
    if support in ("connected", "disconnected"):
        if k_hot < 2 or n_modules < (5 if support == "connected" else 4):
            raise ConfigError(
                f"the {support} support needs k_hot >= 2 and n_modules >= {5 if support == 'connected' else 4}"
            )
        per_layer = _connected_codes(n_modules)
        connected = {c for c in pool if all(code in per_layer for code in c)}
        disconnected = _disconnected(n_modules, generated_layers)
        chosen = connected if support == "connected" else disconnected
        return [c for c in pool if c in chosen], [c for c in pool if c not in connected and c not in disconnected]
    raise ConfigError(f"unknown task support {support!r}; valid: {', '.join(SUPPORTS)}")


def is_compositional(combinations: Sequence[Combination], n_modules: int, generated_layers: int) -> bool:
    """Compositional support: every (generated layer, module) is active in some combination."""
    seen = {(layer, m) for c in combinations for layer, code in enumerate(c) for m in code}
    return len(seen) == n_modules * generated_layers


def is_connected(combinations: Sequence[Combination], n_modules: int, generated_layers: int) -> bool:
    """Connected support: in every generated layer, the graph on all M modules with an edge between modules
    active together in some combination has a single component (which implies compositional support)."""
    for layer in range(generated_layers):
        parent = list(range(n_modules))

        def find(i: int, parent: list[int] = parent) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        active = set()
        for c in combinations:
            code = c[layer]
            active |= set(code)
            for a, b in zip(code, code[1:]):
                parent[find(a)] = find(b)
        if len(active) != n_modules or len({find(i) for i in range(n_modules)}) != 1:
            return False
    return True


def code_matrix(combination: Combination, n_modules: int, continuous: bool, rng: np.random.Generator) -> np.ndarray:
    """The task code z (L, M) of a combination: k-hot, or continuous weights in [0.5, 1) on the same support."""
    z = np.zeros((len(combination), n_modules), dtype=np.float32)
    for layer, code in enumerate(combination):
        if continuous:
            w = rng.exponential(1.0, size=len(code))
            z[layer, list(code)] = 0.5 + 0.5 * w / (w.sum() + 1.0)
        else:
            z[layer, list(code)] = 1.0
    return z


# --------------------------------------------------------------------------- task data


def make_tasks(
    teacher: HyperTeacher,
    combinations: Sequence[Combination],
    tasks_per_combination: int,
    n_support: int,
    n_query: int,
    n_test: int,
    continuous: bool,
    seed: int,
) -> TaskSet:
    """``tasks_per_combination`` tasks per combination (each its own code when continuous) with inputs
    x ~ U[−1, 1]^D and the teacher's targets; deterministic in ``seed``."""
    spec = teacher.spec
    rng = np.random.default_rng(seed)
    combos = list(combinations)
    codes, index = [], []
    for i, c in enumerate(combos):
        for _ in range(tasks_per_combination):
            codes.append(code_matrix(c, spec.n_modules, continuous, rng))
            index.append(i)
    n = n_support + n_query + n_test
    z = torch.from_numpy(np.stack(codes)) if codes else torch.zeros(0, spec.generated_layers, spec.n_modules)
    x = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(len(codes), n, spec.input_dim)).astype(np.float32))
    soft, hard = (
        teacher.targets(x, z) if codes else (torch.zeros(0, n, spec.output_dim), torch.zeros(0, n, dtype=torch.long))
    )
    return TaskSet(
        x=x,
        soft=soft,
        hard=hard,
        z=z,
        combination=torch.tensor(index, dtype=torch.long),
        combinations=combos,
        n_support=n_support,
        n_query=n_query,
        n_test=n_test,
    )

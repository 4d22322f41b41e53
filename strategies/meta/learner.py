"""Meta-learned students of the hypernetwork-teacher streams (Schug et al. 2024, arXiv 2312.15001).

Every student is the run's backbone (an MLP) followed by a linear read-out; what differs is which parameters
are *fast* (adapted per task in the inner loop) and which are *meta* (learned in the outer loop):

- ``meta-hnet``: a **linear hypernetwork**. Each linear layer ℓ of the network is generated from its own bank
  of T templates, W_ℓ = Σ_t ê_{ℓ,t} B_{ℓ,t} (biases likewise), with ê_ℓ = e_ℓ·√T/‖e_ℓ‖ (the scale is
  stop-gradiented). Fast: the embeddings e_ℓ ∈ R^T plus an output bias; meta: the banks and the fast init.
- ``meta-anil``: ANIL, a monolithic control: the body is meta-learned, only the read-out is fast.
- ``meta-maml``: MAML, every weight is fast (initialisation meta-learned).

Bilevel loop per experience (``outer_steps`` outer steps): sample a meta-batch of tasks (a ``replay_fraction``
of it from earlier experiences' tasks), adapt the fast parameters on each task's support set with
``inner_steps`` functional AdamW steps (gradients from :func:`torch.func.grad`, tasks batched with
:func:`torch.func.vmap`), and take one AdamW step of the meta-parameters on the query KL of the adapted
students, differentiated through the inner loop (second order; ``first_order=true`` detaches the inner
gradients). Loss everywhere: KL(teacher soft target ‖ softmax(student)).

Evaluation adapts the fast parameters on a task's support set from the meta-learned initialisation and scores
the task's held-out test points (the reference's protocol). These strategies are not Avalanche templates; they
implement the run loop's protocol (``train(experiences)``, ``eval(stream) → metrics``) on experiences that
carry their tasks (``experience.tasks``, a :class:`~clcompose.strategies.meta.tasks.TaskSet`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from clcompose.strategies.core.registry import STRATEGIES, ConfigError, Options
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.meta.tasks import TaskSet
from clcompose.strategies.metrics.compositional import soft_kl

Kind = Literal["hnet", "anil", "maml"]
DEFAULT_INNER_LR = {"hnet": 0.3, "anil": 0.03, "maml": 0.01}
DEFAULT_OUTER_WD = {"hnet": 1e-2, "anil": 1e-4, "maml": 1e-4}
EPS_ROOT = float(torch.finfo(torch.float32).eps)  # inside the square root: finite second-order gradients at v = 0


@dataclasses.dataclass
class MetaOptions(Options):
    """Bilevel meta-learning (per experience). ``inner_lr``/``outer_weight_decay`` default per student."""

    outer_steps: int = 300
    meta_batch: int = 16
    inner_steps: int = 10
    inner_lr: float | None = None
    inner_weight_decay: float = 1e-4
    outer_lr: float = 1e-3
    outer_weight_decay: float | None = None
    clip_norm: float = 1.0
    templates: int = 24  # hypernetwork only: T templates per bank (the reference uses T = 4M)
    first_order: bool = False
    replay_fraction: float = 0.5
    eval_chunk: int = 64

    def check(self) -> None:
        for name in ("outer_steps", "meta_batch", "inner_steps", "templates", "eval_chunk"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(self.inner_lr is None or self.inner_lr > 0, "inner_lr", "must be > 0")
        self.require(self.outer_lr > 0, "outer_lr", "must be > 0")
        self.require(
            self.outer_weight_decay is None or self.outer_weight_decay >= 0, "outer_weight_decay", "must be >= 0"
        )
        self.require(self.inner_weight_decay >= 0, "inner_weight_decay", "must be >= 0")
        self.require(self.clip_norm > 0, "clip_norm", "must be > 0")
        self.require(0 <= self.replay_fraction <= 1, "replay_fraction", "must be in [0, 1]")


def _linear_layers(net: nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]


class MetaStudent(nn.Module):
    """The backbone + a read-out, with the fast/meta split of ``kind`` (see the module docstring).

    ``forward(fast, x)`` runs one task: ``fast`` maps fast-parameter names to tensors, ``x`` is (n, D).
    """

    def __init__(self, backbone: nn.Module, n_out: int, kind: Kind, templates: int = 24):
        super().__init__()
        if not hasattr(backbone, "out_features"):
            raise ConfigError("meta-learning students need a backbone with out_features (e.g. --backbone mlp)")
        self.kind = kind
        self.net = nn.Sequential(backbone, nn.Linear(backbone.out_features, n_out))
        self.layers = _linear_layers(self.net)
        if not self.layers:
            raise ConfigError("meta-learning students need a backbone made of linear layers (e.g. --backbone mlp)")
        first = self.net.get_submodule(self.layers[0])
        self.in_features = first.in_features
        self.names = [n for n, _ in self.net.named_parameters()]
        self.fast_init = nn.ParameterDict()
        self.banks = nn.ParameterDict()
        if kind == "hnet":
            self.templates = templates
            for layer in self.layers:
                lin = self.net.get_submodule(layer)
                w = torch.empty(templates, *lin.weight.shape)
                nn.init.trunc_normal_(w, std=1.0, a=-2.0, b=2.0)
                self.banks[self._key(layer + ".weight")] = nn.Parameter(w / math.sqrt(templates * lin.in_features))
                if lin.bias is not None:
                    self.banks[self._key(layer + ".bias")] = nn.Parameter(torch.zeros(templates, *lin.bias.shape))
                self.fast_init[self._key(layer)] = nn.Parameter(torch.randn(templates))
            self.fast_init["out_bias"] = nn.Parameter(torch.zeros(n_out))
            self.net.requires_grad_(False)  # every weight is generated from the banks
        else:
            fast = self.names if kind == "maml" else [n for n in self.names if n.startswith("1.")]
            params = dict(self.net.named_parameters())
            for n in fast:
                self.fast_init[self._key(n)] = nn.Parameter(params[n].detach().clone())
                params[n].requires_grad_(False)
        self.fast_names = list(self.fast_init.keys())

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def init_fast(self) -> dict[str, torch.Tensor]:
        return dict(self.fast_init.items())

    def embedding(self, e: torch.Tensor) -> torch.Tensor:
        """A hypernetwork layer's embedding as the network uses it: rescaled to norm √T (scale stop-gradiented,
        as in the reference), so only its direction is a task parameter."""
        return e * (math.sqrt(self.templates) / e.norm(dim=-1, keepdim=True)).detach()

    def task_features(self, fast: dict[str, torch.Tensor]) -> torch.Tensor:
        """Adapted fast parameters of a batch of tasks as one row each, in the form the network uses them (the
        hypernetwork's embeddings normalised; their discarded norm would only add noise to decoding)."""
        rows = [
            (self.embedding(fast[n]) if self.kind == "hnet" and n != "out_bias" else fast[n]).reshape(len(fast[n]), -1)
            for n in self.fast_names
        ]
        return torch.cat(rows, 1)

    def weights(self, fast: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network's parameters for one task."""
        if self.kind == "hnet":
            out = {}
            for layer in self.layers:
                e = self.embedding(fast[self._key(layer)])
                for suffix in (".weight", ".bias"):
                    key = self._key(layer + suffix)
                    if key in self.banks:
                        out[layer + suffix] = torch.tensordot(e, self.banks[key], dims=1)
            last = self.layers[-1] + ".bias"
            out[last] = out[last] + fast["out_bias"] if last in out else fast["out_bias"]
            return out
        params = {n: p for n, p in self.net.named_parameters()}
        params.update({n: fast[self._key(n)] for n in self.names if self._key(n) in fast})
        return params

    def forward(self, fast: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self.weights(fast), (x,))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Task inputs widened with zeros to the backbone's input size (the stream's context columns, which the
        meta-learners must not see: they infer the task from its support set)."""
        extra = self.in_features - x.shape[-1]
        if extra < 0:
            raise ConfigError(f"the backbone takes {self.in_features} inputs but the tasks have {x.shape[-1]}")
        return torch.nn.functional.pad(x, (0, extra)) if extra else x


def adapt(
    student: MetaStudent,
    fast: dict[str, torch.Tensor],
    x: torch.Tensor,
    soft: torch.Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
    create_graph: bool,
) -> dict[str, torch.Tensor]:
    """``steps`` AdamW steps (β = 0.9, 0.999, ε = 1e-8, decoupled weight decay) on KL(support) from ``fast``.

    m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²;  p ← p − lr (m̂ / (√(v̂ + ε_root) + ε) + wd p).
    With ``create_graph`` the result stays differentiable w.r.t. the meta-parameters through every step.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    init = fast
    loss_grad = grad(lambda f: soft_kl(student(f, x), soft))
    m = {k: torch.zeros_like(v) for k, v in fast.items()}
    v2 = {k: torch.zeros_like(v) for k, v in fast.items()}
    for k in range(1, steps + 1):
        g = loss_grad(fast)
        if not create_graph:
            g = {n: t.detach() for n, t in g.items()}
        m = {n: b1 * m[n] + (1 - b1) * g[n] for n in fast}
        v2 = {n: b2 * v2[n] + (1 - b2) * g[n] ** 2 for n in fast}
        fast = {
            n: fast[n]
            - lr * ((m[n] / (1 - b1**k)) / (torch.sqrt(v2[n] / (1 - b2**k) + EPS_ROOT) + eps) + weight_decay * fast[n])
            for n in fast
        }
        if not create_graph:
            fast = {n: t.detach() for n, t in fast.items()}
    if not create_graph:  # first order: the adapted parameters pass the query gradient straight to the init
        fast = {n: fast[n] + init[n] - init[n].detach() for n in fast}
    return fast


def adapt_batch(
    student: MetaStudent,
    x: torch.Tensor,
    soft: torch.Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
    create_graph: bool,
    init: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`adapt` for a batch of tasks (x: (N, n, D), soft: (N, n, O)), vmapped; each from the same init."""
    init = init if init is not None else student.init_fast()
    n = x.shape[0]
    batched = {k: v.expand(n, *v.shape) for k, v in init.items()}
    return vmap(lambda f, xi, si: adapt(student, f, xi, si, steps, lr, weight_decay, create_graph))(batched, x, soft)


@dataclasses.dataclass
class Adapted:
    """Result of few-shot adaptation on a set of tasks."""

    accuracy: float  # on the tasks' held-out test points
    loss: float
    per_task_accuracy: torch.Tensor  # (N,)
    fast: torch.Tensor  # (N, P): the adapted fast parameters, flattened


class MetaLearner:
    """A bilevel meta-learning strategy (see the module docstring) with the run loop's train/eval protocol."""

    def __init__(
        self,
        model: nn.Module,
        options: MetaOptions,
        train: TrainConfig,
        kind: Kind,
        *,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        self.backbone = getattr(model, "backbone", model)
        self.options, self.kind, self.device = options, kind, torch.device(device)
        self.inner_lr = options.inner_lr if options.inner_lr is not None else DEFAULT_INNER_LR[kind]
        wd = options.outer_weight_decay
        self.outer_weight_decay = wd if wd is not None else DEFAULT_OUTER_WD[kind]
        self.student: MetaStudent | None = None
        self.initial_student: MetaStudent | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.buffer: list = []  # TaskSets of the experiences trained so far
        self.history: list[dict] = []

    # ------------------------------------------------------------------ training
    def _build(self, n_out: int) -> None:
        self.student = MetaStudent(self.backbone, n_out, self.kind, self.options.templates).to(self.device)
        self.initial_student = copy.deepcopy(self.student)  # the no-information reference (nothing learned yet)
        self.optimizer = torch.optim.AdamW(
            self.student.meta_parameters(), lr=self.options.outer_lr, weight_decay=self.outer_weight_decay
        )

    def _sample(self, current, earlier) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Support x/soft and query x/soft of a meta-batch (a replay share drawn from earlier experiences)."""
        b = self.options.meta_batch
        n_old = int(round(b * self.options.replay_fraction)) if earlier is not None else 0
        parts = [(current, b - n_old)] + ([(earlier, n_old)] if n_old else [])
        sx, ss, qx, qs = [], [], [], []
        for tasks, n in parts:
            idx = torch.randint(len(tasks), (n,))
            sub = tasks.subset(idx)
            (a, b_, _), (c, d, _) = sub.support(), sub.query()
            sx.append(a), ss.append(b_), qx.append(c), qs.append(d)
        s = self.student
        return (
            s.pad(torch.cat(sx)).to(self.device),
            torch.cat(ss).to(self.device),
            s.pad(torch.cat(qx)).to(self.device),
            torch.cat(qs).to(self.device),
        )

    def meta_loss(self, sx, ss, qx, qs) -> torch.Tensor:
        """Query KL of the students adapted on their support sets, averaged over the meta-batch."""
        o, s = self.options, self.student
        fast = adapt_batch(
            s, sx, ss, o.inner_steps, self.inner_lr, o.inner_weight_decay, create_graph=not o.first_order
        )
        logits = vmap(s.forward)(fast, qx)
        return soft_kl(logits, qs)

    def train(self, experiences, eval_streams=None, **kwargs) -> None:
        for exp in experiences if isinstance(experiences, (list, tuple)) else [experiences]:
            tasks = getattr(exp, "tasks", None)
            if tasks is None:
                raise ConfigError("meta-learning strategies need a teacher stream (benchmarks teacher-*)")
            if self.student is None:
                self._build(int(tasks.soft.shape[-1]))
            earlier = TaskSet.concat(self.buffer) if self.buffer else None
            losses = []
            self.student.train()
            for _ in range(self.options.outer_steps):
                loss = self.meta_loss(*self._sample(tasks, earlier))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(self.student.meta_parameters(), self.options.clip_norm)
                if torch.isfinite(norm):  # the reference skips non-finite updates
                    self.optimizer.step()
                losses.append(float(loss.detach()))
            self.buffer.append(tasks)
            k = max(1, len(losses) // 10)
            self.history.append(
                {
                    "experience": int(exp.current_experience),
                    "tasks": sum(len(t) for t in self.buffer),
                    "outer_loss_first": sum(losses[:k]) / k,
                    "outer_loss_last": sum(losses[-k:]) / k,
                }
            )

    # ------------------------------------------------------------------ evaluation
    def adapt_tasks(self, tasks, initial: bool = False) -> Adapted:
        """Adapt on each task's support set from the meta-learned init (``initial``: from the untrained student)
        and score its test points."""
        student = self.initial_student if initial else self.student
        o = self.options
        accs, losses, fasts = [], [], []
        for start in range(0, len(tasks), o.eval_chunk):
            chunk = tasks.subset(range(start, min(start + o.eval_chunk, len(tasks))))
            (sx, ss, _), (tx, ts, _) = chunk.support(), chunk.test()
            fast = adapt_batch(
                student,
                student.pad(sx).to(self.device),
                ss.to(self.device),
                o.inner_steps,
                self.inner_lr,
                o.inner_weight_decay,
                create_graph=False,
            )
            with torch.no_grad():
                logits = vmap(student.forward)(fast, student.pad(tx).to(self.device))
            ts = ts.to(self.device)
            accs.append((logits.argmax(-1) == ts.argmax(-1)).float().mean(1).cpu())
            losses.append(torch.stack([soft_kl(logits[i], ts[i]) for i in range(len(logits))]).cpu())
            fasts.append(student.task_features(fast).detach().cpu())
        per_task = torch.cat(accs)
        return Adapted(float(per_task.mean()), float(torch.cat(losses).mean()), per_task, torch.cat(fasts))

    def mean_adapted(self, tasks: TaskSet) -> dict[str, torch.Tensor]:
        """The fast parameters adapted on each task's support set (from the meta-learned init), averaged over tasks."""
        s, o = self.student, self.options
        sx, ss, _ = tasks.support()
        fast = adapt_batch(
            s,
            s.pad(sx).to(self.device),
            ss.to(self.device),
            o.inner_steps,
            self.inner_lr,
            o.inner_weight_decay,
            create_graph=False,
        )
        return {k: v.mean(0) for k, v in fast.items()}

    def initial_fast(self) -> dict[str, torch.Tensor]:
        """The meta-learned initialisation of the fast parameters (detached)."""
        return {k: v.detach() for k, v in self.student.init_fast().items()}

    def predict_with(self, fast: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits of one task's inputs under given fast parameters (e.g. merged codes), no adaptation."""
        with torch.no_grad():
            return self.student(fast, self.student.pad(x).to(self.device))

    def eval(self, stream, **kwargs) -> dict[str, float]:
        """Accuracy per experience after few-shot adaptation (Avalanche's metric names, so the run loop reads them)."""
        out = {}
        name = stream.name if stream.name.endswith("_stream") else f"{stream.name}_stream"
        for exp in stream:
            tasks = exp.tasks
            acc = self.adapt_tasks(tasks).accuracy if self.student is not None else 1.0 / tasks.soft.shape[-1]
            out[f"Top1_Acc_Exp/eval_phase/{name}/Exp{exp.current_experience:03d}"] = acc
        return out

    def record_extras(self) -> dict:
        s = self.student
        return {
            "diagnostics": self.history,
            "inner_lr": self.inner_lr,
            "outer_weight_decay": self.outer_weight_decay,
            "meta_parameters": sum(p.numel() for p in s.meta_parameters()) if s else 0,
            "fast_parameters": sum(p.numel() for p in s.fast_init.values()) if s else 0,
        }


def _register(kind: Kind, summary: str):
    def build(model, options: MetaOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
        return MetaLearner(model, options, train, kind, evaluator=evaluator, device=device, plugins=plugins)

    build.__doc__ = summary
    STRATEGIES.register(f"meta-{kind}", MetaOptions)(build)


_register("hnet", "Linear hypernetwork meta-learner (modular; fast = template embeddings), teacher streams only.")
_register("anil", "ANIL meta-learner (monolithic; fast = read-out), teacher streams only.")
_register("maml", "MAML meta-learner (monolithic; every weight fast), teacher streams only.")

"""The transfer ladder: how well the trained body transfers to a held-out task when only the head, the program
ξ and the head, or everything is trained (:func:`transfer_ladder`)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.templates.network import TaskProgramNet, TemplateMixtureNet, recalibrate_statistics
from clcompose.strategies.templates.programs import dataset_inputs, optimizer_for

RUNGS = ("head", "program", "full")


def train_loop(
    net: nn.Module,
    params_and_scales,
    dataset,
    train: TrainConfig,
    epochs: int,
    generator: torch.Generator,
    device,
    forward,
) -> None:
    """Cross-entropy training of the given parameter groups (params, lr multiplier) on ``dataset``, shuffled by
    ``generator``."""
    opt = optimizer_for(params_and_scales, train)
    loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True, generator=generator)
    net.train()
    for _ in range(epochs):
        for x, y, *_ in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()


@torch.no_grad()
def accuracy(forward, dataset, batch_size: int, device) -> float:
    """Top-1 accuracy of ``forward`` on ``dataset``."""
    correct = total = 0
    for x, y, *_ in DataLoader(dataset, batch_size=batch_size):
        correct += int((forward(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    return correct / max(1, total)


def transfer_ladder(
    body: TemplateMixtureNet,
    init_logits: torch.Tensor | None,
    heldout: dict,
    train: TrainConfig,
    epochs: int,
    program_lr_scale: float,
    seed: int,
    device="cpu",
    recalibrate: bool = True,
) -> dict[str, float | None]:
    """Accuracy on a held-out task after training, from the same start (program ``init_logits``, fresh
    statistics and head): the head only; the program ξ and the head; everything (full fine-tuning).
    Runs on copies; the strategy's own model is not changed. ``program`` is None for fixed programs."""
    out: dict[str, float | None] = {}
    with torch.random.fork_rng(devices=[]):  # the ladder must not move the run's global random stream
        for rung in RUNGS:
            out[rung] = _rung(
                rung, body, init_logits, heldout, train, epochs, program_lr_scale, seed, device, recalibrate
            )
    return out


def _rung(
    rung: str,
    body: TemplateMixtureNet,
    init_logits: torch.Tensor | None,
    heldout: dict,
    train: TrainConfig,
    epochs: int,
    program_lr_scale: float,
    seed: int,
    device,
    recalibrate: bool,
) -> float | None:
    """One rung of :func:`transfer_ladder` on a fresh copy of ``body`` (None: no program to train)."""
    task, train_ds, test_ds = heldout["task_label"], heldout["train"], heldout["test"]
    classes = sorted(int(c) for c in train_ds.targets.uniques)
    torch.manual_seed(seed)  # every rung from the same fresh head and statistics
    net = TaskProgramNet(copy.deepcopy(body)).to(device)
    net.add_task(task, classes)
    xi = net.program(task)
    if xi is None and rung == "program":
        return None
    if xi is not None and init_logits is not None:
        with torch.no_grad():
            xi.copy_(init_logits)
    head = list(net.heads[str(task)].parameters())
    groups = {
        "head": [(head, 1.0)],
        "program": [(head, 1.0), ([xi], program_lr_scale)],
        "full": [(head + list(net.body.parameters()), 1.0), ([xi] if xi is not None else [], program_lr_scale)],
    }[rung]
    for p in net.parameters():
        p.requires_grad_(False)
    for ps, _ in groups:
        for p in ps:
            p.requires_grad_(True)

    def forward(x):
        return net(x, task)

    gen = torch.Generator().manual_seed(seed)
    train_loop(net, groups, train_ds, train, epochs, gen, device, forward)
    if recalibrate:
        recalibrate_statistics(net.norms[str(task)], forward, dataset_inputs(train_ds, train.eval_batch_size, device))
    net.eval()
    return accuracy(forward, test_ds, train.eval_batch_size, device)

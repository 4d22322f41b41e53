"""``train.loggers``: Avalanche's loggers (TensorBoard, CSV, Weights & Biases, text) writing under the run folder.

Imported only when a run asks for loggers (it imports Avalanche). The loggers observe a run and change nothing
in it: a run with loggers has the same config hash, accuracy matrix and metrics as one without
(``tests/test_loggers.py``). With loggers, the evaluator also computes the training loss and accuracy per epoch,
the test loss per experience and the stream accuracy; the test loss of an experience not trained yet (its
classes have no head, so their logits are masked to -1e4 and the loss is ~1e4) is not published, so loss
curves show only experiences the model has seen.

Each logger writes to ``<run folder>/logs/<name>`` (``tensorboard/``, ``csv/``, ``wandb/``, ``text.log``); the CSV
files leave a value that was not measured empty (Avalanche's CSV logger writes 0). A
resumed run appends to the text log and the TensorBoard folder, starts a new W&B run, and writes its CSV files
to ``csv-attempt<N>/`` (Avalanche's CSV logger truncates its files). Loggers are left out of checkpoints and
built afresh on resume.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

from avalanche.evaluation.metric_results import AlternativeValues
from avalanche.logging import CSVLogger, TensorboardLogger, TextLogger, WandBLogger
from avalanche.training.plugins import EvaluationPlugin

from clcompose.strategies.core.registry import ConfigError

_EXPERIENCE_LOSS = re.compile(r"^Loss_Exp/eval_phase/[^/]+/(?:Task\d+/)?Exp(\d+)$")


class LoggedEvaluator(EvaluationPlugin):
    """The evaluator of a run with loggers: drops the test loss of experiences not trained yet.

    The run loop sets :attr:`seen_experiences` before every training step and evaluation.
    """

    def __init__(self, *metrics, loggers=None, **kwargs):
        super().__init__(*metrics, loggers=loggers, **kwargs)
        self.seen_experiences: set[int] = set()

    def publish_metric_value(self, mval) -> None:
        m = _EXPERIENCE_LOSS.match(mval.name)
        if m and int(m.group(1)) not in self.seen_experiences:
            return
        super().publish_metric_value(mval)


class SuiteCSVLogger(CSVLogger):
    """Avalanche's ``CSVLogger`` with empty cells, instead of 0, for values that were not measured (e.g. the
    loss of an experience not trained yet, forgetting, validation metrics), so that no 0 passes for a value."""

    def __init__(self, log_folder=None):
        super().__init__(log_folder)
        self.val_acc, self.val_loss = None, None

    def _val_to_str(self, m_val):
        return "" if m_val is None else super()._val_to_str(m_val)

    def after_eval_exp(self, strategy, metric_values, **kwargs):
        values = {"Top1_Acc_Exp": None, "Loss_Exp": None, "ExperienceForgetting": None}
        for val in metric_values:
            for prefix in values:
                if val.name.startswith(prefix):
                    values[prefix] = val.value
        if self.in_train_phase:  # validation within training
            self.val_acc, self.val_loss = values["Top1_Acc_Exp"], values["Loss_Exp"]
        else:
            self.print_eval_metrics(
                strategy.experience.current_experience,
                self.training_exp_id,
                values["Top1_Acc_Exp"],
                values["Loss_Exp"],
                values["ExperienceForgetting"],
            )


class SuiteWandBLogger(WandBLogger):
    """Avalanche 0.6.0's ``WandBLogger`` adapted to current wandb (0.31), which removed what it calls:
    ``wandb.util.generate_id`` (the id now comes from :mod:`uuid`, which leaves every random generator alone),
    ``Run._label`` and ``wandb.viz`` (only scalars are logged; the suite's metrics are scalars)."""

    def before_run(self):
        if self.wandb is None:
            self.import_wandb()
        self.init_kwargs = dict(self.init_kwargs or {})
        self.init_kwargs.setdefault("id", os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12])
        try:
            self.wandb.init(**self.init_kwargs)
        except Exception as exc:  # e.g. online mode without credentials
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"wandb could not start a run ({type(exc).__name__}: {first}); log in with `wandb login`, "
                "or set WANDB_MODE=offline to log to the run folder only"
            ) from None

    def log_single_metric(self, name, value, x_plot):
        self.step = x_plot
        if isinstance(value, AlternativeValues):
            value = value.best_supported_value(float, int)
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            self.wandb.log({name: value}, step=self.step)

    def close(self) -> None:
        if self.wandb is not None and self.wandb.run is not None:
            self.wandb.finish()


def evaluator(names: list[str], folder: Path, run_name: str, config: dict[str, Any], attempt: int = 1):
    """A :class:`LoggedEvaluator` with the loggers ``names`` writing under ``folder``."""
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loggers = []
    try:
        for name in names:
            if name == "tensorboard":
                loggers.append(TensorboardLogger(folder / "tensorboard"))
            elif name == "csv":
                loggers.append(SuiteCSVLogger(str(folder / ("csv" if attempt <= 1 else f"csv-attempt{attempt}"))))
            elif name == "text":
                loggers.append(TextLogger(open(folder / "text.log", "a")))  # noqa: SIM115 (closed by close())
            elif name == "wandb":  # wandb.init(dir=...) writes to <dir>/wandb/
                loggers.append(
                    SuiteWandBLogger(
                        project_name=os.environ.get("WANDB_PROJECT", "clcompose"),
                        run_name=run_name,
                        dir=str(folder),
                        save_code=False,
                        config=config,
                    )
                )
            else:
                raise ConfigError(f"unknown logger {name!r}")
    except BaseException:
        close(loggers)
        raise
    return LoggedEvaluator(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True),
        loggers=loggers,
    )


def close(loggers: list) -> None:
    """Flush and close every logger (files, the TensorBoard writer, the W&B run); never raises."""
    for logger in loggers:
        try:
            if isinstance(logger, TextLogger):
                if logger.file not in (sys.stdout, sys.stderr):
                    logger.file.close()
            elif isinstance(logger, TensorboardLogger):
                logger.writer.close()
            elif hasattr(logger, "close"):
                logger.close()
        except Exception as exc:  # a logger must not fail a finished run
            print(f"bench: warning: could not close {type(logger).__name__}: {exc}", file=sys.stderr)

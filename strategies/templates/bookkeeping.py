"""What every template strategy records about its programs (:class:`ProgramBookkeeping`)."""

from __future__ import annotations

import torch

from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.metrics import templates as TM
from clcompose.strategies.templates.ladder import transfer_ladder
from clcompose.strategies.templates.network import TemplateMixtureNet
from clcompose.strategies.templates.options import ProgramOptions
from clcompose.strategies.templates.programs import mean_of_rows, program_summary, summary_metrics


class ProgramBookkeeping:
    """Programs at their start, per-experience diagnostics and the post-stream metrics (a strategy mixin).

    A strategy calls :meth:`_init_bookkeeping` in its constructor and defines the views :meth:`body`,
    :meth:`current_programs`, :meth:`ladder_start` and :meth:`parameter_counts`.
    """

    def _init_bookkeeping(self, options: ProgramOptions, train: TrainConfig) -> None:
        self.program_options, self.train_config = options, train
        self.initial_programs: dict[int, torch.Tensor] = {}
        self.program_rows: list[dict] = []  # per-experience program diagnostics (ITA/IEL keep their own rows apart)
        self.ladder_result: dict | None = None

    # ------------------------------------------------------------------ views the strategy defines
    def body(self) -> TemplateMixtureNet:
        """The shared body (stem, template bank, output adapter)."""
        raise NotImplementedError

    def current_programs(self) -> dict[int, torch.Tensor]:
        """Each task's program ξ_t (L × N logits) now, detached."""
        raise NotImplementedError

    def ladder_start(self) -> torch.Tensor | None:
        """The program a held-out task starts from (per ``program_init``)."""
        raise NotImplementedError

    def parameter_counts(self) -> dict[str, float]:
        """Parameters (and statistics) a task adds, and the shared ones, for the record's metrics."""
        raise NotImplementedError

    # ------------------------------------------------------------------ records
    def _log_programs(self, tasks: int) -> None:
        # consumes no random numbers (template EWC's Fisher, drawn after it, relies on this)
        programs = self.current_programs()
        if not programs:
            return
        s = program_summary(programs, self.initial_programs)
        row = {"tasks": tasks, "mixture_entropy": mean_of_rows(s["entropy_final"])}
        if len(programs) > 1:
            row["template_overlap"] = TM.mean_offdiagonal(s["program_overlap"])
        self.program_rows = [d for d in self.program_rows if d["tasks"] != tasks] + [row]

    def final_metrics(self, benchmark=None) -> dict[str, float | None]:
        """Scalars for the record's metrics (called by ``bench run`` after the stream)."""
        programs = self.current_programs()
        metrics: dict[str, float | None] = {}
        if programs:
            metrics |= summary_metrics(program_summary(programs, self.initial_programs))
        metrics |= self.parameter_counts()
        heldout = getattr(benchmark, "heldout", None)
        if self.program_options.ladder and heldout:
            if self.ladder_result is None:  # once: a second call reports the same ladder
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
                epochs = self.program_options.ladder_epochs or self.train_config.epochs
                self.ladder_result = transfer_ladder(
                    self.body(),
                    self.ladder_start(),
                    heldout,
                    self.train_config,
                    epochs,
                    self.program_options.program_lr_scale,
                    seed,
                    self.device,
                    self.program_options.recalibrate,
                )
                self.ladder_result["domain"] = heldout.get("domain")
            r = self.ladder_result
            metrics |= {"ladder_head": r["head"], "ladder_program": r["program"], "ladder_full": r["full"]}
        return metrics

    def program_extras(self, names: dict[int, str] | None = None) -> dict:
        """The programs' summary, per-experience diagnostics and ladder for the record's strategy extras."""
        programs = self.current_programs()
        extras = {
            "programs": program_summary(programs, self.initial_programs, names) if programs else None,
            "diagnostics": self.program_rows,
            "ladder": self.ladder_result,
        }
        return extras

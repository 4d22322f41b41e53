"""What a sweep did and where its cells stand, as the ``bench sweep``/``bench status`` lines show them."""

from __future__ import annotations

import dataclasses

from clcompose.bench.sweeps import store
from clcompose.bench.sweeps.sweep import Cell, Sweep


@dataclasses.dataclass
class CellReport:
    cell: Cell
    status: str  # done | already-done | by-other | failed | lost | busy
    detail: str = ""
    moved_aside: str = ""  # a damaged record was moved out of the way before the cell ran again


@dataclasses.dataclass
class SweepReport:
    """What a sweep did, per cell; ``ok`` when every cell of the sweep has its record."""

    sweep: Sweep
    executor: str
    cells: list[CellReport]
    jobs: list[str] = dataclasses.field(default_factory=list)
    waited: bool = True

    @property
    def ok(self) -> bool:
        """No cell failed or was lost (cells still running in another process are not failures of this sweep)."""
        return not self.count("failed", "lost")

    def count(self, *statuses: str) -> int:
        return sum(c.status in statuses for c in self.cells)

    def summary(self) -> str:
        n = len(self.cells)
        if not self.waited:
            return (
                f"sweep {self.sweep.name}: submitted {self.count('submitted')} of {n} cells in {len(self.jobs)} "
                f"{self.executor} job(s) {', '.join(self.jobs[:3])}{' ...' if len(self.jobs) > 3 else ''}; "
                f"follow with: bench status {self.sweep.path}"
            )
        parts = [f"{self.count('done')} run now", f"{self.count('already-done')} already done"]
        if self.count("by-other"):
            parts.append(f"{self.count('by-other')} finished by another process")
        if self.count("busy"):
            parts.append(f"{self.count('busy')} still running in another process")
        parts.append(f"{self.count('failed', 'lost')} failed")
        return f"sweep {self.sweep.name}: {n} cells: {', '.join(parts)} → {self.sweep.output}"

    def problems(self) -> list[str]:
        """One line per cell that failed, was lost or is busy, and per damaged record that was moved aside."""
        lines = []
        for c in self.cells:
            if c.moved_aside:
                ran = "the cell ran again" if c.status == "done" else f"the cell ran again and {c.status}"
                lines.append(f"repaired: {c.cell.label} [{c.cell.hash[:10]}]: {c.moved_aside}; {ran}")
            if c.status in ("failed", "lost", "busy"):
                lines.append(f"{c.status}: {c.cell.label} [{c.cell.hash[:10]}]: {c.detail}")
        return lines


def status_table(sweep: Sweep, states: dict[str, store.CellState]) -> list[str]:
    """One line per cell: state, label, run folder and what is known about it."""
    width = max(len(c.label) for c in sweep.cells)
    lines = []
    for c in sweep.cells:
        st = states[c.hash]
        lines.append(f"  {st.state:8s} {c.label:{width}s}  {c.run_id}" + (f"  ({st.detail})" if st.detail else ""))
    counts = ", ".join(f"{sum(s.state == name for s in states.values())} {name}" for name in store.STATES)
    return lines + [f"{len(sweep.cells)} cells: {counts}"]

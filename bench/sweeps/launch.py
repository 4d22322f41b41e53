"""Fan a sweep out through submitit: local worker processes, in-process debug, or SLURM job arrays.

* ``local``: ``profile.workers`` processes (submitit's LocalExecutor); each takes the next cell that is neither
  done nor held by another process, so the work balances itself.
* ``slurm``: one job array (``map_array``), ``profile.runs_per_job`` cells per array task, at most
  ``profile.array_parallelism`` tasks at once, resources from the profile. Jobs are :class:`SweepWorker`
  (``submitit.helpers.Checkpointable``): on a time-out or preemption (USR2) they are requeued with the same
  cells, and the interrupted run resumes from its last experience checkpoint.
* ``debug``: the same jobs, run one after the other in this process (submitit's DebugExecutor).

Finished cells are never submitted again, and a cell is only ever run by the process that holds its lock
(:mod:`~clcompose.bench.sweeps.store`), so two sweeps over the same cells neither lose nor duplicate records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from clcompose.bench.io import ensure_writable_folder, read_json, resource_dir, utc_now, write_json_atomic
from clcompose.bench.runs import checkpoint
from clcompose.bench.runs.folder import is_complete_record
from clcompose.bench.sweeps import store
from clcompose.bench.sweeps.processes import captured_stderr, child_output_to, inherited_environment
from clcompose.bench.sweeps.reports import CellReport, SweepReport, status_table
from clcompose.bench.sweeps.sweep import Cell, Sweep
from clcompose.bench.sweeps.worker import run_cell
from clcompose.strategies.core.registry import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    """What a job receives for one cell (small and picklable)."""

    config: dict[str, Any]
    hash: str
    run_dir: str
    label: str

    @classmethod
    def of(cls, cell: Cell) -> Task:
        return cls(cell.config, cell.hash, str(cell.run_dir), cell.label)


class SweepWorker(submitit.helpers.Checkpointable):
    """The callable every job runs: its cells one after the other, each resumable from its checkpoint."""

    def __init__(self, environment: dict[str, str] | None = None, progress: bool = False):
        self.environment = dict(environment or {})
        self.progress = progress

    def __call__(self, tasks: list[Task]) -> list[dict[str, Any]]:
        """Run every task; a run that raises is recorded in its folder (failed.json) and the job goes on.

        Returns one outcome per task (see :func:`~clcompose.bench.sweeps.worker.run_cell`), which the sweep reports.
        """
        os.environ.update(self.environment)  # before torch starts its thread pools
        return [self._run(t) | {"hash": t.hash, "label": t.label} for t in tasks]

    def _run(self, task: Task) -> dict[str, Any]:
        """One cell; whatever escapes run_cell's own handling fails that cell only, never the job's others."""
        try:
            return run_cell(task.config, task.hash, Path(task.run_dir), progress=self.progress)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if type(exc).__name__ == "UncompletedJobError":
                raise
            return {"status": "failed", "run_dir": task.run_dir, "error": f"{type(exc).__name__}: {exc}"}

    def checkpoint(self, tasks: list[Task]) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (time-out or preemption) before the job is requeued.

        Every run has already checkpointed at its last experience boundary, so the requeued job gets the same
        cells: finished ones are skipped and the interrupted one resumes where its checkpoint stands.
        """
        return submitit.helpers.DelayedSubmission(self, tasks)


# --------------------------------------------------------------------------- executors


def make_executor(kind: str, folder: Path, sweep: Sweep) -> submitit.AutoExecutor:
    """An executor of exactly ``kind`` (never auto-detected: AutoExecutor would pick slurm wherever srun exists)."""
    if kind == "slurm":
        import shutil

        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise ConfigError("--executor slurm needs SLURM's sbatch and srun on PATH (run it on a cluster login node)")
    timeouts = {f"{kind}_max_num_timeout": sweep.profile.max_num_timeout} if kind in ("local", "slurm") else {}
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=kind, **timeouts)
    executor.update_parameters(**sweep.profile.submitit_parameters(kind, f"bench-{sweep.name}"))
    return executor


def packs(tasks: list[Task], per_job: int) -> list[list[Task]]:
    return [tasks[i : i + per_job] for i in range(0, len(tasks), per_job)]


def sbatch_preview(sweep: Sweep, n_tasks: int) -> str:
    """The ``#SBATCH`` header submitit would write for this sweep's job array (without submitting anything)."""
    from submitit.slurm.slurm import _convert_mem, _make_sbatch_string

    params = dict(sweep.profile.submitit_parameters("slurm", f"bench-{sweep.name}"))
    generic = {"timeout_min": "time", "mem_gb": "mem", "tasks_per_node": "ntasks_per_node", "name": "job_name"}
    slurm = {generic.get(k, k): v for k, v in params.items() if not k.startswith("slurm_")}
    slurm |= {k.removeprefix("slurm_"): v for k, v in params.items() if k.startswith("slurm_")}
    slurm["mem"] = _convert_mem(slurm["mem"])
    text = _make_sbatch_string(
        command="<python -m submitit.core._submit FOLDER>",
        folder=sweep.output / ".submitit" / "FOLDER" / "%j",
        map_count=n_tasks if n_tasks > 1 else None,
        **slurm,
    )
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith("#SBATCH") or line.startswith("export") or line in sweep.profile.setup
    )


def describe(sweep: Sweep, kind: str, states: dict[str, store.CellState]) -> str:
    """The dry-run text: every cell with its state, and how the missing ones would be submitted."""
    todo = [c for c in sweep.cells if states[c.hash].state not in ("done", "running")]
    lines = [
        f"sweep {sweep.name} ({sweep.path}), profile {sweep.profile_path.stem} ({sweep.profile_path})",
        f"run folders in {sweep.output}",
        *status_table(sweep, states),
        "",
    ]
    p = sweep.profile
    thread_note = f"{p.threads} torch thread(s) per run" if p.threads else "torch's default threads"
    if kind == "local":
        lines.append(
            f"executor local: would run {len(todo)} cell(s) in {min(p.workers, len(todo))} worker process(es) on {p.device}, "
            f"{thread_note}, time limit {p.timeout_min} min per worker"
        )
    elif kind == "debug":
        lines.append(
            f"executor debug: would run {len(todo)} cell(s) one after the other in this process, on {p.device}"
        )
    else:
        n_tasks = len(packs(todo, p.runs_per_job))
        lines.append(
            f"executor slurm: would submit {len(todo)} cell(s) as a job array of {n_tasks} task(s), {p.runs_per_job} cell(s) "
            f"per task, at most {min(p.array_parallelism, max(n_tasks, 1))} at once, on {p.device}, {thread_note}; sbatch parameters:"
        )
        lines.append(sbatch_preview(sweep, max(n_tasks, 1)))
    return "\n".join(lines)


def profile_warnings(sweep: Sweep, kind: str) -> list[str]:
    """What a SLURM submission would likely trip on, said by the dry-run before anything is submitted."""
    p = sweep.profile
    if kind != "slurm" or p.account is not None:
        return []
    template = sweep.profile_path.resolve().parent == resource_dir("profiles").resolve() and (
        sweep.profile_path.stem == "cluster-gpu"
    )
    if not (template or p.gpus_per_node):
        return []
    what = "the template profile cluster-gpu" if template else f"profile {sweep.profile_path.stem}"
    return [
        f"{what} sets no account (account: null); most GPU clusters refuse jobs without one: copy "
        f"{sweep.profile_path} and set account (and partition), then pass it with --profile"
    ]


def _submission_error(exc: Exception, sweep: Sweep) -> ConfigError:
    """sbatch's refusal (e.g. GPUs on a node without any) as one line."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if "error:" in line]
    reason = (
        lines[-1].split("error:", 1)[1].strip() if lines else (text.strip().splitlines() or [type(exc).__name__])[0]
    )
    p = sweep.profile
    asked = ", ".join(
        f"{k}={getattr(p, k)}"
        for k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
        if getattr(p, k) not in (None, 0)
    )
    return ConfigError(
        f"sbatch refused the jobs of sweep {sweep.name} (profile {sweep.profile_path.stem}: {asked}): {reason}"
    )


def submit(sweep: Sweep, kind: str, cells: list[Cell], progress: bool = False) -> tuple[list[Any], list[list[Task]]]:
    """Submit ``cells``; returns the jobs and, per job, the tasks it runs (local workers share all of them)."""
    folder = sweep.output / ".submitit" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    executor = make_executor(kind, folder, sweep)
    tasks = [Task.of(c) for c in cells]
    env = sweep.profile.thread_environment()
    worker = SweepWorker(env, progress=progress and kind == "debug")
    with inherited_environment(env):
        if kind == "local":
            with child_output_to(folder / "workers.log"):  # e.g. their tracebacks when Ctrl-C stops them
                jobs = [executor.submit(worker, tasks) for _ in range(min(sweep.profile.workers, len(tasks)))]
            for job in jobs:  # a local disk needs no 15 s grace for a killed worker's missing result file
                job._results_timeout_s = 2
            return jobs, [tasks] * len(jobs)
        groups = packs(tasks, sweep.profile.runs_per_job)
        with captured_stderr() as captured:  # sbatch writes its refusal to our stderr; it belongs in one line
            try:
                jobs = executor.map_array(worker, groups)
            except Exception as exc:  # submitit's FailedJobError when sbatch exits non-zero
                error = exc
            else:
                error = None
        if error is not None:
            raise _submission_error(Exception(f"{error}\n{captured()}"), sweep) from None
        sys.stderr.write(captured())  # warnings of an accepted submission
    if kind == "slurm":
        for job, group in zip(jobs, groups):
            for task in group:
                write_json_atomic(
                    Path(task.run_dir) / store.JOB,
                    {
                        "executor": kind,
                        "job_id": str(job.job_id),
                        "submitted": utc_now(),
                        "stdout": str(job.paths.stdout),
                        "stderr": str(job.paths.stderr),
                    },
                    overwrite=True,
                )
    return jobs, groups


ENDED_BADLY = ("CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def _job_outcome(job: Any) -> tuple[list[dict] | None, str | None]:
    """(outcomes, None) for a job that ran its cells, (None, one line) for one that ended badly (killed,
    timed out too often, or a crash outside the runs).

    ``job.exception()`` is called exactly once: for the debug executor it is what runs the job.
    """
    with contextlib.suppress(Exception):  # a job that SLURM ended badly wrote no result: skip submitit's 15 s grace
        if not job.paths.result_pickle.exists() and str(job.state).split()[0] in ENDED_BADLY:
            job._results_timeout_s = 2
    try:
        exc = job.exception()
    except Exception as e:  # the scheduler lost track of it
        exc = e
    if exc is None:
        return job.result(), None
    text = str(exc)
    state = text.split("(state:", 1)[1].split(")", 1)[0].strip() if "(state:" in text else None
    log = getattr(getattr(job, "paths", None), "stderr", None)
    if state:
        return None, f"job {job.job_id} ended without finishing its runs (state: {state}); log: {log}"
    last = [line for line in text.splitlines() if line.strip() and not line.startswith(("-", " "))]
    return None, f"job {job.job_id} failed: {last[-1] if last else type(exc).__name__}; log: {log}"


def _watch(
    sweep: Sweep, jobs: list[Any], cells: list[Cell], progress: bool, poll_s: float = 1.0, force_every_s: float = 10.0
) -> None:
    """Wait for the jobs, with a progress bar over cells and a line per finished run.

    Records are polled every ``poll_s``; the scheduler is asked about the jobs (one sacct call for all) at
    least every ``force_every_s``, so that a job killed without a result is noticed promptly.
    """
    from tqdm.auto import tqdm

    last_forced = time.monotonic()
    pending = {c.hash: c for c in cells}
    bar = tqdm(total=len(cells), desc=f"sweep {sweep.name}", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            for h, c in list(pending.items()):
                if is_complete_record(c.record_path):
                    del pending[h]
                    bar.update()
                    if progress:
                        rec = read_json(c.record_path) or {}
                        acc = (rec.get("metrics") or {}).get("final_average_accuracy")
                        wall = (rec.get("timing") or {}).get("total_wall_s")
                        bar.write(
                            f"  done {c.label}: final accuracy {acc:.4f} in {wall:.0f} s"
                            if acc is not None and wall is not None
                            else f"  done {c.label}"
                        )
            force = time.monotonic() - last_forced > force_every_s  # a killed job has no record to wait for
            if not pending or all(job.done(force_check=force) for job in jobs):
                break
            if force:
                last_forced = time.monotonic()
            running = []
            for c in pending.values():
                info = read_json(c.run_dir / store.RUNNING)
                if info and info.get("step"):
                    running.append(f"{c.label} {info['step'][0]}/{info['step'][1]}")
                elif info:
                    running.append(f"{c.label} starting")
            bar.set_postfix_str("; ".join(running), refresh=True)
            time.sleep(poll_s)
    finally:
        bar.close()


def launch(
    sweep: Sweep, kind: str | None = None, dry_run: bool = False, wait: bool = True, progress: bool = True, out=None
) -> SweepReport | None:
    """Submit the cells of ``sweep`` that have no record and (unless ``wait=False``) wait and report.

    With ``dry_run`` only prints the cells and the submission parameters, and returns None.
    """
    kind = kind or sweep.profile.executor
    queued = store.squeue_states() if kind == "slurm" or dry_run else {}
    states = {c.hash: store.cell_state(c.run_dir, queued) for c in sweep.cells}
    if dry_run:  # a real submission says it in sbatch's own words, as one error line
        for line in profile_warnings(sweep, kind):
            print(f"bench: warning: {line}", file=sys.stderr)
        print(describe(sweep, kind, states), file=out or sys.stdout)
        return None
    ensure_writable_folder(sweep.output, "runs folder")  # one line now, not a traceback in every worker
    todo, reports, busy = [], {}, {}
    for c in sweep.cells:
        st = states[c.hash]
        if st.state == "done":
            reports[c.hash] = CellReport(c, "already-done")
        elif st.state == "running":  # another process (or a queued job) has it: not submitted again
            reports[c.hash] = CellReport(c, "busy", f"already {st.detail}")
            busy[c.hash] = read_json(c.run_dir / store.RUNNING) or {}
        else:
            todo.append(c)
    jobs: list[Any] = []
    groups: list[list[Task]] = []
    if todo:
        jobs, groups = submit(sweep, kind, todo, progress=progress)
    if not wait:
        for c in todo:
            reports[c.hash] = CellReport(c, "submitted")
        return SweepReport(
            sweep, kind, [reports[c.hash] for c in sweep.cells], [str(j.job_id) for j in jobs], waited=False
        )

    if kind != "debug":  # debug jobs run in _job_outcome, here and now
        try:
            _watch(sweep, jobs, todo, progress)
        except KeyboardInterrupt:
            if (
                kind == "local"
            ):  # our worker processes stop with us (Ctrl-C reaches them too; this is for a lone SIGINT)
                deadline = time.monotonic() + 5
                while not all(job.done() for job in jobs) and time.monotonic() < deadline:
                    time.sleep(0.2)
                for job in jobs:
                    if not job.done():
                        job.cancel(check=False)
            print(
                f"bench: finished runs are kept; the others resume from their last experience when this sweep runs again"
                f"{'' if kind == 'local' else ' (its jobs keep running: bench status ' + str(sweep.path) + ')'}",
                file=sys.stderr,
            )
            raise
    ours = {str(j.job_id) for j in jobs}
    job_error, ran_here, outcome_of = {}, set(), {}
    for job, group in zip(jobs, groups):
        outcomes, error = _job_outcome(job)
        for o in outcomes or []:
            if o["status"] == "done":
                ran_here.add(o["hash"])
            elif o["status"] == "busy" and (o.get("holder") or {}).get("job_id") not in ours:
                busy[o["hash"]] = o["holder"]
            if o["status"] in ("done", "failed"):
                outcome_of[o["hash"]] = o
        if error is not None:
            for task in group:
                job_error.setdefault(task.hash, error)
    queued_now = None  # asked once, after the jobs ended
    for c in sweep.cells:
        if reports.get(c.hash) is None or reports[c.hash].status == "busy":
            queued_now = store.squeue_states() if queued_now is None else queued_now
            reports[c.hash] = _final_report(
                c, ours, ran_here, job_error, busy, outcome_of.get(c.hash) or {}, queued_now
            )
    return SweepReport(sweep, kind, [reports[c.hash] for c in sweep.cells], sorted(ours))


def _final_report(
    c: Cell,
    ours: set[str],
    ran_here: set[str],
    job_error: dict[str, str],
    busy: dict[str, dict],
    outcome: dict[str, Any],
    queued: dict[str, str],
) -> CellReport:
    moved = (
        f"{store.RECORD} was {outcome['problem']}; moved aside to {outcome['moved_aside']}"
        if outcome.get("moved_aside")
        else ""
    )
    # The cell's state is read before its record (see store.cell_state): another process may finish it meanwhile.
    st = store.cell_state(c.run_dir, queued)
    if is_complete_record(c.record_path):
        if c.hash in ran_here:
            return CellReport(c, "done", moved_aside=moved)
        writer = ((read_json(c.record_path) or {}).get("environment") or {}).get("job_id")
        if writer is not None and writer in ours:  # written by one of our jobs that died afterwards
            return CellReport(c, "done")
        return CellReport(c, "by-other", f"record written by {'job ' + writer if writer else 'another process'}")
    failed = read_json(c.run_dir / store.FAILED)
    if failed is not None:
        return CellReport(
            c, "failed", f"{failed.get('error')} (traceback: {c.run_dir / store.FAILED})", moved_aside=moved
        )
    if outcome.get("status") == "failed":  # no failed.json: the folder could not be written
        return CellReport(c, "failed", str(outcome.get("error")), moved_aside=moved)
    progress = checkpoint.peek(c.run_dir / checkpoint.CHECKPOINT_NAME) or {}
    resume = (
        f"; {progress['next_step']}/{progress['n_steps']} experiences are checkpointed, re-run the sweep to resume"
        if "n_steps" in progress
        else "; re-run the sweep to run it"
    )
    if c.hash in job_error:
        return CellReport(c, "lost", job_error[c.hash] + resume)
    if st.state == "running":
        return CellReport(c, "busy", f"still running in another process ({st.detail})")
    if c.hash in busy:
        holder = busy[c.hash]
        return CellReport(
            c,
            "lost",
            f"was held by pid {holder.get('pid')} on {holder.get('host')}, which ended without a record" + resume,
        )
    return CellReport(c, "lost", "no job ran it" + resume)

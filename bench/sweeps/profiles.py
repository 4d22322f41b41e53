"""Cluster profiles: where a sweep's runs execute and what each job asks the scheduler for.

A profile is a small YAML file under ``slurm/profiles/`` (``local``, ``ci``, ``cluster-gpu``, ...) or any path.
Its keys are the fields of :class:`ClusterProfile`; they are validated like every other option of the suite.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from clcompose.bench.io import read_yaml_mapping, resource_dir
from clcompose.strategies.core.registry import ConfigError, Options

EXECUTORS = ("local", "debug", "slurm")


@dataclasses.dataclass
class ClusterProfile(Options):
    """How a sweep runs: the device and threads of every run, and the resources of every job."""

    description: str = ""
    executor: Literal["local", "debug", "slurm"] = "local"  # used when `bench sweep` gets no --executor
    device: str = "cpu"  # cpu, cuda or cuda:N; part of every run's config (and so of its hash)
    threads: int | None = 1  # torch threads per run (also OMP/MKL_NUM_THREADS); null keeps torch's default
    workers: int = 2  # local: worker processes that run cells in parallel
    runs_per_job: int = 1  # slurm/debug: cells run one after the other in one job (array task)
    array_parallelism: int = 64  # slurm: array tasks running at once
    timeout_min: int = 60  # per job; a timed-out slurm job is requeued and resumes (max_num_timeout times)
    max_num_timeout: int = 3
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    gpus_per_node: int = 0
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines run before the job
    additional: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra sbatch flags, e.g. {mail-type: END}

    def check(self) -> None:
        self.require(self.device == "cpu" or self.device.startswith("cuda"), "device", "must be cpu, cuda or cuda:N")
        self.require(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        for name in ("workers", "runs_per_job", "array_parallelism", "timeout_min", "cpus_per_task"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(self.max_num_timeout >= 0, "max_num_timeout", "must be >= 0")
        self.require(self.mem_gb > 0, "mem_gb", "must be > 0")
        self.require(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
        self.require(self.signal_delay_s >= 0, "signal_delay_s", "must be >= 0")
        self.require(all(isinstance(s, str) for s in self.setup), "setup", "must be a list of shell lines")

    def thread_environment(self) -> dict[str, str]:
        """OMP/MKL thread limits for jobs that run on the CPU (one BLAS thread per torch thread)."""
        if self.threads is None or self.device != "cpu":
            return {}
        return {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}

    def submitit_parameters(self, executor: str, job_name: str) -> dict[str, Any]:
        """Parameters for ``submitit.AutoExecutor(cluster=executor).update_parameters``."""
        params: dict[str, Any] = {"timeout_min": self.timeout_min, "name": job_name}
        if executor == "slurm":
            env = [f"export {k}={v}" for k, v in self.thread_environment().items()]
            params |= {
                "nodes": 1,
                "tasks_per_node": 1,
                "cpus_per_task": self.cpus_per_task,
                "mem_gb": self.mem_gb,
                "slurm_array_parallelism": self.array_parallelism,
                "slurm_signal_delay_s": self.signal_delay_s,
                "slurm_setup": env + list(self.setup),
            }
            if self.gpus_per_node:
                params["gpus_per_node"] = self.gpus_per_node
            for key in ("partition", "account", "qos", "constraint"):
                if getattr(self, key) is not None:
                    params[f"slurm_{key}"] = getattr(self, key)
            if self.additional:
                params["slurm_additional_parameters"] = dict(self.additional)
        elif executor == "local":
            params |= {"gpus_per_node": self.gpus_per_node, "local_setup": list(self.setup)}
        return params


def available_profiles() -> list[str]:
    return sorted(p.stem for p in resource_dir("profiles").glob("*.yaml"))


def profile_path(name: str, relative_to: Path | None = None) -> Path:
    """``local`` → ``slurm/profiles/local.yaml``; a value with a ``/`` or a ``.yaml`` suffix is a path."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_absolute() and not path.exists() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"cluster profile file {name} does not exist")
        return path
    path = resource_dir("profiles") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown cluster profile {name!r}; valid: {', '.join(available_profiles())} (or a path to a .yaml file)"
        )
    return path


def load_profile(name: str, relative_to: Path | None = None) -> tuple[ClusterProfile, Path]:
    """Read and validate a profile; every problem is a one-line :class:`ConfigError` naming the file."""
    path = profile_path(name, relative_to)
    data = read_yaml_mapping(path, "cluster profile")
    try:
        return ClusterProfile.from_dict(data, f"cluster profile {path}"), path
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

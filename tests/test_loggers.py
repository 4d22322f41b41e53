"""``train.loggers``: Avalanche's TensorBoard, CSV, text and W&B (offline) loggers write under the run folder,
log no loss for experiences not trained yet, survive a resume, and change neither the metrics nor the run's
identity (its config hash)."""

import csv

import pytest

from clcompose.bench.runs.config import RunConfig
from clcompose.bench.runs.run import run
from tests.test_resume import CONFIG, Killed, kill_after

CFG = CONFIG | {"strategy": "naive"}  # 5 experiences of 2 digits each


def with_loggers(cfg: dict, names: list[str]) -> dict:
    return cfg | {"train": cfg["train"] | {"loggers": names}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    _, rec = run(CFG, runs_dir=tmp_path_factory.mktemp("reference"), progress=False)
    return rec


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_loggers_are_not_part_of_the_run_identity():
    plain = RunConfig.from_dict(CFG).resolve()
    logged = RunConfig.from_dict(with_loggers(CFG, ["tensorboard", "csv", "wandb", "text"])).resolve()
    assert logged.loggers == ["tensorboard", "csv", "wandb", "text"] and plain.loggers == []
    assert logged.to_dict() == plain.to_dict() and logged.run_id() == plain.run_id()
    assert RunConfig.from_dict(with_loggers(CFG, "csv,text")).resolve().loggers == ["csv", "text"]  # from --set
    from clcompose.strategies.core.registry import ConfigError

    for bad, pattern in ((["tb"], "must be one of tensorboard, csv, wandb, text"), (["csv", "csv"], "twice")):
        with pytest.raises(ConfigError, match=pattern):
            RunConfig.from_dict(with_loggers(CFG, bad)).resolve()


def test_tensorboard_csv_and_text_logs_and_identical_metrics(reference, tmp_path):
    path, rec = run(with_loggers(CFG, ["tensorboard", "csv", "text"]), runs_dir=tmp_path, progress=False)
    assert rec["run_id"] == reference["run_id"] and rec["config"] == reference["config"]
    assert rec["accuracy_matrix"] == reference["accuracy_matrix"] and rec["metrics"] == reference["metrics"]
    assert rec["loggers"] == {"loggers": ["tensorboard", "csv", "text"], "folder": "logs"}
    logs = path.parent / "logs"

    tags = scalars(logs / "tensorboard")
    for k in range(5):
        accuracy = tags[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{k:03d}"]
        loss = tags[f"Loss_Exp/eval_phase/test_stream/Exp{k:03d}"]
        assert len(accuracy) == 5 and len(loss) == 5 - k  # no loss before experience k is trained
        assert [a for _, a in accuracy] == pytest.approx([row[k] for row in rec["accuracy_matrix"]])
        assert all(v < 100 for _, v in loss)  # never the ~1e4 of classes without a head
    assert len(tags["Loss_Epoch/train_phase/train_stream"]) == 5 * CFG["train"]["epochs"]

    with open(logs / "csv" / "eval_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25
    for row in rows:
        seen = int(row["eval_exp"]) <= int(row["training_exp"])
        assert (row["eval_loss"] != "") == seen and float(row["eval_accuracy"]) >= 0  # unseen: empty, not 0
    text = (logs / "text.log").read_text()
    assert "Loss_Exp/eval_phase/test_stream/Exp004" in text and "9999" not in text and "10000" not in text


def test_loggers_survive_a_resume(reference, tmp_path, monkeypatch):
    cfg = with_loggers(CFG, ["tensorboard", "csv", "text"])
    out = tmp_path / "cell" / "record.json"
    with monkeypatch.context() as m:
        kill_after(m, 2)  # checkpoints hold no logger: pickling them would fail on open files and writers
        with pytest.raises(Killed):
            run(cfg, out=out, progress=False)
    _, rec = run(cfg, out=out, progress=False)
    assert rec["accuracy_matrix"] == reference["accuracy_matrix"] and rec["metrics"] == reference["metrics"]
    logs = out.parent / "logs"
    assert (logs / "csv" / "eval_results.csv").is_file() and (logs / "csv-attempt2" / "eval_results.csv").is_file()
    resumed_rows = list(csv.DictReader(open(logs / "csv-attempt2" / "eval_results.csv")))
    assert {r["training_exp"] for r in resumed_rows} == {"2", "3", "4"}
    text = (logs / "text.log").read_text()
    assert text.count("-- >> Start of training phase << --") >= 5  # appended across the two attempts
    loss = scalars(logs / "tensorboard")["Loss_Exp/eval_phase/test_stream/Exp000"]
    assert len({step for step, _ in loss}) == 5


def test_loggers_in_a_sweep_do_not_change_the_cells(tmp_path):
    from clcompose.bench.sweeps.sweep import load_sweep
    from tests.test_hardening import TINY, write

    plain = load_sweep(write(tmp_path, TINY), runs_dir=tmp_path).cells
    logged = load_sweep(
        write(tmp_path, TINY.replace("lr: 0.01", "lr: 0.01, loggers: [csv]"), "l.yaml"), runs_dir=tmp_path
    )
    assert [c.run_id for c in logged.cells] == [c.run_id for c in plain]
    assert all(c.config["train"]["loggers"] == ["csv"] for c in logged.cells)


@pytest.mark.slow
def test_wandb_logs_offline(reference, tmp_path, monkeypatch):
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)
    path, rec = run(with_loggers(CFG, ["wandb", "csv"]), runs_dir=tmp_path / "runs", progress=False)
    assert rec["accuracy_matrix"] == reference["accuracy_matrix"] and rec["metrics"] == reference["metrics"]
    (offline,) = (path.parent / "logs" / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    assert log.stat().st_size > 0
    import wandb

    assert wandb.run is None  # finished with the run
    data = log.read_bytes()  # wandb's record log (protobuf): the metric names are stored verbatim
    assert data.count(b"Top1_Acc_Exp/eval_phase/test_stream/Exp004") > 0
    first, last = (data.count(f"Loss_Exp/eval_phase/test_stream/Exp00{k}".encode()) for k in (0, 4))
    assert first > last > 0  # the last experience's loss only once it is trained
    assert b"split-digits" in data and b"config_hash" not in data  # the resolved config is the run's W&B config


def test_a_strategy_without_avalanches_evaluator_warns_that_loggers_log_nothing(tmp_path, capfd):
    from clcompose.bench.runs.session import _Session
    from tests.test_teacher_runs import META, _config

    cfg = _config("teacher-connected", "meta-hnet", strategy_options=META)
    resolved = RunConfig.from_dict(with_loggers(cfg, ["csv"])).resolve()
    session = _Session.build(resolved, progress=False, log_dir=tmp_path / "logs")
    session.close()
    err = capfd.readouterr().err
    assert "bench: warning: strategy meta-hnet does not report to Avalanche's evaluator" in err, err

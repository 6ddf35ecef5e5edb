"""Faults: SIGKILL mid-epoch then --resume, crashes during atomic writes, retried pipeline tasks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coreg.atomic import atomic_path, staged_directory, write_json
from coreg.cli import main

EPOCHS = 5
TRAIN = [
    "data.limit=300", "annotate.num_annotators=3", f"train.epochs={EPOCHS}", "train.warmup_epochs=2",
    "train.rampup_epochs=1", "train.reg_start_offset=0", "train.batch_size=32", "train.warmup_batch_size=32",
    "train.queue_size=128", "train.device=cpu", "train.num_workers=0",
]


def _sets(out: Path) -> list[str]:
    args = ["--quiet", "--set", f"output_dir={out}"]
    for item in TRAIN:
        args += ["--set", item]
    return args


def _env(**extra: str) -> dict[str, str]:
    # One thread each: the two training processes must not depend on scheduling, and the machine is shared.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _train(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "coreg.cli", "train", *_sets(out), *extra]
    return subprocess.Popen(cmd, env=_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _next_epoch(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["next_epoch"])
    except Exception:
        return -1


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    def walk(obj: object, prefix: str) -> list[tuple[str, object]]:
        if isinstance(obj, dict):
            return [kv for k, v in obj.items() for kv in walk(v, f"{prefix}{k}.")]
        if isinstance(obj, list | tuple):
            return [kv for i, v in enumerate(obj) for kv in walk(v, f"{prefix}{i}.")]
        return [(prefix, obj)]

    payload = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in walk(payload, "") if isinstance(v, torch.Tensor)}


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert different == []


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults")
    assert main(["annotate", *_sets(out)]) == 0
    assert main(["aggregate", *_sets(out)]) == 0
    return out


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(aggregated: Path, tmp_path: Path) -> None:
    """Kill training inside epoch 3 (the first Co-Reg epoch), resume, compare with an uninterrupted run.

    The trainer's test hook (``COREG_TEST_PAUSE_AT_STEP``) parks the process after step 1 of that
    epoch and writes a marker; the kill waits for the marker, so it lands mid-epoch however fast
    the machine is. The hook only sleeps: it changes nothing the run computes.
    """
    reference = _train(aggregated, "--out", str(tmp_path / "reference"))
    killed_dir = tmp_path / "killed"
    marker = tmp_path / "paused"
    proc = _train(aggregated, "--out", str(killed_dir), env={"COREG_TEST_PAUSE_AT_STEP": f"3:1:{marker}"})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"training never reached epoch 3 step 1: {proc.poll()=}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read() if proc.stdout else ""
    assert marker.read_text() == "3:1\n"
    ckpt = killed_dir / "checkpoints" / "last.pt"
    assert _next_epoch(ckpt) == 2, "killed inside epoch 3: the last complete checkpoint is the one of epoch 2"
    assert (killed_dir / "history.json").read_text().count('"epoch"') == 2

    resumed = _train(aggregated, "--out", str(killed_dir), "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out

    _assert_same(tmp_path / "reference" / "model.pt", killed_dir / "model.pt")
    _assert_same(tmp_path / "reference" / "checkpoints" / "last.pt", ckpt)
    assert (tmp_path / "reference" / "history.json").read_text().count('"epoch"') == \
        (killed_dir / "history.json").read_text().count('"epoch"') == EPOCHS
    assert [p.name for p in killed_dir.rglob(".*.tmp")] == []  # the kill came between writes: nothing torn


# ----------------------------------------------------------------------------- atomic writes


def test_crash_during_an_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "ok": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_crash_while_building_a_stage_folder_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "annotate"
    with staged_directory(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_directory(target) as d:
        (d / "a.txt").write_text("new, half")
        raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotate"]


# ----------------------------------------------------------------------------- retried pipeline tasks


def _tiny_train_dir(folder: Path) -> Path:
    """A train stage folder with a small, real coreg model.pt and its classes (what the register step reads)."""
    from coreg.contracts import write_classes
    from coreg.train.network import CoRegEnsemble
    from coreg.train.trainer import save_model

    folder.mkdir(parents=True)
    arch = {"backbone": "small_cnn", "in_channels": 1, "image_size": 8, "num_classes": 2, "proj_hidden": 8,
            "proj_dim": 4}
    save_model(folder / "model.pt", CoRegEnsemble(arch), 1, None)
    write_classes(folder, ["a", "b"])
    return folder


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_retried_stage_logging_adds_no_metric_points(tmp_path: Path, store: str,
                                                     request: pytest.FixtureRequest) -> None:
    """A train task killed half-way through logging, then retried twice: each epoch is one point per metric."""
    import json

    from coreg import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db" if store == "sqlite" else request.getfixturevalue("mlflow_server").uri
    cfg = tracking.TrackingConfig(uri=uri, experiment=f"metric-retry-{store}")
    run_id = tracking.start_or_resume_run(cfg, "kfp-metric-retry", {"train": {"epochs": 3}})
    stage = tmp_path / "train"
    stage.mkdir()
    history = [{"epoch": e, "loss": 1.0 / e, "val_hit_rate": 0.5 + e / 10} for e in (1, 2, 3)]
    (stage / "history.json").write_text(json.dumps(history))
    client = tracking.client_for(cfg)
    # the killed attempt got as far as the first epoch's points
    tracking._log_new_metrics(client, run_id, tracking.history_metrics(history)[:1])
    first = tracking.log_stage(cfg, run_id, "train", stage)
    again = tracking.log_stage(cfg, run_id, "train", stage)
    assert first == again and first["train.selected_epoch"] == 3.0
    loss = client.get_metric_history(run_id, "train.loss")
    assert sorted((m.step, m.value) for m in loss) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert len(client.get_metric_history(run_id, "train.val_hit_rate")) == 3
    assert [m.value for m in client.get_metric_history(run_id, "train.epochs_run")] == [3.0]
    assert client.get_run(run_id).data.tags["coreg.stages_done"] == "train"


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_retried_tracking_task_reuses_its_mlflow_run_and_model_version(tmp_path: Path, store: str,
                                                                       request: pytest.FixtureRequest) -> None:
    """The same KFP run id twice (a retried task): one MLflow run, one logged model, one registered version.

    Against the embedded store and the real tracking server (REST, artifacts proxied to S3).
    """
    from coreg import registry, tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db" if store == "sqlite" else request.getfixturevalue("mlflow_server").uri
    cfg = tracking.TrackingConfig(uri=uri, experiment=f"faults-{store}", model_name=f"faults-{store}")
    first = tracking.start_or_resume_run(cfg, "kfp-retry", {"train": {"epochs": 1}})
    again = tracking.start_or_resume_run(cfg, "kfp-retry", {"train": {"epochs": 1}})
    assert first == again
    client = tracking.client_for(cfg)
    exp = client.get_experiment_by_name(cfg.experiment)
    assert len(client.search_runs([exp.experiment_id], "tags.kfp_run_id = 'kfp-retry'")) == 1

    def logged_models() -> list:
        return list(client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{first}'"))

    train = _tiny_train_dir(tmp_path / "train")
    # An attempt killed while uploading the model leaves a PENDING logged model of these weights behind.
    digest = hashlib.sha256((train / "model.pt").read_bytes()).hexdigest()
    pending = client.create_logged_model(exp.experiment_id, name="model", source_run_id=first,
                                         tags={tracking.WEIGHTS_TAG: digest})
    uri1 = tracking.log_model(cfg, first, train)  # completes the pending model instead of starting another
    assert uri1 == f"models:/{pending.model_id}"
    v1 = registry.register_version(cfg, uri1, first, {"metric.accuracy": 0.5})
    # the retry of the register task: the same weights into the same run, registered again
    uri2 = tracking.log_model(cfg, first, train)
    v2 = registry.register_version(cfg, uri2, first, {"metric.accuracy": 0.5})
    assert uri1 == uri2 and v1 == v2
    models = logged_models()
    assert [(m.model_id, str(m.status)) for m in models] == [(pending.model_id, "READY")]
    assert len(client.search_model_versions(f"name = '{cfg.model_name}'")) == 1
    assert str(client.get_model_version_by_alias(cfg.model_name, registry.CHALLENGER).version) == v1
    assert tracking.load_registered_model(cfg, uri2).arch["num_classes"] == 2

    # other weights in the same run (a task rerun after retraining) are a new logged model
    _tiny_train_dir(tmp_path / "retrained")
    uri3 = tracking.log_model(cfg, first, tmp_path / "retrained")
    assert uri3 != uri1 and len(logged_models()) == 2

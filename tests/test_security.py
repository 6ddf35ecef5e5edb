"""Security: secrets never reach outputs, logs or MLflow; torch.load is weights-only; data paths stay in root."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from servers import free_port

from coreg import tracking
from coreg.cli import main
from coreg.config import DataConfig, load_config
from coreg.data import load_dataset
from coreg.errors import CoregError

REPO = Path(__file__).resolve().parent.parent
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "env-aws-secret-Zq81xK",
    "MLFLOW_TRACKING_PASSWORD": "env-mlflow-password-Pw77",
    "MLFLOW_TRACKING_TOKEN": "env-mlflow-token-Tk42",
}
CONFIG_SECRET = "config-s3-secret-Yy93"
URI_PASSWORD = "uri-password-Uu55"


def _grep(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


def test_secrets_never_reach_outputs_logs_or_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY")
    monkeypatch.chdir(tmp_path)
    needles = [*SECRETS.values(), CONFIG_SECRET, URI_PASSWORD]
    store = tmp_path / "mlruns"
    args = ["--set", f"output_dir={tmp_path / 'run'}", "--set", "data.limit=60", "--set", "annotate.num_annotators=3",
            ]
    for item in ["train.epochs=2", "train.warmup_epochs=1", "train.rampup_epochs=1", "train.reg_start_offset=0",
                 "train.batch_size=32", "train.warmup_batch_size=32", "train.queue_size=64", "train.device=cpu",
                 "evaluate.plots=false"]:
        args += ["--set", item]
    caplog.set_level(logging.DEBUG)
    for stage in ("annotate", "aggregate", "train", "evaluate"):
        assert main([stage, *args]) == 0
    # The pipeline's tracking calls, with the config saved as params and the stage files as artifacts.
    config = load_config(None, [a for a in args if a != "--set"])
    cfg = tracking.TrackingConfig(uri=f"sqlite:///{store}/mlflow.db")
    run_id = tracking.start_or_resume_run(cfg, "kfp-secret", config.model_dump(mode="json"))
    for stage in ("annotate", "aggregate", "train", "evaluate"):
        tracking.log_stage(cfg, run_id, stage, tmp_path / "run" / stage)
    client = tracking.client_for(cfg)
    run = client.get_run(run_id)
    seen = " ".join([*run.data.params.values(), *run.data.tags.values()])
    captured = capsys.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for text in (seen, captured.out, captured.err, logs):
        assert not [n for n in needles if n in text]
    assert (tmp_path / "run" / "annotate" / "config.yaml").is_file()
    assert _grep(tmp_path, needles) == []  # stage folders, config.yaml, the MLflow store and its artifacts


def test_a_config_cannot_carry_storage_credentials(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Configs are saved beside every output and logged as params: credentials only come from the environment."""
    code = main(["annotate", "--set", f"output_dir={tmp_path}", "--set", f"storage.secret_access_key={CONFIG_SECRET}"])
    err = capsys.readouterr().err
    assert code == 2 and "storage.secret_access_key': unknown key" in err
    assert CONFIG_SECRET not in err
    assert not any(tmp_path.iterdir())


def test_tracking_uri_credentials_are_not_logged_or_saved(tmp_path: Path) -> None:
    """A tracking URI with user:password is redacted in MLflow params and in error messages."""
    uri = f"http://alice:{URI_PASSWORD}@127.0.0.1:5000"
    assert URI_PASSWORD not in str(tracking.flatten_params({"tracking": {"uri": uri}}))
    assert tracking.redact(uri) == "http://alice:***@127.0.0.1:5000"
    assert tracking.redact("plain http://h:1/x") == "plain http://h:1/x"


def test_unreachable_tracking_server_error_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    cfg = tracking.TrackingConfig(uri=f"http://alice:{URI_PASSWORD}@127.0.0.1:{free_port()}")
    with pytest.raises(CoregError, match=r"MLflow at http://alice:\*\*\*@127\.0\.0\.1") as err:
        tracking.start_or_resume_run(cfg, "kfp-x")
    assert URI_PASSWORD not in str(err.value) and "\n" not in str(err.value)


def _torch_load_calls(source: str) -> list[tuple[int, str]]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in node.keywords)
            if not ok:
                bad.append((node.lineno, ast.unparse(node)))
    return bad


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    for folder in ("coreg", "components", "pipelines", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")) if (REPO / folder).is_dir() else []:
            offenders += [f"{path.relative_to(REPO)}:{line}: {call}"
                          for line, call in _torch_load_calls(path.read_text(encoding="utf-8"))]
    assert offenders == []
    # the checker itself catches an unsafe call
    assert _torch_load_calls("import torch\ntorch.load('x.pt')\ntorch.load('y', weights_only=False)\n")


def test_registered_models_are_never_unpickled() -> None:
    """Models come back from MLflow as coreg's weights-only model.pt, never via mlflow.pytorch.load_model."""
    offenders = []
    for folder in ("coreg", "components", "pipelines"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr == "load_model" and \
                        isinstance(node.value, ast.Attribute) and node.value.attr in ("pytorch", "pyfunc"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), 9).save(path)
    return path


@pytest.mark.parametrize("raw", ["../outside.png", "sub/../../outside.png", "{abs}", "link.png"])
def test_manifest_paths_cannot_escape_the_data_root(tmp_path: Path, raw: str) -> None:
    outside = _png(tmp_path / "outside.png")
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "link.png").symlink_to(outside)
    manifest = root / "m.csv"
    pd.DataFrame({"path": [raw.format(abs=outside)]}).to_csv(manifest, index=False)
    with pytest.raises(CoregError, match=r"m\.csv: row 0: path .* is outside the data root"):
        load_dataset(DataConfig(source="manifest", path=str(manifest), class_names=["a", "b"]))


def test_data_root_can_be_widened_explicitly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "shared" / "images" / "a.png")
    manifest = tmp_path / "shared" / "lists" / "m.csv"
    manifest.parent.mkdir(parents=True)
    pd.DataFrame({"path": ["../images/a.png"]}).to_csv(manifest, index=False)
    cfg = DataConfig(source="manifest", path=str(manifest), class_names=["a", "b"])
    with pytest.raises(CoregError, match="outside the data root"):
        load_dataset(cfg)
    widened = cfg.model_copy(update={"root": str(tmp_path / "shared")})
    assert load_dataset(widened).sample_ids == ["../images/a.png"]
    monkeypatch.setenv("COREG_DATA_ROOT", str(tmp_path / "shared"))
    assert load_dataset(cfg).sample_ids == ["../images/a.png"]


@pytest.mark.parametrize("layout", ["file_link", "class_folder_link", "flat_file_link"])
def test_folder_symlinks_cannot_escape_the_data_root(tmp_path: Path, layout: str) -> None:
    """A folder source follows symlinks only while they stay inside it; one leading out is refused by name."""
    outside = tmp_path / "elsewhere"
    _png(outside / "secret.png")
    root = tmp_path / "data"
    _png(root / "cat" / "a.png")
    _png(root / "dog" / "b.png")
    link = {"file_link": root / "dog" / "link.png", "class_folder_link": root / "cow"}.get(layout)
    names = None
    if layout == "flat_file_link":
        root = tmp_path / "flat"
        _png(root / "a.png")
        link, names = root / "link.png", ["cat", "dog"]
    link.symlink_to(outside / "secret.png" if link.suffix else outside)
    named = link if link.suffix else link / "secret.png"
    cfg = DataConfig(source="folder", path=str(root), class_names=names)
    with pytest.raises(CoregError, match="outside the data root") as err:
        load_dataset(cfg)
    assert str(err.value).startswith(f"{named}: symlink leads outside the data root {root.resolve()}")
    assert "\n" not in str(err.value)
    # data.root (or $COREG_DATA_ROOT) widens the root on purpose, as for manifests
    widened = load_dataset(cfg.model_copy(update={"root": str(tmp_path)}))
    assert str((outside / "secret.png").resolve()) in widened.paths


def test_folder_symlinks_inside_the_data_root_keep_working(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _png(root / "cat" / "a.png")
    _png(root / "shared" / "b.png")
    (root / "dog").mkdir()
    (root / "dog" / "b.png").symlink_to(root / "shared" / "b.png")
    (root / "cow").symlink_to(root / "shared")
    ds = load_dataset(DataConfig(source="folder", path=str(root)))
    assert ds.sample_ids == ["cat/a.png", "cow/b.png", "dog/b.png", "shared/b.png"]
    assert ds.paths[1] == ds.paths[2] == str((root / "shared" / "b.png").resolve())

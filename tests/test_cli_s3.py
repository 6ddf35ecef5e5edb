"""Stage commands on s3:// locations, against a real S3 server on loopback (tests/servers.py)."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from servers import S3Server

from coreg.cli import main
from coreg.storage import MANIFEST

CLASSES = ("cat", "dog", "fox")


def _upload_image_folder(s3: S3Server, prefix: str, per_class: int = 12) -> None:
    """Class sub-folders of small PNGs, each class its own brightness pattern."""
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            pixels = rng.integers(0, 60, (12, 12), dtype=np.uint8)
            pixels[:, c * 4:(c + 1) * 4] += 180
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{name}/{i:03d}.png", Body=buf.getvalue())


def _keys(s3: S3Server, prefix: str) -> set[str]:
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.mark.slow
def test_stages_read_and_write_s3(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COREG_CACHE_DIR", str(tmp_path / "cache"))
    _upload_image_folder(s3_server, "datasets/pets")
    base = f"s3://{s3_server.bucket}/runs/cli"
    common = ["--quiet", "--set", "data.source=folder", "--set", f"data.path=s3://{s3_server.bucket}/datasets/pets",
              "--set", "data.image_size=12", "--set", "annotate.num_annotators=3",
              "--set", "annotate.teacher_samples_per_class=2", "--set", f"output_dir={tmp_path / 'local'}"]

    assert main(["annotate", *common, "--out", f"{base}/annotate"]) == 0, capsys.readouterr().err
    assert main(["aggregate", *common, "--annotations", f"{base}/annotate", "--out", f"{base}/aggregate"]) == 0

    keys = _keys(s3_server, "runs/cli/")
    for stage, name in [("annotate", "annotations.parquet"), ("annotate", MANIFEST),
                        ("aggregate", "candidates.parquet"), ("aggregate", MANIFEST)]:
        assert f"runs/cli/{stage}/{name}" in keys
    assert not (tmp_path / "local").exists()  # nothing was written to the default local folders

    body = boto3.client("s3", endpoint_url=s3_server.endpoint).get_object(
        Bucket=s3_server.bucket, Key="runs/cli/aggregate/candidates.parquet")["Body"].read()
    candidates = pd.read_parquet(io.BytesIO(body))
    assert len(candidates) == 3 * 12
    assert set(candidates["sample_id"]) == {f"{c}/{i:03d}.png" for c in CLASSES for i in range(12)}


def test_failed_stage_publishes_nothing(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COREG_CACHE_DIR", str(tmp_path / "cache"))
    out = f"s3://{s3_server.bucket}/runs/failed/aggregate"
    code = main(["aggregate", "--quiet", "--annotations", str(tmp_path / "missing"), "--out", out])
    assert code == 2
    assert "not found" in capsys.readouterr().err
    assert _keys(s3_server, "runs/failed/") == set()


def test_s3_output_is_refused_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every torchrun rank runs the command: an s3:// --out would be published once per rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["aggregate", "--quiet", "--annotations", str(tmp_path), "--out", "s3://bucket/runs/x/aggregate"])
    err = capsys.readouterr().err
    assert code == 2 and "under torchrun write to a local folder" in err

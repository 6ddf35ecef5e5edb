"""coreg.storage against a real S3 server (moto on loopback): atomic publish, verified fetch, errors."""

from __future__ import annotations

import time

import boto3
import pytest
from servers import free_port

from coreg.errors import CoregError
from coreg.storage import MANIFEST, StorageConfig, fetch_dir, fetch_prefix, list_keys, publish_dir, read_manifest


def _folder(tmp_path, name="stage"):
    folder = tmp_path / name
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x01" * 1000)
    return folder


def test_publish_then_fetch_round_trip(s3_server, tmp_path):
    uri = f"s3://{s3_server.bucket}/t/roundtrip"
    publish_dir(_folder(tmp_path), uri, meta={"stage": "x"})
    keys = list_keys(uri)
    assert sorted(keys) == sorted([f"t/roundtrip/{MANIFEST}", "t/roundtrip/a.txt", "t/roundtrip/sub/b.bin"])
    manifest = read_manifest(uri)
    assert [f.path for f in manifest.files] == ["a.txt", "sub/b.bin"]
    assert manifest.meta == {"stage": "x"}
    out = fetch_dir(uri, tmp_path / "copy")
    assert (out / "a.txt").read_text() == "alpha"
    assert (out / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 1000


def test_manifest_is_written_after_every_file(s3_server, tmp_path):
    """Readers may trust a folder once its manifest exists: it must be the last object written."""
    uri = f"s3://{s3_server.bucket}/t/order"
    publish_dir(_folder(tmp_path), uri)
    s3 = boto3.client("s3")
    objects = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="t/order/")["Contents"]
    times = {o["Key"].rsplit("/", 1)[-1]: o["LastModified"] for o in objects}
    assert times[MANIFEST] >= max(v for k, v in times.items() if k != MANIFEST)


def test_unpublished_folder_is_refused(s3_server, tmp_path):
    boto3.client("s3").put_object(Bucket=s3_server.bucket, Key="t/half/a.txt", Body=b"x")
    with pytest.raises(CoregError, match="not a published coreg folder"):
        fetch_dir(f"s3://{s3_server.bucket}/t/half", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_changed_object_fails_the_checksum(s3_server, tmp_path):
    uri = f"s3://{s3_server.bucket}/t/changed"
    publish_dir(_folder(tmp_path), uri)
    boto3.client("s3").put_object(Bucket=s3_server.bucket, Key="t/changed/a.txt", Body=b"ALPHA")
    with pytest.raises(CoregError, match="does not match the manifest"):
        fetch_dir(uri, tmp_path / "y")


def test_republish_replaces_the_folder(s3_server, tmp_path):
    uri = f"s3://{s3_server.bucket}/t/again"
    publish_dir(_folder(tmp_path), uri)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "a.txt").write_text("beta")
    publish_dir(newer, uri)
    assert [f.path for f in read_manifest(uri).files] == ["a.txt"]
    assert (fetch_dir(uri, tmp_path / "z") / "a.txt").read_text() == "beta"


def test_plain_prefix_and_single_object_fetch(s3_server, tmp_path):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_server.bucket, Key="data/imgs/cat/1.txt", Body=b"1")
    s3.put_object(Bucket=s3_server.bucket, Key="data/manifest.csv", Body=b"path\n")
    folder = fetch_prefix(f"s3://{s3_server.bucket}/data/imgs", tmp_path / "c1")
    assert (folder / "cat" / "1.txt").read_bytes() == b"1"
    single = fetch_prefix(f"s3://{s3_server.bucket}/data/manifest.csv", tmp_path / "c2")
    assert single.read_text() == "path\n"


def test_missing_bucket_is_one_line_error(s3_server, tmp_path):
    with pytest.raises(CoregError, match="bucket 'no-such-bucket' does not exist") as err:
        publish_dir(_folder(tmp_path), "s3://no-such-bucket/x")
    assert "\n" not in str(err.value)


def test_service_down_is_one_line_error_after_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2, connect_timeout=0.5)
    started = time.time()
    with pytest.raises(CoregError, match="unreachable") as err:
        publish_dir(_folder(tmp_path), "s3://bucket/x", cfg)
    assert "\n" not in str(err.value) and "s3://bucket/x" in str(err.value)
    assert time.time() - started < 30


@pytest.fixture
def strict_s3():
    """A second moto S3 server, in its own process, that checks credentials (IAM auth on from the first call)."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("strict moto server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_wrong_credentials_are_one_line_error(strict_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    cfg = StorageConfig(endpoint_url=strict_s3, max_attempts=2)
    with pytest.raises(CoregError, match=r"refused the credentials \(InvalidAccessKeyId\)") as err:
        publish_dir(_folder(tmp_path), "s3://bucket/x", cfg)
    assert "\n" not in str(err.value) and "s3://bucket/x" in str(err.value)


def test_publish_retry_backs_off_only_on_transient_errors(monkeypatch):
    from botocore.exceptions import ClientError

    from coreg import storage

    delays: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ClientError({"Error": {"Code": "SlowDown"}}, "PutObject")
        return "ok"

    assert storage._with_backoff(flaky, attempts=5) == "ok"
    assert delays == [0.5, 1.0]

    def refused() -> None:
        calls.append(1)
        raise ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject")

    calls.clear()
    with pytest.raises(ClientError):
        storage._with_backoff(refused, attempts=5)
    assert len(calls) == 1

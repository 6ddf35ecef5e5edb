"""Local paths and ``s3://`` URIs for stage folders, with atomic publishing.

Why a manifest: S3 has no rename, so a folder of several objects cannot appear at once.
A stage folder is published by uploading its files under ``<uri>/`` and then writing
``<uri>/_coreg_manifest.json`` **last** (one PUT, which S3 makes visible atomically). The
manifest lists every file with its size and SHA-256. Readers (:func:`fetch_dir`) trust
only folders that have a manifest and only the files it lists, and check every
download against it. Re-publishing to the same prefix first deletes the manifest, so a
reader sees the old folder, "not published" or the new folder, never a mix; a reader
that was mid-download during an overwrite fails the checksum check instead of returning
mixed files.

Transient failures (timeouts, 5xx, throttling) are retried by botocore's ``standard``
retry mode; publishing the manifest has its own retry loop with backoff on top, because
it is the one request whose loss would leave a complete upload invisible. A service that
stays down, a missing bucket or refused credentials end in a one-line
:class:`~coreg.errors.CoregError` that names the URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from coreg.atomic import staged_directory
from coreg.errors import CoregError

log = logging.getLogger(__name__)

MANIFEST = "_coreg_manifest.json"
T = TypeVar("T")

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                     "InvalidToken", "AuthorizationHeaderMalformed", "InvalidClientTokenId", "Forbidden", "403"}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "500", "502", "503", "504"}


class StorageConfig(BaseModel):
    """Where stage folders are published and how S3 is reached.

    Credentials default to the standard AWS chain (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, profiles); on
    Kubernetes they come from a secret as env vars, so a config file never has to hold them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    uri: str | None = Field(
        None, description="s3://bucket/prefix that receives one published folder per stage and run; "
        "None keeps outputs local only.")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (SeaweedFS, MinIO, ...); default: AWS_ENDPOINT_URL or AWS itself.")
    region: str | None = Field(None, description="Region; default: AWS_DEFAULT_REGION or us-east-1.")
    max_attempts: Annotated[int, Field(ge=1, le=20)] = Field(
        5, description="Attempts per request (botocore standard retries) and for publishing the manifest.")
    connect_timeout: Annotated[float, Field(gt=0)] = Field(5.0, description="Seconds to connect.")
    read_timeout: Annotated[float, Field(gt=0)] = Field(60.0, description="Seconds to wait for a response.")


def is_s3(location: str | os.PathLike[str] | None) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key has no leading or trailing slash."""
    if not is_s3(uri):
        raise CoregError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise CoregError(f"{uri}: the S3 URI has no bucket name")
    return bucket, key.strip("/")


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def make_client(cfg: StorageConfig | None = None) -> Any:
    """A boto3 S3 client with bounded timeouts and botocore's standard retry mode."""
    import boto3
    from botocore.config import Config

    cfg = cfg or StorageConfig()
    config = Config(
        retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        s3={"addressing_style": "path"},
        signature_version="s3v4",
    )
    # Credentials come only from the AWS chain (environment, Kubernetes secrets mounted as env, instance
    # roles): never from a config file, which is saved beside every output and logged as MLflow params.
    session = boto3.session.Session(
        region_name=cfg.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        or "us-east-1",
    )
    return session.client("s3", endpoint_url=cfg.endpoint_url or None, config=config)


def _endpoint(client: Any) -> str:
    return str(getattr(getattr(client, "meta", None), "endpoint_url", "S3"))


def _is_transient(err: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(err, ConnectionError | HTTPClientError):
        return True
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code")) in _TRANSIENT_CODES
    return False


def _call(what: str, uri: str, client: Any, fn: Callable[[], T]) -> T:
    """Run one S3 request; turn the failures a user can cause or fix into one-line CoregErrors."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

    try:
        return fn()
    except NoCredentialsError:
        raise CoregError(f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(from the environment or a Kubernetes secret)") from None
    except (ConnectionError, HTTPClientError) as err:
        raise CoregError(f"{uri}: S3 endpoint {_endpoint(client)} unreachable while trying to {what} "
                         f"({type(err).__name__}); is the service up?") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", "?"))
        if code in _CREDENTIAL_CODES:
            raise CoregError(f"{uri}: S3 refused the credentials ({code}) while trying to {what}; check "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        if code == "NoSuchBucket":
            raise CoregError(f"{uri}: S3 bucket {split_s3(uri)[0]!r} does not exist") from None
        if code in ("NoSuchKey", "404"):
            raise CoregError(f"{uri}: no such S3 object") from None
        raise CoregError(f"{uri}: S3 error {code} while trying to {what}") from None


def _with_backoff(fn: Callable[[], T], attempts: int, base_delay: float = 0.5) -> T:
    """Retry ``fn`` on transient errors with exponential backoff (on top of botocore's retries)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or not _is_transient(err):
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("S3 request failed (%s); retrying in %.1fs (%d/%d)", type(err).__name__, delay,
                        attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ManifestEntry(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """What a published folder holds; written last, so its presence means 'complete'."""

    format: int = 1
    published_at: str
    files: list[ManifestEntry]
    meta: dict[str, Any] = Field(default_factory=dict)


def publish_dir(local_dir: str | Path, uri: str, cfg: StorageConfig | None = None,
                meta: dict[str, Any] | None = None, client: Any = None) -> str:
    """Upload a complete local folder to ``uri`` and publish it with a manifest written last."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise CoregError(f"{local_dir}: folder to upload not found")
    cfg = cfg or StorageConfig()
    client = client or make_client(cfg)
    bucket, prefix = split_s3(uri)
    manifest_key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    # Unpublish first: from here until the new manifest lands, readers see "not published".
    _call("unpublish the previous version", uri, client,
          lambda: client.delete_object(Bucket=bucket, Key=manifest_key))
    entries = []
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    for path in files:
        rel = path.relative_to(local_dir).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        _call(f"upload {rel}", join_uri(uri, rel), client,
              lambda path=path, key=key: client.upload_file(str(path), bucket, key))
        entries.append(ManifestEntry(path=rel, size=path.stat().st_size, sha256=_sha256(path)))
    manifest = Manifest(published_at=datetime.now(UTC).isoformat(), files=entries, meta=meta or {})
    body = manifest.model_dump_json(indent=2).encode()
    _call("publish the manifest", uri, client, lambda: _with_backoff(
        lambda: client.put_object(Bucket=bucket, Key=manifest_key, Body=body,
                                  ContentType="application/json"), cfg.max_attempts))
    log.info("published %d files to %s", len(entries), uri)
    return uri


def read_manifest(uri: str, cfg: StorageConfig | None = None, client: Any = None) -> Manifest:
    """The manifest of a published folder; a CoregError if the folder is not (yet) published."""
    from botocore.exceptions import ClientError

    client = client or make_client(cfg)
    bucket, prefix = split_s3(uri)
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST

    def get() -> bytes:
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                raise CoregError(f"{uri}: not a published coreg folder (no {MANIFEST}; the upload is "
                                 "missing or unfinished)") from None
            raise

    raw = _call("read the manifest", uri, client, get)
    try:
        return Manifest.model_validate_json(raw)
    except ValueError:
        raise CoregError(f"{join_uri(uri, MANIFEST)}: not a valid manifest") from None


def fetch_dir(uri: str, local_dir: str | Path, cfg: StorageConfig | None = None, client: Any = None) -> Path:
    """Download a published folder into ``local_dir`` (atomically), checking every file's checksum."""
    client = client or make_client(cfg)
    bucket, prefix = split_s3(uri)
    manifest = read_manifest(uri, cfg, client)
    with staged_directory(local_dir) as stage:
        for entry in manifest.files:
            target = stage / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            key = f"{prefix}/{entry.path}" if prefix else entry.path
            _call(f"download {entry.path}", join_uri(uri, entry.path), client,
                  lambda key=key, target=target: client.download_file(bucket, key, str(target)))
            if target.stat().st_size != entry.size or _sha256(target) != entry.sha256:
                raise CoregError(f"{join_uri(uri, entry.path)}: content does not match the manifest (the "
                                 "folder was re-published while reading); retry")
    return Path(local_dir)


def materialize(location: str, cache_dir: str | Path, cfg: StorageConfig | None = None) -> Path:
    """A local folder for ``location``: itself when local, else a verified download under ``cache_dir``."""
    if not is_s3(location):
        path = Path(location)
        if not path.exists():
            raise CoregError(f"{location}: folder not found")
        return path
    bucket, prefix = split_s3(location)
    target = Path(cache_dir) / bucket / (prefix or "_root")
    return fetch_dir(location, target, cfg)


def list_keys(uri: str, cfg: StorageConfig | None = None, client: Any = None) -> list[str]:
    """Every key under ``uri`` (used by tests and ``coreg`` users to inspect a published run)."""
    client = client or make_client(cfg)
    bucket, prefix = split_s3(uri)
    keys: list[str] = []

    def page_all() -> None:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))

    _call("list objects", uri, client, page_all)
    return keys


def manifest_files(uri: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """The manifest as a plain dict (handy in reports)."""
    return json.loads(read_manifest(uri, cfg).model_dump_json())


def fetch_prefix(uri: str, cache_dir: str | Path, cfg: StorageConfig | None = None) -> Path:
    """Download user data from S3: a published folder, a single object (a manifest file) or a plain prefix.

    Returns the local folder, or the local file when ``uri`` names one object.
    """
    client = make_client(cfg)
    bucket, key = split_s3(uri)
    target = Path(cache_dir) / bucket / (key or "_root")
    keys = [k for k in list_keys(uri, cfg, client) if k == key or k.startswith(f"{key}/") or not key]
    if f"{key}/{MANIFEST}" in keys or (not key and MANIFEST in keys):
        return fetch_dir(uri, target, cfg, client)
    if key in keys:  # one object, e.g. s3://bucket/data/manifest.csv
        target.parent.mkdir(parents=True, exist_ok=True)
        _call("download", uri, client, lambda: client.download_file(bucket, key, str(target)))
        return target
    if not keys:
        raise CoregError(f"{uri}: nothing found under this S3 prefix")
    with staged_directory(target) as stage:
        for k in keys:
            rel = k[len(key):].lstrip("/") if key else k
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _call(f"download {rel}", f"s3://{bucket}/{k}", client,
                  lambda k=k, dest=dest: client.download_file(bucket, k, str(dest)))
    return target

"""Shared pytest set-up: offline, quiet environment and the session-wide test servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Set before anything imports MLflow, open_clip or GitPython; subprocesses inherit them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# components/ and pipelines/ are top-level folders of the repository, beside coreg/.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from servers import mlflow_server, s3_server  # noqa: E402, F401  (session fixtures)

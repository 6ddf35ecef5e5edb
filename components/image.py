"""The container image every coreg component runs in, and the one way components are declared.

The image carries Python 3.11, kfp 2.17.3 and the coreg package (with its pinned deps), so
components set ``install_kfp_package=False`` and install nothing at run time: a run never
depends on PyPI being reachable from the cluster. ``COREG_IMAGE`` overrides the image when
the pipeline is compiled (``coreg pipeline compile --image`` sets it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kfp import dsl

DEFAULT_IMAGE = "ghcr.io/coreg/coreg:0.1.0"
IMAGE = os.environ.get("COREG_IMAGE", DEFAULT_IMAGE)


def current_image() -> str:
    """The image for components built now (env COREG_IMAGE read at call time, not import time)."""
    return os.environ.get("COREG_IMAGE") or IMAGE


def component(func: Callable[..., Any], image: str | None = None) -> Any:
    """Declare ``func`` as a lightweight KFP component on the project image, installing nothing."""
    return dsl.component(func=func, base_image=image or current_image(), install_kfp_package=False)

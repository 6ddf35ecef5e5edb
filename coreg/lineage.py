"""Lineage: each stage folder records which folders it was made from.

Later stages follow these links (evaluate needs the annotations two stages back to put
the annotators' own accuracy beside the model's), and a user can always tell what a
result was made from. Paths are stored absolute.
"""

from __future__ import annotations

import json
from pathlib import Path

from coreg.atomic import write_json
from coreg.errors import CoregError

LINEAGE_FILE = "lineage.json"


def write_lineage(directory: Path, stage: str, inputs: dict[str, Path]) -> None:
    write_json(
        Path(directory) / LINEAGE_FILE,
        {"stage": stage, "inputs": {name: str(Path(p).resolve()) for name, p in inputs.items()}},
    )


def read_input(directory: Path, name: str) -> Path | None:
    """The folder recorded as input ``name`` of the stage in ``directory``, if any."""
    path = Path(directory) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["inputs"].get(name)
    except (json.JSONDecodeError, KeyError, AttributeError):
        raise CoregError(f"{path}: not a valid lineage file") from None
    return Path(value) if value else None

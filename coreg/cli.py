"""Command line: ``coreg annotate|aggregate|train|evaluate|run|pipeline|promote|predict``.

Each stage reads the previous stage's folder and writes its own, so stages can be rerun
alone. Folders default to ``<output_dir>/<stage>`` from the config, so the same
``--config`` chains them without naming any folder. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from coreg import __version__
from coreg.config import DEFAULT_CONFIG, RunConfig, load_config
from coreg.errors import CoregError
from coreg.storage import is_s3

log = logging.getLogger("coreg")

STAGES = ("annotate", "aggregate", "train", "evaluate")
PREVIEW_LIMIT = 32
PREVIEW_ROWS = 12


def stage_dir(config: RunConfig, stage: str) -> Path:
    return Path(config.output_dir) / stage


def run_all(config: RunConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Path]:
    """Annotate, aggregate, train and evaluate in one go; returns each stage's folder."""
    from coreg.aggregate import run_aggregate
    from coreg.annotate import run_annotate
    from coreg.evaluate import run_evaluate
    from coreg.train.stage import run_train

    dirs = {stage: stage_dir(config, stage) for stage in STAGES}
    log.info("[1/4] annotate -> %s", dirs["annotate"])
    run_annotate(config, dirs["annotate"])
    log.info("[2/4] aggregate -> %s", dirs["aggregate"])
    run_aggregate(config, dirs["annotate"], dirs["aggregate"])
    log.info("[3/4] train -> %s", dirs["train"])
    run_train(config, dirs["aggregate"], dirs["train"], resume=resume, progress=progress)
    log.info("[4/4] evaluate -> %s", dirs["evaluate"])
    run_evaluate(config, dirs["train"], dirs["evaluate"], annotations_dir=dirs["annotate"])
    return dirs


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coreg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"coreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=None,
                       help=f"YAML run config (default: the bundled demo, {DEFAULT_CONFIG.name})")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field, e.g. --set train.epochs=5 (repeatable)")
        p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
        return p

    p = add("annotate", "Label the images with the configured annotators.")
    p.add_argument("--out", type=str,
                   help="output folder (default: <output_dir>/annotate; <output_dir>/annotate-preview with "
                        "--limit or --preview)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="annotate only the first N samples (a quick preview; the split stays that of the full data)")
    p.add_argument("--preview", action="store_true",
                   help=f"print a table of the first images with their candidate sets (implies --limit "
                        f"{PREVIEW_LIMIT} unless --limit is given)")
    p.add_argument("--import", dest="imports", action="append", default=[], type=Path, metavar="FILE",
                   help="add the answers of another VLM from a JSONL or CSV file (repeatable; see docs/annotate.md)")
    p.add_argument("--few-shot", dest="few_shot", type=Path, metavar="FILE",
                   help="CSV or JSONL file of human labels for a few samples (sets annotate.few_shot_labels)")
    p = add("aggregate", "Turn annotations into candidate label sets and a quality summary.")
    p.add_argument("--annotations", type=str, help="annotate stage folder (default: <output_dir>/annotate)")
    p.add_argument("--out", type=str, help="output folder (default: <output_dir>/aggregate)")
    p = add("train", "Train Co-Reg on the candidate sets.")
    p.add_argument("--candidates", type=str, help="aggregate stage folder (default: <output_dir>/aggregate)")
    p.add_argument("--out", type=str, help="output folder (default: <output_dir>/train)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p = add("evaluate", "Evaluate the trained model on the test split.")
    p.add_argument("--model", type=str, help="train stage folder (default: <output_dir>/train)")
    p.add_argument("--annotations", type=str,
                   help="annotate stage folder for the zero-shot comparison (default: from the lineage)")
    p.add_argument("--out", type=str, help="output folder (default: <output_dir>/evaluate)")
    p = add("run", "Run annotate, aggregate, train and evaluate in sequence.")
    p.add_argument("--out", type=str, help="output folder for all stages (overrides output_dir)")
    p.add_argument("--resume", action="store_true", help="resume training from its last checkpoint")
    from coreg import pipeline_cli

    pipeline_cli.register(sub)
    return parser


def _dispatch(args: argparse.Namespace) -> Path | str:
    from coreg import pipeline_cli

    out = pipeline_cli.dispatch(args)
    if out is not None:
        return out
    config = local_data(load_config(args.config, args.overrides))
    progress = not args.quiet
    if args.command == "run":
        if args.out is not None:
            config.output_dir = str(args.out)
        dirs = run_all(config, resume=args.resume, progress=progress)
        return dirs["evaluate"]
    if args.command == "annotate":
        location = args.out or _annotate_default(config, args)
        with stage_output(location, config) as out:
            _annotate(config, args, progress, out)
        return location
    if args.command == "aggregate":
        from coreg.aggregate import run_aggregate

        annotations = stage_input(args.annotations, config, "annotate")
        with stage_output(args.out or stage_dir(config, "aggregate"), config) as out:
            run_aggregate(config, annotations, out)
        return args.out or out
    if args.command == "train":
        from coreg.train.stage import run_train

        if args.resume and is_s3(args.out):
            raise CoregError(f"--out {args.out}: --resume needs a local output folder (its checkpoints)")
        candidates = stage_input(args.candidates, config, "aggregate")
        with stage_output(args.out or stage_dir(config, "train"), config) as out:
            run_train(config, candidates, out, resume=args.resume, progress=progress)
        return args.out or out
    from coreg.evaluate import run_evaluate

    model = stage_input(args.model, config, "train")
    annotations = stage_input(args.annotations, config, None) if args.annotations else None
    with stage_output(args.out or stage_dir(config, "evaluate"), config) as out:
        run_evaluate(config, model, out, annotations_dir=annotations)
    return args.out or out


def local_data(config: RunConfig) -> RunConfig:
    """Download an ``s3://`` ``data.path`` (a folder prefix or a manifest object) into the local cache."""
    from coreg.steps import local_data as fetch_data

    return fetch_data(config, config.storage)


def stage_input(location: str | None, config: RunConfig, default_stage: str | None) -> Path:
    """A previous stage's folder: local, or a published ``s3://`` folder fetched into the cache."""
    if location is None:
        return stage_dir(config, default_stage or "")
    if is_s3(location):
        from coreg.steps import cache_dir
        from coreg.storage import materialize

        return materialize(location, cache_dir() / "inputs", config.storage)
    return Path(location)


@contextlib.contextmanager
def stage_output(location: str | Path, config: RunConfig) -> Iterator[Path]:
    """Where a stage writes: the local folder itself, or a temp folder published to ``s3://`` on success.

    Publishing writes the manifest last, so readers never see a half-uploaded stage folder;
    a failed stage publishes nothing.
    """
    if not is_s3(str(location)):
        yield Path(location)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CoregError(f"--out {location}: under torchrun write to a local folder (rank 0 writes it), "
                         "then publish it; every rank would publish its own copy otherwise")
    from coreg.storage import publish_dir

    with tempfile.TemporaryDirectory(prefix="coreg-stage-") as tmp:
        local = Path(tmp) / "stage"
        yield local
        publish_dir(local, str(location), config.storage)


def _preview_limit(args: argparse.Namespace) -> int | None:
    if args.limit is not None and args.limit < 1:
        raise CoregError(f"--limit must be a positive number of samples, got {args.limit}")
    return args.limit if args.limit is not None else (PREVIEW_LIMIT if args.preview else None)


def _annotate_default(config: RunConfig, args: argparse.Namespace) -> Path:
    # A preview must never replace a full run's annotations: it gets its own folder by default.
    return stage_dir(config, "annotate-preview" if _preview_limit(args) is not None else "annotate")


def _annotate(config: RunConfig, args: argparse.Namespace, progress: bool, out: Path) -> Path:
    """``coreg annotate`` with its preview, limit, import and few-shot flags applied to the config."""
    from coreg.annotate import run_annotate
    from coreg.annotate.stage import preview_table
    from coreg.config import ImportConfig

    limit = _preview_limit(args)
    if limit is not None:
        config.annotate.limit = limit
    if args.imports:
        config.annotate.imports = [*config.annotate.imports, *(ImportConfig(path=str(f)) for f in args.imports)]
    if args.few_shot is not None:
        config.annotate.few_shot_labels = str(args.few_shot)
    out = run_annotate(config, out, progress=progress)
    if args.preview:
        print(preview_table(out, PREVIEW_ROWS))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        out = _dispatch(args)
    except CoregError as err:
        print(f"coreg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coreg {args.command}: interrupted", file=sys.stderr)
        return 130
    print(f"coreg {args.command}: done, output in {out}")
    if args.command in ("run", "evaluate"):
        print(f"report: {str(out).rstrip('/')}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

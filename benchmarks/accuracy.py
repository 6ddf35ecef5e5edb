"""Accuracy benchmark: Co-Reg and its baselines x data sets x annotation protocols x seeds.

Every cell runs the real stages (``run_annotate`` -> ``run_aggregate`` -> ``run_train`` ->
``run_evaluate``; for zero_shot, evaluate scores the stored plurality votes), so it also checks that every
method keeps the data contracts. Annotation protocols:

* ``vlm_low``:  the VLM-like simulation with a stronger teacher (20 labelled images per class, light blur);
* ``vlm_high``: the VLM-like simulation with a weak teacher (3 per class, heavy blur) and noisier annotators;
* ``synthetic``: the NPLL protocol, q = 0.3, eta = 0.2 (no probabilities, so no soft_distill).

The achieved noise rate (share of training samples whose true label is outside S) and mean |S| are measured
on the training split of each cell. Writes ``benchmarks/out/accuracy[-quick][-TAG].json`` and ``.md`` and prints
the Markdown table: mean +- std over seeds of test accuracy, noise rate, |S| and training wall time.

    .venv/bin/python benchmarks/accuracy.py --quick   # digits at 8 px + 720 animal-mnist images, 3 seeds, 12 epochs
    .venv/bin/python benchmarks/accuracy.py           # digits + animal-mnist, 3 seeds, 40 epochs (see RESULTS.md)

Not part of CI. Settings of one cell are in ``cell_config``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from coreg import contracts
from coreg.aggregate import run_aggregate
from coreg.annotate import run_annotate
from coreg.config import RunConfig, apply_override, parse_config
from coreg.evaluate import run_evaluate
from coreg.train.stage import run_train

OUT = Path(__file__).resolve().parent / "out"
METHODS = ["zero_shot", "ce_majority", "soft_distill", "proden", "dividemix", "coreg"]
PROTOCOLS: dict[str, dict[str, Any]] = {
    "vlm_low": {"method": "simulate_vlm", "teacher_samples_per_class": 20, "teacher_blur": 1.0},
    "vlm_high": {"method": "simulate_vlm", "teacher_samples_per_class": 3, "teacher_blur": 4.0, "logit_noise": 1.0},
    "synthetic": {"method": "synthetic", "q": 0.3, "eta": 0.2},
}
DATASETS = {"digits": {"source": "digits", "image_size": 16},
            "animal-mnist": {"source": "animal_mnist", "image_size": 28}}
# --quick must stay under 10 minutes on two CPU cores, and its time is the convolutions' (Co-Reg runs at
# about its compute floor): digits at their native 8 px instead of 16, animal-mnist reduced to a
# class-balanced subset at 16 px. The full setting uses digits at 16 px and all 10,000 animal-mnist
# images at 28 px.
QUICK_DATA = {"digits": {"image_size": 8}, "animal-mnist": {"image_size": 16, "limit": 720}}


def cell_config(dataset: str, protocol: str, seed: int, quick: bool, limit: int | None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """The run config of one (data set, protocol, seed) cell; ``train.method`` is set per method.

    ``overrides`` (``section.field=value``, as ``coreg --set``) are applied last: ablations such as
    another aggregation rule or the regularisers off run through the same harness.
    """
    epochs, warmup, ramp, reg = (12, 6, 3, 2) if quick else (40, 15, 10, 5)  # full = the digits demo budget
    data = {**DATASETS[dataset], **(QUICK_DATA.get(dataset, {}) if quick else {}), "test_fraction": 0.2,
            "split_seed": 0, **({"limit": limit} if limit else {})}
    raw = {
        "data": data,
        "annotate": {**PROTOCOLS[protocol], "num_annotators": 27, "seed": seed},
        "aggregate": {"rule": "union"},
        "train": {"backbone": "small_cnn", "epochs": epochs, "warmup_epochs": warmup, "rampup_epochs": ramp,
                  "reg_start_offset": reg, "lr": 0.05, "batch_size": 64, "warmup_batch_size": 64,
                  "queue_size": 1024, "num_workers": 0, "device": "auto", "seed": seed},
        "evaluate": {"plots": False},
    }
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def write_report(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/out/<name>.json`` (the benchmarks' machine-readable output) and say where."""
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / f"{name}.json"
    target.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {target}")
    return target


def candidate_quality(aggregate_dir: Path) -> tuple[float, float]:
    """(noise rate, mean |S|) on the training split: share of true labels outside S, mean set size."""
    samples = contracts.read_samples(aggregate_dir)
    k = len(contracts.read_classes(aggregate_dir))
    cands = contracts.read_candidates(aggregate_dir, k).set_index("sample_id")["candidates"]
    train = samples[samples["split"] == "train"]
    sets = cands.reindex(train["sample_id"].to_numpy())
    inside = [int(y) in set(s) for y, s in zip(train["label"], sets, strict=True)]
    return 1.0 - float(np.mean(inside)), float(np.mean([len(s) for s in sets]))


def run_cell(raw: dict[str, Any], methods: list[str], root: Path) -> list[dict[str, Any]]:
    """Annotate and aggregate once, then train and evaluate every method on the same candidate sets."""
    config: RunConfig = parse_config(raw, "benchmark")
    run_annotate(config, root / "annotate", progress=False)
    run_aggregate(config, root / "annotate", root / "aggregate")
    noise, size = candidate_quality(root / "aggregate")
    rows = []
    for method in methods:
        if method == "soft_distill" and raw["annotate"]["method"] == "synthetic":
            continue  # the synthetic protocol gives no probabilities to distil
        cfg = parse_config({**raw, "train": {**raw["train"], "method": method}}, "benchmark")
        start = time.perf_counter()
        train_dir = run_train(cfg, root / "aggregate", root / f"train-{method}", progress=False)
        seconds = time.perf_counter() - start
        ev = run_evaluate(cfg, train_dir, root / f"evaluate-{method}")
        acc = json.loads((ev / "metrics.json").read_text())["model"]["accuracy"]
        row = {"method": method, "test_accuracy": acc, "noise_rate": noise, "mean_set_size": size,
               "train_seconds": round(seconds, 2)}
        if method == "coreg":  # how many classes the last epoch's clean splits lacked (see RESULTS.md)
            history = json.loads((train_dir / "history.json").read_text())
            row["classes_without_clean"] = history[-1].get("classes_without_clean")
        rows.append(row)
        print(f"  {method:13s} acc {acc:.3f}  noise {noise:.3f}  |S| {size:.2f}  {seconds:6.1f}s", flush=True)
    return rows


def _ms(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per (data set, protocol, method): mean ± std over seeds."""
    df = pd.DataFrame(results)
    lines = ["| data set | protocol | method | test accuracy | noise rate | mean \\|S\\| | train s | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for (dataset, protocol), cell in df.groupby(["dataset", "protocol"], sort=False):
        for method in METHODS:
            m = cell[cell["method"] == method]
            if m.empty:
                continue
            lines.append(f"| {dataset} | {protocol} | {method} | {_ms(list(m['test_accuracy']))} | "
                         f"{_ms(list(m['noise_rate']))} | {_ms(list(m['mean_set_size']), 2)} | "
                         f"{_ms(list(m['train_seconds']), 1)} | {len(m)} |")
    return "\n".join(lines) + "\n"


def _cell(dataset: str, protocol: str, seed: int, quick: bool, limit: int | None, methods: list[str],
          threads: int, overrides: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """One (data set, protocol, seed) cell in its own temporary folder; returns (log text, result rows)."""
    import contextlib
    import io

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("coreg").setLevel(logging.ERROR)  # per-epoch warnings are summarised in the rows
    buffer = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="coreg-bench-") as tmp, contextlib.redirect_stdout(buffer):
        print(f"{dataset} / {protocol} / seed {seed}")
        rows = run_cell(cell_config(dataset, protocol, seed, quick, limit, overrides), methods, Path(tmp))
    return buffer.getvalue(), [{"dataset": dataset, "protocol": protocol, "seed": seed, **row} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="seeds 0-2, 12 epochs, digits at 8 px, animal-mnist reduced to 720 images at 16 px")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS))
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--limit", type=int, help="use only the first N samples of each data set")
    parser.add_argument("--jobs", type=int, default=2,
                        help="cells run in parallel processes, each with cpu_count / jobs torch threads (default 2: "
                             "small CNNs on tiny images use one core far better than two)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every cell's config, e.g. --set aggregate.rule=min_votes "
                             "(repeatable; for ablations)")
    parser.add_argument("--tag", help="suffix of the output files (accuracy[-quick]-TAG.json/.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets = args.datasets or list(DATASETS)
    seeds = args.seeds or [0, 1, 2]
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    cells = [(d, p, s) for d in datasets for p in args.protocols for s in seeds]
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_cell, d, p, s, args.quick, args.limit, args.methods, threads,
                               args.overrides) for d, p, s in cells]
        for future in futures:  # in submission order, so the table and JSON do not depend on scheduling
            text, rows = future.result()
            print(text, end="", flush=True)
            results.extend(rows)
    table = markdown(results)
    total = time.perf_counter() - start
    print(table)
    print(f"total {total:.0f}s with {jobs} parallel cell(s) x {threads} torch thread(s)")
    name = ("accuracy-quick" if args.quick else "accuracy") + (f"-{args.tag}" if args.tag else "")
    write_report(name, {"args": vars(args), "total_seconds": round(total, 1), "threads_per_cell": threads,
                        "protocols": PROTOCOLS, "results": results})
    (OUT / f"{name}.md").write_text(table + f"\ntotal {total:.0f}s with {jobs} parallel cell(s) x {threads} "
                                    "torch thread(s)\n")


if __name__ == "__main__":
    main()

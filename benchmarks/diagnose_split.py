"""Per-epoch diagnostics of the clean/noisy split of Co-Reg and of DivideMix-style co-training.

Runs one benchmark cell (the config of ``benchmarks/accuracy.py``) through the real stages and
records, after every epoch's split (method steps 1-3), for each net: its accuracy on the
training samples (argmax of the aligned prediction), the clean split's size, its precision (share
of clean samples whose pseudo-label, the aligned argmax within S, is the true label) and its
per-true-class counts. Only **training** labels are read, after training, to score what the
trainer decided; the test split is never touched, so nothing here can leak into model selection.

    .venv/bin/python benchmarks/diagnose_split.py --protocol vlm_high --seed 0

Prints one table per method and writes ``benchmarks/out/diagnose-<dataset>-<protocol>-<seed>.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DATASETS, PROTOCOLS, cell_config, write_report

from coreg import contracts
from coreg.aggregate import run_aggregate
from coreg.annotate import run_annotate
from coreg.config import parse_config
from coreg.train import losses as L
from coreg.train import trainer as trainer_module
from coreg.train.stage import ROLES_FILE, run_train


def record_splits(records: list[dict[str, Any]]) -> Any:
    """Wrap the trainer's ``_split`` so every epoch's clean masks and pseudo-labels land in ``records``."""
    real_split = trainer_module._split

    def spy(run: Any, state: Any, epoch: int) -> Any:
        aligned, weights, clean = real_split(run, state, epoch)
        records.append({
            "epoch": epoch + 1,
            "prediction": [p.argmax(dim=1).cpu().numpy() for p in aligned],
            "pseudo": [L.restrict_to_candidates(p, run.data.candidates).argmax(dim=1).cpu().numpy() for p in aligned],
            "clean": [np.asarray(c, dtype=bool).copy() for c in clean],
        })
        return aligned, weights, clean

    return spy


def score(records: list[dict[str, Any]], labels: np.ndarray) -> list[dict[str, Any]]:
    """Per epoch and net: train accuracy, clean size, clean precision and per-true-class clean counts."""
    k = int(labels.max()) + 1
    rows = []
    for rec in records:
        for net in (0, 1):
            clean, pseudo = rec["clean"][net], rec["pseudo"][net]
            right = pseudo == labels
            rows.append({
                "epoch": rec["epoch"], "net": net + 1,
                "train_accuracy": float((rec["prediction"][net] == labels).mean()),
                "clean": int(clean.sum()),
                "clean_precision": float(right[clean].mean()) if clean.any() else None,
                "correct_kept": float(clean[right].mean()) if right.any() else None,
                "clean_per_true_class": np.bincount(labels[clean], minlength=k).tolist(),
                "true_class_size": np.bincount(labels, minlength=k).tolist(),
            })
    return rows


def diagnose(dataset: str, protocol: str, seed: int, quick: bool, methods: list[str],
             overrides: list[str]) -> dict[str, list[dict[str, Any]]]:
    raw = cell_config(dataset, protocol, seed, quick, None, overrides)
    results = {}
    with tempfile.TemporaryDirectory(prefix="coreg-diagnose-") as tmp:
        root = Path(tmp)
        config = parse_config(raw, "diagnose")
        run_annotate(config, root / "annotate", progress=False)
        run_aggregate(config, root / "annotate", root / "aggregate")
        samples = contracts.read_samples(root / "aggregate").set_index("sample_id")
        for method in methods:
            records: list[dict[str, Any]] = []
            original = trainer_module._split
            trainer_module._split = record_splits(records)
            try:
                cfg = parse_config({**raw, "train": {**raw["train"], "method": method}}, "diagnose")
                out = run_train(cfg, root / "aggregate", root / f"train-{method}", progress=False)
            finally:
                trainer_module._split = original
            roles = pd.read_parquet(out / ROLES_FILE)
            fit_ids = roles.loc[roles["role"] == "fit", "sample_id"]
            labels = samples.loc[fit_ids, "label"].to_numpy(dtype=np.int64)
            results[method] = score(records, labels)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS))
    parser.add_argument("--protocol", default="vlm_high", choices=list(PROTOCOLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the quick budget (12 epochs) instead of 40")
    parser.add_argument("--methods", nargs="+", default=["coreg", "dividemix"], choices=["coreg", "dividemix"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = diagnose(args.dataset, args.protocol, args.seed, args.quick, args.methods, args.overrides)
    for method, rows in results.items():
        print(f"\n{method}: {args.dataset} / {args.protocol} / seed {args.seed} (training labels only)\n")
        print("| epoch | net | train acc | clean | clean precision | correct kept | clean per true class |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            precision = "n/a" if r["clean_precision"] is None else f"{r['clean_precision']:.3f}"
            kept = "n/a" if r["correct_kept"] is None else f"{r['correct_kept']:.3f}"
            print(f"| {r['epoch']} | {r['net']} | {r['train_accuracy']:.3f} | {r['clean']} | {precision} | {kept} | "
                  f"{r['clean_per_true_class']} |")
    write_report(f"diagnose-{args.dataset}-{args.protocol}-{args.seed}", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()

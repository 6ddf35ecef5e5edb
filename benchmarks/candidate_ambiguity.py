"""How informative are the candidate sets? Per aggregation rule: noise, size and class-wide ambiguity.

A partial-label learner can only tell class a from class b if some images of a have sets
without b (and the other way round). When an annotator crowd confuses a with b for most images
of a, the union of their answers puts b in nearly every set of a: the sets then say "a or b"
for the whole class and carry no information about which, while the plurality vote may still
say "a" more often than "b". This script measures that on the training split of one benchmark
cell (the same annotate config as ``benchmarks/accuracy.py``), for several aggregation rules:

* noise rate (true label outside S), mean |S|, plurality-vote accuracy, mean companion rate;
* per class: set recall P(y in S | y), the most frequent wrong companion b and P(b in S | y);
* "blind pairs": class pairs (a, b) where b is in at least ``--blind`` (default 0.8) of the sets
  of class-a images that contain a.

It uses training labels only (no test split). Prints tables and writes JSON:

    .venv/bin/python benchmarks/candidate_ambiguity.py --protocol vlm_high --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import PROTOCOLS, cell_config, write_report

from coreg import contracts
from coreg.aggregate import aggregate_annotations, plurality_vote
from coreg.annotate import run_annotate
from coreg.config import AggregateConfig, parse_config

RULES: dict[str, dict[str, Any]] = {
    "union": {"rule": "union"},
    "min_votes=2": {"rule": "min_votes", "min_votes": 2},
    "min_votes=3": {"rule": "min_votes", "min_votes": 3},
    "min_votes=5": {"rule": "min_votes", "min_votes": 5},
    "ratio=0.5": {"rule": "ratio", "ratio": 0.5, "k": 5},
    "topk=2": {"rule": "topk", "k": 2},
}


def set_statistics(sets: np.ndarray, votes: np.ndarray, labels: np.ndarray, blind: float) -> dict[str, Any]:
    """Noise, size, plurality accuracy and per-class ambiguity of candidate sets (n, K) bool."""
    n, k = sets.shape
    contains = sets[np.arange(n), labels]
    per_class = []
    blind_pairs = []
    for a in range(k):
        rows = labels == a
        with_a = rows & contains
        co = sets[with_a].mean(axis=0) if with_a.any() else np.zeros(k)
        co[a] = -1.0
        b = int(co.argmax())
        per_class.append({"class": a, "images": int(rows.sum()), "recall": float(contains[rows].mean()),
                          "companion": b, "companion_rate": float(co[b]),
                          "plurality_accuracy": float((plurality_vote(votes[rows]) == a).mean())})
        blind_pairs += [(a, int(j)) for j in np.flatnonzero(co >= blind)]
    return {"noise_rate": float(1.0 - contains.mean()), "mean_set_size": float(sets.sum(axis=1).mean()),
            "mean_companion_rate": float(np.mean([c["companion_rate"] for c in per_class])),
            "plurality_accuracy": float((plurality_vote(votes) == labels).mean()),
            "blind_pairs": blind_pairs, "per_class": per_class}


def analyse(dataset: str, protocol: str, seed: int, blind: float) -> dict[str, Any]:
    """Annotate one cell, then aggregate its training split under every rule in ``RULES``."""
    config = parse_config(cell_config(dataset, protocol, seed, quick=False, limit=None), "ambiguity")
    with tempfile.TemporaryDirectory(prefix="coreg-ambiguity-") as tmp:
        run_annotate(config, Path(tmp), progress=False)
        samples = contracts.read_samples(Path(tmp))
        k = len(contracts.read_classes(Path(tmp)))
        annotations = contracts.read_annotations(Path(tmp), k)
    train = samples[samples["split"] == "train"]
    ids = train["sample_id"].tolist()
    annotations = annotations[annotations["sample_id"].isin(set(ids))]
    labels = train["label"].to_numpy()
    out = {}
    for name, rule in RULES.items():
        agg = aggregate_annotations(annotations, ids, k, AggregateConfig(**rule))
        out[name] = set_statistics(agg.candidates.astype(bool), agg.votes, labels, blind)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "animal-mnist"])
    parser.add_argument("--protocol", default="vlm_high", choices=[p for p in PROTOCOLS if p != "synthetic"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--blind", type=float, default=0.8, help="companion rate that makes a pair 'blind'")
    args = parser.parse_args()
    results = {seed: analyse(args.dataset, args.protocol, seed, args.blind) for seed in args.seeds}
    print(f"{args.dataset} / {args.protocol}, training split, mean over seeds {args.seeds}\n")
    print("| rule | noise rate | mean \\|S\\| | plurality acc | mean companion rate | blind pairs (per seed) |")
    print("|---|---|---|---|---|---|")
    for rule in RULES:
        rows = [results[s][rule] for s in args.seeds]
        keys = ("noise_rate", "mean_set_size", "plurality_accuracy", "mean_companion_rate")
        mean = {key: np.mean([r[key] for r in rows]) for key in keys}
        pairs = " / ".join(str(len(r["blind_pairs"])) for r in rows)
        print(f"| {rule} | {mean['noise_rate']:.3f} | {mean['mean_set_size']:.2f} | "
              f"{mean['plurality_accuracy']:.3f} | {mean['mean_companion_rate']:.2f} | {pairs} |")
    first = args.seeds[0]
    print(f"\nseed {first}, rule union, per class:\n")
    print("| class | recall | companion | companion rate | plurality acc |")
    print("|---|---|---|---|---|")
    for c in results[first]["union"]["per_class"]:
        print(f"| {c['class']} | {c['recall']:.2f} | {c['companion']} | {c['companion_rate']:.2f} | "
              f"{c['plurality_accuracy']:.2f} |")
    write_report(f"candidate-ambiguity-{args.dataset}-{args.protocol}", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()

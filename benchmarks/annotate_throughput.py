"""Annotation throughput and memory of the open_clip annotate stage (CPU; random weights).

Two measurements:

1. Throughput: the whole ``coreg annotate`` stage (``run_annotate``: data set listing, model
   build, 27-template text embeddings, DataLoader decoding, forward passes, sharded Parquet
   writing, assembly, atomic publish) against a bare ``model.encode_image`` loop over the
   same images, already decoded and preprocessed into batches. Goal: stage >= 0.8 x bare.
2. Memory: peak RSS of the stage, each size in a fresh subprocess, as the number of images
   grows (default 1,000 -> 10,000) with a tiny open_clip model, so the run is dominated by
   the data path, not the network. Goal: flat (memory bounded by batch and shard).

Prints a table and writes ``benchmarks/out/annotate_throughput.json``. Not part of CI.

    .venv/bin/python benchmarks/annotate_throughput.py            # ~5 minutes on a 2-core CPU
    .venv/bin/python benchmarks/annotate_throughput.py --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = "coreg-bench-tiny"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` JPEGs of ``size`` px in one folder per class (smooth noise, so JPEG decoding is realistic)."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
        img.save(folder / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg", quality=90)
    return folder


def stage_config(images: Path, model: str, batch_size: int, num_workers: int | None, out: Path) -> Any:
    from coreg.config import RunConfig

    return RunConfig.model_validate({
        "output_dir": str(out),
        "data": {"source": "folder", "path": str(images)},
        "annotate": {"method": "open_clip", "models": [{"name": model, "pretrained": None}],
                     "batch_size": batch_size, "num_workers": num_workers, "device": "cpu",
                     "shard_size": 1024},
    })


def bare_loop(images: Path, model_name: str, batch_size: int) -> dict[str, float]:
    """encode_image over pre-decoded, pre-transformed batches: the ceiling for the stage."""
    import open_clip

    from coreg.config import DataConfig
    from coreg.data.sources import load_dataset

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    dataset = load_dataset(DataConfig(source="folder", path=str(images)))
    decoded = torch.stack([preprocess(dataset.load_image(i)) for i in range(len(dataset))])
    batches = list(decoded.split(batch_size))
    with torch.no_grad():
        model.encode_image(batches[0][:2])  # warm-up, not timed
        cpu = cpu_seconds()
        start = time.perf_counter()
        for batch in batches:
            model.encode_image(batch)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
    return {"images": len(decoded), "seconds": seconds, "images_per_second": len(decoded) / seconds,
            "cpu_seconds": cpu}


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers): unlike wall time, it
    hardly changes when other jobs share the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def stage_run(images: Path, model_name: str, batch_size: int, num_workers: int | None) -> dict[str, Any]:
    from coreg.annotate import run_annotate

    with tempfile.TemporaryDirectory() as tmp:
        config = stage_config(images, model_name, batch_size, num_workers, Path(tmp))
        cpu = cpu_seconds()
        start = time.perf_counter()
        run_annotate(config, Path(tmp) / "annotate", progress=False)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
        summary = json.loads((Path(tmp) / "annotate" / "annotation_summary.json").read_text())
    n = summary["annotated_samples"]
    model = summary["open_clip"]["models"][0]
    return {"images": n, "seconds": seconds, "images_per_second": n / seconds, "cpu_seconds": cpu,
            "loop_images_per_second": model["images_per_second"]}


def memory_child(images: str, batch_size: int, num_workers: int | None) -> None:
    """Runs in a subprocess: annotate with the tiny model, print peak RSS (MiB) as JSON."""
    import open_clip

    from coreg.annotate import run_annotate

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
        open_clip.add_model_config(Path(tmp) / f"{TINY}.json")
        config = stage_config(Path(images), TINY, batch_size, num_workers, Path(tmp))
        start = time.perf_counter()
        run_annotate(config, Path(tmp) / "annotate", progress=False)
        seconds = time.perf_counter() - start
        size = (Path(tmp) / "annotate" / "annotations.parquet").stat().st_size
    own = peak_rss_mib()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": own, "peak_worker_rss_mib": children, "seconds": seconds,
                      "annotations_mib": size / 2**20}))


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a child
    started from a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_run(images: Path, batch_size: int, num_workers: int | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-child", str(images), "--batch-size", str(batch_size)]
    if num_workers is not None:
        cmd += ["--num-workers", str(num_workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--models", nargs="+", default=["ViT-S-32", "ViT-B-32"])
    parser.add_argument("--images", type=int, nargs="+", default=None,
                        help="images per model for the throughput runs (one number per model)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating bare/stage repetitions per model, best kept (default 2; 1 with --quick); "
                             "other jobs on a shared machine make single runs noisy")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=None, help="default: the stage's auto choice")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "annotate_throughput.json")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch_size, args.num_workers)
        return
    counts = args.images or ([128] * len(args.models) if args.quick else [1024, 512][: len(args.models)])
    counts += [counts[-1]] * (len(args.models) - len(counts))
    sizes = args.memory_sizes or ([200, 1000] if args.quick else [1000, 10000])
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                           "torch": torch.__version__},
                               "batch_size": args.batch_size, "throughput": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, count in zip(args.models, counts, strict=True):
            images = Path(tmp) / f"tp-{count}"
            if not images.exists():
                make_images(images, count, 256)
            repeats = args.repeats or (1 if args.quick else 2)
            bares, stages = [], []
            for _ in range(repeats):  # alternate, so a burst of outside load hits both sides alike
                bares.append(bare_loop(images, model_name, args.batch_size))
                stages.append(stage_run(images, model_name, args.batch_size, args.num_workers))
            bare = max(bares, key=lambda r: r["images_per_second"])
            stage = max(stages, key=lambda r: r["images_per_second"])
            bare_cpu = min(r["cpu_seconds"] for r in bares)
            stage_cpu = min(r["cpu_seconds"] for r in stages)
            row = {"model": model_name, "images": count, "bare_images_per_second": bare["images_per_second"],
                   "stage_images_per_second": stage["images_per_second"],
                   "stage_loop_images_per_second": stage["loop_images_per_second"],
                   "ratio": stage["images_per_second"] / bare["images_per_second"],
                   "loop_ratio": stage["loop_images_per_second"] / bare["images_per_second"],
                   "bare_cpu_ms_per_image": 1000 * bare_cpu / count, "stage_cpu_ms_per_image": 1000 * stage_cpu / count,
                   "cpu_ratio": bare_cpu / stage_cpu,
                   "stage_seconds": stage["seconds"], "bare_seconds": bare["seconds"], "repeats": repeats,
                   "all_bare_images_per_second": [r["images_per_second"] for r in bares],
                   "all_stage_images_per_second": [r["images_per_second"] for r in stages],
                   "load_average_after": os.getloadavg()[0]}
            results["throughput"].append(row)
            print(f"{model_name}: bare {row['bare_images_per_second']:.1f} img/s, stage "
                  f"{row['stage_images_per_second']:.1f} img/s (ratio {row['ratio']:.2f})", flush=True)
        for size in sizes:
            images = make_images(Path(tmp) / f"mem-{size}", size, 64, seed=1)
            row = {"images": size, **memory_run(images, args.batch_size, args.num_workers)}
            results["memory"].append(row)
            print(f"memory {size} images: peak RSS {row['peak_rss_mib']:.0f} MiB "
                  f"({row['seconds']:.1f} s)", flush=True)
    mem = results["memory"]
    results["memory_growth"] = mem[-1]["peak_rss_mib"] / mem[0]["peak_rss_mib"] if len(mem) > 1 else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwritten {args.out}")


def table(results: dict[str, Any]) -> str:
    lines = ["| model | images | bare encode_image (img/s) | whole stage (img/s) | stage / bare | "
             "stage image loop (img/s) | loop / bare | CPU ms/img bare | CPU ms/img stage | CPU bare / stage |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["throughput"]:
        lines.append(f"| {r['model']} | {r['images']} | {r['bare_images_per_second']:.1f} | "
                     f"{r['stage_images_per_second']:.1f} | {r['ratio']:.2f} | "
                     f"{r['stage_loop_images_per_second']:.1f} | {r['loop_ratio']:.2f} | "
                     f"{r['bare_cpu_ms_per_image']:.0f} | {r['stage_cpu_ms_per_image']:.0f} | {r['cpu_ratio']:.2f} |")
    lines += ["", "| images (tiny model, 64 px JPEGs) | peak RSS main (MiB) | peak RSS worker (MiB) | seconds | "
              "annotations.parquet (MiB) |", "|---|---|---|---|---|"]
    for r in results["memory"]:
        lines.append(f"| {r['images']} | {r['peak_rss_mib']:.0f} | {r['peak_worker_rss_mib']:.0f} | "
                     f"{r['seconds']:.1f} | {r['annotations_mib']:.1f} |")
    if results.get("memory_growth") is not None:
        lines.append(f"\npeak RSS growth, {results['memory'][0]['images']} -> {results['memory'][-1]['images']} "
                     f"images: x{results['memory_growth']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

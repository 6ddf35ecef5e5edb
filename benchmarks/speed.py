"""Seconds per Co-Reg epoch against its floor: the same forward/backward passes, timed in isolation.

1. Run ``coreg.train.fit`` for a few epochs (warm-up, then Co-Reg epochs with every loss on) and take the
   wall time of the last Co-Reg epoch from ``history.json``.
2. While that epoch runs, record every network call the trainer makes: each forward (batch shape, grad on or
   off, projection head or not, which net), each key-encoder pass and each optimiser step.
3. Replay exactly those calls on random tensors of the same shapes with the same networks: forwards, one
   backward + SGD step per recorded step, nothing else (no augmentation, data loading, GMM, targets,
   MixMatch, queue, prototypes, validation, checkpoint writing).

The ratio epoch / floor is the trainer's overhead over its compute (goal <= 1.3). Writes
``benchmarks/out/speed.json``.

    .venv/bin/python benchmarks/speed.py                       # digits 16 px, small_cnn, CPU: ~1-2 minutes
    .venv/bin/python benchmarks/speed.py --data fake --backbone preact_resnet18 --image-size 32 --n 5000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coreg.annotate.synthetic import synthetic_candidates
from coreg.config import DataConfig, TrainConfig
from coreg.data import load_dataset
from coreg.train import trainer
from coreg.train.network import CoRegNet

OUT = Path(__file__).resolve().parent / "out"


def load_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int]:
    """uint8 (N, C, H, W) images, labels and K: bundled digits, or torchvision FakeData (CIFAR-sized)."""
    if args.data == "digits":
        ds = load_dataset(DataConfig(source="digits", image_size=args.image_size))
        idx = np.arange(min(args.n, len(ds)))
        return ds.load_images(idx, args.image_size, 1), np.asarray(ds.labels)[idx], ds.num_classes
    from torchvision.datasets import FakeData
    fake = FakeData(size=args.n, image_size=(3, args.image_size, args.image_size), num_classes=10,
                    random_offset=0)
    images = np.stack([np.asarray(fake[i][0], dtype=np.uint8).transpose(2, 0, 1) for i in range(args.n)])
    labels = np.array([int(fake[i][1]) for i in range(args.n)])
    return images, labels, 10


class Recorder:
    """Patches CoRegNet.forward / encode_keys and trainer._step to log the calls of one epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.current, self.calls = epoch, -1, []
        self._forward, self._keys, self._step = CoRegNet.forward, CoRegNet.encode_keys, trainer._step
        self._coreg_epoch = trainer._coreg_epoch

    def __enter__(self) -> Recorder:
        rec = self

        def forward(net: CoRegNet, x: torch.Tensor, with_proj: bool = False) -> Any:
            if rec.current == rec.epoch:
                rec.calls.append(("fwd", tuple(x.shape), torch.is_grad_enabled(), with_proj, id(net)))
            return rec._forward(net, x, with_proj)

        def keys(net: CoRegNet, x: torch.Tensor) -> torch.Tensor:
            if rec.current == rec.epoch:
                rec.calls.append(("keys", tuple(x.shape), False, False, id(net)))
            return rec._keys(net, x)

        def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
            if rec.current == rec.epoch:
                rec.calls.append(("step", (), True, False, id(opt)))
            rec._step(opt, loss)

        def coreg_epoch(run: Any, state: Any, epoch: int) -> dict[str, Any]:
            rec.current = epoch
            return rec._coreg_epoch(run, state, epoch)

        CoRegNet.forward, CoRegNet.encode_keys = forward, keys  # type: ignore[method-assign]
        trainer._step, trainer._coreg_epoch = step, coreg_epoch
        return self

    def __exit__(self, *exc: object) -> None:
        CoRegNet.forward, CoRegNet.encode_keys = self._forward, self._keys  # type: ignore[method-assign]
        trainer._step, trainer._coreg_epoch = self._step, self._coreg_epoch


def replay(calls: list[tuple], cfg: TrainConfig, arch: dict[str, Any], device: torch.device) -> float:
    """Seconds to run the recorded calls on random inputs: forwards, and backward + SGD at every step."""
    nets = [CoRegNet(arch["backbone"], arch["in_channels"], arch["image_size"], arch["num_classes"],
                     cfg.proj_hidden, cfg.proj_dim, queue_size=cfg.queue_size).to(device) for _ in range(2)]
    opts = [torch.optim.SGD(n.query_parameters(), lr=1e-4, momentum=cfg.momentum) for n in nets]
    ids = {}
    for kind, _, _, _, ident in calls:  # map the recorded nets/optimisers onto ours in order of appearance
        if kind != "step" and ident not in ids:
            ids[ident] = nets[len([v for v in ids.values() if isinstance(v, CoRegNet)]) % 2]
    steps_seen: dict[int, int] = {}
    shapes = {shape for kind, shape, *_ in calls if kind != "step"}
    inputs = {s: torch.randn(s, device=device) for s in shapes}
    pending: list[torch.Tensor] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for kind, shape, grad, with_proj, ident in calls:
        if kind == "step":
            opt = opts[steps_seen.setdefault(ident, len(steps_seen)) % 2]
            loss = sum(t.float().mean() for t in pending)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            pending = []
            continue
        net = ids[ident]
        if kind == "keys":
            net.encode_keys(inputs[shape])
            continue
        with torch.set_grad_enabled(grad):
            out = net(inputs[shape], with_proj=with_proj)
        if grad:
            pending.extend(out if isinstance(out, tuple) else (out,))
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "fake"], default="digits")
    parser.add_argument("--backbone", choices=["small_cnn", "preact_resnet18"], default="small_cnn")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--n", type=int, default=1797, help="images (digits has 1,797)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--coreg-epochs", type=int, default=2, help="Co-Reg epochs after warm-up (last is timed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", default=str(OUT / "speed.json"))
    args = parser.parse_args()

    images, labels, k = load_images(args)
    cand = synthetic_candidates(labels, k, 0.3, 0.2, seed=0).matrix.astype(np.float32)
    n_val = len(images) // 10
    epochs = args.warmup_epochs + args.coreg_epochs
    cfg = TrainConfig(backbone=args.backbone, epochs=epochs, warmup_epochs=args.warmup_epochs, rampup_epochs=1,
                      reg_start_offset=0, batch_size=args.batch_size, warmup_batch_size=2 * args.batch_size,
                      queue_size=1024, device=args.device, num_workers=args.num_workers, seed=0)
    device = trainer.resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp, Recorder(epochs - 1) as rec:
        result = trainer.fit(images[n_val:], cand[n_val:], cfg, Path(tmp), horizontal_flip=args.data != "digits",
                             val_images=images[:n_val], val_candidates=cand[:n_val], progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    epoch_s = float(result.history[-1]["seconds"])
    arch = {"backbone": args.backbone, "in_channels": images.shape[1], "image_size": images.shape[2],
            "num_classes": k}
    replay(rec.calls, cfg, arch, device)  # warm the allocator / kernels once
    floor_s = replay(rec.calls, cfg, arch, device)
    n_fit = len(images) - n_val
    passes = sum(1 for c in rec.calls if c[0] == "fwd")
    report = {
        "device": str(device), "backbone": args.backbone, "data": args.data, "image_size": args.image_size,
        "fit_images": n_fit, "batch_size": args.batch_size, "coreg_epoch_seconds": round(epoch_s, 3),
        "floor_seconds": round(floor_s, 3), "ratio": round(epoch_s / floor_s, 3),
        "images_per_second": round(n_fit / epoch_s, 1), "forward_calls": passes,
        "optimizer_steps": sum(1 for c in rec.calls if c[0] == "step"),
        "peak_gpu_memory_gib": None if peak is None else round(peak, 2), "torch_threads": torch.get_num_threads(),
    }
    for key, value in report.items():
        print(f"{key:22s} {value}")
    print(f"ratio epoch / floor = {report['ratio']:.2f} (goal <= 1.3)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The Co-Reg networks: two (backbone + classifier + projection head) nets and shared prototypes.

Each training net also owns a momentum key encoder and a queue of past keys for the
contrastive loss. The queue has an explicit ``queue_valid`` mask: slots are empty until a
key is written, instead of starting as random noise that acts as fake negatives.
Inference models are built with ``with_momentum=False`` and carry neither.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coreg.train.backbones import build_backbone

QUERY_PREFIXES = ("backbone.", "classifier.", "head.")


class CoRegNet(nn.Module):
    """One network of the pair: features -> logits, and features -> L2-normalised embedding."""

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        image_size: int,
        num_classes: int,
        proj_hidden: int,
        proj_dim: int,
        queue_size: int = 0,
        with_momentum: bool = True,
    ) -> None:
        super().__init__()
        self.backbone, feature_dim = build_backbone(backbone, in_channels, image_size)
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.head = nn.Sequential(nn.Linear(feature_dim, proj_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(proj_hidden, proj_dim))
        self.with_momentum = with_momentum
        if with_momentum:
            self.key_backbone = copy.deepcopy(self.backbone)
            self.key_head = copy.deepcopy(self.head)
            for p in [*self.key_backbone.parameters(), *self.key_head.parameters()]:
                p.requires_grad_(False)
            self.register_buffer("queue_feats", torch.zeros(queue_size, proj_dim))
            self.register_buffer("queue_targets", torch.zeros(queue_size, num_classes))
            self.register_buffer("queue_clean", torch.zeros(queue_size, dtype=torch.bool))
            self.register_buffer("queue_valid", torch.zeros(queue_size, dtype=torch.bool))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, with_proj: bool = False) -> Any:
        """Logits, or ``(logits, embedding)`` when ``with_proj`` (one backbone pass for both)."""
        feats = self.backbone(x)
        logits = self.classifier(feats)
        if not with_proj:
            return logits
        return logits, F.normalize(self.head(feats), dim=1)

    def query_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters (the key encoder is updated by momentum, not by the optimiser)."""
        return [*self.backbone.parameters(), *self.classifier.parameters(), *self.head.parameters()]

    def query_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights inference needs: backbone, classifier and projection head."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(QUERY_PREFIXES)}

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of the momentum key encoder (no gradient)."""
        return F.normalize(self.key_head(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def reset_key_encoder(self) -> None:
        """Copy the query encoder into the key encoder (done at the start of every epoch)."""
        self.key_backbone.load_state_dict(self.backbone.state_dict())
        self.key_head.load_state_dict(self.head.state_dict())

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """key = m * key + (1 - m) * query, for parameters (BN buffers keep their own batch stats)."""
        pairs = zip([*self.key_backbone.parameters(), *self.key_head.parameters()],
                    [*self.backbone.parameters(), *self.head.parameters()], strict=True)
        for key_p, query_p in pairs:
            key_p.mul_(momentum).add_(query_p.detach(), alpha=1 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor) -> None:
        """Write a batch of keys (with soft targets and clean flags) into the ring buffer."""
        size = self.queue_feats.shape[0]
        if keys.shape[0] > size:  # only the newest keys fit
            keys, targets, clean = keys[-size:], targets[-size:], clean[-size:]
        n = keys.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue_feats[slots] = keys
        self.queue_targets[slots] = targets
        self.queue_clean[slots] = clean.bool()
        self.queue_valid[slots] = True
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


class CoRegEnsemble(nn.Module):
    """The pair f1, f2 with the shared class prototypes; ``forward`` is the test-time prediction.

    ``mean``/``std`` (shape (1, C, 1, 1)) are the training images' per-channel statistics on a
    0-1 scale; :meth:`normalize` applies them to uint8 batches.
    """

    def __init__(self, arch: dict[str, Any], queue_size: int = 0, with_momentum: bool = False) -> None:
        super().__init__()
        self.arch = dict(arch)
        kwargs = {
            "backbone": arch["backbone"], "in_channels": arch["in_channels"], "image_size": arch["image_size"],
            "num_classes": arch["num_classes"], "proj_hidden": arch["proj_hidden"], "proj_dim": arch["proj_dim"],
            "queue_size": queue_size, "with_momentum": with_momentum,
        }
        self.net1 = CoRegNet(**kwargs)
        self.net2 = CoRegNet(**kwargs)
        self.register_buffer("prototypes", torch.zeros(arch["num_classes"], arch["proj_dim"]))
        self.register_buffer("mean", torch.zeros(1, arch["in_channels"], 1, 1))
        self.register_buffer("std", torch.ones(1, arch["in_channels"], 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``logits_f1 + logits_f2`` of a normalised float batch."""
        return self.net1(x) + self.net2(x)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float, scaled to 0-1 and standardised with the training statistics."""
        return (images.to(self.mean.device, torch.float32) / 255.0 - self.mean) / self.std

"""Batched data augmentation on uint8 image tensors: no per-image Python.

Random parameters (crop offsets, flips, cutout centres, resized-crop boxes) are drawn for a
whole batch from an explicit ``torch.Generator`` on the CPU, then applied with tensor ops
on the batch's device. Drawing them for the *global* batch and slicing per rank makes a
distributed run see exactly the augmentation a single process would.

Pipelines:
  * CIFAR style: pad ``crop_padding`` (zeros = black, or reflect) + random crop back to
    the input size, horizontal flip, per-channel normalisation, optional cutout (a square
    of side ``cutout`` set to 0 after normalisation, i.e. to the mean colour; DeVries &
    Taylor 2017 clip the square at the border, as here).
  * ImageNet style: random-resized crop (scale, aspect ratio; torchvision's sampling rule,
    10 tries then the centre crop) via one ``grid_sample`` call, flip, normalisation.
  * Batch mixing (opt-in, applied by the training loop after the transform): mixup and CutMix
    (:class:`MixSpec`, :func:`sample_mix`, :func:`apply_mix`, :func:`mix_targets`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    """What the training augmentation does (all off = normalisation only)."""

    crop_padding: int = 4
    pad_mode: str = "zeros"
    flip: bool = True
    cutout: int = 0
    random_resized_crop: bool = False
    output_size: int = 0
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {self.pad_mode!r}")
        if self.cutout < 0:
            raise ValueError(f"cutout must be >= 0 (0 disables it), got {self.cutout}")
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"rrc_scale must satisfy 0 < min <= max <= 1, got {self.rrc_scale}")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"rrc_ratio must satisfy 0 < min <= max, got {self.rrc_ratio}")
        if self.random_resized_crop and self.output_size < 1:
            raise ValueError("random_resized_crop needs output_size >= 1")


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 255] float (N, C, H, W) -> float32 normalised per channel."""
    x = x.to(torch.float32, copy=True)
    return x.sub_(mean.view(1, -1, 1, 1) * 255.0).mul_(1.0 / (std.view(1, -1, 1, 1) * 255.0))


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size`` x ``size`` crop of (N, C, H, W); identity when size is 0 or the full size."""
    h, w = x.shape[-2:]
    if size <= 0 or (size == h and size == w):
        return x
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def pad_crop(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """Pad by ``pad`` and crop back to the input size at per-image offsets (oy, ox) in [0, 2*pad]."""
    n, c, h, w = x.shape
    if mode == "reflect" and x.dtype == torch.uint8:
        x = x.to(torch.float32)  # reflect padding is not implemented for uint8
    xp = F.pad(x, (pad, pad, pad, pad), mode="constant" if mode == "zeros" else "reflect")
    rows = (oy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    xp = torch.gather(xp, 2, rows)
    cols = (ox.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return torch.gather(xp, 3, cols)


def cutout_(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size`` square centred at (cy, cx) in each image, clipped at the border (in place)."""
    n, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    y0 = (cy - size // 2).view(n, 1, 1)
    x0 = (cx - size // 2).view(n, 1, 1)
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return x.masked_fill_(inside.unsqueeze(1), 0.0)


def sample_rrc_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                     generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes (n, 4) as (top, left, h, w) floats, torchvision's rule:
    area fraction ~ U(scale), log aspect ~ U(log ratio); the first of ``tries`` candidates
    that fits, else the largest centred crop with the aspect ratio clamped to ``ratio``."""
    area = height * width
    s = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator) * area
    logr = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    w = torch.sqrt(s * r).round()
    h = torch.sqrt(s / r).round()
    ok = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    u = torch.rand(n, tries, 2, generator=generator)
    first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full((n,), -1))
    boxes = torch.empty(n, 4)
    # Fallback: centre crop of the whole image with the aspect ratio clamped.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = float(height), round(height * ratio[1])
    else:
        fw, fh = float(width), float(height)
    boxes[:] = torch.tensor([(height - fh) / 2, (width - fw) / 2, fh, fw])
    has = first >= 0
    idx = first.clamp_min(0)
    ar = torch.arange(n)
    hh, ww = h[ar, idx], w[ar, idx]
    top = torch.floor(u[ar, idx, 0] * (height - hh + 1))
    left = torch.floor(u[ar, idx, 1] * (width - ww + 1))
    boxes[has] = torch.stack([top, left, hh, ww], 1)[has]
    return boxes


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box (top, left, h, w) and resize to ``size`` (bilinear), one
    ``grid_sample`` for the batch; ``flip`` (bool, n) mirrors horizontally in the same pass."""
    n, _, H, W = x.shape
    boxes = boxes.to(device=x.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(1)
    cx = (left + w / 2) / W * 2 - 1
    cy = (top + h / 2) / H * 2 - 1
    sx, sy = w / W, h / H
    if flip is not None:
        sx = torch.where(flip.to(x.device), -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchAugment:
    """Training transform: uint8 batch + parameters -> normalised float32 batch.

    ``sample(n, generator)`` draws the random parameters of a batch (on the CPU);
    ``apply(x, params)`` applies them. Keeping the two apart lets the loader draw
    parameters for the global batch and give each rank its slice.
    """

    def __init__(self, spec: AugmentSpec, mean: tuple[float, ...], std: tuple[float, ...], image_size: int):
        self.spec = spec
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.image_size = image_size  # side of the stored images
        self.out_size = spec.output_size if spec.random_resized_crop else image_size

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random parameters for ``n`` images (a dict of CPU tensors with leading dim n)."""
        sp, p = self.spec, {}
        if sp.random_resized_crop:
            p["boxes"] = sample_rrc_boxes(n, self.image_size, self.image_size, sp.rrc_scale, sp.rrc_ratio, generator)
        elif sp.crop_padding:
            p["offsets"] = torch.randint(0, 2 * sp.crop_padding + 1, (n, 2), generator=generator)
        if sp.flip:
            p["flip"] = torch.rand(n, generator=generator) < 0.5
        if sp.cutout:
            p["cutout"] = torch.stack([torch.randint(0, self.out_size, (n,), generator=generator),
                                       torch.randint(0, self.out_size, (n,), generator=generator)], 1)
        return p

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment a uint8 batch (N, C, H, W) with ``params`` from :meth:`sample`."""
        sp, dev = self.spec, x.device
        params = {k: v.to(dev) for k, v in params.items()}
        flip = params.get("flip")
        if "boxes" in params:
            x = resized_crop(x, params["boxes"], self.out_size, flip)
            flip = None
        elif "offsets" in params:
            x = pad_crop(x, params["offsets"][:, 0], params["offsets"][:, 1], sp.crop_padding, sp.pad_mode)
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = normalize(x, self.mean.to(dev), self.std.to(dev))
        if "cutout" in params:
            cutout_(x, params["cutout"][:, 0], params["cutout"][:, 1], sp.cutout)
        return x


class EvalTransform:
    """Evaluation transform: centre crop (image folders) and normalisation."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop: int = 0):
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.crop = crop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = center_crop(x, self.crop)
        return normalize(x, self.mean.to(x.device), self.std.to(x.device))


# ---- mixup and cutmix (batch level, on the normalised float batch) -----------------------------------
#: ``derive_seed(seed, MIX_SEED_TAG, epoch, step)`` seeds a step's mixing draw (the loader uses tags 1, 2).
MIX_SEED_TAG = 3
MIX_KINDS = ("none", "mixup", "cutmix")


@dataclass(frozen=True)
class MixSpec:
    """Mixup (Zhang et al. 2018, arXiv 1710.09412) and CutMix (Yun et al. 2019, arXiv 1905.04899).

    ``mixup_alpha`` / ``cutmix_alpha``: the Beta(alpha, alpha) parameter of each (0 disables it).
    ``prob``: probability that a batch is mixed at all. ``switch_prob``: with both enabled, the
    probability that a mixed batch uses CutMix rather than mixup. One ``lam`` per batch and image i
    paired with image n-1-i of the same batch (timm's default "batch" mode; the papers pair with a
    random permutation, which for a shuffled batch is the same in distribution).
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        for k in ("mixup_alpha", "cutmix_alpha"):
            v = getattr(self, k)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{k} must be >= 0 (0 disables it), got {v}")
        for k in ("prob", "switch_prob"):
            v = getattr(self, k)
            if not 0 <= v <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {v}")

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclass(frozen=True)
class MixParams:
    """One batch's draw: ``kind`` (none / mixup / cutmix), the weight ``lam`` of each image's own
    label, and for CutMix the pasted box ``(top, left, height, width)`` in pixels."""

    kind: str = "none"
    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (Yun et al. 2019, section 3.1): side ratio sqrt(1 - lam), centre uniform over the
    image, clipped at the border; returns ``(top, left, h, w)`` (h or w may be 0)."""
    rat = math.sqrt(1.0 - lam)
    ch, cw = int(height * rat), int(width * rat)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y0, x0, y1 - y0, x1 - x0


def sample_mix(spec: MixSpec, height: int, width: int, rng: np.random.Generator) -> MixParams:
    """Draw one batch's mixing from ``rng`` (a ``numpy.random.Generator``).

    For CutMix, ``lam`` is recomputed from the clipped box, ``1 - box area / image area``, so the
    label weights equal the pixel fractions (as the CutMix reference code does)."""
    if not spec.enabled or rng.random() >= spec.prob:
        return MixParams()
    use_cutmix = spec.cutmix_alpha > 0 and (spec.mixup_alpha == 0 or rng.random() < spec.switch_prob)
    if use_cutmix:
        lam = float(rng.beta(spec.cutmix_alpha, spec.cutmix_alpha))
        box = cutmix_box(lam, height, width, rng)
        return MixParams("cutmix", 1.0 - box[2] * box[3] / (height * width), box)
    return MixParams("mixup", float(rng.beta(spec.mixup_alpha, spec.mixup_alpha)))


def apply_mix(x: torch.Tensor, params: MixParams) -> torch.Tensor:
    """Mix a float batch (N, C, H, W) with its reverse ``x.flip(0)``: mixup blends every pixel,
    CutMix pastes the partner's box. ``kind == "none"`` returns ``x`` itself."""
    if params.kind == "none":
        return x
    partner = x.flip(0)
    if params.kind == "mixup":
        return partner.lerp(x, params.lam)  # lam * x + (1 - lam) * partner
    if params.kind == "cutmix":
        assert params.box is not None
        top, left, h, w = params.box
        out = x.clone()
        out[:, :, top:top + h, left:left + w] = partner[:, :, top:top + h, left:left + w]
        return out
    raise ValueError(f"mix kind must be one of {MIX_KINDS}, got {params.kind!r}")


def mix_targets(y: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets (N, num_classes) of a mixed batch: ``lam * t(y) + (1 - lam) * t(y.flip(0))`` with
    ``t`` the label-smoothed one-hot ``(1 - smoothing) * onehot + smoothing / num_classes`` (Szegedy
    et al. 2016, as ``torch.nn.CrossEntropyLoss(label_smoothing=...)``). Each row sums to 1;
    ``lam = 1`` gives the smoothed one-hot of ``y`` alone."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    off = smoothing / num_classes
    onehot = F.one_hot(y, num_classes).to(torch.float32)
    t = onehot * (1.0 - smoothing) + off
    return t.flip(0).lerp(t, lam) if lam < 1 else t

"""A small U-Net for lung masks, its ignore-aware losses and Dice/IoU, and mask prediction for an image.

The network (Ronneberger et al. 2015, reduced): ``depth`` down-sampling stages of two 3x3
conv-BatchNorm-ReLU layers with ``base_channels * 2**k`` channels, a bottleneck, and mirrored
up-sampling stages (transposed 2x2 convolution, skip concatenation, two convolutions). The output
is one channel of **logits** ``(B, 1, H, W)``; ``sigmoid(logits) > 0.5`` is the lung mask. Any input
size works: inputs are padded to a multiple of ``2**depth`` and the output is cropped back.

Target masks carry three values: 1 = lung, 0 = background, and *ignore* (value 127 in the V7 lung
masks: a device or markup over the lung). Ignored pixels are left out of the loss and of Dice/IoU
through a ``valid`` mask of the same shape.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as _PILImage
from torch import nn

from cxrbench.io import ImageReadError, read_image
from cxrbench.preprocess import Preprocess

__all__ = ["IGNORE_CODE", "IGNORE_VALUE", "UNet", "dice_iou", "mask_to_target", "masked_bce_loss", "predict_lung_mask",
           "read_mask_pair", "soft_dice_loss"]

#: Mask value that marks pixels to leave out of the loss and the scores (V7 "Ignore").
IGNORE_VALUE = 127
#: Label code of ignored pixels in (S, S) uint8 code maps: 0 background, 1 lung, 2 ignore.
IGNORE_CODE = 2


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net returning ``(B, 1, H, W)`` lung logits for a ``(B, in_channels, H, W)`` float input.

    Parameters
    ----------
    in_channels : input channels (1 for grey X-rays).
    base_channels : channels of the first stage; stage k has ``base_channels * 2**k``.
    depth : number of down-sampling stages (the bottleneck runs at ``H / 2**depth``).

    With the defaults (16, 4) the model has 1.9 M parameters and trains on a CPU at 128 px.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_channels, self.base_channels, self.depth = in_channels, base_channels, depth
        widths = [base_channels * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])])
        self.down.extend(_double_conv(widths[k - 1], widths[k]) for k in range(1, depth + 1))
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[k + 1], widths[k], 2, stride=2)
                                      for k in reversed(range(depth)))
        self.up = nn.ModuleList(_double_conv(2 * widths[k], widths[k]) for k in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` lung logits of a ``(B, C, H, W)`` batch of any size (padded to ``2**depth``)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for upsample, block in zip(self.upsample, self.up):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)[..., :h, :w]


# --------------------------------------------------------------------------------------------------
# losses and scores with ignored pixels


def _check_pair(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if valid is None:
        return torch.ones_like(target, dtype=logits.dtype)
    if valid.shape != target.shape:
        raise ValueError(f"valid {tuple(valid.shape)} and target {tuple(target.shape)} differ in shape")
    return valid.to(logits.dtype)


def masked_bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy over the valid pixels.

    Parameters
    ----------
    logits : (B, 1, H, W) float, pre-sigmoid.
    target : (B, 1, H, W) float in {0, 1}.
    valid : (B, 1, H, W) bool or {0, 1}; 0 marks ignored pixels (mask value 127). None: all valid.

    Returns
    -------
    Scalar tensor; 0 when no pixel is valid.
    """
    weight = _check_pair(logits, target, valid)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return (per_pixel * weight).sum() / weight.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                   eps: float = 1.0) -> torch.Tensor:
    """``1 - soft Dice`` of ``sigmoid(logits)`` over the valid pixels, averaged over the batch.

    Shapes as :func:`masked_bce_loss`; ``eps`` smooths images with an empty target.
    """
    weight = _check_pair(logits, target, valid)
    prob = torch.sigmoid(logits) * weight
    target = target.to(logits.dtype) * weight
    dims = tuple(range(1, logits.ndim))
    dice = (2 * (prob * target).sum(dims) + eps) / (prob.sum(dims) + target.sum(dims) + eps)
    return 1.0 - dice.mean()


def dice_iou(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
             valid: np.ndarray | torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU of binary masks per image, counting only valid pixels.

    Parameters
    ----------
    pred, target : (H, W) or (B, ..., H, W) bool or {0, 1}.
    valid : same shape, bool; False marks ignored pixels. None: all valid.

    Returns
    -------
    (dice, iou) : float64 arrays of shape (B,) (shape () for one (H, W) mask). Both are 1 when
    prediction and target are empty on the valid pixels.
    """
    pred, target = (np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) > 0.5 for a in (pred, target))
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    if valid is None:
        valid = np.ones_like(target)
    valid = np.asarray(valid.detach().cpu() if isinstance(valid, torch.Tensor) else valid).astype(bool)
    if valid.shape != target.shape:
        raise ValueError(f"valid {valid.shape} and target {target.shape} differ in shape")
    axes = tuple(range(1, pred.ndim)) if pred.ndim > 2 else (0, 1)
    inter = (pred & target & valid).sum(axis=axes).astype(np.float64)
    p, t = (pred & valid).sum(axis=axes).astype(np.float64), (target & valid).sum(axis=axes).astype(np.float64)
    union = p + t - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(p + t > 0, 2 * inter / np.where(p + t > 0, p + t, 1), 1.0)
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)
    return dice, iou


# --------------------------------------------------------------------------------------------------
# the mask format: 255 lung, 0 background, 127 ignore


def mask_to_target(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a 0/127/255 mask into ``(target, valid)``, both (H, W) bool.

    Values >= 192 are lung, 64..191 (the 127 "ignore" label) are not valid, below 64 background.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    return mask >= 192, (mask < 64) | (mask >= 192)


def _read_mask(path: str | os.PathLike) -> np.ndarray:
    try:
        with _PILImage.open(path) as pil:
            return np.asarray(pil.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ImageReadError(str(path), f"cannot read mask ({exc})") from None


def read_mask_pair(path: str | os.PathLike, mask_path: str | os.PathLike,
                   preprocess: Preprocess | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one image and its mask onto one grid.

    Parameters
    ----------
    path, mask_path : the image and its 0/127/255 mask (same pixel size).
    preprocess : crop + resize for both (the mask resized nearest-neighbour); None keeps the square
        crop at source resolution (the displayed crop).

    Returns
    -------
    image : (S, S) float32 in [0, 1].
    codes : (S, S) uint8, 0 background, 1 lung, 2 ignore.

    Raises
    ------
    ImageReadError
        Unreadable image or mask, or a mask whose size differs from the image's.
    """
    pixels = read_image(path).pixels
    mask = _read_mask(mask_path)
    if mask.shape != pixels.shape:
        raise ImageReadError(str(mask_path), f"mask {mask.shape} and image {pixels.shape} differ in size")
    pp = preprocess or Preprocess(size=min(pixels.shape))
    image = pp.geometry(pixels)
    small = pp.replace(resample="nearest").geometry(mask.astype(np.float32) / 255.0)
    target, valid = mask_to_target(np.round(small * 255.0))
    return image, np.where(valid, target.astype(np.uint8), IGNORE_CODE).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# inference


@torch.no_grad()
def predict_lung_mask(model: nn.Module, preprocess: Preprocess, display: np.ndarray, *,
                      threshold: float = 0.5, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Lung mask of a displayed crop: the one segmentation step (the pipeline's report, ``cxrbench segment``,
    U-Net evaluation and the notebooks all call it).

    Parameters
    ----------
    model : a U-Net returning (B, 1, h, w) logits.
    preprocess : the U-Net bundle's :class:`~cxrbench.preprocess.Preprocess`.
    display : (S, S) float32 in [0, 1], the square crop shown to the user (any size).
    threshold : probability above which a pixel is lung.

    Returns
    -------
    (mask, probability) : (S, S) bool and (S, S) float32 in [0, 1] on the grid of ``display``
    (the model's output is resized bilinearly).
    """
    display = np.asarray(display, dtype=np.float32)
    if display.ndim != 2:
        raise ValueError(f"display must be a (S, S) grey image, got shape {display.shape}")
    x = torch.from_numpy(preprocess.intensity(preprocess.geometry(display)))[None].to(device)
    logit_prob = torch.sigmoid(model.to(device).eval()(x).float())
    prob = F.interpolate(logit_prob, size=display.shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    return prob > threshold, prob.astype(np.float32)

"""Latent Shift counterfactuals (Cohen et al. 2021, arXiv:2102.09475): what would have to change for a finding to go.

An autoencoder at the classifier's input resolution encodes the image, ``z = E(x)``; the gradient of the
finding's probability through the decoder, ``g = d sigmoid(f(D(z)))[t] / dz``, says how to move the latent code
to raise it. Decoding ``D(z + lambda * g)`` for negative ``lambda`` gives images in which the finding fades
(the autoencoder keeps them close to the images it was trained on, so the change is not adversarial noise).
The search for ``lambda`` and the difference map follow captum's ``LatentShift`` (captum's pull request;
captum 0.9.0, the installed release, does not ship it): step to more negative ``lambda`` until the probability
has fallen by ``pred_diff``, falls below 0.05, stops falling, the image has changed by more than
``max_pixel_change`` of its sum, or ``|lambda|`` reaches ``max_shift``; then sweep ``n_frames`` values from 0 to
that bound. Here the direction is the unit gradient scaled by the code's norm, so ``lambda = -0.5`` moves the
code by half its length whatever the autoencoder's scale.

The classifier and the autoencoder each take the image on their own scale (an imported torchxrayvision
classifier [-1024, 1024], cxrbench's autoencoder [0, 1]): both are read from their :class:`Preprocess` (the
two bundles' cards), the image goes classifier input -> grey [0, 1] -> autoencoder input, and every decoded
frame back the same way, so the probabilities along the sweep are the classifier's on its own scale.
:func:`check_scales` refuses two preprocessings between which no conversion exists (another crop, resampling or
equalisation: the equalised image cannot be undone), naming both models.

The map of the explainer is the difference ``|D(z) - D(z + lambda* g)|`` between the reconstruction and the
last frame (captum's ``"mm"``; ``heatmap="int"``, ``"mean"``, ``"max"`` give its other choices): the pixels that
change where the prediction has fallen. :meth:`LatentShift.counterfactual` returns the frames and the
probability along the sweep as a :class:`Counterfactual`. On known lesions it is measured by
:func:`cxrbench.explain.metrics.latent_shift_comparison`.

>>> ls = get_explainer("latent_shift", classifier, autoencoder=ae, preprocess=bundle.preprocess)  # doctest: +SKIP
>>> cf = ls.counterfactual(x, target=4)          # frames, lambdas, probabilities, difference  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from cxrbench.explain.base import Explainer, Targets, prepared_model, target_matrix
from cxrbench.preprocess import Preprocess

__all__ = ["HEATMAPS", "Counterfactual", "LatentShift", "NoAutoencoderError", "ScaleMismatchError", "check_scales"]

HEATMAPS: tuple[str, ...] = ("mm", "int", "mean", "max")
Heatmap = Literal["mm", "int", "mean", "max"]


class NoAutoencoderError(ValueError):
    """Latent Shift was asked for without an autoencoder at the classifier's resolution."""


NO_AUTOENCODER = ("latent_shift needs an autoencoder at the classifier's input resolution (a bundle of kind "
                  "'autoencoder': cxrbench train autoencoder --like CLASSIFIER_BUNDLE --data DATA --out RUN); "
                  "none was given")


class ScaleMismatchError(ValueError):
    """The autoencoder's input cannot be converted to the classifier's (or back): :func:`check_scales`."""


#: the settings two inputs must share for one to be converted into the other (only the normalisation may differ)
SHARED_SETTINGS: tuple[str, ...] = ("size", "crop", "resample", "equalize", "clahe_clip")


def check_scales(classifier: Preprocess, autoencoder: Preprocess, *, classifier_name: str = "the classifier",
                 autoencoder_name: str = "the autoencoder") -> None:
    """Raise :class:`ScaleMismatchError`, naming both models, unless the autoencoder's input converts to the
    classifier's: the same pixels (:data:`SHARED_SETTINGS`) on a normalisation of their own, one grey channel for
    the autoencoder. Both normalisations are affine maps of the [0, 1] grey image, so those always convert."""
    differ = [k for k in SHARED_SETTINGS if getattr(autoencoder, k) != getattr(classifier, k)]
    if autoencoder.channels != 1:
        differ.append(f"channels ({autoencoder.channels}: an autoencoder of one grey channel is needed)")
    if differ:
        detail = ", ".join(d if "(" in d else f"{d} ({getattr(autoencoder, d)} vs {getattr(classifier, d)})"
                           for d in differ)
        raise ScaleMismatchError(
            f"{autoencoder_name} (autoencoder) and {classifier_name} (classifier): the autoencoder's input cannot be "
            f"converted to the classifier's, it differs in {detail}; train one with cxrbench train autoencoder "
            f"--like {classifier_name}")


@dataclass
class Counterfactual:
    """The Latent Shift of one image for one finding.

    ``frames``: ``(T, H, W)`` float32 in [0, 1] (the grey image both models' inputs are normalised from: the
    displayed crop), ``frames[0]`` the reconstruction (``lambda = 0``), ``frames[-1]`` the counterfactual;
    ``lambdas`` ``(T,)`` from 0 to the bound found; ``probabilities`` ``(T,)`` the classifier's sigmoid of the
    target logit for each frame (normalised as the classifier's card says); ``difference`` ``(H, W)`` float32
    (see the module doc); ``input_probability`` that of the image itself; ``reconstruction_error`` the mean
    ``|x - D(E(x))|``; ``stop`` why the search stopped.
    """

    target: int
    frames: np.ndarray
    lambdas: np.ndarray
    probabilities: np.ndarray
    difference: np.ndarray
    input_probability: float
    reconstruction_error: float
    stop: str

    @property
    def probability_drop(self) -> float:
        """First frame's probability minus the last's (> 0: removing the change lowers the finding)."""
        return float(self.probabilities[0] - self.probabilities[-1])


def _check_autoencoder(autoencoder: Any) -> nn.Module:
    if autoencoder is None:
        raise NoAutoencoderError(NO_AUTOENCODER)
    if not isinstance(autoencoder, nn.Module) or not all(callable(getattr(autoencoder, m, None))
                                                         for m in ("encode", "decode")):
        raise TypeError(f"autoencoder must be an nn.Module with encode and decode, got {type(autoencoder).__name__}")
    return autoencoder


class LatentShift(Explainer):
    """Counterfactual maps from an autoencoder's latent space (see the module doc).

    Parameters
    ----------
    model : classifier returning (B, N) logits.
    autoencoder : ``encode((B, 1, S, S)) -> (B, Z)``, ``decode -> (B, 1, S, S)`` at the classifier's input side S
        (:class:`~cxrbench.models.autoencoder.ConvAutoencoder` with ``image_size=S``). Required.
    preprocess : the classifier's :class:`~cxrbench.preprocess.Preprocess` (its card's): how its input maps to
        and from the [0, 1] grey image (default: the input already is that image).
    autoencoder_preprocess : the autoencoder's (its card's): how that grey image maps to and from the
        autoencoder's input and output (default: [0, 1], one channel, the pixels of ``preprocess``: what
        ``cxrbench train autoencoder --like`` records). Checked against ``preprocess`` by :func:`check_scales`.
    n_frames : frames of the sweep (>= 2). pred_diff, max_shift, step, max_pixel_change: the search (module doc).
    heatmap : ``"mm"`` (default), ``"int"``, ``"mean"`` or ``"max"``.
    keep_residual : add the reconstruction's residual ``x - D(E(x))`` to every frame (not in the paper or
        captum): the first frame is then the image itself, and a finding the autoencoder blurs away (a small
        lesion) can still be shifted. Default False (captum's frames).
    normalize, sigma, relu : post-processing, as for every explainer.
    """

    name: ClassVar[str] = "latent_shift"

    def __init__(self, model: nn.Module, *, autoencoder: nn.Module | None = None, preprocess: Preprocess | None = None,
                 autoencoder_preprocess: Preprocess | None = None, n_frames: int = 6, pred_diff: float = 0.8,
                 max_shift: float = 2.0, step: float = 0.05, max_pixel_change: float = 0.1, heatmap: Heatmap = "mm",
                 keep_residual: bool = False, **options: Any) -> None:
        super().__init__(model, **options)
        self.autoencoder: Any = _check_autoencoder(autoencoder)  # encode / decode, checked
        if heatmap not in HEATMAPS:
            raise ValueError(f"heatmap must be one of {HEATMAPS}, got {heatmap!r}")
        if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 2:
            raise ValueError(f"n_frames must be an integer >= 2, got {n_frames!r}")
        for key, value in (("pred_diff", pred_diff), ("max_shift", max_shift), ("step", step),
                           ("max_pixel_change", max_pixel_change)):
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        pp = preprocess or Preprocess(size=int(getattr(self.autoencoder, "image_size", 64)), normalize="zero_one")
        ae_pp = autoencoder_preprocess or pp.replace(normalize="zero_one", channels=1)
        check_scales(pp, ae_pp)
        self.channels = pp.channels
        self._mean, self._std = (torch.as_tensor(v).view(1, -1, 1, 1) for v in pp.stats())
        self._ae_mean, self._ae_std = (float(v[0]) for v in ae_pp.stats())
        self.n_frames, self.pred_diff, self.max_shift, self.step = n_frames, pred_diff, max_shift, step
        self.max_pixel_change, self.heatmap, self.keep_residual = max_pixel_change, heatmap, bool(keep_residual)
        #: the :class:`Counterfactual` of every image and target of the last call, in batch then target order
        self.counterfactuals: list[Counterfactual] = []

    # ------------------------------------------------------------------ the two spaces
    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier input ``(B, C, S, S)`` -> the autoencoder's ``(B, 1, S, S)`` in [0, 1]."""
        return (x[:, :1] * self._std[:, :1].to(x) + self._mean[:, :1].to(x)).clamp(0.0, 1.0)

    def to_model(self, unit: torch.Tensor) -> torch.Tensor:
        """The autoencoder's ``(B, 1, S, S)`` [0, 1] -> classifier input ``(B, C, S, S)``."""
        return (unit.expand(-1, self.channels, -1, -1) - self._mean.to(unit)) / self._std.to(unit)

    def _encode(self, unit: torch.Tensor) -> torch.Tensor:
        """The grey image [0, 1] -> the autoencoder's input (its card's normalisation) -> its latent code."""
        return self.autoencoder.encode((unit - self._ae_mean) / self._ae_std)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """A latent code -> the autoencoder's output (its card's normalisation) -> the grey image [0, 1]."""
        return (self.autoencoder.decode(z) * self._ae_std + self._ae_mean).clamp(0.0, 1.0)

    def _probability(self, unit: torch.Tensor, target: int) -> torch.Tensor:
        return torch.sigmoid(self.model(self.to_model(unit))[:, target])

    # ------------------------------------------------------------------ one image
    def counterfactual(self, x: torch.Tensor, target: int) -> Counterfactual:
        """The Latent Shift of the image ``x`` ``(1, C, S, S)`` (classifier input) for output ``target``."""
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"counterfactual takes one image (1, C, S, S), got {tuple(x.shape)}")
        target_matrix([int(target)], 1, self._num_outputs(x))  # range check with the usual message
        self._check_side(x)
        with prepared_model(self.model), prepared_model(self.autoencoder), torch.enable_grad():
            return self._counterfactual(x.detach(), int(target))

    def _check_side(self, x: torch.Tensor) -> None:
        side = getattr(self.autoencoder, "image_size", x.shape[-1])
        if tuple(x.shape[-2:]) != (side, side):
            raise ValueError(f"the autoencoder works at {side} px but the classifier input is "
                             f"{tuple(x.shape[-2:])}: train one at the classifier's resolution (--like its bundle)")

    def _num_outputs(self, x: torch.Tensor) -> int:
        with torch.no_grad(), prepared_model(self.model):
            return int(self.model(x[:1]).shape[1])

    def _counterfactual(self, x: torch.Tensor, target: int) -> Counterfactual:
        unit = self.to_unit(x)
        z = self._encode(unit).detach().requires_grad_(True)
        recon = self._decode(z)
        residual = (unit - recon).detach() if self.keep_residual else torch.zeros_like(unit)
        grad = torch.autograd.grad(self._probability(recon + residual, target).sum(), z)[0]
        norm = float(grad.norm())
        direction = grad / norm * float(z.detach().norm()) if norm > 0 else torch.zeros_like(grad)
        z = z.detach()

        @torch.no_grad()
        def shifted(lambdas: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
            frames = self._decode(z + torch.as_tensor(lambdas, dtype=z.dtype).view(-1, 1) * direction)
            frames = (frames + residual).clamp(0.0, 1.0) if self.keep_residual else frames
            return frames, self._probability(frames, target).double().cpu().numpy()

        with torch.no_grad():
            input_probability = float(self._probability(unit, target)[0])
            reconstruction_error = float((unit - recon).abs().mean())
        bound, stop = self._search(shifted, (recon + residual).detach(), norm > 0)
        lambdas = np.linspace(0.0, bound, self.n_frames)
        frames, probabilities = shifted(lambdas)
        frames_np = frames[:, 0].detach().float().cpu().numpy()
        return Counterfactual(target, frames_np, lambdas, probabilities, self._heatmap(frames_np),
                              input_probability, reconstruction_error, stop)

    def _search(self, shifted: Any, recon: torch.Tensor, has_gradient: bool) -> tuple[float, str]:
        """The most negative ``lambda`` of the sweep and why the search stopped there (captum's rules)."""
        if not has_gradient:
            return 0.0, "zero gradient: the probability does not depend on the latent code"
        candidates, value = [], 0.0
        while value > -self.max_shift:
            value = max(value * 1.1 - self.step, -self.max_shift)
            candidates.append(value)
        initial = float(shifted(np.zeros(1))[1][0])
        if initial < 0.05:
            return 0.0, ("the first frame's probability is below 0.05 already: the autoencoder's reconstruction does "
                         "not show the finding (try keep_residual=True, or a better autoencoder)")
        last, pixel_sum = initial, float(recon.abs().sum())
        for start in range(0, len(candidates), 8):  # a few steps per batch: one decode + forward each
            chunk = np.asarray(candidates[start:start + 8])
            frames, probabilities = shifted(chunk)
            changes = (frames - recon).abs().flatten(1).sum(1).cpu().numpy()
            for lam, p, change in zip(chunk, probabilities, changes):
                if p > last:
                    return float(lam), "the probability stopped falling"
                if p < 0.05:
                    return float(lam), "the probability fell below 0.05"
                if initial - p > self.pred_diff:
                    return float(lam), f"the probability fell by more than {self.pred_diff:g}"
                if change > self.max_pixel_change * pixel_sum:
                    return float(lam), f"the image changed by more than {self.max_pixel_change:.0%} of its sum"
                last = float(p)
        return float(candidates[-1]), f"|lambda| reached max_shift {self.max_shift:g}"

    def _heatmap(self, frames: np.ndarray) -> np.ndarray:
        if self.heatmap == "mm":
            out = np.abs(frames[0] - frames[-1])
        elif self.heatmap == "int":
            out = np.abs(np.diff(frames, axis=0)).mean(0)
        elif self.heatmap == "mean":
            out = np.abs(frames[1:] - frames[0]).mean(0)
        else:
            out = np.abs(frames[1:] - frames[0]).max(0)
        return out.astype(np.float32)

    # ------------------------------------------------------------------ the explainer protocol
    def _compute(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        with torch.no_grad():
            num_outputs = int(self.model(x[:1]).shape[1])
        index = target_matrix(targets, x.shape[0], num_outputs)
        self._check_side(x)
        self.counterfactuals = []
        maps = torch.zeros(x.shape[0], index.shape[1], x.shape[-2], x.shape[-1])
        with prepared_model(self.autoencoder):
            for b in range(x.shape[0]):
                for f, t in enumerate(index[b].tolist()):
                    cf = self._counterfactual(x[b:b + 1], int(t))
                    self.counterfactuals.append(cf)
                    maps[b, f] = torch.from_numpy(cf.difference)
        return maps

"""Classifiers on hybrid feature vectors: one-vs-rest logistic regression and torch MLPs.

Each takes ``(N, D)`` float features and ``(N, F)`` 0/1 labels, ``fit(x, y, x_val, y_val)`` and
``predict_proba(x) -> (N, F)``. :func:`make_classifier` builds one by name (:data:`CLASSIFIERS`), as the
report's table (:func:`cxrbench.hybrid.experiment.run_hybrid_experiment`) does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["CLASSIFIERS", "LogisticBaseline", "TorchMLPClassifier", "make_classifier"]


# ----------------------------------------------------------------------------------- classifiers
def _check_x(x: np.ndarray) -> np.ndarray:
    """``(N, D)`` finite float32 features."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"features must be a finite (N, D) array, got shape {x.shape} (drop NaN rows first)")
    return x


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D)`` finite float32 features and ``(N, F)`` 0/1 float32 labels."""
    x = _check_x(x)
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 2 or y.shape[0] != x.shape[0] or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 of shape (N={x.shape[0]}, F), got {y.shape}")
    return x, y


class LogisticBaseline:
    """One-vs-rest (binary relevance) L2 logistic regression, ``class_weight="balanced"`` (scikit-learn).

    A finding with one class only in the training rows gets that class's constant probability.
    """

    def __init__(self, C: float = 0.1, max_iter: int = 2000, seed: int = 0):
        self.C, self.max_iter, self.seed = C, max_iter, seed
        self.models_: list[Any] = []

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None, y_val: np.ndarray | None = None):
        """Fit on ``(N, D)`` float features and ``(N, F)`` 0/1 labels (validation data unused)."""
        from sklearn.linear_model import LogisticRegression

        x, y = _check_xy(x, y)
        self.models_ = []
        for j in range(y.shape[1]):
            col = y[:, j]
            if col.min() == col.max():
                self.models_.append(float(col[0]))
                continue
            lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=self.max_iter, random_state=self.seed)
            self.models_.append(lr.fit(x, col.astype(int)))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(N, F)`` float64 probabilities in [0, 1]."""
        x = _check_x(x)
        cols = [np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1] for m in self.models_]
        return np.stack(cols, axis=1).astype(np.float64)


class _MLP(nn.Sequential):
    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, dropout: float):
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(dropout)]
            n_in = h
        super().__init__(*layers, nn.Linear(n_in, n_out))


class TorchMLPClassifier:
    """Multi-label MLP in torch: ReLU + dropout hidden layers, BCE-with-logits with ``pos_weight``.

    Adam; early stopping on the validation loss (best weights restored); seeded, and the global torch
    random state is left untouched. ``history_`` holds ``epoch, train_loss, val_loss`` per epoch.
    """

    def __init__(self, hidden: Sequence[int] = (512,), *, dropout: float = 0.4, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 64, max_epochs: int = 200, patience: int = 10,
                 max_pos_weight: float = 100.0, seed: int = 0):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden, self.dropout, self.lr, self.weight_decay = tuple(hidden), dropout, lr, weight_decay
        self.batch_size, self.max_epochs, self.patience = batch_size, max_epochs, patience
        self.max_pos_weight, self.seed = max_pos_weight, seed
        self.model_: _MLP | None = None
        self.history_: list[dict[str, float]] = []
        self.best_epoch_ = 0

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> "TorchMLPClassifier":
        """Train on ``(N, D)``/``(N, F)``; stop when the validation loss has not improved for ``patience`` epochs."""
        x, y = _check_xy(x, y)
        x_val, y_val = _check_xy(x_val, y_val)
        pos = y.sum(axis=0)
        pw = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0).clip(0, self.max_pos_weight)
        criterion = nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(pw, dtype=torch.float32))
        xt, yt, xv, yv = map(torch.from_numpy, (x, y, x_val, y_val))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _MLP(x.shape[1], self.hidden, y.shape[1], self.dropout)
            opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True)
            gen = torch.Generator().manual_seed(self.seed)
            best, best_state, waited, self.history_ = math.inf, _snapshot(model), 0, []
            for epoch in range(1, self.max_epochs + 1):
                model.train()
                total = 0.0
                for idx in torch.randperm(len(xt), generator=gen).split(self.batch_size):
                    opt.zero_grad()
                    loss = criterion(model(xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                model.eval()
                with torch.no_grad():
                    val_loss = float(criterion(model(xv), yv))
                self.history_.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss})
                if val_loss < best - 1e-6:
                    best, best_state, waited, self.best_epoch_ = val_loss, _snapshot(model), 0, epoch
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
        model.load_state_dict(best_state)
        self.model_ = model.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(N, F)`` float64 sigmoid probabilities."""
        if self.model_ is None:
            raise RuntimeError("call fit() first")
        x = _check_x(x)
        return torch.sigmoid(self.model_(torch.from_numpy(x))).double().numpy()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


#: classifier name -> (table label, factory(seed, **options))
CLASSIFIERS: dict[str, tuple[str, Any]] = {
    "logreg": ("Logistic regression (OvR, balanced)", lambda seed, **kw: LogisticBaseline(seed=seed, **kw)),
    "mlp": ("MLP [512]", lambda seed, **kw: TorchMLPClassifier((512,), seed=seed, **kw)),
    "deep_mlp": ("Deeper MLP [1024, 512, 256]",
                 lambda seed, **kw: TorchMLPClassifier((1024, 512, 256), seed=seed, **kw)),
}


def make_classifier(name: str, seed: int = 0, **options: Any) -> LogisticBaseline | TorchMLPClassifier:
    """A fresh classifier by name: ``"logreg"``, ``"mlp"`` or ``"deep_mlp"`` (see :data:`CLASSIFIERS`).

    ``options`` go to the constructor (e.g. ``max_epochs=50`` for the MLPs, ``C=1.0`` for logreg).
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; expected one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name][1](seed, **options)

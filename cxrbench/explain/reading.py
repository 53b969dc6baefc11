"""Reading a method comparison against chance: does a method's pointing game beat the ``random`` row, or is
it equal to it within noise? Text in the notebooks comes from these numbers, not from another run's."""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["pointing_game_vs_random", "pointing_game_sentence"]


def _chance(random_row: pd.Series) -> float:
    """The hit probability of a uniform-noise map: its share of mass in the region (the region's area share),
    else the random row's own pointing game."""
    for col in ("mass_in_region", "pointing_game"):
        v = float(random_row.get(col, math.nan))
        if math.isfinite(v):
            return min(max(v, 0.0), 1.0)
    return math.nan


def pointing_game_vs_random(table: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Each method's pointing game against chance, by a one-sided exact binomial test.

    ``table`` is :func:`cxrbench.explain.metrics.compare_methods`'s (one row per method, with ``n_images``,
    ``pointing_game`` and a ``random`` row). Chance is the hit probability of a noise map (the random row's
    ``mass_in_region``, i.e. the regions' mean area share). Returns one row per method (not ``random``):
    method, hits, n_images, pointing_game, chance, p_value, verdict ("beats random" when p < ``alpha``, else
    "below random" when fewer hits than chance by the same test the other way, else "equal to random within
    noise").
    """
    from scipy.stats import binomtest

    t = table.reset_index() if "method" not in table.columns else table
    if "random" not in set(t["method"]):
        raise ValueError("the comparison has no 'random' row (compare_methods(..., include_random=True))")
    chance = _chance(t.set_index("method").loc["random"])
    rows = []
    for _, r in t[t["method"] != "random"].iterrows():
        n = int(r["n_images"])
        hits = int(round(float(r["pointing_game"]) * n))
        if n == 0 or not math.isfinite(chance):
            p, verdict = math.nan, "untestable"
        else:
            p = float(binomtest(hits, n, chance, alternative="greater").pvalue)
            below = float(binomtest(hits, n, chance, alternative="less").pvalue) < alpha
            verdict = "beats random" if p < alpha else "below random" if below else "equal to random within noise"
        rows.append({"method": r["method"], "hits": hits, "n_images": n, "pointing_game": float(r["pointing_game"]),
                     "chance": chance, "p_value": p, "verdict": verdict})
    return pd.DataFrame(rows)


def pointing_game_sentence(verdicts: pd.DataFrame, where: str) -> str:
    """One sentence (Markdown) on :func:`pointing_game_vs_random`'s result for the images ``where``."""
    if verdicts.empty:
        return f"No method was compared on {where}."
    chance = float(verdicts["chance"].iloc[0])
    n = int(verdicts["n_images"].max())
    beat = verdicts.loc[verdicts["verdict"] == "beats random", "method"].tolist()
    same = verdicts.loc[verdicts["verdict"] != "beats random", "method"].tolist()
    head = f"On {where} ({n} images, chance of a hit {chance:.2f}): "
    if not beat:
        return head + ("**every method's pointing game equals `random` within noise**, so none of these maps "
                       "localises the finding better than noise here.")
    text = head + ", ".join(f"`{m}`" for m in beat) + " point(s) into the region more often than noise (p < 0.05)"
    return text + (f"; {', '.join(f'`{m}`' for m in same)} equal(s) `random` within noise." if same else ".")

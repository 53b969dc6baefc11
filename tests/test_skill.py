"""The box that says a model's numbers show the workflow, not a usable model, and the reading of a method
comparison against chance: both computed from the numbers they are given."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cxrbench.evaluation import skill_box, skill_box_for, skill_verdict
from cxrbench.explain.reading import pointing_game_sentence, pointing_game_vs_random


def test_weak_models_get_a_visible_warning_box_and_good_ones_do_not():
    weak = skill_box(0.565, (0.48, 0.64), subject="the run in build/runs/x")
    page = weak._repr_html_()
    assert weak.weak and "reaches 0.5" in weak.reason
    assert 'role="alert"' in page and "the workflow, not a usable model" in page and "0.565" in page
    assert "paediatric" in page and "phantoms" in page and "0.480-0.640" in page
    assert "Not a usable model" in repr(weak) and "<" not in weak.text()

    below_floor = skill_box(0.70, (0.62, 0.78))  # CI clear of 0.5, but under 0.75
    assert below_floor.weak and "below 0.75" in below_floor.reason
    good = skill_box(0.91, (0.86, 0.95))
    assert not good.weak and 'role="alert"' not in good._repr_html_() and "0.910" in good.text()
    assert skill_box(0.80, None).ci_low != skill_box(0.80, None).ci_low  # NaN: no interval known
    assert not skill_box(0.80, None).weak
    assert skill_verdict(math.nan) and "undefined" in skill_verdict(float("nan"))
    assert skill_verdict(0.9, 0.5) is not None  # a CI that touches chance is weak whatever the point estimate
    assert "below chance" in skill_box(0.415, (0.380, 0.457)).reason  # a CI wholly under 0.5 does not "reach" it
    assert "below chance" in skill_verdict(0.45)


def test_skill_box_for_computes_the_auc_and_its_ci_from_labels_and_scores():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 2)) < 0.3).astype(int)
    noise = skill_box_for(y, rng.random(y.shape), n_boot=200)
    assert noise.weak and noise.ci_low < 0.5 < noise.ci_high
    good = skill_box_for(y, y + 0.3 * rng.random(y.shape), n_boot=200)
    assert not good.weak and good.macro_auc > 0.95 and good.ci_low > 0.9


def _table(pg: dict[str, float], n: int = 20, chance: float = 0.1) -> pd.DataFrame:
    rows = [{"method": m, "n_images": n, "pointing_game": v, "mass_in_region": math.nan} for m, v in pg.items()]
    rows.append({"method": "random", "n_images": n, "pointing_game": 0.15, "mass_in_region": chance})
    return pd.DataFrame(rows)


def test_pointing_game_is_read_against_chance_with_a_binomial_test():
    v = pointing_game_vs_random(_table({"ig": 0.6, "cam": 0.15, "gradcam": 0.0, "sal": 0.05}, n=40, chance=0.3)
                                ).set_index("method")
    assert v.loc["ig", "verdict"] == "beats random" and v.loc["ig", "hits"] == 24  # 24 of 40 at chance 0.3
    assert v.loc["cam", "verdict"] == "below random"  # 6 of 40 at 0.3: p(<= 6) ~ 0.02
    assert v.loc["gradcam", "verdict"] == "below random"
    assert v.loc["ig", "chance"] == pytest.approx(0.3)  # the area share, not the noisy random pointing game
    few = pointing_game_vs_random(_table({"cam": 0.0, "ig": 0.5}, n=6, chance=0.03)).set_index("method")
    assert few.loc["cam", "verdict"] == "equal to random within noise"  # 0 of 6 at 0.03 is what chance gives
    assert few.loc["ig", "verdict"] == "beats random"  # 3 of 6 at 0.03
    sentence = pointing_game_sentence(few.reset_index(), "the phantoms")
    assert "`ig`" in sentence and "`cam` equal(s) `random` within noise" in sentence and "6 images" in sentence

    none = pointing_game_vs_random(_table({"cam": 0.2, "saliency": 0.1}, n=11, chance=0.182))
    assert "every method's pointing game equals `random` within noise" in pointing_game_sentence(none, "NIH boxes")
    with pytest.raises(ValueError, match="random"):
        pointing_game_vs_random(_table({"cam": 0.2}).query("method != 'random'"))

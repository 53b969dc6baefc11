"""Published numbers the notebooks compare against (with their sources)."""

from __future__ import annotations

import pandas as pd

from cxrbench.labels import NIH_FINDINGS

__all__ = ["chester_table1"]

# Chester (Cohen, Bertin, Frappier 2019), Table 1: AUC on the NIH ChestX-ray14 test set.
# Wang et al. 2017 (ChestX-ray8), Rajpurkar et al. 2017 (CheXNet), Weng et al. 2017 (the reimplementation
# Chester deployed; mean +- std over 10 random half-size splits of the test set).
_TABLE1 = {
    "Atelectasis": (0.716, 0.809, 0.810, 0.004),
    "Cardiomegaly": (0.807, 0.924, 0.900, 0.005),
    "Effusion": (0.784, 0.863, 0.874, 0.003),
    "Infiltration": (0.609, 0.734, 0.701, 0.004),
    "Mass": (0.706, 0.867, 0.824, 0.009),
    "Nodule": (0.671, 0.780, 0.745, 0.006),
    "Pneumonia": (0.633, 0.768, 0.760, 0.017),
    "Pneumothorax": (0.806, 0.888, 0.834, 0.006),
    "Consolidation": (0.708, 0.790, 0.794, 0.007),
    "Edema": (0.835, 0.887, 0.866, 0.005),
    "Emphysema": (0.815, 0.937, 0.894, 0.011),
    "Fibrosis": (0.769, 0.804, 0.789, 0.011),
    "Pleural_Thickening": (0.708, 0.806, 0.751, 0.005),
    "Hernia": (0.767, 0.916, 0.889, 0.035),
}


def chester_table1() -> pd.DataFrame:
    """Chester Table 1 as a table indexed by finding (NIH order)."""
    rows = [{"finding": f, "Wang2017_DenseNet50": _TABLE1[f][0], "Rajpurkar2017_CheXNet": _TABLE1[f][1],
             "Weng2017_CheXNet": _TABLE1[f][2], "Weng2017_std": _TABLE1[f][3]} for f in NIH_FINDINGS]
    return pd.DataFrame(rows).set_index("finding")

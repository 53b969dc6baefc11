"""Label sets: the 14 NIH ChestX-ray14 findings in one fixed order, other datasets' labels, aliases.

The order of :data:`NIH_FINDINGS` is the order of every model output, every CSV column and every
plot in cxrbench. It is the order of Wang et al. (2017) and of the CheXNet reimplementation
(Weng et al., 2017) whose checkpoints Chester used.
"""

from __future__ import annotations

from typing import Iterable

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

#: The string NIH uses for an image with none of the 14 findings.
NO_FINDING = "No Finding"

#: Kermany et al. paediatric set: binary pneumonia task, and its three-way origin.
PEDIATRIC_FINDINGS: tuple[str, ...] = ("Pneumonia",)
PEDIATRIC_CLASSES: tuple[str, ...] = ("normal", "bacterial", "viral")

#: Lung-mask values of the V7 Labs masks in ``cxr/masks``.
MASK_LUNG, MASK_IGNORE, MASK_BACKGROUND = 255, 127, 0

# Spellings seen in other tables and papers -> the NIH name.
_ALIASES: dict[str, str] = {
    "pleural thickening": "Pleural_Thickening",
    "pleural_thickening": "Pleural_Thickening",
    "pleuralthickening": "Pleural_Thickening",
    "effusions": "Effusion",
    "pleural effusion": "Effusion",
    "infiltrate": "Infiltration",
    "infiltrates": "Infiltration",
    "lung lesion": "Mass",
    "enlarged cardiomediastinum": "Cardiomegaly",
}


def canonical_finding(name: str) -> str:
    """Return the NIH spelling of a finding name (case, spaces and known aliases folded).

    Raises ``KeyError`` naming the unknown label and the accepted ones.
    """
    key = name.strip().lower().replace("-", " ")
    for finding in NIH_FINDINGS:
        if key in (finding.lower(), finding.lower().replace("_", " ")):
            return finding
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f"unknown finding {name!r}; expected one of {', '.join(NIH_FINDINGS)}")


def parse_finding_labels(text: str, findings: Iterable[str] = NIH_FINDINGS) -> list[int]:
    """Turn an NIH ``Finding Labels`` string (``"Effusion|Mass"``, ``"No Finding"``) into 0/1 per finding."""
    findings = tuple(findings)
    present = {canonical_finding(t) for t in str(text).split("|") if t.strip() and t.strip() != NO_FINDING}
    return [int(f in present) for f in findings]

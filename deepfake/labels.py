"""The class list and the label names: one definition for the model's outputs, the data readers and the metrics."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("ai", "real")  # index order of the model's outputs
POSITIVE = "ai"  # the class a detection rate, an ROC curve and P(ai) are about
LABEL_SYNONYMS = {
    "ai": "ai",
    "fake": "ai",
    "generated": "ai",
    "synthetic": "ai",
    "ai_generated": "ai",
    "ai-generated": "ai",
    "real": "real",
    "authentic": "real",
    "human": "real",
    "photo": "real",
}


def canonical_label(name: str) -> str | None:
    """A folder or manifest label (any case, any synonym) as a class name, or None if it is not one."""
    return LABEL_SYNONYMS.get(str(name).strip().lower())

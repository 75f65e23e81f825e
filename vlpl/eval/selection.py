"""Which epoch is the best: the trainer's model-selection criterion (``TrainConfig.select``).

The common case for users is a held-out split **without full labels** (real partial annotations, or nothing
but the observed labels), where Cole's val mAP cannot be computed. The criteria:

* ``map``: Cole's mAP on the val split's full labels (ALGORITHMS.md 2c: the best val epoch; the default when
  the val split has full labels).
* ``masked_map_observed``: the masked mAP (:func:`vlpl.eval.metrics.masked_average_precision`, CSL's
  ``mAP_partial``) of the model's val scores against the val split's **observed** labels: annotated entries
  only, classes lacking an observed positive or negative skipped. Needs no full label at all; the default when
  the val split has no full labels (partial annotations or none).
* ``teacher_agreement``: the mAP of the model's val scores against the teacher's pseudo-labels of the val split
  (the run's rule and parameters on the cached, unflipped views, deterministic; positives = pseudo-positives
  and observed positives; the mean over classes that have a positive there). Needs no label at all; an option,
  since it rewards agreeing with the teacher rather than being right.
* ``auto``: ``map`` when the val split's labels are full, else ``masked_map_observed``.

Every other evaluated split (test) is scored with Cole's mAP on full labels, or with the masked mAP on its
labels when they are partial annotations (``labels_kind: partial``). The criterion in effect is written into
every epoch record and ``summary.json`` (``select``), and ``vlpl evaluate`` states it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np

from vlpl.config import ConfigError
from vlpl.eval.metrics import masked_average_precision, mean_average_precision

log = logging.getLogger(__name__)

__all__ = ["SELECT_CRITERIA", "Selector", "keeps_split", "prediction_arrays", "resolve_criterion"]

SELECT_CRITERIA = ("auto", "map", "masked_map_observed", "teacher_agreement")


def _check(select: str) -> None:
    if select not in SELECT_CRITERIA:
        raise ConfigError(f"select: expected one of {', '.join(SELECT_CRITERIA)}, got {select!r}")


def _has_full_labels(reader: Any) -> bool:
    return reader is not None and reader.labels is not None and reader.labels_kind == "full"


def resolve_criterion(select: str, val: Any) -> str:
    """The criterion in effect for ``select`` (``auto`` resolved) given the val split reader (or None).

    Raises:
        ConfigError: an unknown criterion, or ``map`` on a val split without full labels.
    """
    _check(select)
    if select == "auto":
        return "map" if val is None or _has_full_labels(val) else "masked_map_observed"
    if select == "map" and val is not None and not _has_full_labels(val):
        kind = "partial annotations" if val.labels is not None else "no labels"
        raise ConfigError(f"select: 'map' needs full labels on the val split, which has {kind}; use "
                          f"masked_map_observed (or auto)")
    return select


def keeps_split(select: str, name: str, val_split: str, reader: Any) -> bool:
    """Whether the trainer evaluates split ``name``: it has rows and labels, or it is the val split and the
    criterion needs none (``masked_map_observed`` / ``teacher_agreement``, or ``auto`` falling back to them)."""
    _check(select)
    if not len(reader):
        return False
    if reader.labels is not None:
        return True
    return name == val_split and select != "map"


class Selector:
    """The val criterion and the per-split scores of one run (built once in ``setup``).

    Args:
        select: ``TrainConfig.select``.
        val: the val split reader (None when the run has none).
        rule, rule_params: the run's pseudo-label rule (``teacher_agreement``; ``damp`` with its defaults
            when the run has no rule).
    """

    def __init__(self, select: str, val: Any, rule: Optional[str] = None,
                 rule_params: Optional[Dict[str, Any]] = None) -> None:
        self.criterion = resolve_criterion(select, val)
        self.select = select
        self.rule = rule or "damp"
        self.rule_params = dict(rule_params or {}) if rule else {}
        self._teacher: Optional[np.ndarray] = None
        if val is not None:
            log.info("best epoch chosen by %s on split %r%s", self.criterion, val.name,
                     " (auto)" if select == "auto" else "")

    def teacher_targets(self, reader: Any, batch_size: int = 256) -> np.ndarray:
        """``(N, C)`` bool: the teacher's positives on ``reader``'s rows (pseudo-positives of the rule on the
        cached unflipped views, deterministic, and the observed positives); computed once."""
        if self._teacher is None:
            import torch

            from vlpl.pseudolabel.rules import RuleRows, apply_rule

            out = np.zeros((len(reader), reader.store.num_classes), bool)
            for pos, scores in reader.iter_scores(batch_size):
                obs = torch.from_numpy(reader.observed_at(pos))
                # rows: what knn / calibrated read, and the store's score kind (a SigLIP-type store's sigmoids)
                pseudo = apply_rule(self.rule, torch.from_numpy(scores), obs, dynamic=False,
                                    rows=RuleRows(reader, pos), **self.rule_params)
                out[pos] = (pseudo.cpu().numpy() == 1) | (obs.numpy() == 1)
            self._teacher = out
        return self._teacher

    def score(self, name: str, reader: Any, probs: np.ndarray, is_val: bool) -> float:
        """The split's number for the epoch record: the criterion on the val split, else Cole's mAP (full
        labels) or the masked mAP (partial annotations)."""
        if is_val and self.criterion == "masked_map_observed":
            return masked_average_precision(reader.observed, probs)["map"]
        if is_val and self.criterion == "teacher_agreement":
            return mean_average_precision(self.teacher_targets(reader), probs)["map_pos"]
        if reader.labels_kind == "partial":
            return masked_average_precision(reader.labels, probs)["map"]
        return mean_average_precision(reader.labels, probs)["map"]


def prediction_arrays(reader: Any) -> Dict[str, np.ndarray]:
    """``labels`` (and ``labels_kind`` when not full) for a split's ``predictions/<split>.npz``: the full labels,
    the partial annotations (``labels_kind`` ``partial``), or, for a split without labels, its observed labels
    marked ``partial`` (what ``masked_map_observed`` scored)."""
    if reader.labels is None:
        return {"labels": np.asarray(reader.observed, np.int8), "labels_kind": np.asarray("partial"),
                "labels_source": np.asarray("observed")}
    if reader.labels_kind == "partial":
        return {"labels": np.asarray(reader.labels, np.int8), "labels_kind": np.asarray("partial")}
    return {"labels": reader.labels}

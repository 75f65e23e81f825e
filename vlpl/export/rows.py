"""The rows an export writes, read from a score store batch by batch with the pseudo-label rule applied.

Every exporter (the Hugging Face dataset, :mod:`vlpl.export.hf`; the papers' formats, :mod:`vlpl.export.formats`)
reads the store through :func:`iter_batches` only: one batch of views, labels and rule outputs in memory at a time,
through the store's read API (:meth:`vlpl.store.store.ScoreStore.split`), so any score form (dense, per-view
embeddings, top-k) and a teacher ensemble export the same way.

The rule is applied by name (any registered rule, :data:`vlpl.registry.RULES`) on the **unflipped** views
(``dynamic=False``), the deterministic labelling evaluate measures; training's dynamic flip draws are a per-step
augmentation of the same cached views (export them with ``--all-views`` to redo them).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_RULE", "ExportBatch", "resolve_rule", "iter_batches", "rule_aggregate", "open_store"]

DEFAULT_RULE = "damp"


def resolve_rule(rule: Optional[str], params: Optional[Mapping[str, Any]], thresholds: Optional[str]
                 ) -> Tuple[str, Dict[str, Any]]:
    """The rule's name and its full, validated parameters (defaults filled in), torch-free.

    ``thresholds`` (``--thresholds FILE``) is the rule's ``thresholds`` parameter; without ``rule`` it selects rule
    ``calibrated`` (per-class thresholds from ``vlpl calibrate``), else the default rule is ``damp``. A rule
    that has no ``thresholds`` parameter is refused with a thresholds file. Raises a ConfigError naming the
    option (:func:`vlpl.pseudolabel.params.rule_params`).
    """
    from vlpl.config import ConfigError
    from vlpl.pseudolabel.params import rule_params
    from vlpl.registry import RULES

    values = dict(params or {})
    name = rule or ("calibrated" if thresholds else DEFAULT_RULE)
    if thresholds is not None:
        if "thresholds" not in RULES.schema(name).names():
            raise ConfigError(f"--thresholds: rule {name!r} takes no thresholds file (rules that do: calibrated, "
                              f"threshold)")
        if "thresholds" in values and values["thresholds"] != thresholds:
            raise ConfigError(f"--thresholds {thresholds!r} and rule_params.thresholds={values['thresholds']!r} "
                              f"disagree; give one")
        values["thresholds"] = str(thresholds)
    return name, rule_params(name, values, where="rule_params").to_dict()


@dataclass
class ExportBatch:
    """One batch of a split's rows, in split order (failed rows left out)."""

    positions: np.ndarray  # (B,) positions in the split
    sample_ids: List[str]
    images: List[str]
    observed: np.ndarray  # (B, C) int8
    labels: np.ndarray  # (B, C) int8 (zeros where unknown)
    labels_known: np.ndarray  # (B,) bool
    scores: np.ndarray  # (B, n_variants, n_views, C) float32 raw teacher scores
    pseudo: np.ndarray  # (B, C) int8 in {-1, 0, 1}: the rule's output
    aggregate: Optional[np.ndarray]  # (B, C) float32: the rule's per-class aggregate, or None
    embeddings: Optional[np.ndarray]  # (B, D) float32 image embeddings, when asked


def open_store(source: Any) -> Any:
    """A store or ensemble (:meth:`vlpl.store.store.ScoreStore.open`) from a path, a list of paths, or an open one."""
    from vlpl.store.store import ScoreStore

    if hasattr(source, "split") and hasattr(source, "classes"):
        return source
    return ScoreStore.open(source if isinstance(source, (list, tuple)) else str(source))


def rule_aggregate(name: str, unflipped: Any, observed: Any, params: Mapping[str, Any]) -> Optional[Any]:
    """``(B, C)`` torch float: the per-class score rule ``name`` thresholds or ranks, from ``(B, n_views, C)`` raw
    scores of one variant, or None for a rule without one (``knn``, plugins; a thresholds file fitted on
    neighbour-smoothed scores). Run it inside the store's score kind (:meth:`ScoreKind.scope`), as the rule."""
    from vlpl.pseudolabel.rules import aggregate_scores, damp_scores, view_softmax

    if name == "damp":
        return damp_scores(unflipped, observed, temp=params["temp"], eta=params["eta"])[0]
    if name == "vlpl":
        return view_softmax(unflipped[:, 0], params["temp"])
    if name in ("threshold", "topk"):
        return aggregate_scores(unflipped, score=params["score"], temp=params["temp"], view=params["view"])
    if name == "calibrated":
        from vlpl.pseudolabel.calibrate import aggregate_values, load_thresholds

        th = load_thresholds(params["thresholds"])
        if getattr(th, "knn", None):
            return None
        return aggregate_values(unflipped, observed, th.aggregate, **th.aggregate_params)
    return None


def iter_batches(store: Any, split: str, rule: str, params: Mapping[str, Any], batch_size: int = 256,
                 embeddings: bool = False, aggregate: bool = True) -> Iterator[ExportBatch]:
    """The ok rows of ``split`` in order, ``batch_size`` at a time, with the rule's labels and aggregate.

    Memory: one batch of views (``B x V x C`` float32) plus the reader's bounded stream cache."""
    import torch

    from vlpl.pseudolabel.rules import RuleRows, apply_rule

    sp = store.split(split, sidecars=False)
    kind = getattr(store, "score_kind", None)
    for pos, scores in sp.iter_scores(batch_size):
        full = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
        obs_np = np.asarray(sp.observed_at(pos), dtype=np.int8)
        obs = torch.from_numpy(obs_np)
        pseudo = apply_rule(rule, full, obs, dynamic=False, rows=RuleRows(sp, pos), **dict(params))
        agg = None
        if aggregate:
            with kind.scope() if kind is not None else contextlib.nullcontext():
                a = rule_aggregate(rule, full[:, 0], obs, params)
            agg = None if a is None else a.detach().float().cpu().numpy()
        known = np.asarray(sp.labels_known[pos], dtype=bool)
        labels = np.zeros_like(obs_np)
        if known.any():
            labels[known] = sp.labels_at(pos[known])
        yield ExportBatch(
            positions=pos,
            sample_ids=[str(sp.sample_ids[int(i)]) for i in pos],
            images=[str(sp.images[int(i)]) for i in pos],
            observed=obs_np,
            labels=labels,
            labels_known=known,
            scores=np.asarray(scores, dtype=np.float32),
            pseudo=pseudo.detach().cpu().numpy().astype(np.int8),
            aggregate=agg,
            embeddings=np.asarray(sp.image_embeddings(pos), np.float32) if embeddings else None,
        )


def split_names(store: Any, wanted: Optional[Sequence[str]] = None) -> List[str]:
    """The store's splits to export, in the store's order (``wanted``: those, each checked to exist)."""
    have = list(store.splits())
    if not wanted:
        return have
    missing = [s for s in wanted if s not in have]
    if missing:
        raise ValueError(f"split(s) {missing} not in the store {getattr(store, 'root', store)} (it has {have})")
    return list(wanted)

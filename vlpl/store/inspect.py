"""``vlpl inspect STORE``: what is in a score store, read in batches (memory bounded by one batch of scores and
labels, whatever the store's size and score form), and ``--verify``: the full sha256 and page check of every
shard."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from vlpl.store.store import ScoreStore

__all__ = ["summarize", "format_summary", "verify"]


class _Moments:
    """Running count, mean, std, min and max of a stream of arrays (float64 sums)."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x = x.astype(np.float64, copy=False)
        self.n += x.size
        self.s += float(x.sum())
        self.ss += float(np.square(x).sum())
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def result(self) -> Optional[Dict[str, float]]:
        if not self.n:
            return None
        mean = self.s / self.n
        return {"mean": mean, "std": float(np.sqrt(max(self.ss / self.n - mean * mean, 0.0))),
                "min": self.lo, "max": self.hi}


class _Corr:
    """Running Pearson correlation of two equally shaped streams."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        self.n += x.size
        self.sx += x.sum()
        self.sy += y.sum()
        self.sxx += (x * x).sum()
        self.syy += (y * y).sum()
        self.sxy += (x * y).sum()

    def result(self) -> Optional[float]:
        if not self.n:
            return None
        cov = self.n * self.sxy - self.sx * self.sy
        den = np.sqrt(max(self.n * self.sxx - self.sx ** 2, 0.0) * max(self.n * self.syy - self.sy ** 2, 0.0))
        return float(cov / den) if den > 0 else None


def summarize(root: Path, max_failed: int = 20, batch_size: int = 512, verify_shards: bool = False) -> Dict[str, Any]:
    """A JSON-able summary of the store at ``root``: identity, counts, score statistics (streamed),
    observed and full labels per image, and the first ``max_failed`` failed rows. ``verify_shards``:
    also check every shard's sha256 and pages (:meth:`ScoreStore.verify`; raises on a bad shard)."""
    store = ScoreStore(Path(root), require_complete=False)
    m = store.manifest
    spec = store.view_spec
    out: Dict[str, Any] = {
        "store": str(root),
        "complete": bool(m.get("complete")),
        "rows": store.num_rows,
        "failed": int(m.get("num_failed", 0)),
        "splits": m.get("splits", {}),
        "model": {k: m["model"].get(k) for k in ("backend", "name", "pretrained", "checkpoint_sha256")},
        "views": {k: spec.to_dict()[k] for k in ("grid", "flips", "n_variants", "n_views", "num_views", "image_size")},
        "num_classes": store.num_classes,
        "classes": store.classes,
        "templates": m.get("templates"),
        "embedding_dim": m.get("embedding_dim"),
        "score_format": store.score_format,
        "score_form": m.get("score_form"),
        "score_kind": {"kind": store.score_kind.kind, "logit_scale": store.score_kind.logit_scale,
                       "logit_bias": store.score_kind.logit_bias},
        "labels_kind": store.labels_kind,
        "dense_view": bool(getattr(spec, "dense", False)),
        "shards": len(m.get("shards", [])),
    }
    if not m.get("complete"):
        return out
    if verify_shards:
        out["verified"] = store.verify()
    C = store.num_classes
    every, glob, tiles, flip = _Moments(), _Moments(), _Moments(), _Corr()
    top1 = np.zeros(C, np.int64)
    n_img, n_pos, n_neg, n_known, n_lab = 0, 0, 0, 0, 0
    for name in store.splits():
        sp = store.split(name, sidecars=False)  # one streamed pass: nothing written, labels per batch
        n_img += len(sp)
        n_known += int(sp.labels_known.sum())
        for pos, s in sp.iter_scores(batch_size):  # (B, n_variants, n_views, C); labels read per batch too
            obs = sp.observed_at(pos)
            n_pos += int((obs == 1).sum())
            n_neg += int((obs == -1).sum())
            known = pos[sp.labels_known[pos]]
            n_lab += int((sp.labels_at(known) == 1).sum()) if len(known) else 0  # partial labels: -1 = negative
            every.add(s)
            g = s[:, 0, spec.global_index()]
            glob.add(g)
            if spec.grid:  # the g x g tiles (not the dense patch-token view, counted apart)
                tiles.add(s[:, :, 1 : 1 + spec.grid * spec.grid])
            if spec.n_variants == 2:
                flip.add(s[:, 0], s[:, 1])
            top1 += np.bincount(g.argmax(1), minlength=C)
    if n_img:
        order = np.argsort(-top1, kind="stable")[:5]
        out["scores"] = {
            "all_views": every.result(),
            "global_view": glob.result(),
            "tiles": tiles.result(),
            "flip_consistency": flip.result(),
            "most_frequent_top1": [(store.classes[i], int(top1[i])) for i in order if top1[i]],
        }
        out["observed"] = {"positives_per_image": n_pos / n_img, "negatives_per_image": n_neg / n_img}
    if n_known:
        out["labels"] = {"known_rows": n_known, "positives_per_image": n_lab / n_known}
    out["failed_rows"] = [{"row": f["row"], "sample_id": f["sample_id"], "error": f["error"]}
                          for f in store.failures(max_failed)]
    return out


def verify(root: Path) -> Dict[str, Any]:
    """Full integrity check of the store at ``root`` (sha256 and pages of every shard); raises
    :class:`vlpl.store.store.StoreError` listing every bad shard."""
    return ScoreStore(Path(root)).verify()


def format_summary(s: Dict[str, Any]) -> str:
    lines = [f"store      {s['store']}  ({'complete' if s['complete'] else 'INCOMPLETE: re-run to resume'})",
             f"rows       {s['rows']}  failed {s['failed']}  splits {s['splits']}  shards {s['shards']}",
             f"model      {s['model']['backend']}:{s['model']['name']}  pretrained={s['model']['pretrained']}"
             + (f"  checkpoint sha256={s['model']['checkpoint_sha256'][:12]}" if s['model']['checkpoint_sha256'] else ""),
             f"views      grid {s['views']['grid']}x{s['views']['grid']}  flips={s['views']['flips']}  "
             f"V={s['views']['num_views']}  at {s['views']['image_size'][0]}x{s['views']['image_size'][1]}",
             f"classes    {s['num_classes']}: {', '.join(s['classes'][:8])}{', ...' if s['num_classes'] > 8 else ''}",
             f"templates  {len(s['templates'] or [])}: {(s['templates'] or [''])[0]!r}{' ...' if len(s['templates'] or []) > 1 else ''}",
             f"embedding  dim {s['embedding_dim']}",
             f"format     {s.get('score_format', 'dense')}"
             + (f"  k={s['score_form']['k']}" if (s.get('score_form') or {}).get('k') else "")]
    sc = s.get("scores")
    if sc:
        g = sc["global_view"]
        kind = s.get("score_kind") or {"kind": "cosine"}
        what = {"cosine": "raw cosine", "siglip": f"raw cosine of a sigmoid teacher (p = sigmoid("
                f"{kind.get('logit_scale') or 0:.4g} cos {kind.get('logit_bias') or 0:+.4g}))",
                "probability": "per-class probabilities"}.get(kind["kind"], kind["kind"])
        lines.append(f"scores     {what}, global view mean {g['mean']:.4f} std {g['std']:.4f} "
                     f"[{g['min']:.4f}, {g['max']:.4f}]")
        if sc.get("tiles"):
            t = sc["tiles"]
            lines.append(f"           tiles mean {t['mean']:.4f} std {t['std']:.4f} [{t['min']:.4f}, {t['max']:.4f}]")
        if sc.get("flip_consistency") is not None:
            lines.append(f"           corr(unflipped, flipped) {sc['flip_consistency']:.4f}")
        lines.append("           most frequent top-1 (global): "
                     + ", ".join(f"{c} ({n})" for c, n in sc["most_frequent_top1"]))
    if "observed" in s:
        lines.append(f"observed   {s['observed']['positives_per_image']:.2f} positives, "
                     f"{s['observed']['negatives_per_image']:.2f} negatives per image")
    if "labels" in s:
        what = "partial annotations (+1 / -1 / unknown)" if s.get("labels_kind") == "partial" else "full labels"
        lines.append(f"labels     {what} for {s['labels']['known_rows']} rows, "
                     f"{s['labels']['positives_per_image']:.2f} positives per image")
    if s.get("verified"):
        v = s["verified"]
        lines.append(f"verified   {v['shards']} shards ({v['bytes'] / 1e6:.1f} MB): sha256 and page checksums match")
    for f in s.get("failed_rows", []):
        lines.append(f"FAILED     row {f['row']} {f['sample_id']}: {f['error']}")
    return "\n".join(lines)

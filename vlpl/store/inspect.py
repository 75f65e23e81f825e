"""``vlpl inspect STORE``: what is in a score store."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

from vlpl.store.store import ScoreStore


def summarize(root: Path, max_failed: int = 20) -> Dict[str, Any]:
    store = ScoreStore(Path(root), require_complete=False)
    m = store.manifest
    out: Dict[str, Any] = {
        "store": str(root),
        "complete": bool(m.get("complete")),
        "rows": store.num_rows,
        "failed": int(m.get("num_failed", 0)),
        "splits": m.get("splits", {}),
        "model": {k: m["model"].get(k) for k in ("backend", "name", "pretrained", "checkpoint_sha256")},
        "views": {k: m["views"][k] for k in ("grid", "flips", "n_variants", "n_views", "num_views", "image_size")},
        "num_classes": store.num_classes,
        "classes": store.classes,
        "templates": m.get("templates"),
        "embedding_dim": m.get("embedding_dim"),
        "shards": len(m.get("shards", [])),
    }
    if not m.get("complete"):
        return out
    a = store.arrays(("sample_id", "scores", "status", "error", "observed", "labels"))
    ok = a["status"] == "ok"
    s = a["scores"][ok].astype(np.float32).reshape(int(ok.sum()), store.n_variants, store.n_views, store.num_classes)
    if len(s):
        glob = s[:, 0, 0]
        top1 = np.bincount(glob.argmax(1), minlength=store.num_classes)
        order = np.argsort(-top1)[:5]
        out["scores"] = {
            "all_views": _stats(s),
            "global_view": _stats(glob),
            "tiles": _stats(s[:, :, 1:]) if store.n_views > 1 else None,
            "flip_consistency": float(np.corrcoef(s[:, 0].ravel(), s[:, 1].ravel())[0, 1]) if store.n_variants == 2 else None,
            "most_frequent_top1": [(store.classes[i], int(top1[i])) for i in order if top1[i]],
        }
    obs = a["observed"]
    out["observed"] = {"positives_per_image": float((obs == 1).sum(1).mean()),
                       "negatives_per_image": float((obs == -1).sum(1).mean())}
    if a["labels_known"].any():
        lab = a["labels"][a["labels_known"]]
        out["labels"] = {"known_rows": int(a["labels_known"].sum()), "positives_per_image": float(lab.sum(1).mean())}
    failed = np.nonzero(~ok)[0]
    out["failed_rows"] = [{"row": int(i), "sample_id": a["sample_id"][i], "error": a["error"][i]}
                          for i in failed[:max_failed]]
    return out


def _stats(x: np.ndarray) -> Dict[str, float]:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def format_summary(s: Dict[str, Any]) -> str:
    lines = [f"store      {s['store']}  ({'complete' if s['complete'] else 'INCOMPLETE: re-run to resume'})",
             f"rows       {s['rows']}  failed {s['failed']}  splits {s['splits']}  shards {s['shards']}",
             f"model      {s['model']['backend']}:{s['model']['name']}  pretrained={s['model']['pretrained']}"
             + (f"  checkpoint sha256={s['model']['checkpoint_sha256'][:12]}" if s['model']['checkpoint_sha256'] else ""),
             f"views      grid {s['views']['grid']}x{s['views']['grid']}  flips={s['views']['flips']}  "
             f"V={s['views']['num_views']}  at {s['views']['image_size'][0]}x{s['views']['image_size'][1]}",
             f"classes    {s['num_classes']}: {', '.join(s['classes'][:8])}{', ...' if s['num_classes'] > 8 else ''}",
             f"templates  {len(s['templates'] or [])}: {(s['templates'] or [''])[0]!r}{' ...' if len(s['templates'] or []) > 1 else ''}",
             f"embedding  dim {s['embedding_dim']}"]
    sc = s.get("scores")
    if sc:
        g = sc["global_view"]
        lines.append(f"scores     raw cosine, global view mean {g['mean']:.4f} std {g['std']:.4f} "
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
        lines.append(f"labels     full labels for {s['labels']['known_rows']} rows, "
                     f"{s['labels']['positives_per_image']:.2f} positives per image")
    for f in s.get("failed_rows", []):
        lines.append(f"FAILED     row {f['row']} {f['sample_id']}: {f['error']}")
    return "\n".join(lines)

"""Score forms of a store: how the per-view teacher scores of a row are kept, and how a reader turns them
back into dense ``(B, V, C)`` float32 cosines. Torch-free (torch is imported only by :func:`encode_views`,
which the pseudolabel stage calls on the device).

``dense`` (default)
    ``scores``: ``V x C`` float16 raw cosines. ``2 V C`` bytes a row: 5 KB at 80 classes, 680 KB at 10,000.

``embeddings``
    ``view_embeddings``: ``V x D`` float16 unit-norm image embeddings of every view (34 x 512 x 2 = 35 KB for
    ViT-B/16 with g = 4 and flips, whatever the class count). A reader computes the exact cosine scores per
    batch as ``emb @ text_embeddings.T`` (on the device the caller asks for), so classes or prompts can be
    changed afterwards with the text tower alone (:func:`vlpl.store.store.retarget_classes`): no image pass.
    Scores equal the dense form's to float16 rounding of the embeddings (|error| <= ~1e-3).

``topk`` (sparse; ours, documented in the README's store section)
    One class set per image, shared by all its views: the ``k`` classes with the best rank in ANY view
    (flips included): every view's top-1 first, then every view's top-2, ..., ties by the highest cosine over
    views. So each view's leading classes are kept (the global view's for VLPL, every tile's for DAMP's
    max-tile aggregation), however noisy the other views are (ranking by the max cosine over views alone
    lost the global view's top class on a synthetic C = 10,000 store). Per row: ``topk_classes`` (k class
    ids, ascending; uint16, int32 above 65,535 classes), ``topk_scores`` (``V x k`` float16 cosines of those
    classes) and ``topk_floor`` (``V`` float32), the *softmax-equivalent floor* of each view's dropped
    classes::

        floor_v = T * (logsumexp_{c not kept}(s_vc / T) - log(C - k)),   T = FLOOR_TEMP = 0.01

    A reader fills every dropped class with ``floor_v``, plus a tiny offset (``TIE_EPS`` = 1e-5 times a
    score in [-1, 1]) that orders the dropped classes by a class prior, ``text_embeddings @ the store's mean
    global image embedding`` (``mean_image_embedding`` in the manifest, written at finalize). So, at the
    rules' temperature ``T``, each view's softmax denominator (hence every kept class's probability and the
    total dropped mass) is exact up to float16 rounding (the offsets change it by < 0.1%); ``floor_v`` lies
    between the mean and the max of the view's dropped cosines.

    What is lost: each image's own order among its dropped classes, so a rule that ranks the bottom of the
    class list (DAMP / VLPL ``negatives=pseudo``, ``negative_ratio > 0``) picks the dropped part of its
    bottom set by the prior where the dense store uses the image's scores (exact when
    ``floor(ratio * C) >= C - k``: every dropped class is then in the bottom set); softmaxes at a temperature
    other than ``T`` are approximate for the dropped mass. Positives (the top of the list) agree with the
    dense form whenever they are among the k kept classes.

    Measured end to end (``vlpl pseudolabel`` dense vs ``score_format=topk``, read back through the split
    readers, ``dynamic=False``), coco256 train with the tiny teacher (V = 10, C = 80) at k = 16 and 64, and a
    synthetic C = 10,000 store (V = 10) at k = 64: DAMP (default, neutral negatives) and VLPL: 100% of images
    identical. Pseudo negatives at ratio 0.5: positives 100% identical, negatives equal in number, entries
    equal 93-95% (coco, k = 16), 99.98-100% (coco, k = 64), 67-70% (synthetic; 50% with ties broken by class
    id instead of the prior).

    Bytes a row at k = 64, V = 34: 128 + 4,352 + 136 = 4,616 before compression (3.6 KB on disk at C =
    10,000), whatever the class count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa

__all__ = ["FORMATS", "FLOOR_TEMP", "DEFAULT_TOPK", "ScoreForm", "encode_views", "topk_from_dense", "densify"]

FORMATS = ("dense", "embeddings", "topk")
#: the temperature the top-k floor is exact at: the rules' softmax temperature (vlpl.pseudolabel.params.TEMP)
FLOOR_TEMP = 0.01
DEFAULT_TOPK = 64
#: scale of the prior-ordered offsets of dropped classes (:func:`tie_offsets`)
TIE_EPS = 1e-5


@dataclass(frozen=True)
class ScoreForm:
    """One store's score form: its name and shape parameters, the Parquet columns it writes, and the
    reconstruction of dense scores from those columns."""

    name: str
    num_views: int
    num_classes: int
    dim: int
    k: int = 0
    floor_temp: float = FLOOR_TEMP

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ValueError(f"score_format: expected one of {', '.join(FORMATS)}, got {self.name!r}")
        if self.name == "topk":
            if not isinstance(self.k, int) or self.k < 1:
                raise ValueError(f"topk: expected an integer >= 1 for score_format topk, got {self.k!r}")
            object.__setattr__(self, "k", min(self.k, self.num_classes))
        if self.name == "embeddings" and self.dim < 1:
            raise ValueError("score_format embeddings needs the embedding dimension (embedding_dim >= 1)")

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, num_views: int, num_classes: int, dim: int, k: int = DEFAULT_TOPK) -> "ScoreForm":
        return cls(name, int(num_views), int(num_classes), int(dim), int(k) if name == "topk" else 0)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], num_views: int, num_classes: int) -> "ScoreForm":
        """The form of a stored manifest (``score_format``; ``score_form`` holds ``k`` and ``floor_temp``)."""
        name = str(manifest.get("score_format", "dense"))
        extra = manifest.get("score_form") or {}
        return cls(name, num_views, num_classes, int(manifest.get("embedding_dim") or 0),
                   int(extra.get("k", 0)), float(extra.get("floor_temp", FLOOR_TEMP)))

    def manifest_entry(self) -> Dict[str, Any]:
        """``score_format`` and (compact forms) ``score_form`` for the manifest."""
        out: Dict[str, Any] = {"score_format": self.name}
        if self.name == "topk":
            out["score_form"] = {"k": self.k, "floor_temp": self.floor_temp,
                                 "class_set": "top-k by max cosine over all views, one set per image",
                                 "floor": "T*(logsumexp_{dropped}(s/T) - log(C-k)) per view"}
        elif self.name == "embeddings":
            out["score_form"] = {"scores": "view_embeddings @ text_embeddings.T"}
        return out

    # -- columns ----------------------------------------------------------------------------------------
    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.num_classes <= 65535 else np.dtype(np.int32)

    def payload(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """Per-row payload columns: name -> (shape of one row, numpy dtype)."""
        V, C = self.num_views, self.num_classes
        if self.name == "dense":
            return {"scores": ((V, C), np.dtype(np.float16))}
        if self.name == "embeddings":
            return {"view_embeddings": ((V, self.dim), np.dtype(np.float16))}
        return {"topk_classes": ((self.k,), self.index_dtype),
                "topk_scores": ((V, self.k), np.dtype(np.float16)),
                "topk_floor": ((V,), np.dtype(np.float32))}

    @property
    def columns(self) -> List[str]:
        return list(self.payload())

    def arrow_fields(self) -> List[Tuple[str, pa.DataType]]:
        out = []
        for name, (shape, dtype) in self.payload().items():
            ty: pa.DataType = pa.from_numpy_dtype(dtype)
            for n in reversed(shape):
                ty = pa.list_(ty, n)
            out.append((name, ty))
        return out

    @property
    def bytes_per_row(self) -> int:
        """Uncompressed payload bytes of one row."""
        return int(sum(math.prod(shape) * dt.itemsize for shape, dt in self.payload().values()))

    # -- reconstruction ---------------------------------------------------------------------------------
    def dense(self, payload: Mapping[str, np.ndarray], text: Optional[np.ndarray] = None,
              offsets: Optional[np.ndarray] = None) -> np.ndarray:
        """``(B, V, C)`` float32 cosines from a batch of payload columns (``text``: the store's (C, D) text
        embeddings, needed by the embeddings form; ``offsets``: top-k's tie order of dropped classes)."""
        if self.name == "dense":
            return np.asarray(payload["scores"], np.float32)
        if self.name == "embeddings":
            if text is None:
                raise ValueError("the embeddings form needs the store's text embeddings to compute scores")
            emb = np.asarray(payload["view_embeddings"], np.float32)
            return emb @ np.asarray(text, np.float32).T
        return densify(payload["topk_classes"], payload["topk_scores"], payload["topk_floor"], self.num_classes,
                       offsets)

    def dense_torch(self, payload: Mapping[str, np.ndarray], text: Any, device: Any,
                    offsets: Optional[np.ndarray] = None) -> Any:
        """As :meth:`dense`, computed with torch on ``device`` (the payload is moved, not the dense scores)."""
        import torch

        dev = torch.device(device)
        if self.name == "dense":
            return torch.from_numpy(np.asarray(payload["scores"])).to(dev).float()
        if self.name == "embeddings":
            emb = torch.from_numpy(np.asarray(payload["view_embeddings"])).to(dev).float()
            t = text if isinstance(text, torch.Tensor) else torch.from_numpy(np.asarray(text, np.float32))
            return emb @ t.to(dev, torch.float32).T
        idx = torch.from_numpy(np.asarray(payload["topk_classes"]).astype(np.int64)).to(dev)
        val = torch.from_numpy(np.asarray(payload["topk_scores"])).to(dev).float()
        floor = torch.from_numpy(np.asarray(payload["topk_floor"], np.float32)).to(dev)
        B, V, _ = val.shape
        out = floor[:, :, None].expand(B, V, self.num_classes).clone()
        if offsets is not None:
            out += torch.from_numpy(np.asarray(offsets, np.float32)).to(dev)[None, None, :]
        return out.scatter_(2, idx[:, None, :].expand(B, V, idx.shape[1]), val)

    def from_dense(self, scores: np.ndarray, embeddings: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """Payload arrays of this form from dense ``(N, V, C)`` scores (the embeddings form needs the
        per-view ``(N, V, D)`` embeddings instead)."""
        if self.name == "dense":
            return {"scores": np.asarray(scores, np.float16)}
        if self.name == "embeddings":
            if embeddings is None:
                raise ValueError("the embeddings form is made from per-view image embeddings, not from scores")
            return {"view_embeddings": np.asarray(embeddings, np.float16)}
        idx, val, floor = topk_from_dense(np.asarray(scores, np.float32), self.k, self.floor_temp)
        return {"topk_classes": idx.astype(self.index_dtype), "topk_scores": val, "topk_floor": floor}

    def empty(self, n: int) -> Dict[str, np.ndarray]:
        """Zeroed payload buffers for ``n`` rows."""
        return {name: np.zeros((n, *shape), dt) for name, (shape, dt) in self.payload().items()}


def topk_from_dense(scores: np.ndarray, k: int, temp: float = FLOOR_TEMP) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(classes (N, k) ascending, scores (N, V, k) float16, floor (N, V) float32)`` of dense ``(N, V, C)``
    float scores: the top-k class set by max over views, and the softmax-equivalent floor of the rest."""
    N, V, C = scores.shape
    k = min(k, C)
    idx = np.sort(np.argsort(_selection_key(scores, k), axis=1, kind="stable")[:, :k], axis=1)
    kept = np.take_along_axis(scores, idx[:, None, :], axis=2)  # (N, V, k)
    if C == k:
        floor = np.full((N, V), -np.inf, np.float32)
    else:
        mask = np.ones((N, C), bool)
        np.put_along_axis(mask, idx, False, axis=1)
        z = scores.astype(np.float64) / temp
        z = np.where(mask[:, None, :], z, -np.inf)
        m = z.max(axis=2, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(axis=2, keepdims=True)))[..., 0]
        floor = (temp * (lse - math.log(C - k))).astype(np.float32)
    return idx, kept.astype(np.float16), floor


def _selection_key(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, C) float32 ranking key of the class set (lower = kept first): ``4 * best rank in any view - max
    cosine over views``; a class in no view's top-k is +inf. Every view's top-1 comes first, then top-2, ...
    (ties by the highest cosine), so each view's leading classes are kept whatever the noise elsewhere."""
    N, V, C = scores.shape
    order = np.argsort(-scores, axis=2, kind="stable")[:, :, :k]  # (N, V, k) per-view top-k
    key = np.full((N, C), np.inf, np.float32)
    rows = np.arange(N)[:, None]
    for r in range(k - 1, -1, -1):  # descending, so the best (lowest) rank is written last
        key[rows, order[:, :, r]] = np.minimum(key[rows, order[:, :, r]], r)
    return (4.0 * key - scores.max(axis=1)).astype(np.float32)


def tie_offsets(prior: np.ndarray) -> np.ndarray:
    """(C,) float32 offsets that order the dropped classes by a class prior: ``TIE_EPS * z``, ``z`` the
    prior centred and scaled to [-1, 1] (a change of the dropped mass below 0.1% at T = 0.01)."""
    z = np.asarray(prior, np.float64) - float(np.mean(prior))
    m = float(np.abs(z).max()) if z.size else 0.0
    return (TIE_EPS * z / m).astype(np.float32) if m > 0 else np.zeros(len(z), np.float32)


def densify(classes: np.ndarray, scores: np.ndarray, floor: np.ndarray, num_classes: int,
            offsets: Optional[np.ndarray] = None) -> np.ndarray:
    """``(B, V, C)`` float32 from a top-k payload: kept classes their scores, every other class the floor
    (plus ``offsets``, :func:`tie_offsets`, which order the dropped classes by the store's class prior)."""
    B, V, k = scores.shape
    out = np.empty((B, V, num_classes), np.float32)
    out[...] = np.asarray(floor, np.float32)[:, :, None]
    if offsets is not None:
        out += np.asarray(offsets, np.float32)[None, None, :]
    idx = np.broadcast_to(np.asarray(classes, np.int64)[:, None, :], (B, V, k))
    np.put_along_axis(out, idx, np.asarray(scores, np.float32), axis=2)
    return out


def encode_views(form: ScoreForm, feats: Any, text: Any) -> Dict[str, np.ndarray]:
    """The payload of a batch from the teacher's per-view features, computed on their device.

    ``feats``: ``(n, V, D)`` unit-norm float torch tensor; ``text``: ``(C, D)`` float32 tensor on the same
    device. Dense: the float16 cosines; embeddings: the float16 features; top-k: the class set, kept scores
    and floor computed on the device, so the ``(n, V, C)`` scores never reach the host."""
    import torch

    with torch.no_grad():
        if form.name == "embeddings":
            return {"view_embeddings": feats.to(torch.float16).cpu().numpy()}
        scores = feats.float() @ text.float().T  # (n, V, C)
        if form.name == "dense":
            return {"scores": scores.to(torch.float16).cpu().numpy()}
        C, k, T = scores.shape[2], form.k, form.floor_temp
        # the same class set as topk_from_dense (_selection_key): best rank in any view, then max cosine
        n, V = scores.shape[0], scores.shape[1]
        ranks = torch.sort(-scores, dim=2, stable=True).indices[:, :, :k]  # (n, V, k)
        rank_of = torch.arange(k, device=scores.device, dtype=torch.float32).expand(n, V, k)
        key = torch.full((n, C), math.inf, device=scores.device)
        key.scatter_reduce_(1, ranks.reshape(n, -1), rank_of.reshape(n, -1), reduce="amin")
        key = 4.0 * key - scores.max(dim=1).values.float()
        idx = torch.sort(key, dim=1, stable=True).indices[:, :k].sort(dim=1).values
        kept = scores.gather(2, idx[:, None, :].expand(-1, scores.shape[1], -1))
        if C == k:
            floor = torch.full(scores.shape[:2], -math.inf, device=scores.device)
        else:
            z = (scores.double() / T).scatter(2, idx[:, None, :].expand(-1, scores.shape[1], -1), -math.inf)
            floor = T * (torch.logsumexp(z, dim=2) - math.log(C - k))
        return {"topk_classes": idx.cpu().numpy().astype(form.index_dtype),
                "topk_scores": kept.to(torch.float16).cpu().numpy(),
                "topk_floor": floor.float().cpu().numpy()}

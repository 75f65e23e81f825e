"""webdataset tar shards as a ``vlpl pseudolabel`` input (``data.format: webdataset``), and ``wds://`` image references.

**Input.** ``data.urls`` lists the shards: a string (brace-expanded by webdataset's ``expand_urls``, e.g.
``shards/{000000..000009}.tar``; ``::`` separates several patterns), a list of such strings, or a mapping
``{train: ..., test: ...}`` naming the official splits (a string or list alone is the official train split). A URL
without a protocol is a local path relative to ``data.root`` (and must stay inside it, the root confinement rule
of :mod:`vlpl.data.images`); any other URL (``s3://``, ``gs://``, ``https://``, ``memory://``) is opened through
fsspec. Samples follow webdataset's conventions: members are grouped by key, the name up to the first dot of
its base name (webdataset's ``base_plus_ext``), in tar order; a sample's image is its first member with an
extension of :data:`IMAGE_EXTS` (in that order).

**Labels**, per sample, from (first that applies):

* a side file ``data.labels`` keyed by the sample key: CSV with columns ``key,labels`` (class names joined by
  ``|``) or ``key,positives,negatives`` (real partial annotations), or JSON lines with those keys;
* the sample's ``json`` member (``data.wds_labels_member``, default ``json``): an object with ``labels`` (a list
  of class names) or ``positives`` / ``negatives`` (lists of class names); a json member without those keys (an
  img2dataset metadata record) gives no labels;
* a text member (``data.wds_labels_member`` ending in ``txt``, e.g. ``labels.txt``): class names one a line or
  joined by ``|``.

Classes come from ``data.classes`` (default ``<root>/classes.txt``). ``sample_id`` is the sample key; two
samples with one key (in any shards) are an error naming both.

**References.** A sample's image is stored as ``wds://<shard url>#<key>`` (``%`` and ``#`` in the key written
``%25`` and ``%23``; a local shard's URL relative to the data root). :data:`vlpl.data.images.SCHEMES` gets an
opener for it, so :meth:`vlpl.data.images.ImageSource.open` reopens any member later (the trainer, ``vlpl
predict``) by **random access**: a per-shard offset index (member name -> data offset and size, read from the
tar's member headers by the standard library's ``tarfile`` on a seekable file: 512-byte headers, never the
members' bytes) is built once per shard, kept in memory per process and cached on disk
(``$VLPL_CACHE_DIR`` or ``~/.cache/vlpl``, ``wds-index/<sha256 of the URL>.json``), validated against the shard's
size and modification time (or ETag) so a rewritten shard is re-indexed. A member is then one ranged read
(``fs.cat_file(path, start, end)``).

Why not webdataset's own tar iterator for this: webdataset 1.0's ``tar_file_iterator`` reads a tar as a stream
(``tarfile`` mode ``r|*``), which yields each member's bytes but not its offset, and wids (its random-access
index) is no longer part of webdataset 1.0; listing a shard by streaming it reads every byte of every image,
while the member table reads only the headers (docs/INPUTS.md has the measurement). webdataset still defines the
conventions used here: ``expand_urls`` and ``base_plus_ext``; tests build shards with ``webdataset.TarWriter``.

**Failures.** A corrupt or truncated image member, a sample without an image member, or a missing key is an
:class:`~vlpl.data.images.ImageLoadError` naming the shard and the key: a failed row of the store, like a corrupt
file. A shard that cannot be listed at all (missing, not a tar, compressed) is a
:class:`~vlpl.data.readers.DatasetFormatError` naming it; a shard cut short keeps the samples before the cut
(the sample cut through is left out) with a warning naming it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vlpl.config import ConfigError, DataConfig, resolve_path
from vlpl.data.images import SCHEMES, ImageLoadError, ImageSource, printable
from vlpl.data.readers import (
    OFFICIAL_SPLITS,
    DatasetFormatError,
    OfficialSplits,
    RawItem,
    _classes_path,
    _multi_hot,
    _names,
    _text_lines,
    read_class_list,
)

logger = logging.getLogger(__name__)

WDS_PREFIX = "wds://"
#: image member extensions, in order of preference (a sample's image is the first one present)
IMAGE_EXTS: Tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "img")
#: the version of the on-disk index format (a cached index of another version is rebuilt)
INDEX_VERSION = 1
#: threads listing shards at once (reading headers is I/O: object storage answers many requests in parallel)
LIST_THREADS = 16


# --------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------


def has_protocol(url: str) -> bool:
    """Whether ``url`` names an fsspec protocol (``s3://...``); a plain path has none."""
    head, sep, _ = url.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").isalnum()


def expand(pattern: Union[str, Sequence[str]]) -> List[str]:
    """Shard URLs of a pattern (webdataset's ``expand_urls``: ``::`` separated, brace-expanded) or of a list."""
    from webdataset.shardlists import expand_urls

    if isinstance(pattern, str):
        return list(expand_urls(pattern))
    out: List[str] = []
    for p in pattern:
        if not isinstance(p, str):
            raise ConfigError(f"data.urls: expected shard URLs (strings), got {p!r}")
        out += list(expand_urls(p))
    return out


def shard_urls(cfg: DataConfig) -> Dict[str, List[str]]:
    """``data.urls`` -> official split -> its shard URLs, expanded, in the order given.

    Raises:
        ConfigError: ``data.urls`` is missing, empty, or a mapping with keys other than train/test.
    """
    urls = getattr(cfg, "urls", None)
    if urls in (None, "", []):
        raise ConfigError("data.urls: format 'webdataset' needs the tar shards (e.g. shards/{000000..000009}.tar, "
                          "or {train: ..., test: ...})")
    if isinstance(urls, dict):
        bad = [k for k in urls if k not in OFFICIAL_SPLITS]
        if bad:
            raise ConfigError(f"data.urls: keys must be train and/or test, got {bad}")
        out = {s: expand(urls[s]) if urls.get(s) else [] for s in OFFICIAL_SPLITS}
    else:
        out = {"train": expand(urls), "test": []}
    if not out["train"]:
        raise ConfigError("data.urls: no shard for the official train split")
    return out


def quote_key(key: str) -> str:
    """A sample key as written in a ``wds://`` reference (``%`` -> ``%25``, ``#`` -> ``%23``)."""
    return key.replace("%", "%25").replace("#", "%23")


def unquote_key(text: str) -> str:
    """The inverse of :func:`quote_key`."""
    return text.replace("%23", "#").replace("%25", "%")


def make_ref(url: str, key: str) -> str:
    """``wds://<url>#<key>``: the store's image reference of sample ``key`` of shard ``url``."""
    return f"{WDS_PREFIX}{url}#{quote_key(key)}"


def split_ref(rest: str) -> Tuple[str, str]:
    """``<url>#<key>`` (a ``wds://`` reference without its scheme) -> ``(url, key)``."""
    url, sep, key = rest.rpartition("#")
    if not sep or not url or not key:
        raise ImageLoadError(f"cannot open image {WDS_PREFIX}{printable(rest)}: expected wds://<shard url>#<key>",
                             WDS_PREFIX + rest, "bad reference")
    return url, unquote_key(key)


def _store_url(url: str, root: Path, images_cfg: Any) -> str:
    """How a shard URL is written into references: a local path relative to the data root when it is inside it
    (so the store moves with ``data_root=``); a path outside the root only with ``images.allow_outside_root``."""
    if has_protocol(url):
        return url
    p = resolve_path(root, url)
    assert p is not None
    real, root_real = Path(os.path.realpath(p)), Path(os.path.realpath(root))
    if real.is_relative_to(root_real):
        return real.relative_to(root_real).as_posix()
    if not getattr(images_cfg, "allow_outside_root", False):
        raise ConfigError(f"data.urls: shard {url} resolves to {real}, outside the data root {root_real} (put the "
                          f"shards under data.root, or set data.images.allow_outside_root=true)")
    return str(real)


# --------------------------------------------------------------------------------------------------
# the per-shard offset index
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """A shard's member table: per sample key (in tar order), extension -> ``(data offset, size)``.

    Attributes:
        url: the shard as opened (a local path or an fsspec URL).
        fingerprint: size and modification time (or ETag) of the shard when it was indexed.
        samples: key -> {extension: (offset, size)}, in tar order.
        truncated: the tar ended inside a member or its header (how): the samples before the cut are kept, the
            sample the cut went through is left out.
    """

    url: str
    fingerprint: str
    samples: Dict[str, Dict[str, Tuple[int, int]]] = field(default_factory=dict)
    truncated: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {"version": INDEX_VERSION, "url": self.url, "fingerprint": self.fingerprint,
                "truncated": self.truncated,
                "samples": [[k, {e: list(v) for e, v in m.items()}] for k, m in self.samples.items()]}

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "ShardIndex":
        return cls(str(obj["url"]), str(obj["fingerprint"]),
                   {str(k): {str(e): (int(v[0]), int(v[1])) for e, v in m.items()} for k, m in obj["samples"]},
                   obj.get("truncated"))


def _fs_path(url: str) -> Tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def fingerprint(fs: Any, path: str) -> str:
    """``size:<bytes>,<version>``: what identifies a shard's bytes without reading them (size plus its mtime,
    ETag or creation time, whichever the file system reports)."""
    info = fs.info(path)
    version = next((info[k] for k in ("mtime", "LastModified", "last_modified", "ETag", "etag", "created",
                                      "updated") if info.get(k) is not None), "")
    return f"size:{info.get('size')},{version}"


def cache_dir() -> Path:
    """Where shard indexes are cached: ``$VLPL_CACHE_DIR`` or ``$XDG_CACHE_HOME/vlpl`` (``~/.cache/vlpl``)."""
    base = os.environ.get("VLPL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlpl")
    return Path(base) / "wds-index"


def build_index(url: str, fs: Any, path: str, fp: str, label_exts: Sequence[str] = ()
                ) -> Tuple[ShardIndex, Dict[str, Dict[str, bytes]]]:
    """Read the member table of one uncompressed tar (``tarfile`` on a seekable file: headers only) and the bytes
    of the members whose extension is in ``label_exts``.

    Returns:
        The index, and key -> {extension: bytes} of the label members.

    Raises:
        DatasetFormatError: the shard is missing, unreadable, compressed or not a tar (naming it).
    """
    from webdataset.tariterators import base_plus_ext

    index = ShardIndex(url, fp)
    labels: Dict[str, Dict[str, bytes]] = {}
    try:
        f = fs.open(path, "rb")
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"webdataset shard {url}: cannot open ({type(e).__name__}: {e})") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise DatasetFormatError(f"webdataset shard {url}: not an uncompressed tar ({e}); random access to "
                                     f"members needs plain .tar shards (img2dataset writes those)") from None
        try:
            while True:
                try:
                    m = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    index.truncated = f"{type(e).__name__}: {e}"
                    break
                if m is None:
                    break
                if not m.isreg():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if base.startswith("__") and base.endswith("__"):
                    continue  # webdataset metadata members
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                index.samples.setdefault(key, {})[ext] = (int(m.offset_data), int(m.size))
                if ext in label_exts:
                    f.seek(m.offset_data)
                    labels.setdefault(key, {})[ext] = f.read(m.size)
                tf.members = []  # keep memory flat on large shards
            end = f.seek(0, 2)
            last = next(reversed(index.samples), None)
            if last is not None and any(o + n > end for o, n in index.samples[last].values()):
                index.truncated = index.truncated or f"a member of sample {last!r} runs past the end of the file"
        finally:
            tf.close()
    if index.truncated:  # the sample the cut went through may have lost members: it is left out
        last = next(reversed(index.samples), None)
        if last is not None:
            index.samples.pop(last)
            labels.pop(last, None)
        logger.warning("webdataset shard %s is cut short (%s): keeping its %d samples before the cut%s", url,
                       index.truncated, len(index.samples),
                       f"; sample {last!r}, cut through, is left out" if last is not None else "")
    return index, labels


_INDEXES: Dict[str, ShardIndex] = {}
_LOCK = threading.Lock()


def shard_index(url: str, fs: Any, path: str) -> ShardIndex:
    """The shard's index: from this process's memory, else the disk cache (when its fingerprint still matches),
    else built (:func:`build_index`) and cached."""
    with _LOCK:
        hit = _INDEXES.get(url)
    if hit is not None:
        return hit
    fp = fingerprint(fs, path)
    cfile = cache_dir() / f"{hashlib.sha256(url.encode('utf-8', 'surrogateescape')).hexdigest()}.json"
    index: Optional[ShardIndex] = None
    try:
        obj = json.loads(cfile.read_text())
        if obj.get("version") == INDEX_VERSION and obj.get("url") == url and obj.get("fingerprint") == fp:
            index = ShardIndex.from_json(obj)
    except (OSError, ValueError, KeyError, TypeError):
        index = None
    if index is None:
        index, _ = build_index(url, fs, path, fp)
        _save_index(cfile, index)
    with _LOCK:
        _INDEXES[url] = index
    return index


def _save_index(cfile: Path, index: ShardIndex) -> None:
    from vlpl.store.atomic import atomic_write_json

    try:
        cfile.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfile, index.to_json())
    except OSError as e:  # a read-only home: the index stays in memory only
        logger.info("cannot cache the index of %s in %s (%s): kept in memory", index.url, cfile, e)


def _remember(url: str, index: ShardIndex) -> None:
    cfile = cache_dir() / f"{hashlib.sha256(url.encode('utf-8', 'surrogateescape')).hexdigest()}.json"
    _save_index(cfile, index)
    with _LOCK:
        _INDEXES[url] = index


def clear_memory_cache() -> None:
    """Forget the indexes held in this process (the disk cache stays)."""
    with _LOCK:
        _INDEXES.clear()


# --------------------------------------------------------------------------------------------------
# opening a member (SCHEMES["wds"])
# --------------------------------------------------------------------------------------------------


def _locate(source: ImageSource, url: str) -> Tuple[Any, str, str]:
    """-> (fs, path, index key) of a shard URL as a reference writes it (local ones under the data root)."""
    if has_protocol(url):
        fs, path = _fs_path(url)
        return fs, path, url
    real = source.resolve(url)  # root confinement, symlinks
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), str(real), str(real)


def image_member(members: Dict[str, Tuple[int, int]]) -> Optional[str]:
    """The extension of a sample's image member (the first of :data:`IMAGE_EXTS` present), or None."""
    return next((e for e in IMAGE_EXTS if e in members), None)


def open_member(source: ImageSource, rest: str) -> Tuple[bytes, str]:
    """``SCHEMES["wds"]``: the bytes of the image member a ``wds://<url>#<key>`` reference names, and its name
    (``<url>#<key>.<ext>``) for errors.

    Raises:
        ImageLoadError: the shard or the key is missing, the sample has no image member, or the member is cut short.
    """
    url, key = split_ref(rest)
    ref = WDS_PREFIX + rest
    shown = f"{printable(url)}#{printable(key)}"
    try:
        fs, path, ikey = _locate(source, url)
        index = shard_index(ikey, fs, path)
    except ImageLoadError:
        raise
    except DatasetFormatError as e:
        raise ImageLoadError(f"cannot open image {shown}: {e}", ref, "unreadable shard") from None
    except FileNotFoundError:
        hint = "" if has_protocol(url) else f" under the data root {source.root} (set data_root=... if the data moved)"
        raise ImageLoadError(f"cannot open image {shown}: shard {printable(url)} not found{hint}", ref,
                             "file not found") from None
    except OSError as e:
        raise ImageLoadError(f"cannot open image {shown}: shard {printable(url)}: {e}", ref, "unreadable shard") from None
    members = index.samples.get(key)
    if members is None:
        raise ImageLoadError(f"cannot open image {shown}: shard {printable(url)} has no sample with key "
                             f"{printable(key)!r}", ref, "missing member")
    ext = image_member(members)
    if ext is None:
        raise ImageLoadError(f"cannot open image {shown}: the sample has no image member (members: "
                             f"{', '.join('.' + e for e in members)}; expected one of "
                             f"{', '.join('.' + e for e in IMAGE_EXTS)})", ref, "missing member")
    offset, size = members[ext]
    name = f"{url}#{key}.{ext}"
    try:
        data = fs.cat_file(path, start=offset, end=offset + size)
    except OSError as e:
        raise ImageLoadError(f"cannot read image {printable(name)}: {e}", ref, "unreadable file") from None
    if len(data) < size:
        raise ImageLoadError(f"cannot decode image {printable(name)}: truncated member: {len(data)} of {size} "
                             f"bytes in the shard", ref, "truncated file")
    if size == 0:
        raise ImageLoadError(f"cannot decode image {printable(name)}: empty file: 0 bytes", ref, "empty file")
    return data, name


SCHEMES["wds"] = open_member


# --------------------------------------------------------------------------------------------------
# the reader (data.format: webdataset)
# --------------------------------------------------------------------------------------------------


def _label_lists(obj: Any, where: str) -> Optional[Tuple[List[str], Optional[List[str]]]]:
    """``(positives, negatives or None)`` of a labels record (a dict), or None when it holds no labels."""
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "positives" in obj or "negatives" in obj:
        pos, neg = obj.get("positives") or [], obj.get("negatives") or []
        for what, v in (("positives", pos), ("negatives", neg)):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise DatasetFormatError(f"{where}: {what!r} must be a list of class names, got {v!r}")
        return list(pos), list(neg)
    if "labels" in obj:
        v = obj["labels"]
        if isinstance(v, str):
            v = _names(v)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise DatasetFormatError(f"{where}: 'labels' must be a list of class names, got {v!r}")
        return list(v), None
    return None


def read_side_labels(path: Path) -> Dict[str, Tuple[List[str], Optional[List[str]]]]:
    """A side labels file keyed by sample key: CSV ``key,labels`` / ``key,positives,negatives`` (names joined by
    ``|``) or JSON lines with those keys. Errors name the file and the line."""
    if not path.is_file():
        raise DatasetFormatError(f"label file {path} not found")
    out: Dict[str, Tuple[List[str], Optional[List[str]]]] = {}

    def add(key: Any, rec: Tuple[List[str], Optional[List[str]]], where: str) -> None:
        if not isinstance(key, str) or not key:
            raise DatasetFormatError(f"{where}: missing or empty 'key'")
        if key in out:
            raise DatasetFormatError(f"{where}: key {key!r} appears twice")
        out[key] = rec

    if path.suffix.lower() == ".jsonl":
        for line_no, line in _text_lines(path):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DatasetFormatError(f"{where}: not valid JSON ({e})") from None
            rec = _label_lists(obj, where)
            if rec is None:
                raise DatasetFormatError(f"{where}: expected 'labels' or 'positives'/'negatives'")
            add(obj.get("key"), rec, where)
        return out
    text = "".join(line for _, line in _text_lines(path))
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if sorted(header) not in (sorted(["key", "labels"]), sorted(["key", "positives", "negatives"])):
        raise DatasetFormatError(f"{path}: header {','.join(header)}; expected key,labels or key,positives,negatives")
    for k, row in enumerate(reader, start=2):
        row = {(a or "").strip(): (b or "") for a, b in row.items()}
        if "labels" in row:
            rec: Tuple[List[str], Optional[List[str]]] = (_names(row["labels"]), None)
        else:
            rec = (_names(row["positives"]), _names(row["negatives"]))
        add(row["key"].strip(), rec, f"{path}, line {k}")
    return out


def _member_labels(data: bytes, ext: str, where: str) -> Optional[Tuple[List[str], Optional[List[str]]]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetFormatError(f"{where}: the .{ext} member is not UTF-8 text") from None
    if ext == "json" or ext.endswith(".json"):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DatasetFormatError(f"{where}: the .{ext} member is not valid JSON ({e})") from None
        return _label_lists(obj, f"{where} (.{ext} member)")
    names = [n for line in text.splitlines() for n in _names(line)]
    return names, None


def read_webdataset(cfg: DataConfig) -> OfficialSplits:
    """``data.format: webdataset``: the samples of the tar shards ``data.urls`` (see the module docstring)."""
    root = Path(cfg.root)
    classes = read_class_list(_classes_path(cfg, root))
    index = {n: i for i, n in enumerate(classes)}
    C = len(classes)
    label_ext = str(getattr(cfg, "wds_labels_member", "json") or "json").lstrip(".")
    side = None
    if cfg.labels is not None:
        spath = resolve_path(root, cfg.labels)
        assert spath is not None
        side = read_side_labels(spath)
    kinds: set = set()

    def vector(rec: Tuple[List[str], Optional[List[str]]], where: str) -> np.ndarray:
        pos, neg = rec
        kinds.add("full" if neg is None else "partial")
        if len(kinds) > 1:
            raise DatasetFormatError(f"{where}: mixes full labels ('labels') and partial annotations "
                                     f"('positives'/'negatives') across samples; use one kind")

        def idx(names: List[str], what: str) -> List[int]:
            bad = [n for n in names if n not in index]
            if bad:
                raise DatasetFormatError(f"{where}: unknown class name {bad[0]!r} in {what} (not in the class list)")
            return [index[n] for n in names]

        p = idx(pos, "positives" if neg is not None else "labels")
        if neg is None:
            return _multi_hot(p, C)
        n = idx(neg, "negatives")
        both = sorted(set(p) & set(n))
        if both:
            raise DatasetFormatError(f"{where}: class {classes[both[0]]!r} is listed both as a positive and as a "
                                     f"negative")
        return _multi_hot(p, C) - _multi_hot(n, C)

    out: Dict[str, List[RawItem]] = {"train": [], "test": []}
    label_exts = () if side is not None else (label_ext,)

    def list_shard(url: str) -> Tuple[str, ShardIndex, Dict[str, Dict[str, bytes]]]:
        stored = _store_url(url, root, cfg.images)
        if has_protocol(url):
            fs, path = _fs_path(url)
            ikey = url
        else:
            from fsspec.implementations.local import LocalFileSystem

            fs, path = LocalFileSystem(), os.path.realpath(resolve_path(root, url))  # type: ignore[arg-type]
            ikey = path
        try:
            fp = fingerprint(fs, path)
        except FileNotFoundError:
            raise DatasetFormatError(f"webdataset shard {url} not found (data.urls)") from None
        sidx, lab = build_index(ikey, fs, path, fp, label_exts)
        _remember(ikey, sidx)
        return stored, sidx, lab

    n_shards = 0
    # the shards are listed on threads (I/O: headers, label members), LIST_THREADS at a time, consumed in order;
    # with data.max_samples a split's listing stops once it has enough rows
    with ThreadPoolExecutor(max_workers=LIST_THREADS) as pool:
        for split, urls in shard_urls(cfg).items():
            for c in range(0, len(urls), LIST_THREADS):
                if cfg.max_samples is not None and len(out[split]) >= cfg.max_samples:
                    break
                chunk = urls[c:c + LIST_THREADS]
                n_shards += len(chunk)
                for url, (stored, sidx, lab) in zip(chunk, pool.map(list_shard, chunk)):
                    for key in sidx.samples:
                        where = f"webdataset shard {url}, sample {key!r}"
                        rec = None
                        if side is not None:
                            rec = side.get(key)
                        elif label_ext in lab.get(key, {}):
                            rec = _member_labels(lab[key][label_ext], label_ext, where)
                        labels = None if rec is None else vector(rec, where)
                        out[split].append(RawItem(key, make_ref(stored, key), labels))
    for split, items in out.items():
        known = [it.labels is not None for it in items]
        if any(known) and not all(known):
            first = next(it for it in items if it.labels is None)
            raise DatasetFormatError(
                f"webdataset official {split} split: {sum(known)} of {len(items)} samples have labels, sample "
                f"{first.sample_id!r} ({printable(first.image)}) has none (labels from "
                f"{'data.labels' if side is not None else 'the .' + label_ext + ' members'})")
    logger.info("webdataset: %d shards, %d train and %d test samples", n_shards, len(out["train"]), len(out["test"]))
    return OfficialSplits(root=root, classes=classes, train=out["train"], test=out["test"],
                          default_name=root.name or "webdataset",
                          labels_kind="partial" if kinds == {"partial"} else "full")


def write_index_for(path: Union[str, Path]) -> ShardIndex:
    """Build (or refresh) and cache the index of one local or fsspec shard; returns it (a helper for tools that
    prepare shards ahead of a run)."""
    url = str(path)
    if has_protocol(url):
        fs, p = _fs_path(url)
        ikey = url
    else:
        from fsspec.implementations.local import LocalFileSystem

        fs, p = LocalFileSystem(), os.path.realpath(url)
        ikey = p
    idx, _ = build_index(ikey, fs, p, fingerprint(fs, p))
    _remember(ikey, idx)
    return idx


__all__ = ["WDS_PREFIX", "IMAGE_EXTS", "ShardIndex", "build_index", "shard_index", "open_member", "read_webdataset",
           "read_side_labels", "shard_urls", "expand", "make_ref", "split_ref", "cache_dir", "clear_memory_cache",
           "write_index_for"]

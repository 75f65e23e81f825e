"""Save a student classifier and rebuild it from its files alone, never executing code from them.

A model directory::

    model.safetensors     the weights (safetensors: tensors only, no pickle)
    model.json            the student config (incl. the head config), mean/std, num_classes, the vlpl
                          version, the format version, and the sha256 of each of the other files
    classes.txt           one class name a line
    text_embeddings.npy   the class context's (C, D) float32 text embeddings (absent when it has none)

Every file is written atomically (temporary name + rename), ``model.json`` last: it names the sha256 of the
files it belongs with, so a directory caught between two saves is detected on load, not half-read.
Identical weights give byte-identical files.

:func:`load_model` reads JSON, text, ``.npy`` (``allow_pickle=False``) and safetensors only: there is no
pickle path. The head is looked up by name in ``vlpl.registry.HEADS`` and nowhere else (plugins come
from the command line, never from a saved file); the backbone is rebuilt by name without fetching
pretrained weights (the saved weights replace them). Anything unexpected is refused with an error naming
the file and the key.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Set, Union

import numpy as np
import torch

from vlpl.config import ConfigError, StudentConfig, load_config, to_dict
from vlpl.registry import HEADS, RegistryError
from vlpl.store.atomic import atomic_write_bytes, atomic_write_json
from vlpl.train.model import ClassContext, Classifier, create_classifier

log = logging.getLogger(__name__)

FORMAT = "vlpl-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
CLASSES_FILE = "classes.txt"
EMBEDDINGS_FILE = "text_embeddings.npy"

_KEYS = {"format", "format_version", "vlpl_version", "student", "num_classes", "num_features", "mean", "std",
         "text_embeddings", "files"}


class ModelFileError(ValueError):
    """A model directory that cannot be loaded: the message names the file and the key."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_bytes(state: Dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``state`` (CPU, contiguous; a tensor sharing storage with an earlier one is
    stored as its own copy, which loading writes back into both)."""
    from safetensors.torch import save

    storages: Set[int] = set()
    tensors: Dict[str, torch.Tensor] = {}
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(ptr)
        tensors[k] = t
    return save(tensors, metadata={"format": "pt"})


def save_model(directory: Union[str, Path], model: Classifier, cfg: StudentConfig,
               context: Optional[ClassContext] = None,
               state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed) as described in the module docstring.

    ``context``: the class context to save; it must be the one the head was built with, ``model.context``
    (the default; with ``head.text_embeddings: student`` it holds the student's own embeddings, not the
    store's), and a different one is refused. ``state_dict``: the weights to write instead of ``model.state_dict()`` (e.g.
    ``accelerator.get_state_dict(model)`` under FSDP). Returns the directory.
    """
    import vlpl

    d = Path(directory)
    ctx = model.context
    if context is not None and context is not ctx:
        same = context.names == ctx.names and (
            (context.text_embeddings is None and ctx.text_embeddings is None)
            or (context.text_embeddings is not None and ctx.text_embeddings is not None
                and np.array_equal(context.text_embeddings, ctx.text_embeddings)))
        if not same:
            raise ValueError("save_model: the class context given differs from the one the head was built with "
                             "(model.context; with head.text_embeddings=student it holds the student's own "
                             "embeddings): pass model.context or nothing")
    bad = [n for n in ctx.names if "\n" in n or "\r" in n or n != n.strip() or not n]
    if bad:
        raise ValueError(f"save_model: class names must be non-empty single lines without surrounding "
                         f"spaces ({CLASSES_FILE}); got {bad[:3]!r}")
    weights = _weights_bytes(state_dict if state_dict is not None else model.state_dict())
    classes = "".join(f"{n}\n" for n in ctx.names).encode("utf-8")
    files: Dict[str, bytes] = {WEIGHTS_FILE: weights, CLASSES_FILE: classes}
    emb_meta = None
    if ctx.text_embeddings is not None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(ctx.text_embeddings, dtype=np.float32), allow_pickle=False)
        files[EMBEDDINGS_FILE] = buf.getvalue()
        emb_meta = {"file": EMBEDDINGS_FILE, "shape": list(ctx.text_embeddings.shape),
                    "source": cfg.head.text_embeddings}
    for name, data in files.items():
        atomic_write_bytes(d / name, data)
    if ctx.text_embeddings is None and (d / EMBEDDINGS_FILE).exists():
        (d / EMBEDDINGS_FILE).unlink()  # a stale file from an earlier save: not part of this model
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vlpl_version": vlpl.__version__,
        "student": to_dict(cfg),
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "mean": list(model.mean),
        "std": list(model.std),
        "text_embeddings": emb_meta,
        "files": {name: _sha256(data) for name, data in sorted(files.items())},
    }
    atomic_write_json(d / CONFIG_FILE, meta)
    return d


def _err(path: Path, key: str, what: str) -> ModelFileError:
    return ModelFileError(f"{path}: key {key!r}: {what}")


def _read_checked(d: Path, name: str, files: Dict[str, str], cfg_path: Path) -> bytes:
    path = d / name
    if name not in files:
        raise _err(cfg_path, "files", f"no sha256 recorded for {name}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror}); it is listed in {cfg_path} key 'files'") from None
    if _sha256(data) != files[name]:
        raise ModelFileError(f"{path}: sha256 {_sha256(data)[:16]}... does not match {cfg_path} key "
                             f"'files.{name}' ({str(files[name])[:16]}...): the file is damaged or from another save")
    return data


def read_model_json(directory: Union[str, Path]) -> Dict[str, Any]:
    """``model.json`` of a model directory, checked: format, version, keys and their types."""
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{Path(directory)} is not a saved model: {CONFIG_FILE} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: expected a JSON object at the top level, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise _err(path, "format", f"expected {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _err(path, "format_version", f"expected {FORMAT_VERSION}, got {meta.get('format_version')!r} "
                                           f"(saved by vlpl {meta.get('vlpl_version')!r})")
    unknown = sorted(set(meta) - _KEYS)
    if unknown:
        raise _err(path, unknown[0], f"unknown key (expected only: {', '.join(sorted(_KEYS))})")
    missing = sorted(k for k in _KEYS if k not in meta)
    if missing:
        raise _err(path, missing[0], "missing")
    if not isinstance(meta["student"], dict):
        raise _err(path, "student", "expected a mapping (the student config)")
    if not isinstance(meta["files"], dict) or not all(isinstance(v, str) for v in meta["files"].values()):
        raise _err(path, "files", "expected a mapping of file name -> sha256")
    if not isinstance(meta["num_classes"], int) or meta["num_classes"] < 1:
        raise _err(path, "num_classes", f"expected a positive integer, got {meta['num_classes']!r}")
    for k in ("mean", "std"):
        v = meta[k]
        if not (isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)):
            raise _err(path, k, f"expected a list of numbers, got {v!r}")
    return meta


def load_model(directory: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Classifier:
    """The classifier saved in ``directory`` by :func:`save_model`, rebuilt from its files alone, in eval
    mode. Never unpickles, never imports a module named in a file, never fetches pretrained weights."""
    from safetensors.torch import load

    d = Path(directory)
    cfg_path = d / CONFIG_FILE
    meta = read_model_json(d)
    files: Dict[str, str] = meta["files"]
    try:
        cfg = load_config(StudentConfig, base=meta["student"], base_source=f"{cfg_path} key 'student'")
    except ConfigError as e:
        raise ModelFileError(str(e)) from None
    if cfg.head.name not in HEADS:  # registry lookup only: nothing is imported for a name in a file
        raise _err(cfg_path, "student.head.name",
                   f"head {cfg.head.name!r} is not registered (registered: {', '.join(HEADS.names())}); a head "
                   f"from a plugin must be loaded with --plugin, it is never imported from a saved model")
    names = _read_checked(d, CLASSES_FILE, files, cfg_path).decode("utf-8").splitlines()
    if len(names) != meta["num_classes"]:
        raise _err(cfg_path, "num_classes", f"{meta['num_classes']}, but {d / CLASSES_FILE} has {len(names)} names")
    emb = None
    if meta["text_embeddings"] is not None:
        data = _read_checked(d, EMBEDDINGS_FILE, files, cfg_path)
        try:
            emb = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise ModelFileError(f"{d / EMBEDDINGS_FILE}: not a plain .npy array ({e})") from None
    try:
        context = ClassContext(names, emb)
    except ValueError as e:
        raise ModelFileError(f"{d}: {e}") from None
    cfg.pretrained = False
    cfg.open_clip_pretrained = None
    try:
        model = create_classifier(cfg, context, pretrained=False, use_student_text=False)
    except (ConfigError, RegistryError) as e:
        raise _err(cfg_path, "student", f"cannot rebuild the model: {e}") from None
    try:
        state = load(_read_checked(d, WEIGHTS_FILE, files, cfg_path))
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error types vary by version
        raise ModelFileError(f"{d / WEIGHTS_FILE}: not a safetensors file ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{d / WEIGHTS_FILE}: the weights do not fit the model described in {cfg_path} "
                             f"({str(e).splitlines()[0]})") from None
    model.mean, model.std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
    return model.to(map_location).eval()


__all__ = ["save_model", "load_model", "read_model_json", "ModelFileError", "FORMAT_VERSION"]

"""Training checkpoints that never execute code (issue 9.2), written atomically and verified on load.

A checkpoint is a folder ``checkpoints/step_NNNNNNNNN`` (the run's global micro-step) holding exactly::

    model.safetensors      the student's weights (safetensors: no code, no pickle)
    loss.safetensors       the loss's state (ROLE estimator, LL-Cp corrections, EM+APL soft negatives)
    optimizer.pt           optimizer state: tensors and plain data only, read with torch.load(weights_only=True)
    scheduler.pt           scheduler state, the same
    rng.pt                 RNG states as tensors / plain data (every draw is re-seeded from (seed, epoch, step)
                           anyway; kept so that nothing random is lost)
    progress.json          where the run is: epoch, step, position in the epoch, best mAP, history, ...
    complete.json          format version, and the sha256 of every file above; written last

It is written to ``checkpoints/.tmp-step_NNNNNNNNN``, every file fsynced, then renamed: a folder without
``complete.json`` is never a checkpoint. On load every file's sha256 is checked (a flipped bit is detected
and the file named), and a folder holding anything else (``*.pkl`` from accelerate's ``save_state``, a
crafted file) is refused without reading it: ``torch.load`` never runs with ``weights_only=False``.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "vlpl-train-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^step_(\d{9})$")
TMP_PREFIX = ".tmp-"
FILES = ("model.safetensors", "loss.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "progress.json")
COMPLETE = "complete.json"
SELF_KEY = "complete_sha256"  # complete.json's checksum of its own content (a flipped bit there is detected too)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or must not be loaded; the message names the path. (A ValueError,
    so that the CLI reports it as a clear message rather than a traceback.)"""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint whose files no longer match their recorded sha256 (or are missing): resume may fall back."""


# ---- fault injection (tests only) -----------------------------------------------------------------------

KILL_ENV = "VLPL_FAULT_KILL_AT"
_hits: Counter = Counter()


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL at the ``n``-th pass through point ``name`` when the environment says
    ``VLPL_FAULT_KILL_AT=name:n`` (the fault-injection tests; a no-op otherwise). Points: ``step`` (after an
    optimizer step), ``checkpoint`` (inside a checkpoint write, some files written), ``validate`` (inside
    validation), ``epoch_end`` (after the epoch's metrics record, before its checkpoint)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- writing ---------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_bytes(tensors: Dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # own, contiguous CPU copies: safetensors refuses tensors that share memory (tied weights)
    return save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()})


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the single write call; tests inject ENOSPC here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _self_checksum(complete: Dict[str, Any]) -> str:
    body = {k: v for k, v in complete.items() if k != SELF_KEY}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> Dict[str, Any]:
    """Torch (CPU, CUDA), numpy and Python RNG states as tensors and plain data (loadable with weights_only)."""
    np_state = np.random.get_state()
    py = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py[0]), "state": list(py[1]), "gauss": py[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointContent:
    """What a checkpoint holds, as loaded (tensors on the CPU)."""

    path: Path
    model: Dict[str, torch.Tensor]
    loss: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]
    rng: Dict[str, Any]
    progress: Dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def save_checkpoint(ckdir: Path, step: int, model_state: Dict[str, torch.Tensor], loss_state: Dict[str, torch.Tensor],
                    optimizer_state: Dict[str, Any], scheduler_state: Dict[str, Any], progress: Dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint ``step`` under ``ckdir`` atomically, then prune to the newest ``keep`` (0: keep all).

    On any OSError (a full disk, a read-only file system) the temporary folder is removed, every older
    checkpoint is kept, and a :class:`CheckpointError` names the file and the cause.
    """
    ckdir = Path(ckdir)
    final = ckdir / checkpoint_name(step)
    tmp = ckdir / (TMP_PREFIX + final.name)
    parts: List[Tuple[str, Callable[[], bytes]]] = [
        ("model.safetensors", lambda: _safetensors_bytes(model_state)),
        ("loss.safetensors", lambda: _safetensors_bytes(loss_state)),
        ("optimizer.pt", lambda: _torch_bytes(optimizer_state)),
        ("scheduler.pt", lambda: _torch_bytes(scheduler_state)),
        ("rng.pt", lambda: _torch_bytes(rng_state())),
        ("progress.json", lambda: (json.dumps(progress, indent=1, sort_keys=True) + "\n").encode()),
    ]
    current: Optional[Path] = None
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        hashes: Dict[str, str] = {}
        for i, (name, make) in enumerate(parts):
            data = make()
            current = tmp / name
            _write_file(current, data)
            hashes[name] = sha256_bytes(data)
            if i == 2:
                fault_point("checkpoint")
        complete = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                    "epoch": int(progress.get("epoch", 0)), "sha256": hashes}
        complete[SELF_KEY] = _self_checksum(complete)
        current = tmp / COMPLETE
        _write_file(current, (json.dumps(complete, indent=1, sort_keys=True) + "\n").encode())
        _fsync_dir(tmp)
        current = final
        if final.exists():  # a checkpoint of the same step (e.g. a resumed run re-reaching it): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = current or tmp
        prev = list_checkpoints(ckdir)
        kept = f"the previous checkpoint {prev[-1]} is kept" if prev else "no earlier checkpoint exists"
        if e.errno == errno.ENOSPC:
            msg = f"no space left on device writing checkpoint file {where}"
        else:
            msg = f"cannot write checkpoint file {where}: {e.strerror or e}"
        raise CheckpointError(f"{msg}; {kept}. Free space (or fix the folder) and resume with resume=true") from e
    if keep > 0:
        for old in list_checkpoints(ckdir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading ---------------------------------------------------------------------------------------------


def list_checkpoints(ckdir: Path) -> List[Path]:
    """Complete checkpoint folders (``step_*`` with ``complete.json``), oldest first."""
    ckdir = Path(ckdir)
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / COMPLETE).is_file())


def foreign_entries(ckdir: Path) -> List[Path]:
    """Entries of ``ckdir`` that are neither vlpl checkpoints nor vlpl temp folders (e.g. accelerate's
    ``epoch_001`` state folders of vlpl < 0.2, or anything planted there)."""
    ckdir = Path(ckdir)
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir()
                  if not CHECKPOINT_RE.match(p.name) and not p.name.startswith(TMP_PREFIX))


def remove_orphans(ckdir: Path) -> List[Path]:
    """Remove temporary folders left by a killed checkpoint write; returns what was removed."""
    ckdir = Path(ckdir)
    gone = []
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            if p.name.startswith(TMP_PREFIX) or (CHECKPOINT_RE.match(p.name) and not (p / COMPLETE).exists()):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointCorrupt(f"{path}: expected a JSON object")
    return data


def verify_checkpoint(path: Path) -> Dict[str, bytes]:
    """Check a checkpoint folder and return its files' bytes.

    Raises :class:`CheckpointError` for a folder that holds anything but vlpl's files (refused unread), and
    :class:`CheckpointCorrupt` for a missing file or a sha256 mismatch (the file is named).
    """
    path = Path(path)
    allowed = set(FILES) | {COMPLETE}
    extra = sorted(p.name for p in path.iterdir() if p.name not in allowed)
    if extra:
        raise CheckpointError(
            f"{path}: unexpected file(s) {', '.join(extra)}; a vlpl checkpoint holds only {', '.join(sorted(allowed))}. "
            f"Refusing to load it (checkpoints are never unpickled with code execution; a folder from "
            f"`accelerate save_state` or vlpl < 0.2 cannot be resumed)")
    complete = _read_json(path / COMPLETE)
    if complete.get(SELF_KEY) != _self_checksum(complete):
        raise CheckpointCorrupt(f"{path / COMPLETE}: its checksum does not match its content (changed after it "
                                f"was written)")
    if complete.get("format") != FORMAT or complete.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / COMPLETE}: format {complete.get('format')!r} version "
                              f"{complete.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
    hashes = complete.get("sha256")
    if not isinstance(hashes, dict) or set(hashes) != set(FILES):
        raise CheckpointCorrupt(f"{path / COMPLETE}: 'sha256' must list exactly {', '.join(FILES)}")
    out: Dict[str, bytes] = {}
    for name in FILES:
        f = path / name
        try:
            data = f.read_bytes()
        except OSError as e:
            raise CheckpointCorrupt(f"{f}: missing or unreadable ({e.strerror or e})") from e
        if sha256_bytes(data) != hashes[name]:
            raise CheckpointCorrupt(f"{f}: sha256 does not match the one recorded in {COMPLETE} (the file "
                                    f"changed after it was written: a flipped bit, a partial copy)")
        out[name] = data
    return out


def _load_torch(data: bytes, where: Path) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an UnpicklingError for anything but tensors and plain data
        raise CheckpointError(f"{where}: refused: holds something other than tensors and plain data "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def load_checkpoint(path: Path) -> CheckpointContent:
    """Verify (see :func:`verify_checkpoint`) and load one checkpoint; never executes code from it."""
    from safetensors.torch import load as st_load

    path = Path(path)
    files = verify_checkpoint(path)
    try:
        model = st_load(files["model.safetensors"])
        loss = st_load(files["loss.safetensors"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointCorrupt(f"{path}: unreadable safetensors ({type(e).__name__}: {e})") from e
    try:
        progress = json.loads(files["progress.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"{path / 'progress.json'}: {e}") from e
    return CheckpointContent(path, model, loss, _load_torch(files["optimizer.pt"], path / "optimizer.pt"),
                             _load_torch(files["scheduler.pt"], path / "scheduler.pt"),
                             _load_torch(files["rng.pt"], path / "rng.pt"), progress)


def load_latest(ckdir: Path) -> Optional[CheckpointContent]:
    """The newest checkpoint under ``ckdir`` that verifies; a corrupt one is skipped with a warning naming
    the file (resume then continues from the one before). A folder that must not be loaded (foreign files,
    a pickle that is not plain data), or checkpoints none of which verifies, stop with
    :class:`CheckpointError`. ``None`` when there is no checkpoint at all."""
    foreign = foreign_entries(ckdir)
    if foreign:
        raise CheckpointError(
            f"{ckdir}: unexpected entr{'y' if len(foreign) == 1 else 'ies'} {', '.join(p.name for p in foreign)}; "
            f"vlpl checkpoints are step_NNNNNNNNN folders. Refusing to resume (nothing in a checkpoint folder is "
            f"ever unpickled with code execution; a checkpoint of vlpl < 0.2 or `accelerate save_state` cannot "
            f"be resumed: start a new run, or remove the entry if you trust where it came from)")
    cks = list_checkpoints(ckdir)
    errors = []
    for i, path in enumerate(reversed(cks)):
        try:
            return load_checkpoint(path)
        except CheckpointCorrupt as e:
            older = cks[len(cks) - 2 - i] if len(cks) - 2 - i >= 0 else None
            errors.append(str(e))
            log.warning("checkpoint %s is corrupt: %s; %s", path.name, e,
                        f"falling back to {older.name}" if older else "no older checkpoint")
    if cks:
        raise CheckpointError(f"{ckdir}: no checkpoint verifies ({'; '.join(errors)}); refusing to start over "
                              f"silently: move the folder away to train from scratch")
    return None

"""Where a result came from: the command line, the source commit and the device (recorded with every run summary
and evaluation report, and required by the results page, :mod:`vlpl.results`)."""
from __future__ import annotations

import logging
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["command_line", "git_commit", "device_name", "provenance"]

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed (``vlpl`` for the console script's path), shell-quoted."""
    args = list(sys.argv if argv is None else argv)
    if args and Path(args[0]).name in ("vlpl", "__main__.py"):
        args[0] = "vlpl"
    return " ".join(shlex.quote(str(a)) for a in args)


def git_commit(root: Path = SOURCE_ROOT) -> Optional[Dict[str, Any]]:
    """``{"sha": HEAD, "dirty": uncommitted changes to tracked files}`` of the checkout vlpl runs from, or None
    outside a git checkout (an installed wheel: its version stands for the source)."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return {"sha": sha, "dirty": dirty} if sha else None


def device_name() -> str:
    """The accelerator this process computes on: ``"NVIDIA H100 80GB HBM3 x8"`` or ``"cpu (x86_64, 16 threads)"``."""
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{torch.cuda.get_device_name(0)}" + (f" x{n}" if n > 1 else "")
        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - no torch: still say what the machine is
        threads = None
    return f"cpu ({platform.machine()}" + (f", {threads} threads)" if threads else ")")


def provenance(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``{"command", "commit", "dirty", "version", "device", "host"}`` of this process."""
    from vlpl import __version__

    commit = git_commit()
    return {"command": command_line(argv), "commit": (commit or {}).get("sha"),
            "dirty": (commit or {}).get("dirty"), "version": __version__, "device": device_name(),
            "host": platform.node()}

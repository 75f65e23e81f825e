"""``run_export(cfg)``: the ``vlpl export`` stage function (the CLI and pipelines call it with an ExportConfig)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["check_export_config", "run_export"]


def check_export_config(cfg: Any) -> None:
    """Checks that need no torch and no store read: the format, the options that only some formats take, the
    rule and its parameters (:func:`vlpl.export.rows.resolve_rule`). Raises a ConfigError naming the key."""
    from vlpl.config import EXPORT_FORMATS, ConfigError
    from vlpl.export.rows import resolve_rule

    if cfg.format not in EXPORT_FORMATS:
        raise ConfigError(f"format: {cfg.format!r}; expected one of: {', '.join(EXPORT_FORMATS)}")
    if cfg.format != "hf":
        given = [k for k in ("save_to_disk", "push_to_hub") if getattr(cfg, k)]
        given += [k for k in ("with_images", "all_views", "embeddings") if getattr(cfg, k)]
        given += ["sparse_topk"] if cfg.sparse_topk else []
        if given:
            raise ConfigError(f"{', '.join(given)}: options of --format hf, not of --format {cfg.format}")
    if cfg.sparse_topk < 0:
        raise ConfigError(f"sparse_topk: {cfg.sparse_topk}; expected 0 (none) or the classes kept per image")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size: {cfg.batch_size}; expected >= 1")
    if (cfg.private or cfg.revision) and not cfg.push_to_hub:
        raise ConfigError("private / revision go with push_to_hub (--push-to-hub REPO_ID)")
    if cfg.thresholds is not None and not Path(cfg.thresholds).is_file():
        raise ConfigError(f"thresholds: {cfg.thresholds!r} does not exist (write one with `vlpl calibrate STORE`)")
    resolve_rule(cfg.rule, cfg.rule_params, cfg.thresholds)


def run_export(cfg: Any, argv: Optional[Sequence[str]] = None) -> Any:
    """Export ``cfg.store`` in ``cfg.format``: ``hf`` -> :func:`vlpl.export.hf.export_hf` (an
    :class:`~vlpl.export.hf.HFExport`), ``cole`` / ``laion`` -> :mod:`vlpl.export.formats` (the output folder)."""
    check_export_config(cfg)
    if cfg.format == "hf":
        from vlpl.export.hf import export_hf

        return export_hf(cfg, argv)
    from vlpl.export.formats import export_cole, export_laion

    return (export_cole if cfg.format == "cole" else export_laion)(cfg, argv)

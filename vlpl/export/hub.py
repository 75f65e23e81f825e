"""Push an export to the Hugging Face Hub: the card and metadata through ``huggingface_hub.HfApi``, the rows through
``DatasetDict.push_to_hub`` (which merges its ``configs`` / ``dataset_info`` into the card already uploaded).

The token is never handled here: ``HfApi`` and ``push_to_hub`` get ``token=None`` and find it themselves (``hf auth
login``'s stored token or ``HF_TOKEN``); nothing in this module prints, logs or writes it. Which account pushes is
logged by name only when the Hub says (``whoami``), never the token. Images go up only when the export holds them
(``--with-images``); otherwise the ``image`` column is the relative path string.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from vlpl.export.schema import METADATA_FILE

log = logging.getLogger(__name__)

__all__ = ["push_export", "HubError"]


class HubError(RuntimeError):
    """A push that failed; the message names the repo and the step (never the token)."""


def _step(what: str, repo: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - name the step and repo; any token-shaped text is redacted
        from vlpl.export.hf import redact

        hint = ""
        name = type(e).__name__
        if "Unauthorized" in str(e) or "401" in str(e) or name in ("LocalTokenNotFoundError", "HfHubHTTPError"):
            hint = " (log in with `hf auth login` or set HF_TOKEN; a write token is needed)"
        raise HubError(f"push to {repo}: {what} failed: {name}: {redact(str(e))}{hint}") from None


def push_export(dd: Any, out: Path, config_name: str, repo_id: str, *, private: bool = False,
                revision: Optional[str] = None, max_shard_size: Any = "500MB") -> str:
    """Upload the export of ``config_name`` (the ``DatasetDict`` ``dd`` and the card of folder ``out``) to the
    dataset repo ``repo_id``; returns the repo's URL.

    Steps: ``create_repo(exist_ok=True)`` (``private``), ``create_branch`` for ``revision``, the card checked by the
    Hub's own YAML validation (``DatasetCard.validate``; offline checks ran when it was rendered), upload ``README.md``
    (rendered for ``repo_id``), then ``dd.push_to_hub(repo_id, config_name=config_name, ...)`` (Parquet shards of at
    most ``max_shard_size`` under ``<config>/``; it updates the card's ``configs`` and ``dataset_info`` in place and
    deletes the other files of ``<config>/``), then ``<config>/vlpl_export.json``.
    """
    from huggingface_hub import HfApi

    from vlpl.export.card import read_configs, render_card

    api = HfApi()  # token: the standard login / HF_TOKEN, resolved by huggingface_hub
    url = _step("create_repo", repo_id, api.create_repo, repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision is not None and not str(revision).startswith("refs/pr/"):
        _step("create_branch", repo_id, api.create_branch, repo_id, branch=revision, repo_type="dataset",
              exist_ok=True)
    card = render_card(read_configs(out), repo=repo_id)
    _step("validate the card (Hub YAML validation)", repo_id, card.validate, repo_type="dataset")
    _step("upload README.md", repo_id, api.upload_file, path_or_fileobj=str(card).encode("utf-8"),
          path_in_repo="README.md", repo_id=repo_id, repo_type="dataset", revision=revision,
          commit_message=f"vlpl export: dataset card ({config_name})")
    _step("push_to_hub", repo_id, dd.push_to_hub, repo_id, config_name=config_name, private=private,
          revision=revision, max_shard_size=max_shard_size,
          commit_message=f"vlpl export: {config_name} ({', '.join(f'{k} {len(v)}' for k, v in dd.items())})")
    _step(f"upload {config_name}/{METADATA_FILE}", repo_id, api.upload_file,
          path_or_fileobj=str(Path(out) / config_name / METADATA_FILE), path_in_repo=f"{config_name}/{METADATA_FILE}",
          repo_id=repo_id, repo_type="dataset", revision=revision,
          commit_message=f"vlpl export: {config_name} metadata")
    link = str(getattr(url, "url", None) or f"https://huggingface.co/datasets/{repo_id}")
    log.info("pushed %s to %s%s", config_name, link, f" (revision {revision})" if revision else "")
    return link

"""vlpl export --push-to-hub, exercised up to the network boundary.

``huggingface_hub.HfApi``'s network methods (``repo_info``, ``create_repo``, ``create_branch``, ``upload_file``,
``preupload_lfs_files``, ``create_commit``) and the Hub file system datasets reads the existing card through are
replaced by a fake Hub that keeps the repo in a local folder; everything above them is the real code: vlpl's push,
``DatasetDict.push_to_hub`` (shard sizing, Parquet writing, the card's ``configs`` / ``dataset_info`` merge). A
fake token sits in ``HF_TOKEN`` and must appear in no log line, no output and no written file.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

TOKEN = "hf_" + "Zq7" * 12  # shaped like a real token; never valid anywhere
REPO = "someone/coco256-pseudo"


class FakeHub:
    """A Hub that stores one dataset repo in ``root`` and records every API call (without their values' bytes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: List[Tuple[str, Dict[str, Any]]] = []

    def _write(self, path_in_repo: str, src: Any) -> None:
        dst = self.root / path_in_repo
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, (bytes, bytearray)):
            dst.write_bytes(bytes(src))
        elif isinstance(src, (str, Path)):
            dst.write_bytes(Path(src).read_bytes())
        else:
            dst.write_bytes(src.read())

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import datasets.dataset_dict as dsd
        import huggingface_hub as hh
        from fsspec.implementations.dirfs import DirFileSystem
        from fsspec.implementations.local import LocalFileSystem

        hub = self

        def record(name: str, **kw: Any) -> None:
            hub.calls.append((name, {k: v for k, v in kw.items() if k not in ("additions", "operations",
                                                                              "path_or_fileobj")}))

        def repo_info(api: Any, repo_id: str, *a: Any, **kw: Any) -> Any:
            record("repo_info", repo_id=repo_id, token=api.token, **kw)
            return SimpleNamespace(id=repo_id, sha="0" * 40)

        def create_repo(api: Any, repo_id: str, *a: Any, **kw: Any) -> Any:
            record("create_repo", repo_id=repo_id, token=api.token, **kw)
            hub.root.mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/datasets/{repo_id}")

        def create_branch(api: Any, repo_id: str, *a: Any, **kw: Any) -> None:
            record("create_branch", repo_id=repo_id, token=api.token, **kw)

        def upload_file(api: Any, *, path_or_fileobj: Any, path_in_repo: str, repo_id: str, **kw: Any) -> None:
            record("upload_file", repo_id=repo_id, path_in_repo=path_in_repo, token=api.token, **kw)
            hub._write(path_in_repo, path_or_fileobj)

        def preupload_lfs_files(api: Any, repo_id: str, additions: Any, **kw: Any) -> None:
            record("preupload_lfs_files", repo_id=repo_id, token=api.token, **kw)
            for op in additions:  # the shard's temporary file is deleted after this call: keep its bytes now
                with op.as_file() as f:
                    op._fake_bytes = f.read()

        def create_commit(api: Any, repo_id: str, operations: Any, **kw: Any) -> Any:
            record("create_commit", repo_id=repo_id, token=api.token, **kw)
            for op in operations:
                if isinstance(op, hh.CommitOperationAdd):
                    data = getattr(op, "_fake_bytes", None)
                    if data is None:
                        with op.as_file() as f:
                            data = f.read()
                    hub._write(op.path_in_repo, io.BytesIO(data))
                elif isinstance(op, hh.CommitOperationDelete):
                    (hub.root / op.path_in_repo).unlink(missing_ok=True)
            return SimpleNamespace(commit_url="fake", oid="1" * 40)

        def validate(card: Any, repo_type: Any = None) -> None:  # the Hub's /api/validate-yaml: offline checks only
            from vlpl.export.card import front_matter

            record("validate", repo_type=repo_type)
            front_matter(str(card))

        monkeypatch.setattr(hh.RepoCard, "validate", validate)
        for name, fn in (("repo_info", repo_info), ("create_repo", create_repo), ("create_branch", create_branch),
                         ("upload_file", upload_file), ("preupload_lfs_files", preupload_lfs_files),
                         ("create_commit", create_commit)):
            monkeypatch.setattr(hh.HfApi, name, fn)
        # datasets reads the repo's current card and lists its files through the Hub file system: the local repo
        monkeypatch.setattr(dsd, "HfFileSystem", lambda *a, **kw: LocalFileSystem())
        monkeypatch.setattr(dsd, "DirFileSystem", lambda fs, path: DirFileSystem(path=str(hub.root),
                                                                                   fs=LocalFileSystem()))


def _all_text_of(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_push_to_hub_up_to_the_network(coco256_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    """vlpl export --push-to-hub --private --revision --max-shard-size: the repo gets the card (task fields, our
    body, datasets' dataset_info merged in), the Parquet shards under <config>/ and vlpl_export.json; the rows read
    back from the fake repo equal the local export; no call carries the token (the libraries resolve it from
    HF_TOKEN themselves) and the token is in no log, no output and no file."""
    import datasets

    from vlpl.cli import main
    from vlpl.export.card import front_matter

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    rc = main(["-vv", "export", str(coco256_store), "--out", str(out), "--push-to-hub", REPO, "--private",
               "--revision", "dev", "--max-shard-size", "20KB", "--save-to-disk", str(tmp_path / "disk"),
               "--sparse-topk", "3"])
    assert rc == 0
    printed = capsys.readouterr()
    assert f"pushed: https://huggingface.co/datasets/{REPO}" in printed.out
    # what was called, and how
    names = [n for n, _ in hub.calls]
    assert names[:4] == ["create_repo", "create_branch", "validate", "upload_file"]
    assert "preupload_lfs_files" in names and "create_commit" in names and names[-1] == "upload_file"
    create = dict(hub.calls[0][1])
    assert create["private"] is True and create["repo_type"] == "dataset" and create["exist_ok"] is True
    assert hub.calls[1][1]["branch"] == "dev"
    commit = next(kw for n, kw in hub.calls if n == "create_commit")
    assert commit["revision"] == "dev"
    for _, kw in hub.calls:
        assert kw.get("token") is None  # vlpl never hands a token over: the library finds HF_TOKEN / the login
    # the repo: card, shards (20KB -> several per split), metadata
    config = "vlpl_tiny_damp"
    shards = sorted(p.name for p in (hub.root / config).glob("*.parquet"))
    assert len([s for s in shards if s.startswith("test-")]) > 1
    assert (hub.root / config / "vlpl_export.json").is_file()
    card = (hub.root / "README.md").read_text()
    fm = front_matter(card)
    assert fm["task_ids"] == ["multi-label-image-classification"] and fm["license"] == "other"
    assert [c["config_name"] for c in fm["configs"]] == [config]
    assert fm["dataset_info"]["config_name"] == config  # merged in by datasets' push_to_hub
    assert "Rule**: `damp`" in card and f'load_dataset("{REPO}", "{config}")' in card
    pushed = datasets.load_dataset("parquet", data_files={s: str(hub.root / config / f"{s}-*.parquet")
                                                          for s in ("train", "val", "test")})
    local = datasets.load_from_disk(str(tmp_path / "disk"))
    for split in ("train", "val", "test"):
        assert pushed[split].features == local[split].features
        assert pushed[split]["sample_id"] == local[split]["sample_id"]
        assert pushed[split]["image"] == local[split]["image"]  # paths: no image was uploaded
        np.testing.assert_array_equal(np.asarray(pushed[split]["vlpl_tiny_score"], np.float32),
                                      np.asarray(local[split]["vlpl_tiny_score"], np.float32))
    assert isinstance(pushed["train"].features["image"], datasets.Value)
    # the token: nowhere
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged  # logging was on
    for text in (logged, printed.out, printed.err):
        assert TOKEN not in text
    for folder in (out, tmp_path / "disk", hub.root):
        assert TOKEN.encode() not in _all_text_of(folder)


def test_push_failure_names_step_without_token(coco256_store: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub error is reported with the repo and the step; a token echoed in the library's message is redacted."""
    import huggingface_hub as hh

    from vlpl.config import ExportConfig, load_config
    from vlpl.export.hub import HubError
    from vlpl.export.stage import run_export

    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def create_repo(api: Any, repo_id: str, *a: Any, **kw: Any) -> Any:
        raise RuntimeError(f"401 Unauthorized for token {TOKEN}")

    monkeypatch.setattr(hh.HfApi, "create_repo", create_repo)
    cfg = load_config(ExportConfig, [], [f"store={coco256_store}", f"out={tmp_path / 'out'}", f"push_to_hub={REPO}",
                                         "splits=[val]"])
    with pytest.raises(HubError) as e:
        run_export(cfg)
    assert REPO in str(e.value) and "create_repo" in str(e.value) and "hf auth login" in str(e.value)
    assert TOKEN not in str(e.value)
    assert (tmp_path / "out" / "README.md").is_file()  # the local export is complete before the push

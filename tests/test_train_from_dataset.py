"""vlpl train from a `vlpl export` dataset (issue 13, item 4): the dataset read through the store API gives the
store's values, training from it gives the store's per-step pseudo-labels, losses and predictions, and what an
export lacks (views, images, vlpl's metadata) is refused by name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

from vlpl.config import ExportConfig, load_config

TINY_NET = Path(__file__).resolve().parent.parent / "configs" / "models" / "tiny_classifier.yaml"
CONFIG = "vlpl_tiny_damp"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """datasets' cache (the Arrow files of Parquet inputs) in a temporary folder for this module."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
        yield


def _export(store: Path, out: Path, *overrides: str) -> None:
    from vlpl.export.stage import run_export

    run_export(load_config(ExportConfig, [], [f"store={store}", f"out={out}", *overrides]), argv=["vlpl", "export"])


@pytest.fixture(scope="module")
def full(coco256_store: Path, tmp_path_factory: pytest.TempPathFactory, hf_cache: Any) -> Dict[str, Path]:
    """coco256 exported with every view, the images and the embeddings (+ save_to_disk)."""
    base = tmp_path_factory.mktemp("full")
    _export(coco256_store, base / "out", "all_views=true", "with_images=true", "embeddings=true",
            f"save_to_disk={base / 'disk'}")
    return {"out": base / "out", "disk": base / "disk"}


@pytest.fixture(scope="module")
def bare(coco256_store: Path, tmp_path_factory: pytest.TempPathFactory, hf_cache: Any) -> Path:
    """coco256 exported with the defaults: the global view only, image paths only."""
    out = tmp_path_factory.mktemp("bare") / "out"
    _export(coco256_store, out)
    return out


def _train(store: Any, out: Path, *overrides: str) -> Path:
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    return run_train(load_train_config([TINY_NET], [
        f"store={store}", f"out={out}", "progress=false", "epochs=1", "max_steps_per_epoch=3", "batch_size=8",
        "eval_batch_size=64", "log_every=1", *overrides]))


def _spy(monkeypatch: pytest.MonkeyPatch) -> List[Tuple[Any, Any, Any]]:
    """Record every training step's batch positions, pseudo-labels and loss."""
    import vlpl.train.loop as loop

    seen: List[Tuple[Any, Any, Any]] = []
    real = loop.train_step

    def spy(batch: Any, model: Any, loss: Any, rule: Any, state: Any) -> Any:
        out = real(batch, model, loss, rule, state)
        seen.append((batch.index.detach().clone(), None if out.pseudo is None else out.pseudo.detach().cpu().clone(),
                     out.terms["loss"].detach().clone()))
        return out

    monkeypatch.setattr(loop, "train_step", spy)
    return seen


def _assert_same_steps(a: List[Tuple[Any, Any, Any]], b: List[Tuple[Any, Any, Any]]) -> None:
    import torch

    assert len(a) == len(b) == 3
    for (ia, pa, la), (ib, pb, lb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert pa is not None and torch.equal(pa, pb)
        assert torch.equal(la, lb), (la, lb)
    assert any(bool((p == 1).any()) for _, p, _ in a)  # the rule labelled something: the comparison has content


# --------------------------------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["out", "prefixed", "config_dir", "disk"])
def test_dataset_reads_as_the_store(coco256_store: Path, full: Dict[str, Path], where: str) -> None:
    """Every way of naming the export opens a DatasetStore whose readers give the store's values exactly: scores in
    the store's layout (positions in any order), observed and full labels, ids, views, kind, classes."""
    from vlpl.store.hf_dataset import DatasetStore
    from vlpl.store.store import ScoreStore

    src = {"out": str(full["out"]), "prefixed": f"hf:{full['out']}#{CONFIG}",
           "config_dir": str(full["out"] / CONFIG), "disk": str(full["disk"])}[where]
    store, ds = ScoreStore.open(coco256_store), ScoreStore.open(src)
    assert isinstance(ds, DatasetStore) and ds.config_name == CONFIG
    assert ds.classes == store.classes and ds.view_spec == store.view_spec and ds.score_kind == store.score_kind
    assert ds.splits() == store.splits() and ds.embedding_dim == store.embedding_dim
    for name in store.splits():
        a, b = store.split(name), ds.split(name)
        pos = np.random.default_rng(0).permutation(len(a))[:37]
        np.testing.assert_array_equal(b.scores(pos), a.scores(pos))  # float16 in both: bit-identical
        np.testing.assert_array_equal(b.observed_at(pos), a.observed_at(pos))
        np.testing.assert_array_equal(b.labels_at(pos), a.labels_at(pos))
        np.testing.assert_array_equal(b.image_embeddings(pos), a.image_embeddings(pos).astype(np.float16))
        assert list(b.sample_ids) == list(a.sample_ids) and b.sample_ids[5] == a.sample_ids[5]
        assert b.images[3] == f"hf://{name}/3"  # the dataset's own image column
        got = np.concatenate([s for _, s in b.iter_scores(50)])
        np.testing.assert_array_equal(got, a.scores(np.arange(len(a))))
        assert b.labels_known.all() and b.observed.shape == (len(a), store.num_classes)


def test_image_refs_of_a_dataset_open_the_same_pixels(coco256_store: Path, coco256_root: Path,
                                                      full: Dict[str, Path]) -> None:
    from vlpl.data.images import ImageSource
    from vlpl.store.store import ScoreStore

    store, ds = ScoreStore.open(coco256_store), ScoreStore.open(str(full["out"]))
    a, b = store.split("val"), ds.split("val")
    src_a = ImageSource.from_store(store.dataset_info, None)
    src_b = ds.image_source(None)
    for i in (0, 7):
        assert np.array_equal(np.asarray(src_b.open(b.images[i])), np.asarray(src_a.open(a.images[i])))


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["hub_layout", "disk"])
def test_training_from_the_export_equals_training_from_the_store(coco256_store: Path, full: Dict[str, Path],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 where: str) -> None:
    """DAMP with dynamic flip draws (every view, both variants): per step the same batch, the same pseudo-labels
    and the same loss; the same test predictions at the end. The dataset holds the images themselves."""
    src = f"hf:{full['out']}" if where == "hub_layout" else str(full["disk"])
    steps_store = _spy(monkeypatch)
    run_a = _train(coco256_store, tmp_path / "a", "pseudo.rule=damp")
    steps_ds: List[Tuple[Any, Any, Any]] = []
    monkeypatch.undo()
    steps_ds = _spy(monkeypatch)
    run_b = _train(src, tmp_path / "b", "pseudo.rule=damp")
    _assert_same_steps(steps_store, steps_ds)
    pa, pb = np.load(run_a / "predictions" / "test.npz"), np.load(run_b / "predictions" / "test.npz")
    np.testing.assert_array_equal(pb["probs"], pa["probs"])
    np.testing.assert_array_equal(pb["labels"], pa["labels"])
    summary = json.loads((run_b / "summary.json").read_text())
    assert summary["store"] == (src if src.startswith("hf:") else str(Path(src).resolve()))
    ident = json.loads((run_b / "store.json").read_text())
    assert ident["score_format"] == "dataset" and ident["views"]["num_views"] == 10


def test_cli_trains_from_a_global_view_export_with_a_data_root(coco256_store: Path, coco256_root: Path, bare: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A default export (global view, image paths) serves a rule that reads only the unflipped global view (VLPL,
    pseudo.variant=unflipped): `vlpl train store=hf:DIR data_root=...` gives the store's per-step results."""
    from vlpl.cli import main

    args = ["pseudo.rule=vlpl", "pseudo.variant=unflipped", "pseudo.params.threshold=0.02"]
    steps_store = _spy(monkeypatch)
    _train(coco256_store, tmp_path / "a", *args)
    monkeypatch.undo()
    steps_ds = _spy(monkeypatch)
    assert main(["train", "-c", str(TINY_NET), f"store=hf:{bare}", f"data_root={coco256_root}",
                 f"out={tmp_path / 'b'}", "progress=false", "epochs=1", "max_steps_per_epoch=3", "batch_size=8",
                 "eval_batch_size=64", "log_every=1", *args]) == 0
    _assert_same_steps(steps_store, steps_ds)


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["pseudo.rule=damp"], [r"rule 'damp' reads the 4 other views per variant \(tile_0_0", "--all-views"]),
    (["pseudo.rule=vlpl"], ["rule 'vlpl' reads the flipped views", "--all-views", "pseudo.variant=unflipped"]),
    (["pseudo.rule=topk", "pseudo.params.view=max", "pseudo.dynamic=false"], ["view='max'", "--all-views"]),
    (["pseudo.rule=vlpl", "pseudo.variant=unflipped"], ["exported without --with-images", "data_root=DIR",
                                                        "vlpl export STORE --with-images"]),
    (["pseudo.rule=vlpl", "pseudo.variant=unflipped", "loss.reconstruction=0.5"], ["--embeddings"]),
    (["pseudo.rule=vlpl", "pseudo.variant=unflipped", "student.head=sigrl"],
     ["head 'sigrl' reads the class text embeddings", "student.head.text_embeddings=student"]),
])
def test_what_an_export_lacks_is_refused_by_name(bare: Path, tmp_path: Path, overrides: List[str],
                                                 expected: List[str]) -> None:
    from vlpl.store.hf_dataset import DatasetSourceError

    with pytest.raises(DatasetSourceError) as e:
        _train(f"hf:{bare}", tmp_path / "run", *overrides)
    for pattern in expected:
        assert pattern in str(e.value) or __import__("re").search(pattern, str(e.value)), (pattern, str(e.value))
    assert str(bare) in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_dataset_not_made_by_vlpl_is_refused(tmp_path: Path, hf_cache: Any) -> None:
    import datasets

    from vlpl.store.hf_dataset import DatasetSourceError
    from vlpl.store.store import ScoreStore

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": ["a.jpg"], "label": [1]})})
    dd.save_to_disk(str(tmp_path / "disk"))
    dd["train"].to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    for src in (tmp_path / "disk", f"hf:{tmp_path / 'disk'}", tmp_path / "pq"):
        with pytest.raises(DatasetSourceError, match=r"not a dataset made by `vlpl export` \(.*vlpl_export.json"):
            ScoreStore.open(src)
    with pytest.raises(DatasetSourceError, match="not a dataset made by `vlpl export`"):
        _train(f"hf:{tmp_path / 'disk'}", tmp_path / "run")


def test_hub_id_reads_the_card_config_and_its_metadata(coco256_store: Path, full: Dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf:user/repo`: the configs listed, `<config>/vlpl_export.json` fetched with hf_hub_download and the rows
    loaded with load_dataset(repo, config): the Hub client replaced at its API boundary by the local export."""
    import datasets
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from vlpl.store.hf_dataset import DatasetSourceError
    from vlpl.store.store import ScoreStore

    calls: List[Any] = []
    real_load = datasets.load_dataset

    def download(repo_id: str, filename: str, repo_type: str, revision: Any = None, **kw: Any) -> str:
        calls.append(("download", repo_id, filename, repo_type, revision))
        if repo_id != "user/pseudo":
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(full["out"] / filename)

    def configs(repo_id: str, revision: Any = None, **kw: Any) -> List[str]:
        calls.append(("configs", repo_id, revision))
        return [CONFIG]

    def load(path: str, name: Any = None, **kw: Any) -> Any:
        calls.append(("load", path, name, kw.get("revision")))
        return real_load(str(full["out"]) if path in ("user/pseudo", "user/other") else path, name, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(datasets, "get_dataset_config_names", configs)
    monkeypatch.setattr(datasets, "load_dataset", load)
    ds = ScoreStore.open("hf:user/pseudo@v1")
    assert ("configs", "user/pseudo", "v1") in calls
    assert ("download", "user/pseudo", f"{CONFIG}/vlpl_export.json", "dataset", "v1") in calls
    assert ("load", "user/pseudo", CONFIG, "v1") in calls
    store = ScoreStore.open(coco256_store)
    np.testing.assert_array_equal(ds.split("train").scores([4, 0]), store.split("train").scores([4, 0]))
    with pytest.raises(DatasetSourceError, match=r"hf:user/other: not a dataset made by `vlpl export`"):
        ScoreStore.open(f"hf:user/other#{CONFIG}")


@pytest.mark.parametrize("rule, params, variant, grid, flips, needs", [
    ("damp", {}, "unflipped", 2, True, "tile_0_0"),
    ("damp", {}, "unflipped", 0, False, None),  # no grid: DAMP reads the global view only
    ("vlpl", {}, "unflipped", 2, True, None),
    ("vlpl", {}, "random", 2, True, "flipped views"),
    ("vlpl", {}, "random", 2, False, None),  # no flips cached: random takes the unflipped view
    ("threshold", {"view": "global"}, "unflipped", 2, True, None),
    ("threshold", {"view": "mean"}, "unflipped", 2, True, "view='mean'"),
    ("my_plugin_rule", {}, "unflipped", 2, True, "every cached view"),
])
def test_views_needed(rule: str, params: Dict[str, Any], variant: str, grid: int, flips: bool, needs: Any) -> None:
    from vlpl.store.hf_dataset import views_needed
    from vlpl.store.views import ViewSpec

    got = views_needed(rule, params, variant, ViewSpec(grid=grid, flips=flips, image_size=(64, 64)))
    assert (got is None) if needs is None else (needs in got), got


def test_dataset_sources_are_recognised(coco256_store: Path, full: Dict[str, Path], tmp_path: Path) -> None:
    from vlpl.store.hf_dataset import is_dataset_source, parse_source

    assert is_dataset_source("hf:user/name") and is_dataset_source(full["out"]) and is_dataset_source(full["disk"])
    assert not is_dataset_source(coco256_store) and not is_dataset_source([str(coco256_store)])
    assert not is_dataset_source(tmp_path) and not is_dataset_source(tmp_path / "missing")
    assert parse_source("hf:user/name@main#cfg") == ("user/name", "cfg", "main", True)
    assert parse_source("hf://user/name") == ("user/name", None, None, True)
    assert parse_source(f"{full['out']}#{CONFIG}") == (str(full["out"]), CONFIG, None, False)


def test_knn_finds_the_stores_neighbours_in_the_exported_embeddings(coco256_store: Path, full: Dict[str, Path]) -> None:
    """Rule knn from an export with --all-views --embeddings: no FAISS index travels with it, so the exported image
    embeddings are searched exactly; the pseudo-labels equal the store's (whose index is a Flat one)."""
    import torch

    from vlpl.pseudolabel.rules import RuleRows, apply_rule
    from vlpl.store.store import ScoreStore

    got = []
    for st in (ScoreStore.open(coco256_store), ScoreStore.open(str(full["out"]))):
        sp = st.split("train")
        pos = np.arange(len(sp))
        got.append(apply_rule("knn", torch.from_numpy(sp.scores(pos)), torch.from_numpy(sp.observed_at(pos)),
                              dynamic=False, rows=RuleRows(sp, pos), base="damp", k=5, alpha=0.5))
    assert torch.equal(got[0], got[1]) and bool((got[0] == 1).any())


def test_partial_annotations_keep_their_kind(coco256_real_partial_store: Path, tmp_path: Path, hf_cache: Any) -> None:
    """A store of real partial annotations (labels_kind partial, {-1,0,1}): the dataset's readers say partial and
    give the same annotations and observed labels, so the trainer picks the same selection criterion."""
    from vlpl.eval.selection import resolve_criterion
    from vlpl.store.store import ScoreStore

    _export(coco256_real_partial_store, tmp_path / "out", "splits=[val]")
    store, ds = ScoreStore.open(coco256_real_partial_store), ScoreStore.open(f"hf:{tmp_path / 'out'}")
    a, b = store.split("val"), ds.split("val")
    assert ds.labels_kind == b.labels_kind == a.labels_kind == "partial"
    assert list(ds.splits()) == ["val"]
    np.testing.assert_array_equal(b.labels, a.labels)
    assert (b.labels == -1).any()
    np.testing.assert_array_equal(b.observed, a.observed)
    assert resolve_criterion("auto", b) == resolve_criterion("auto", a) == "masked_map_observed"


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_a_run_from_a_dataset_resumes_bit_identically(full: Dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 3 (checkpoint at step 2) and resumed with the dataset named another way (OUT#config instead
    of hf:OUT: the identity is the data's, not the spelling's): the step losses and the test predictions equal an
    uninterrupted run's."""
    import vlpl.train.loop as loop

    args = ["epochs=2", "max_steps_per_epoch=2", "checkpoint_every_steps=2", "pseudo.rule=damp"]
    straight = _train(f"hf:{full['out']}", tmp_path / "straight", *args)
    hits = {"n": 0}

    def kill(name: str) -> None:
        if name == "step":
            hits["n"] += 1
            if hits["n"] == 3:
                raise _Killed()

    monkeypatch.setattr(loop, "fault_point", kill)
    with pytest.raises(_Killed):
        _train(f"hf:{full['out']}", tmp_path / "resumed", *args)
    monkeypatch.undo()
    steps = _spy(monkeypatch)
    resumed = _train(f"{full['out']}#{CONFIG}", tmp_path / "resumed", *args, "resume=true")
    assert len(steps) == 2  # steps 3 and 4 only: it continued from the step-2 checkpoint

    def losses(run: Path) -> List[Tuple[int, float]]:
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if r["kind"] == "step"]

    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    np.testing.assert_array_equal(np.load(resumed / "predictions" / "test.npz")["probs"],
                                  np.load(straight / "predictions" / "test.npz")["probs"])

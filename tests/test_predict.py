"""``vlpl predict``: the trained model's scores on new images, tags, inputs (files, folders, lists, webdataset),
corrupt images recorded and skipped, outputs in three formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlpl.cli import main as cli_main
from vlpl.predict import (
    PredictError,
    choose_tagging,
    collect_images,
    f1_thresholds,
    predict_images,
    read_predictions,
    run_thresholds,
    write_thresholds_file,
)

REPO = Path(__file__).resolve().parent.parent
TINY_NET = str(REPO / "configs" / "models" / "tiny_classifier.yaml")


@pytest.fixture(scope="module")
def trained_run(coco256_store, tmp_path_factory) -> Path:
    """A tiny an run on the shared coco256 store (1 epoch, 2 steps): best/ and predictions/{val,test}.npz."""
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    out = tmp_path_factory.mktemp("predict") / "run"
    run_train(load_train_config([TINY_NET], [f"store={coco256_store}", f"out={out}", "progress=false",
                                             "method=an", "epochs=1", "max_steps_per_epoch=2",
                                             "eval_batch_size=32"]))
    return out


def _test_files(store: Path):
    from vlpl.store.store import ScoreStore

    st = ScoreStore.open(store)
    root = Path(st.dataset_info["root"])
    test = st.split("test")
    return [str((root / ref).resolve()) for ref in test.images], list(test.sample_ids)


def test_scores_on_the_test_images_equal_the_runs_saved_test_predictions(trained_run, coco256_store, tmp_path):
    files, ids = _test_files(coco256_store)
    saved = np.load(trained_run / "predictions" / "test.npz", allow_pickle=False)
    assert list(saved["sample_ids"]) == ids
    # another batch size than the run's eval batch (32), and a list file as input
    lst = tmp_path / "test.txt"
    lst.write_text("# the test split\n" + "\n".join(files) + "\n")
    res = predict_images(trained_run, [str(lst)], tmp_path / "p.parquet", batch_size=7, device="cpu",
                         num_workers=0, show_progress=False)
    assert res.images == len(files) and res.failed == 0
    images, errors, tags, probs, classes = read_predictions(res.out)
    assert images == files and errors == [None] * len(files)
    assert classes == (trained_run / "classes.txt").read_text().splitlines()
    np.testing.assert_allclose(probs, saved["probs"], rtol=0, atol=2e-6)
    assert float(np.abs(probs - saved["probs"]).max()) < 2e-6
    # the tags are the run's thresholds applied to those scores
    t = run_thresholds(trained_run, classes).thresholds
    assert tags == [[c for c, p, th in zip(classes, row, t) if p >= th] for row in probs]


def test_formats_agree_and_corrupt_images_are_rows_with_an_error(trained_run, coco256_store, tmp_path):
    files, _ = _test_files(coco256_store)
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for f in files[:3]:
        (folder / Path(f).name).write_bytes(Path(f).read_bytes())
    good = sorted(str(p.resolve()) for p in folder.iterdir())
    (folder / "zz_broken.jpg").write_bytes(Path(files[0]).read_bytes()[:300])  # truncated JPEG
    (folder / "notes.md").write_text("not an image")  # not listed: no image extension
    outs = {}
    for ext in ("csv", "jsonl", "parquet"):
        res = predict_images(trained_run, [str(tmp_path / "imgs")], tmp_path / f"o.{ext}", topk=2,
                             device="cpu", num_workers=0, show_progress=False)
        assert res.images == 4 and res.failed == 1
        outs[ext] = read_predictions(res.out)
    images, errors, tags, probs, classes = outs["parquet"]
    assert images[:3] == good and images[3].endswith("zz_broken.jpg")
    assert errors[:3] == [None] * 3 and "truncated" in errors[3] and tags[3] is None and np.isnan(probs[3]).all()
    top = np.argsort(-probs[:3], axis=1, kind="stable")[:, :2]
    assert tags[:3] == [[classes[c] for c in row] for row in top]
    for ext in ("csv", "jsonl"):
        i2, e2, t2, p2, c2 = outs[ext]
        assert (i2, e2, t2, c2) == (images, errors, tags, classes)
        np.testing.assert_array_equal(p2, probs)  # float32 round trip through text, exact
    assert not list(tmp_path.glob(".o.*"))  # no temporary file left
    # a listed file that does not exist is a row with an error too, not a crash
    lst = tmp_path / "l.txt"
    lst.write_text(f"{good[0]}\nimgs/gone.jpg\n")
    res = predict_images(trained_run, [str(lst)], tmp_path / "m.jsonl", device="cpu", num_workers=0,
                         show_progress=False)
    i3, e3, _, p3, _ = read_predictions(res.out)
    assert res.failed == 1 and i3[1] == str(tmp_path / "imgs" / "gone.jpg") and "not found" in e3[1]
    # a batch of one image against the same image in a batch of many: equal up to float32 summation order
    np.testing.assert_allclose(p3[0], probs[0], rtol=1e-6, atol=1e-7)


def test_f1_thresholds_hand_computed():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.3], [0.3, 0.3]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    t = f1_thresholds(probs, labels)
    # class 0: t=0.9 -> F1 2/3; t=0.8 -> 1/2; t=0.4 -> 2*2/(3+2)=0.8; t=0.3 -> 2*2/(4+2)=2/3: best 0.4
    assert t[0] == 0.4 and t[1] == 0.5  # class 1 has no positive: the default
    # partial labels (+1 / -1 annotated, 0 unknown): only annotated entries count
    part = np.array([[1, 1], [0, -1], [-1, 0], [1, 0]])
    t = f1_thresholds(probs, part, partial=True)
    # class 0 on rows 0, 2, 3 (scores 0.9+, 0.4-, 0.3+): t=0.9 -> 2/3, t=0.4 -> 2*1/(2+2)=1/2, t=0.3 -> 2*2/(3+2)=0.8
    # class 1: rows 0 (+, 0.1) and 1 (-, 0.2): t=0.2 -> 0, t=0.1 -> 2/3 -> 0.1
    assert t[0] == 0.3 and t[1] == 0.1
    assert f1_thresholds(probs, np.array([[1, 1], [0, 0], [0, 0], [0, 0]]), partial=True).tolist() == [0.5, 0.5]


def test_webdataset_input_gives_the_folder_scores(trained_run, coco256_store, tmp_path):
    import webdataset as wds

    files, _ = _test_files(coco256_store)
    files = files[:5]
    for s, part in enumerate((files[:3], files[3:])):
        with wds.TarWriter(str(tmp_path / f"shard-{s}.tar")) as w:
            for f in part:
                w.write({"__key__": Path(f).stem, "jpg": Path(f).read_bytes(), "json": b"{}"})
    a = predict_images(trained_run, files, tmp_path / "a.parquet", device="cpu", num_workers=0, show_progress=False)
    b = predict_images(trained_run, [str(tmp_path / "shard-{0..1}.tar")], tmp_path / "b.parquet", device="cpu",
                       num_workers=0, show_progress=False)
    ia, _, ta, pa, _ = read_predictions(a.out)
    ib, eb, tb, pb, _ = read_predictions(b.out)
    assert [r.rsplit("#", 1)[1] for r in ib] == [Path(f).stem for f in files] and eb == [None] * 5
    np.testing.assert_array_equal(pa, pb)
    assert ta == tb


def test_thresholds_sources_and_refusals(trained_run, tmp_path):
    classes = (trained_run / "classes.txt").read_text().splitlines()
    tg = choose_tagging(trained_run, classes, threshold=0.3)
    assert tg.tags(np.array([[0.3] + [0.1] * (len(classes) - 1)])) == [[classes[0]]]
    f = write_thresholds_file(tmp_path / "t.json", tg)
    again = choose_tagging(trained_run, classes, thresholds=str(f))
    np.testing.assert_array_equal(again.thresholds, tg.thresholds)
    doc = json.loads(f.read_text())
    doc["classes"][1] = "zebra-ish"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(PredictError, match="position 1"):
        choose_tagging(trained_run, classes, thresholds=str(tmp_path / "bad.json"))
    (tmp_path / "cal.json").write_text(json.dumps({"format": "vlpl-thresholds/1", "aggregate": "global",
                                                   "classes": classes, "thresholds": [0.2] * len(classes)}))
    with pytest.raises(PredictError, match="teacher"):
        choose_tagging(trained_run, classes, thresholds=str(tmp_path / "cal.json"))
    with pytest.raises(PredictError, match="one of"):
        choose_tagging(trained_run, classes, threshold=0.5, topk=3)
    with pytest.raises(PredictError, match="not a file, folder"):
        collect_images([str(tmp_path / "nothing.xyz")])


def test_cli_predict_writes_jsonl(trained_run, coco256_store, tmp_path, capsys):
    files, _ = _test_files(coco256_store)
    out = tmp_path / "cli.jsonl"
    rc = cli_main(["predict", str(trained_run), *files[:2], "--out", str(out), "--threshold", "0.0",
                   "--batch-size", "2", "--device", "cpu", "--num-workers", "0"])
    assert rc == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["image"] for r in recs] == files[:2] and all(len(r["tags"]) == len(r["scores"]) for r in recs)
    assert "2 images" in capsys.readouterr().out
    assert cli_main(["predict", str(tmp_path), files[0]]) == 2  # not a run: a named error, no traceback

"""Dataset readers (vlpl.data.readers / records): folder, coco, voc, cole, hf, splits, image errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from vlpl.config import ConfigError, DataConfig, ObservedConfig
from vlpl.data.observed import single_positive_cole
from vlpl.data.readers import DatasetFormatError, load_dataset, train_val_split
from vlpl.data.records import ImageLoadError, LabelledDataset


def _jpeg(path: Path, seed: int = 0, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def _check_invariants(ds: LabelledDataset) -> None:
    order = {"train": 0, "val": 1, "test": 2}
    ranks = [order[s.split] for s in ds.samples]
    assert ranks == sorted(ranks), "samples must be train, then val, then test"
    assert len({s.sample_id for s in ds.samples}) == len(ds.samples)
    for s in ds.samples:
        assert s.observed.dtype == np.int8 and s.observed.shape == (len(ds.classes),)
        if s.labels is not None:
            assert s.labels.dtype == np.int8 and s.labels.shape == (len(ds.classes),)


# --------------------------------------------------------------------------------------------------
# train / val split (ALGORITHMS.md 2b)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,n_train,n_val", [(5717, 4574, 1143), (82081, 65665, 16416), (128, 102, 26)])
def test_train_val_split_sizes(n: int, n_train: int, n_val: int) -> None:
    tr, va = train_val_split(n, 0.2, 1200)
    assert (len(tr), len(va)) == (n_train, n_val)
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    assert len(np.intersect1d(tr, va)) == 0
    np.testing.assert_array_equal(np.union1d(tr, va), np.arange(n))
    perm = np.random.RandomState(1200).permutation(n)
    np.testing.assert_array_equal(va, np.sort(perm[n - n_val:]))
    tr2, va2 = train_val_split(n, 0.2, 1200)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, train_val_split(n, 0.2, 1201)[1])


def test_train_val_split_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(10, 1.0)


# --------------------------------------------------------------------------------------------------
# folder reader on the real coco256 data
# --------------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_coco256(coco256_root: Path) -> None:
    ds = load_dataset(DataConfig(root=str(coco256_root)))
    classes = (coco256_root / "classes.txt").read_text().split("\n")
    classes = [c for c in classes if c.strip()]
    assert ds.classes == classes and len(ds.classes) == 80
    assert len(ds) == 256
    assert [len(ds.split_indices(s)) for s in ("train", "val", "test")] == [102, 26, 128]
    _check_invariants(ds)

    rows = _read_csv(coco256_root / "labels.csv")
    by_image = {r["image"]: r for r in rows}
    assert len(by_image) == 256
    for s in ds.samples:
        r = by_image[s.image]
        want = {n for n in r["labels"].split("|") if n}
        assert {ds.classes[c] for c in np.nonzero(s.labels)[0]} == want
        assert (r["split"] == "test") == (s.split == "test")
        assert s.sample_id == s.image[: -len(".jpg")]

    # train/val = Cole's split of the official train rows, in file order
    official_train = [r["image"] for r in rows if r["split"] == "train"]
    tr, va = train_val_split(len(official_train), 0.2, 1200)
    assert [ds.samples[i].image for i in ds.split_indices("train")] == [official_train[i] for i in tr]
    assert [ds.samples[i].image for i in ds.split_indices("val")] == [official_train[i] for i in va]
    assert [ds.samples[i].image for i in ds.split_indices("test")] == [r["image"] for r in rows if r["split"] == "test"]

    # one observed positive per train/val image, a true one (none for images without labels)
    for i in np.concatenate([ds.split_indices("train"), ds.split_indices("val")]):
        s = ds.samples[i]
        n_obs = int((s.observed == 1).sum())
        assert (s.observed >= 0).all()
        if s.labels.sum() == 0:
            assert n_obs == 0
        else:
            assert n_obs == 1 and s.labels[s.observed == 1][0] == 1

    # observed = Cole sampling over the official train split in file order
    full = np.stack([np.isin(np.arange(80), [classes.index(n) for n in r["labels"].split("|") if n])
                     for r in rows if r["split"] == "train"]).astype(np.int8)
    obs = single_positive_cole(full, seed=1200)
    np.testing.assert_array_equal(ds.observed_matrix("train"), obs[tr])
    np.testing.assert_array_equal(ds.observed_matrix("val"), obs[va])

    again = load_dataset(DataConfig(root=str(coco256_root)))
    np.testing.assert_array_equal(ds.observed_matrix(), again.observed_matrix())
    np.testing.assert_array_equal(ds.label_matrix(), again.label_matrix())

    img = ds.open_image(0)
    assert img.mode == "RGB" and min(img.size) > 0


def test_folder_coco256_options(coco256_root: Path) -> None:
    ds = load_dataset(DataConfig(root=str(coco256_root), max_samples=20, val_fraction=0.0,
                                 observed=ObservedConfig(mode="partial", keep=0.5)))
    assert [len(ds.split_indices(s)) for s in ("train", "val", "test")] == [20, 0, 20]
    lab, obs = ds.label_matrix("train"), ds.observed_matrix("train")
    assert (obs == -1).any() and (obs == 1).any()
    kept = obs != 0
    np.testing.assert_array_equal(obs[kept], 2 * lab[kept] - 1)


# --------------------------------------------------------------------------------------------------
# folder reader on synthetic data: jsonl, carved val, errors
# --------------------------------------------------------------------------------------------------


def _folder(tmp_path: Path, csv_text: str, classes: str = "cat\ndog\nbird\n") -> Path:
    (tmp_path / "classes.txt").write_text(classes)
    (tmp_path / "labels.csv").write_text(csv_text)
    return tmp_path


def test_folder_unknown_class_names_file_row_and_name(tmp_path: Path) -> None:
    root = _folder(tmp_path, "image,split,labels\na.jpg,train,cat\nb.jpg,train,dog|unicorn\n")
    with pytest.raises(DatasetFormatError) as e:
        load_dataset(DataConfig(root=str(root)))
    msg = str(e.value)
    assert str(root / "labels.csv") in msg and "line 3" in msg and "'unicorn'" in msg


def test_folder_missing_column(tmp_path: Path) -> None:
    root = _folder(tmp_path, "image,labels\na.jpg,cat\n")
    with pytest.raises(DatasetFormatError) as e:
        load_dataset(DataConfig(root=str(root)))
    msg = str(e.value)
    assert str(root / "labels.csv") in msg and "split" in msg and "image,split,labels" in msg


def test_folder_missing_classes_txt(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image,split,labels\na.jpg,train,cat\n")
    with pytest.raises(DatasetFormatError) as e:
        load_dataset(DataConfig(root=str(tmp_path)))
    assert str(tmp_path / "classes.txt") in str(e.value) and "not found" in str(e.value)


def test_folder_bad_split_value(tmp_path: Path) -> None:
    root = _folder(tmp_path, "image,split,labels\na.jpg,training,cat\n")
    with pytest.raises(DatasetFormatError, match="line 2: split 'training'"):
        load_dataset(DataConfig(root=str(root)))


def _format_error(root: Path) -> str:
    with pytest.raises(DatasetFormatError) as e:
        load_dataset(DataConfig(root=str(root)))
    return str(e.value)


def test_folder_csv_is_strict(tmp_path: Path) -> None:
    """Issue 9.9: extra columns, a missing labels column and ragged rows are errors with the line number."""
    csv_path = str(tmp_path / "labels.csv")
    msg = _format_error(_folder(tmp_path, "image,split,labels,comment\na.jpg,train,cat,hi\n"))
    assert csv_path in msg and "line 1" in msg and "unexpected column(s) 'comment'" in msg
    assert "image,split,labels" in msg
    msg = _format_error(_folder(tmp_path, "image,split\na.jpg,train\n"))
    assert "line 1" in msg and "missing column(s) labels" in msg and "image,split,labels" in msg
    msg = _format_error(_folder(tmp_path, "image,split,labels\na.jpg,train,cat\nb.jpg,train,dog,extra\n"))
    assert csv_path in msg and "line 3: 4 field(s), expected 3" in msg
    msg = _format_error(_folder(tmp_path, "image,split,labels\na.jpg,train,cat\n\nb.jpg,train\n"))
    assert "line 4: 2 field(s), expected 3" in msg
    msg = _format_error(_folder(tmp_path, "image,split,image,labels\na.jpg,train,b.jpg,cat\n"))
    assert "repeated column(s) image" in msg
    # columns in another order are fine; a quoted field spanning two lines keeps the line numbers right
    ds = load_dataset(DataConfig(root=str(_folder(tmp_path, 'labels,image,split\n"cat|\ndog",a.jpg,train\n'
                                                            'bird,b.jpg,test\n')), val_fraction=0.0))
    assert [(s.image, s.split) for s in ds.samples] == [("a.jpg", "train"), ("b.jpg", "test")]
    np.testing.assert_array_equal(ds.label_matrix(), [[1, 1, 0], [0, 0, 1]])
    msg = _format_error(_folder(tmp_path, 'image,split,labels\n"a.jpg",train,"cat|\ndog"\nb.jpg,train,zebra\n'))
    assert "line 4" in msg and "'zebra'" in msg


def test_folder_utf8_bom_accepted_latin1_named(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_bytes("\ufeffcat\ndog\nbird\n".encode("utf-8"))
    (tmp_path / "labels.csv").write_bytes("\ufeffimage,split,labels\ncafé.jpg,train,cat\n".encode("utf-8"))
    ds = load_dataset(DataConfig(root=str(tmp_path), val_fraction=0.0))
    assert ds.classes == ["cat", "dog", "bird"] and ds.samples[0].image == "café.jpg"
    (tmp_path / "labels.csv").write_bytes("image,split,labels\na.jpg,train,cat\ncafé.jpg,train,cat\n".encode("latin-1"))
    msg = _format_error(tmp_path)
    assert str(tmp_path / "labels.csv") in msg and "line 3" in msg and "not valid UTF-8" in msg
    (tmp_path / "labels.csv").unlink()
    (tmp_path / "labels.jsonl").write_bytes(b'{"image": "a.jpg", "split": "train", "labels": ["cat"]}\n'
                                            b'{"image": "caf\xe9.jpg", "split": "train", "labels": []}\n')
    msg = _format_error(tmp_path)
    assert str(tmp_path / "labels.jsonl") in msg and "line 2" in msg and "not valid UTF-8" in msg
    (tmp_path / "labels.jsonl").write_bytes(b'\xef\xbb\xbf{"image": "a.jpg", "split": "train", "labels": ["cat"]}\n')
    assert load_dataset(DataConfig(root=str(tmp_path), val_fraction=0.0)).samples[0].image == "a.jpg"


def test_folder_jsonl_is_strict(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    path = tmp_path / "labels.jsonl"
    path.write_text('{"image": "a.jpg", "split": "train", "labels": ["cat"]}\n\n'
                    '{"image": "b.jpg", "split": "train", "labels": ["dog"], "note": 1}\n')
    msg = _format_error(tmp_path)
    assert str(path) in msg and "line 3" in msg and "unexpected key(s) 'note'" in msg and "image, split, labels" in msg
    path.write_text('{"image": "a.jpg", "split": "train"}\n')
    assert "line 1: missing key(s) labels" in _format_error(tmp_path)
    path.write_text('{"image": 7, "split": "train", "labels": []}\n')
    assert "line 1: 'image' must be a string" in _format_error(tmp_path)
    path.write_text('{"image": "a.jpg", "split": "train", "labels": ["cat"]}\n{"image": "b.jpg", "split": "train", '
                    '"labels": ["cow"]}\n')
    msg = _format_error(tmp_path)
    assert "line 2" in msg and "'cow'" in msg


def test_folder_jsonl_with_carved_val(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    rows = [
        {"image": "im/a.jpg", "split": "train", "labels": ["cat", "dog"]},
        {"image": "im/b.jpg", "split": "val", "labels": ["bird"]},
        {"image": "im/c.jpg", "split": "test", "labels": []},
        {"image": "im/d.jpg", "split": "train", "labels": ["dog"]},
        {"image": "im/e.jpg", "split": "val", "labels": ["cat"]},
    ]
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(DataConfig(root=str(tmp_path)))
    _check_invariants(ds)
    assert [(s.image, s.split) for s in ds.samples] == [
        ("im/a.jpg", "train"), ("im/d.jpg", "train"), ("im/b.jpg", "val"), ("im/e.jpg", "val"),
        ("im/c.jpg", "test"),
    ]
    np.testing.assert_array_equal(ds.label_matrix("train"), [[1, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(ds.label_matrix("test"), [[0, 0, 0]])
    # observed simulated over the official train rows (train + val) in file order
    full = np.array([[1, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.int8)
    obs = single_positive_cole(full, 1200)
    np.testing.assert_array_equal(ds.observed_matrix("train"), obs[[0, 2]])
    np.testing.assert_array_equal(ds.observed_matrix("val"), obs[[1, 3]])
    assert (ds.observed_matrix("test") == 0).all()


def test_label_matrix_unknown_split() -> None:
    ds = LabelledDataset(root=Path("."), classes=["a"], samples=[], name="x")
    with pytest.raises(ValueError, match="unknown split"):
        ds.split_indices("validation")


# --------------------------------------------------------------------------------------------------
# image errors
# --------------------------------------------------------------------------------------------------


def test_open_image_errors(tmp_path: Path) -> None:
    root = _folder(tmp_path, "image,split,labels\ngood.jpg,train,cat\ncorrupt.jpg,train,dog\n"
                             "trunc.jpg,test,cat\nmissing.jpg,test,bird\n")
    _jpeg(root / "good.jpg", size=64)
    (root / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    _jpeg(root / "full.jpg", seed=1, size=128)
    data = (root / "full.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    ds = load_dataset(DataConfig(root=str(root), val_fraction=0.0))
    idx = {s.image: i for i, s in enumerate(ds.samples)}
    assert ds.open_image(idx["good.jpg"]).size == (64, 64)
    for name in ("corrupt.jpg", "trunc.jpg", "missing.jpg"):
        with pytest.raises(ImageLoadError) as e:
            ds.open_image(idx[name])
        assert str(root / name) in str(e.value)
    with pytest.raises(ImageLoadError, match="truncated"):
        ds.open_image(idx["trunc.jpg"])
    with pytest.raises(ImageLoadError, match="not found"):
        ds.open_image(idx["missing.jpg"])


# --------------------------------------------------------------------------------------------------
# coco reader
# --------------------------------------------------------------------------------------------------

COCO_CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"},
             {"id": 7, "name": "train"}]  # ids not contiguous, and not sorted


def _coco_json(path: Path, images: List[Dict], anns: List[Dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": COCO_CATS}))


def _coco_tree(tmp_path: Path) -> Path:
    def img(i: int, d: str) -> Dict:
        return {"id": i, "file_name": f"COCO_{d}_{i:012d}.jpg", "width": 16, "height": 16}

    tr_ids = [9, 25, 100, 30]  # sorted as strings: "100", "25", "30", "9"
    _coco_json(
        tmp_path / "annotations" / "instances_train2014.json",
        [img(i, "train2014") for i in tr_ids],
        [
            {"id": 1, "image_id": 9, "category_id": 90},
            {"id": 2, "image_id": 9, "category_id": 1},
            {"id": 3, "image_id": 9, "category_id": 1},  # same category twice
            {"id": 4, "image_id": 25, "category_id": 7},
            {"id": 5, "image_id": 100, "category_id": 3},
            {"id": 6, "image_id": 100, "category_id": 3},
            # image 30 has no annotation
        ],
    )
    _coco_json(
        tmp_path / "annotations" / "instances_val2014.json",
        [img(i, "val2014") for i in (42, 5)],
        [{"id": 7, "image_id": 42, "category_id": 7}, {"id": 8, "image_id": 5, "category_id": 1}],
    )
    for i in tr_ids:
        _jpeg(tmp_path / "train2014" / f"COCO_train2014_{i:012d}.jpg", seed=i)
    for i in (42, 5):
        _jpeg(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg", seed=i)
    return tmp_path


def test_coco_reader(tmp_path: Path) -> None:
    root = _coco_tree(tmp_path)
    ds = load_dataset(DataConfig(root=str(root), format="coco", val_fraction=0.0))
    _check_invariants(ds)
    assert ds.classes == ["person", "car", "toothbrush", "train"]
    train = [ds.samples[i] for i in ds.split_indices("train")]
    assert [s.sample_id for s in train] == [
        "train2014/COCO_train2014_000000000100",
        "train2014/COCO_train2014_000000000025",
        "train2014/COCO_train2014_000000000009",
    ]
    np.testing.assert_array_equal(ds.label_matrix("train"), [[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]])
    test = [ds.samples[i] for i in ds.split_indices("test")]
    assert [s.image for s in test] == ["val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000005.jpg"]
    np.testing.assert_array_equal(ds.label_matrix("test"), [[0, 0, 0, 1], [1, 0, 0, 0]])
    assert ds.open_image(0).size == (32, 32)

    kept = load_dataset(DataConfig(root=str(root), format="coco", val_fraction=0.0, keep_unannotated=True))
    assert [kept.samples[i].sample_id[-3:] for i in kept.split_indices("train")] == ["100", "025", "030", "009"]
    np.testing.assert_array_equal(kept.label_matrix("train")[2], [0, 0, 0, 0])
    assert (kept.observed_matrix("train")[2] == 0).all()


def test_coco_reader_category_mismatch(tmp_path: Path) -> None:
    root = _coco_tree(tmp_path)
    p = root / "annotations" / "instances_val2014.json"
    d = json.loads(p.read_text())
    d["categories"] = d["categories"][::-1]
    p.write_text(json.dumps(d))
    with pytest.raises(DatasetFormatError, match="different categories"):
        load_dataset(DataConfig(root=str(root), format="coco"))


# --------------------------------------------------------------------------------------------------
# voc reader
# --------------------------------------------------------------------------------------------------

VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
       "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def _voc_tree(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    flags = {  # official split -> image id -> {class: flag}; unlisted classes are -1
        "train": {
            "2008_000010": {"cat": 1, "dog": 1},
            "2008_000002": {"person": 1, "chair": 0},   # chair difficult -> negative
            "2008_000005": {"bird": 0},                 # only difficult -> dropped
            "2008_000003": {},                          # negative for every class -> dropped
        },
        "val": {"2009_000001": {"tvmonitor": 1}, "2008_000007": {"aeroplane": 1, "cat": 0}},
    }
    for split, imgs in flags.items():
        for cls in VOC:
            lines = [f"{i} {'' if f.get(cls, -1) < 0 else ' '}{f.get(cls, -1)}" for i, f in imgs.items()]
            (main / f"{cls}_{split}.txt").write_text("\n".join(lines) + "\n")
    for i in ("2008_000010", "2008_000002", "2009_000001", "2008_000007"):
        _jpeg(root / "JPEGImages" / f"{i}.jpg")
    return root


def test_voc_reader(tmp_path: Path) -> None:
    root = _voc_tree(tmp_path)
    ds = load_dataset(DataConfig(root=str(root), format="voc", val_fraction=0.0))
    _check_invariants(ds)
    assert ds.classes == VOC
    assert [s.image for s in ds.samples] == [
        "JPEGImages/2008_000002.jpg", "JPEGImages/2008_000010.jpg",  # train, sorted; 000003/000005 dropped
        "JPEGImages/2008_000007.jpg", "JPEGImages/2009_000001.jpg",  # official val = our test
    ]
    assert [s.split for s in ds.samples] == ["train", "train", "test", "test"]
    lab = ds.label_matrix()
    assert {VOC[c] for c in np.nonzero(lab[0])[0]} == {"person"}  # difficult chair is negative
    assert {VOC[c] for c in np.nonzero(lab[1])[0]} == {"cat", "dog"}
    assert {VOC[c] for c in np.nonzero(lab[2])[0]} == {"aeroplane"}
    assert {VOC[c] for c in np.nonzero(lab[3])[0]} == {"tvmonitor"}
    assert ds.open_image(3).mode == "RGB"


def test_voc_reader_missing_file(tmp_path: Path) -> None:
    root = _voc_tree(tmp_path)
    (root / "ImageSets" / "Main" / "sofa_val.txt").unlink()
    with pytest.raises(DatasetFormatError, match="sofa_val.txt"):
        load_dataset(DataConfig(root=str(root), format="voc"))


# --------------------------------------------------------------------------------------------------
# cole reader
# --------------------------------------------------------------------------------------------------


def _cole_tree(tmp_path: Path) -> Path:
    rs = np.random.RandomState(0)
    tr_labels = (rs.rand(10, 4) < 0.4).astype(np.float64)
    tr_labels[:, 0] = 1  # every row has a positive
    te_labels = (rs.rand(3, 4) < 0.4).astype(np.float64)
    np.save(tmp_path / "formatted_train_images.npy", np.array([f"train/img{i}.jpg" for i in range(10)]))
    np.save(tmp_path / "formatted_train_labels.npy", tr_labels)
    np.save(tmp_path / "formatted_val_images.npy", np.array([f"val/img{i}.jpg" for i in range(3)]))
    np.save(tmp_path / "formatted_val_labels.npy", te_labels)
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    return tmp_path


def test_cole_reader(tmp_path: Path) -> None:
    root = _cole_tree(tmp_path)
    (root / "imgs").mkdir()
    _jpeg(root / "imgs" / "val" / "img1.jpg")
    ds = load_dataset(DataConfig(root=str(root), format="cole", classes="names.txt", image_root="imgs"))
    _check_invariants(ds)
    assert ds.classes == ["a", "b", "c", "d"]
    assert ds.root == root / "imgs"
    assert [len(ds.split_indices(s)) for s in ("train", "val", "test")] == [8, 2, 3]
    tr_labels = np.load(root / "formatted_train_labels.npy").astype(np.int8)
    tr, va = train_val_split(10, 0.2, 1200)
    np.testing.assert_array_equal(ds.label_matrix("train"), tr_labels[tr])
    np.testing.assert_array_equal(ds.label_matrix("val"), tr_labels[va])
    np.testing.assert_array_equal(ds.label_matrix("test"), np.load(root / "formatted_val_labels.npy"))
    assert [ds.samples[i].image for i in ds.split_indices("test")] == ["val/img0.jpg", "val/img1.jpg", "val/img2.jpg"]
    assert ds.samples[ds.split_indices("test")[1]].sample_id == "val/img1"
    assert ds.open_image(int(ds.split_indices("test")[1])).size == (32, 32)
    np.testing.assert_array_equal(ds.observed_matrix("train"), single_positive_cole(tr_labels, 1200)[tr])

    # mode given: formatted_train_labels_obs.npy is the default file
    obs = np.zeros((10, 4), dtype=np.float32)
    obs[np.arange(10), np.arange(10) % 4] = 1
    np.save(root / "formatted_train_labels_obs.npy", obs)
    g = load_dataset(DataConfig(root=str(root), format="cole", classes="names.txt",
                                observed=ObservedConfig(mode="given")))
    np.testing.assert_array_equal(g.observed_matrix("train"), obs[tr])
    np.testing.assert_array_equal(g.observed_matrix("val"), obs[va])
    assert (g.observed_matrix("test") == 0).all()

    # an explicit file with the wrong shape: the error names it and the expected shape
    np.save(root / "bad_obs.npy", obs[:7])
    with pytest.raises(ConfigError) as e:
        load_dataset(DataConfig(root=str(root), format="cole", classes="names.txt",
                                observed=ObservedConfig(mode="given", file="bad_obs.npy")))
    assert str(root / "bad_obs.npy") in str(e.value) and "(10, 4)" in str(e.value)


def test_cole_reader_needs_classes(tmp_path: Path) -> None:
    root = _cole_tree(tmp_path)
    with pytest.raises(ConfigError, match="class list"):
        load_dataset(DataConfig(root=str(root), format="cole"))


# --------------------------------------------------------------------------------------------------
# hf reader
# --------------------------------------------------------------------------------------------------


def test_hf_reader(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    names = ["cat", "dog", "bird"]
    feats = datasets.Features({"image": datasets.Image(),
                               "labels": datasets.Sequence(datasets.ClassLabel(names=names))})

    def make(n: int, seed: int, labels: List[List[int]]) -> "datasets.Dataset":
        ims = [Image.fromarray(np.full((8 + i, 10, 3), 20 * i + seed, dtype=np.uint8)) for i in range(n)]
        return datasets.Dataset.from_dict({"image": ims, "labels": labels}, features=feats)

    dd = datasets.DatasetDict({
        "train": make(5, 0, [[0], [1, 2], [], [2], [0, 1]]),
        "validation": make(2, 3, [[1], [0, 2]]),
    })
    dd.save_to_disk(str(tmp_path / "hfds"))
    ds = load_dataset(DataConfig(root=str(tmp_path), format="hf", hf_path="hfds", val_fraction=0.4,
                                 hf_splits={"train": "train", "test": "validation"}))
    _check_invariants(ds)
    assert ds.classes == names
    assert [len(ds.split_indices(s)) for s in ("train", "val", "test")] == [3, 2, 2]
    tr, va = train_val_split(5, 0.4, 1200)
    full = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=np.int8)
    np.testing.assert_array_equal(ds.label_matrix("train"), full[tr])
    np.testing.assert_array_equal(ds.label_matrix("test"), [[0, 1, 0], [1, 0, 1]])
    i = int(ds.split_indices("test")[1])
    assert ds.samples[i].sample_id == "validation/1" and ds.samples[i].image == "hf://validation/1"
    img = ds.open_image(i)
    assert img.mode == "RGB" and img.size == (10, 9)
    assert img.getpixel((0, 0)) == (23, 23, 23)

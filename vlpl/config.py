"""Typed configuration for every stage.

"YAML sets defaults, flags win, the resolved config is saved next to the outputs" (timm's rule):

* a stage config is a tree of dataclasses;
* ``--config FILE`` may be given several times, later files win key by key;
* ``key.sub=value`` overrides win over every file (values are parsed as YAML scalars);
* an unknown key, a value of the wrong type or a missing required value is a :class:`ConfigError`
  that names the key, the file (or the override) it came from, and what was expected;
* :func:`to_dict` gives back plain data, which each stage writes as ``config.yaml`` beside its outputs.

A config file may also say ``include: [other.yaml, ...]`` (paths relative to the including file, or to
the project's ``configs/`` folder): the included files are merged first, the including file wins.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFIG_DIRS = [Path(__file__).resolve().parent.parent / "configs"]


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, its source and what was expected."""


MISSING: Any = dataclasses.MISSING


def required() -> Any:
    """Mark a dataclass field as required (no default)."""
    return field(default=None, metadata={"required": True})


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------


@dataclass
class ObservedConfig:
    """How the observed (incomplete) training labels are obtained.

    * ``single_positive``: Cole et al.'s protocol (ALGORITHMS.md 2b): one ``RandomState(seed)`` per
      official split, per image shuffle the positives and keep the first, then shuffle the negatives
      (consuming RNG draws) and keep ``num_neg`` of them.
    * ``partial``: MLR-PL protocol (ALGORITHMS.md 10): every entry of the +-1 matrix is kept iff
      ``u < keep`` with ``u`` drawn by ``np.random.seed(seed)`` over the whole N x C array.
    * ``given``: read from ``file`` (N x C npy in {-1,0,1}, rows in the official train order).
    * ``full``: the full labels (positives +1, negatives -1): the full-label upper bound.
    * ``none``: nothing observed (zero-shot use).
    * ``fpc`` / ``rps``: CSL's FPC(N) (``per_class`` positives and negatives per class) and RPS(q) (each label
      unknown with probability ``drop``), ALGORITHMS.md 9e; seed 0 unless ``seed`` is set.
    * ``given`` also takes partial annotations from the labels file itself (``positives``/``negatives``
      columns, OpenImages image-level CSV): see docs/PARTIAL_LABELS.md.
    """

    mode: str = "single_positive"
    seed: Optional[int] = None  # default: 1200 for single_positive, 0 for partial
    num_neg: int = 0
    keep: float = 0.5
    file: Optional[str] = None
    per_class: int = 1000  # fpc: CSL's FPC(N), N annotated positives and N negatives per class (ALGORITHMS.md 9e)
    drop: float = 0.5  # rps: CSL's RPS(q), each label made unknown with probability q (ALGORITHMS.md 9e)


@dataclass
class ImageConfig:
    """How images are opened, in every stage (``vlpl.data.images.open_image``; issue 9 decode rules).

    ``max_pixels``: decoded images larger than this (width x height) are refused as a failed row
    (decompression-bomb guard; PIL's own guard is kept on as well). ``allow_outside_root``: file lists may
    name absolute paths, ``..`` or symlinks that resolve outside the data root only when this is true.
    ``exif_transpose``: apply the EXIF orientation (what a viewer shows).
    """

    max_pixels: int = 89_478_485  # PIL's MAX_IMAGE_PIXELS: about 9459 x 9459
    allow_outside_root: bool = False
    exif_transpose: bool = True


@dataclass
class DataConfig:
    """Where the images and labels are, and in which format.

    ``format``: ``folder`` (images + labels.csv/jsonl + classes.txt), ``coco`` (official instances
    JSON), ``voc`` (VOCdevkit/VOC2012 ImageSets/Main), ``cole`` (formatted_*.npy), ``hf`` (a Hugging
    Face dataset; streamed with ``hf_streaming``), ``webdataset`` (tar shards, ``urls``; docs/INPUTS.md). Paths that
    are not absolute are relative to ``root``.
    """

    format: str = "folder"
    root: str = required()
    name: Optional[str] = None
    classes: Optional[str] = None  # classes.txt (folder, cole, hf); default <root>/classes.txt
    labels: Optional[str] = None  # folder: labels.csv / labels.jsonl; default <root>/labels.csv
    # coco: official split -> instances JSON, and split -> image folder
    annotations: Dict[str, str] = field(default_factory=dict)
    image_dirs: Dict[str, str] = field(default_factory=dict)
    keep_unannotated: bool = False  # coco: Cole keeps only annotated images (2b); MLR-PL keeps all (10)
    # cole: folder with formatted_{train,val}_{images,labels}.npy; images relative to image_root
    image_root: Optional[str] = None
    # hf: local path or hub id, columns, and which dataset split is our train / test
    hf_path: Optional[str] = None
    hf_image_column: str = "image"
    hf_label_column: str = "labels"
    hf_splits: Dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    # the 80/20 train/val split of the official train split (Cole: RandomState(1200), sorted)
    val_fraction: float = 0.2
    split_seed: int = 1200
    observed: ObservedConfig = field(default_factory=ObservedConfig)
    max_samples: Optional[int] = None  # per official split, for quick runs (first N in file order)
    images: ImageConfig = field(default_factory=ImageConfig)
    # coco: row order of an official split: "id_str" (Cole: image ids sorted as strings, 2b) or "json" (the
    # instances JSON's images list, pycocotools' order: the MLR-PL keep-ratio protocol's rows, ALGORITHMS.md 10)
    image_order: str = "id_str"
    # webdataset: tar shard URLs (brace-expanded; local paths relative to root, or fsspec URLs); a string or list is
    # the official train split, a mapping {train: ..., test: ...} names both (vlpl/data/webdataset.py, docs/INPUTS.md)
    urls: Union[None, str, List[str], Dict[str, Any]] = None
    wds_labels_member: str = "json"  # webdataset: the member with a sample's labels (json, or a txt extension)
    # hf: stream the dataset (datasets.load_dataset(..., streaming=True)) instead of loading it (vlpl/data/streaming.py)
    hf_streaming: bool = False


@dataclass
class RelationGCNConfig:
    """AEVLP's relation-GCN residual on the teacher's class text features (ALGORITHMS.md 7b; Decision 2: off by
    default, on with a recorded seed): ``normalize(T + G(T))``, G a frozen random 3-layer GCN over the class
    relation graph (vlpl/vlm/relation_gcn.py). ``teacher.relation_gcn=true`` reads as ``{enabled: true}``."""

    FROM_BOOL: ClassVar[str] = "enabled"

    enabled: bool = False
    seed: int = 0  # the GCN's random weights are a function of this seed (recorded in the store's manifest)
    sparse_topk: Optional[int] = None  # neighbours kept per class, itself included (AEVLP: VOC 20, COCO 62, NUS 50, CUB 312); null: all
    reweight: float = 0.2  # the neighbours' weight in each row of the adjacency; the class keeps 1 - reweight
    hidden: int = 1024  # the GCN's hidden width (AEVLP: 512 -> 1024 -> 1024 -> 512)
    relation: str = "text"  # "text": cosine of the teacher's class text embeddings; or a C x C .npy file


@dataclass
class TeacherConfig:
    """The frozen vision-language model.

    ``backend``: ``open_clip`` (``name`` is an open_clip model name or ``hf-hub:...``; ``pretrained``
    a tag such as ``openai`` or a local checkpoint file) or ``hf`` (transformers CLIPModel /
    SiglipModel, ``name`` a local directory or hub id).
    """

    backend: str = "open_clip"
    name: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    templates: Union[str, List[str]] = "a photo of a {}."  # a template, a list, or an open_clip set name
    normalization: str = "model"  # "model" (open_clip's mean/std, Decision 3) or "imagenet"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    device: str = "auto"
    # class descriptions (RAM++/CuPL style): a JSON or YAML file mapping each class to a list of strings, embedded
    # with the templated class names and averaged per class (docs/TEACHERS.md); `templates: []` uses them alone
    descriptions: Optional[str] = None
    # AEVLP's relation-GCN residual on the class text features (off by default, Decision 2; RelationGCNConfig)
    relation_gcn: RelationGCNConfig = field(default_factory=RelationGCNConfig)


@dataclass
class ViewsConfig:
    """DAMP views: a global view plus a g x g non-overlapping grid, each also flipped."""

    grid: int = 4
    flips: bool = True
    resize_mode: str = "squash"  # squash (AEVLP: Resize((s,s))) | shortest (resize + centre crop)
    max_side: Optional[int] = None  # downscale decoded images whose longer side exceeds this
    # the dense patch-token view (docs/TEACHERS.md): per class, the mean of the dense_topk best patch-text cosines
    # of the global view's projected patch tokens (1 = the max), stored as one more view after the tiles
    dense: bool = False
    dense_topk: int = 1


@dataclass
class IndexConfig:
    """The FAISS index over the store's image embeddings (``vlpl/store/index.py``).

    ``factory``: a FAISS index factory string (``Flat`` exact; ``IVF4096,PQ64`` or ``HNSW32`` for 10M+
    images), inner product on unit-norm embeddings; ``train_sample``: rows (seeded by ``seed``) that types
    needing training are trained on; ``gpu``: auto (the GPUs when faiss-gpu sees one and the type has a GPU
    version) | true | false; ``search_params``: e.g. ``nprobe=32`` (null: chosen from the type). ``index: false``
    (or ``true``) reads as ``{enabled: false}``, ``index: HNSW32`` as ``{factory: HNSW32}``.
    """

    FROM_STR: ClassVar[str] = "factory"
    FROM_BOOL: ClassVar[str] = "enabled"

    enabled: bool = True
    factory: str = "Flat"
    train_sample: int = 100_000
    gpu: Union[bool, str] = "auto"
    search_params: Optional[str] = None
    seed: int = 0

    def __bool__(self) -> bool:  # ``if cfg.index:`` means "build an index"
        return self.enabled


@dataclass
class PseudolabelConfig:
    # "model" was the teacher's key before 0.2; it is still read, with a deprecation message
    RENAMED: ClassVar[Dict[str, str]] = {"model": "teacher"}

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    out: str = required()
    batch_size: int = 32  # images per forward (x views each)
    num_workers: int = 2
    shard_size: int = 1024
    overwrite: bool = False
    # the FAISS index over image embeddings (vlpl/store/index.py): true/false, a factory string, or a mapping
    index: IndexConfig = field(default_factory=IndexConfig)
    progress: bool = True
    # stop (after writing what is done) when more than this share of the images so far failed to decode
    max_failed_fraction: float = 0.1
    # the score writer: "background" (a thread assembles, encodes, hashes and writes shards; the scoring loop
    # waits only when writer_queue batches are pending) | "inline" (the loop writes each shard itself)
    writer: str = "background"
    writer_queue: int = 0  # batches waiting for the background writer at most; 0 = one shard's worth
    # "cpu": PIL decodes every image in the DataLoader workers; "device": JPEGs are decoded by
    # torchvision.io.decode_jpeg on the teacher's device (nvJPEG on CUDA), the rest by PIL as with "cpu"
    decode: str = "cpu"
    # how the store keeps the scores (vlpl/store/formats.py): dense (V x C float16) | embeddings (V x D float16
    # per-view image embeddings, scored against the text embeddings when read) | topk (k classes per image)
    score_format: str = "dense"
    topk: int = 64  # classes kept per image by score_format=topk
    # a teacher ensemble (vlpl/store/ensemble.py): each entry a teacher config file (its `teacher:` section) or a
    # mapping of teacher keys (plus an optional `id`, the sub-store's name) over `teacher`; one store per teacher is
    # written to OUT/teachers/<id>/ and OUT/ensemble.json names them with their ensemble_weights (default: equal)
    teachers: List[Union[str, Dict[str, Any]]] = field(default_factory=list)
    ensemble_weights: Optional[List[float]] = None


@dataclass
class HeadConfig:
    """The classifier head: a registered head (``vlpl train --list``) and its parameters.

    A head is built from this config and a *class context* (class names + class text embeddings, from the
    store by default, ``text_embeddings: student`` = the student's own open_clip text tower where it has
    one). ``student.head=linear`` (a bare name) is read as ``{name: linear}``.
    """

    FROM_STR: ClassVar[str] = "name"

    name: str = "linear"
    params: Dict[str, Any] = field(default_factory=dict)
    text_embeddings: str = "store"  # store | student


@dataclass
class StudentConfig:
    """The trainable classifier: a timm model by name, or an open_clip image tower."""

    kind: str = "timm"  # timm | open_clip
    name: str = "resnet50"
    # true: the weights of timm's tag in ``name`` (``resnet50.tv_in1k``; a bare name: timm's default tag), random
    # init (with a warning) when they cannot be had; a path: a local checkpoint file (.safetensors/.pth/.bin)
    pretrained: Union[bool, str] = True
    open_clip_pretrained: Optional[str] = None  # kind=open_clip: a pretrained tag or a local checkpoint
    image_size: int = 448
    normalization: str = "imagenet"  # imagenet | model (the backbone's own mean/std)
    head: HeadConfig = field(default_factory=HeadConfig)
    # written by vlpl train (not an input): the weights the student was actually built from, e.g.
    # "resnet50.tv_in1k", "ViT-B-16/openai", "file:PATH sha256:HEX16", or null (random initialisation)
    pretrained_tag: Optional[str] = None


@dataclass
class LossConfig:
    name: str = "gpr"
    params: Dict[str, Any] = field(default_factory=dict)
    # ours (Decision 5), off by default: weight of the reconstruction term added to any loss,
    # 1 - cos(P f, e) of the head's reconstruction feature and the teacher's cached image embedding
    reconstruction: float = 0.0


@dataclass
class PseudoConfig:
    """How pseudo-labels are derived from the cached scores at every step (never a CLIP pass)."""

    rule: Optional[str] = "damp"  # a registered rule, or null for none
    dynamic: bool = True  # each step each view takes its cached flipped or unflipped variant (Decision 4)
    params: Dict[str, Any] = field(default_factory=dict)
    # which cached flip variant each view takes: random (Decision 4, AEVLP) | follow_student_flip (the views of the
    # image the student sees, VLPL's released code) | unflipped; null: random if dynamic else unflipped
    variant: Optional[str] = None


@dataclass
class OptimConfig:
    """The optimizer, by timm name (``timm.optim.create_optimizer_v2``: adam, adamw, sgd, lamb, ...)."""

    name: str = "adam"  # any timm optimizer name
    lr: float = 1e-5  # backbone
    head_lr: Optional[float] = 1e-4  # head (null: same as lr)
    weight_decay: float = 0.0
    scheduler: str = "none"  # none | cosine | step
    step_size: int = 10
    gamma: float = 0.1
    params: Dict[str, Any] = field(default_factory=dict)  # extra optimizer arguments (momentum, betas, ...)


@dataclass
class PhasesConfig:
    """Cole et al.'s training modes (ALGORITHMS.md §2c) as phases of one run (:mod:`vlpl.train.phases`).

    ``linear_init_epochs``: the first N epochs train the head alone on the frozen backbone (Cole's
    ``linear_init``: 25, then 10 end-to-end epochs: ``epochs: 35``); ``freeze_backbone``: the whole run
    (Cole's ``linear_fixed_features``). A frozen backbone gets no gradient and runs in eval mode.
    ``linear_init_lr``: the learning rate of the linear phase (every group scaled by
    ``linear_init_lr / optim.lr``; Cole tunes the phases apart, their issue #10); null: the run's.
    ``reset_optimizer``: the end-to-end phase starts with a fresh optimizer state, as Cole's second run does.
    """

    linear_init_epochs: int = 0
    freeze_backbone: bool = False
    linear_init_lr: Optional[float] = None
    reset_optimizer: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.linear_init_epochs, bool) or not isinstance(self.linear_init_epochs, int) \
                or self.linear_init_epochs < 0:
            raise ConfigError(f"phases.linear_init_epochs: expected an epoch count >= 0, got {self.linear_init_epochs!r}")
        if self.linear_init_lr is not None and not self.linear_init_lr > 0:
            raise ConfigError(f"phases.linear_init_lr: expected a learning rate > 0 or null, got {self.linear_init_lr!r}")


@dataclass
class TrainConfig:
    # "model" was the student's key before 0.2; it is still read, with a deprecation message
    RENAMED: ClassVar[Dict[str, str]] = {"model": "student"}

    store: Union[str, List[str]] = required()  # a store, a teacher-ensemble directory, or a list of stores
    out: str = required()
    method: Optional[str] = None  # configs/methods/<method>.yaml: the recipe, with per-dataset tables
    dataset: Optional[str] = None  # which per-dataset row of the recipe (voc2012, coco2014, nuswide, cub)
    data_root: Optional[str] = None  # default: the dataset root recorded in the store
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 8
    batch_size: int = 16
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, no on CPU) | no | bf16 | fp16
    # DataLoader workers per process ("auto": the CPUs this process may use, shared by the node's training
    # processes, one left to the process) and batches each worker loads ahead (null: about 8 in flight)
    num_workers: Union[int, str] = "auto"
    prefetch_factor: Optional[int] = None
    compile: bool = False  # torch.compile the model's training forward pass
    seed: int = 0
    hflip: bool = True  # training augmentation: Resize((s, s)) + RandomHorizontalFlip (Cole 2c)
    early_stop_patience: Optional[int] = None  # stop after this many epochs without a better val mAP
    early_stop_drop: Optional[float] = None  # stop when val mAP falls this many points below the best
    val_split: str = "val"
    test_split: str = "test"
    eval_batch_size: int = 32
    max_steps_per_epoch: Optional[int] = None  # for quick runs
    resume: bool = False
    keep_checkpoints: int = 2
    # besides the end of every epoch: a checkpoint every N optimizer steps and/or every M minutes (null: off),
    # so that a kill loses at most that much work; a mid-epoch resume continues at the exact next batch
    checkpoint_every_steps: Optional[int] = None
    checkpoint_every_minutes: Optional[float] = 30.0
    images: ImageConfig = field(default_factory=ImageConfig)
    deterministic: bool = False
    log_every: int = 10
    progress: bool = True
    # which epoch is the best (vlpl.eval.selection): auto | map | masked_map_observed | teacher_agreement;
    # auto = Cole's val mAP when the val split has full labels, else the masked mAP on its observed labels
    select: str = "auto"
    # Cole et al.'s linear-init / fixed-features modes: epochs (or the whole run) with the backbone frozen
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    # weights of the stores given as store=[A,B] (or, for an ensemble directory, instead of its own); null: equal
    # (a list) or the ensemble's (vlpl/store/ensemble.py)
    ensemble_weights: Optional[List[float]] = None


@dataclass
class EvaluateConfig:
    """``vlpl evaluate``: a training run (its saved predictions) and/or a score store alone."""

    run: Optional[str] = None  # a training run directory
    store: Optional[str] = None  # a score store: zero-shot scores and pseudo-label rules, no training
    split: str = "test"
    out: Optional[str] = None  # default: <run>/eval or <store>/eval
    # pseudo-label rules to measure, name -> parameters; null: the run's own rule and parameters (or, for a
    # store alone, damp and vlpl with their defaults)
    rules: Optional[Dict[str, Dict[str, Any]]] = None
    pseudo_split: str = "train"  # pseudo-label quality is measured where pseudo-labels are used
    # pseudo-label threshold sweep: log-spaced below 0.05 (softmax scores at temp 0.01 over many classes are
    # small), then every 0.05; plotted on a log axis
    thresholds: List[float] = field(default_factory=lambda: [0.001, 0.002, 0.005, 0.01, 0.02] + [
        round(0.05 * i, 2) for i in range(1, 20)])
    f1_threshold: float = 0.5
    top_k: int = 3
    plots: bool = True


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        (a,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(a)}"
    if origin in (dict, Dict):
        return "a mapping"
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}) from {source}"
        )

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(e)
        raise bad()
    if origin in (list, List, Sequence):
        (a,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, a, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise bad()
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (dict, Dict):
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise bad()
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return value  # handled by _build
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str):  # a quoted number ("1e-5") is that number
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad()
    return value


def _apply_renames(cls: Any, data: Dict[str, Any], sources: Dict[str, str], prefix: str) -> Dict[str, Any]:
    """Old key names (``cls.RENAMED``: old -> new) are read as the new ones, with a deprecation message;
    a value given under both names is an error (which one would win is not obvious)."""
    renamed: Dict[str, str] = getattr(cls, "RENAMED", {})
    if not any(k in data for k in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        src = sources.get(f"{prefix}{old}", "the configuration")
        if new in data:
            raise ConfigError(f"both {prefix}{old!r} (deprecated) and {prefix}{new!r} are set (the first in {src}); "
                              f"use only {prefix}{new!r}")
        log.warning("config key %r (in %s) is deprecated: it is now %r", f"{prefix}{old}", src, f"{prefix}{new}")
        data[new] = data.pop(old)
        for k in [k for k in sources if k == f"{prefix}{old}" or k.startswith(f"{prefix}{old}.")]:
            sources[f"{prefix}{new}{k[len(prefix) + len(old):]}"] = sources[k]
    return data


def _build(cls: Type[T], data: Dict[str, Any], sources: Dict[str, str], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: Dict[str, Any] = {}
    data = _apply_renames(cls, data, sources, prefix)
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            src = sources.get(key, "the configuration")
            if not prefix and k in ("plugins", "plugin"):
                raise ConfigError(f"{key!r} in {src}: plugins are never loaded from a configuration (a file may come from "
                                  f"anyone); pass --plugin MODULE on the command line, or install an entry "
                                  f"point in the 'vlpl.plugins' group")
            raise ConfigError(
                f"unknown key {key!r} in {src}; expected one of: {', '.join(sorted(fields))}"
            )
        tp = hints[k]
        src = sources.get(key, sources.get(prefix.rstrip("."), "the configuration"))
        if dataclasses.is_dataclass(tp):
            if isinstance(v, str) and getattr(tp, "FROM_STR", None):  # e.g. head=linear -> {name: linear}
                v = {tp.FROM_STR: v}
            elif isinstance(v, bool) and getattr(tp, "FROM_BOOL", None):  # e.g. index=false -> {enabled: false}
                v = {tp.FROM_BOOL: v}
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {v!r} from {src}")
            kwargs[k] = _build(tp, v, sources, prefix=f"{key}.")
        else:
            kwargs[k] = _coerce(v, tp, key, src)
            default = fields[k].default_factory() if fields[k].default_factory is not MISSING else None
            if isinstance(default, dict) and default and isinstance(kwargs[k], dict):
                # a mapping with built-in entries (e.g. data.hf_splits): a file or an override sets some
                # entries and keeps the others, as ``data.hf_splits.test=validation`` means
                kwargs[k] = {**default, **kwargs[k]}
    for name, f in fields.items():
        if f.metadata.get("required") and kwargs.get(name) is None:
            raise ConfigError(
                f"missing required value {prefix}{name!r} ({_type_name(hints[name])}); "
                f"set it in a --config file or as {prefix}{name}=..."
            )
    return cls(**kwargs)


def _record_sources(data: Any, source: str, sources: Dict[str, str], prefix: str = "") -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}{k}"
            sources[key] = source
            _record_sources(v, source, sources, f"{key}.")


def deep_merge(base: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _resolve_config_path(name: str, relative_to: Optional[Path]) -> Path:
    p = Path(name)
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if relative_to is not None:
            candidates.append(relative_to / p)
        candidates.append(Path.cwd() / p)
        for d in CONFIG_DIRS:
            candidates.append(d / p)
            if p.suffix == "":
                candidates.append(d / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file {name!r} not found (looked in: {', '.join(str(c) for c in candidates)})")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that YAML 1.2 floats without a dot (``1e-5``) are floats, not strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def yaml_load(stream: Any) -> Any:
    """Parse YAML text or a stream with the safe loader; every config, recipe and pipeline goes through it,
    so ``temp: 1e-2`` in a file and ``pseudo.params.temp=1e-2`` on the command line are the same float."""
    return yaml.load(stream, Loader=_YamlLoader)


def load_yaml_file(path: Union[str, Path], _stack: Tuple[Path, ...] = ()) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read a YAML config (safe loader) with its ``include:`` list; returns (data, key sources)."""
    path = Path(path).resolve()
    if path in _stack:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in _stack + (path,))}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    merged: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    for inc in includes:
        inc_path = _resolve_config_path(str(inc), path.parent)
        d, s = load_yaml_file(inc_path, _stack + (path,))
        merged = deep_merge(merged, d)
        sources.update(s)
    merged = deep_merge(merged, data)
    _record_sources(data, str(path), sources)
    return merged, sources


def parse_override(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _field_type(cls: Any, key: str) -> Any:
    """The declared type of dotted ``key`` in config class ``cls`` (None when the key is not a field)."""
    tp: Any = cls
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _from_str(cls: Any, data: Any) -> Any:
    """``data`` with each string given for a dataclass field that accepts one (``FROM_STR``, e.g.
    ``head: linear``) written as its mapping (``head: {name: linear}``), so that layers merge key by key."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for k, v in data.items():
        tp = hints.get(k)
        if dataclasses.is_dataclass(tp):
            if isinstance(v, str) and getattr(tp, "FROM_STR", None):
                out[k] = {tp.FROM_STR: v}
            elif isinstance(v, bool) and getattr(tp, "FROM_BOOL", None):
                out[k] = {tp.FROM_BOOL: v}
            elif isinstance(v, dict):
                out[k] = _from_str(tp, v)
    return out


def _set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def load_config(
    cls: Type[T],
    files: Sequence[Union[str, Path]] = (),
    overrides: Sequence[str] = (),
    base: Optional[Dict[str, Any]] = None,
    base_source: str = "the built-in defaults",
) -> T:
    """Build a ``cls`` config from defaults, ``base``, YAML files (later win) and dotted overrides."""
    # Deprecated key names are renamed layer by layer (defaults, each file, each override) before merging, so
    # that a recipe's new key and a user's old-style override of the same thing merge as the user means.
    sources: Dict[str, str] = {}
    _record_sources(dict(base or {}), base_source, sources)
    data: Dict[str, Any] = _from_str(cls, _apply_renames(cls, dict(base or {}), sources, ""))
    for f in files:
        path = _resolve_config_path(str(f), None)
        d, s = load_yaml_file(path)
        sources.update(s)
        data = deep_merge(data, _from_str(cls, _apply_renames(cls, d, sources, "")))
    renamed: Dict[str, str] = getattr(cls, "RENAMED", {})
    heads: Dict[str, str] = {}  # top-level key -> the first override that set it
    for o in overrides:
        key, value = parse_override(o)
        head, _, rest = key.partition(".")
        heads.setdefault(head, o)
        if head in renamed:
            if renamed[head] in heads:
                raise ConfigError(f"both {head!r} (deprecated, in the override {o!r}) and {renamed[head]!r} (in the "
                                  f"override {heads[renamed[head]]!r}) are set; use only {renamed[head]!r}")
            log.warning("config key %r (in the override %r) is deprecated: it is now %r", head, o, renamed[head])
            key = renamed[head] + (f".{rest}" if rest else "")
        elif head in renamed.values():
            old = next(k for k, v in renamed.items() if v == head)
            if old in heads:
                raise ConfigError(f"both {old!r} (deprecated, in the override {heads[old]!r}) and {head!r} (in the "
                                  f"override {o!r}) are set; use only {head!r}")
        tp = _field_type(cls, key)
        if dataclasses.is_dataclass(tp):  # student.head=linear -> {name: linear}, so that a later
            value = _from_str(tp, value) if isinstance(value, dict) else \
                {tp.FROM_STR: value} if isinstance(value, str) and getattr(tp, "FROM_STR", None) else \
                {tp.FROM_BOOL: value} if isinstance(value, bool) and getattr(tp, "FROM_BOOL", None) else value
        _set_dotted(data, key, value)  # student.head.params.x=1 keeps that name
        sources[key] = f"the override {o!r}"
        _record_sources(value, f"the override {o!r}", sources, f"{key}.")
    cfg = _build(cls, data, sources)
    check_entries(cfg, sources)
    return cfg


def check_entries(cfg: Any, sources: Optional[Dict[str, str]] = None) -> None:
    """Check the registered names and parameters a stage config uses (``loss``, ``pseudo``, evaluate's
    ``rules``, a head with a known schema) through their parameter schemas, without importing torch.

    ``load_config`` calls this; ``sources`` (dotted key -> file / override) lets the errors say where a
    value came from. Raises a :class:`ConfigError` naming the key (an unknown name or option is also a
    :class:`vlpl.registry.RegistryError`).
    """
    from vlpl.params import UnknownNameError
    from vlpl.registry import HEADS, LOSSES, RULES

    srcs = sources or {}

    def schema(registry: Any, name: str, key: str) -> Any:
        try:
            return registry.schema(name)
        except UnknownNameError as e:
            where = srcs.get(key)
            raise UnknownNameError(f"{key}: {e}" + (f" (from {where})" if where else "")) from None

    if isinstance(cfg, TrainConfig):
        w = cfg.ensemble_weights  # a teacher ensemble given as store=[A,B] (vlpl/store/ensemble.py)
        if w is not None and isinstance(cfg.store, list) and len(w) != len(cfg.store):
            raise ConfigError(f"ensemble_weights: {len(w)} weight(s) for the {len(cfg.store)} stores of `store` "
                              f"(from {srcs.get('ensemble_weights', 'the configuration')}); give one per store")
        if isinstance(cfg.store, list) and not cfg.store:
            raise ConfigError("store: an empty list; give a store, an ensemble directory or a list of stores")
        loss = schema(LOSSES, cfg.loss.name, "loss.name")
        loss.from_dict(cfg.loss.params, where="loss.params", sources=srcs, what=f"loss {cfg.loss.name!r}")
        if cfg.pseudo.rule is not None:
            rule = schema(RULES, cfg.pseudo.rule, "pseudo.rule")
            rule.from_dict(cfg.pseudo.params, where="pseudo.params", sources=srcs,
                           what=f"pseudo-label rule {cfg.pseudo.rule!r}")
        elif getattr(loss, "requires_pseudo", False):
            raise ConfigError(f"loss {cfg.loss.name!r} needs pseudo-labels: set pseudo.rule (e.g. damp; "
                              f"see vlpl train --list)")
        w = cfg.loss.reconstruction
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ConfigError(f"loss.reconstruction: expected a weight >= 0 (0: off), got {w!r}")
        head = cfg.student.head
        if head.name in HEADS.schema_names():  # a head whose schema is known without importing it (plugins)
            HEADS.schema(head.name).from_dict(head.params, where="student.head.params", sources=srcs,
                                              what=f"head {head.name!r}")
    elif isinstance(cfg, EvaluateConfig):
        for name, values in (cfg.rules or {}).items():
            schema(RULES, name, f"rules.{name}").from_dict(values, where=f"rules.{name}", sources=srcs,
                                                           what=f"pseudo-label rule {name!r}")


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Any, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML, atomically."""
    from vlpl.store.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_path(root: Union[str, Path], p: Optional[str]) -> Optional[Path]:
    """``p`` relative to ``root`` unless absolute (``~`` expanded); None stays None."""
    if p is None:
        return None
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else Path(root) / q


# --------------------------------------------------------------------------------------------------
# vlpl export (issue 13; vlpl/export/)
# --------------------------------------------------------------------------------------------------


EXPORT_FORMATS = ("hf", "cole", "laion")


@dataclass
class ExportConfig:
    """``vlpl export STORE``: a store's pseudo-labels as a Hugging Face dataset (+ card, save, push) or in the
    papers' formats (Cole ``formatted_*.npy``, the clip-retrieval/LAION embedding layout). See docs/PUBLISHING.md."""

    store: Any = required()  # a score store, a teacher-ensemble directory, or a list of stores
    out: str = required()  # the export folder (hf: README.md + <config>/<split>-*.parquet + vlpl_export.json)
    format: str = "hf"  # hf | cole | laion
    rule: Optional[str] = None  # any registered rule; default damp (calibrated when thresholds is given)
    rule_params: Dict[str, Any] = field(default_factory=dict)
    thresholds: Optional[str] = None  # a `vlpl calibrate` file: the rule's thresholds parameter
    splits: List[str] = field(default_factory=list)  # empty: every split of the store
    with_images: bool = False  # the image bytes in the `image` column (else the relative path)
    all_views: bool = False  # every cached view's scores (<teacher>_views, V x C)
    embeddings: bool = False  # the teacher's image embedding
    sparse_topk: int = 0  # > 0: <teacher>_topk, the K best classes per image with their scores
    teacher_name: Optional[str] = None  # column prefix (default: the teacher model's name)
    config_name: Optional[str] = None  # the dataset config (default <teacher>_<rule>)
    data_root: Optional[str] = None  # where the images are now (with_images), if not the store's recorded root
    save_to_disk: Optional[str] = None  # also DatasetDict.save_to_disk here
    push_to_hub: Optional[str] = None  # a hub repo id; the token comes from `hf auth login` / HF_TOKEN
    private: bool = False
    revision: Optional[str] = None
    max_shard_size: str = "500MB"
    license: str = "other"  # the card's license field (a Hub license id)
    batch_size: int = 256  # rows read from the store at a time
    quality_rows: int = 20000  # rows per split the card's quality numbers are measured on (at most)
    rows_per_file: int = 1000000  # format laion: rows per img_emb_NNNN.npy / metadata_NNNN.parquet pair

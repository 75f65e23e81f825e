"""``vlpl export-model RUN --out DIR [--push-to-hub REPO_ID]``: a run's best model as a self-describing folder.

The folder (written whole: built in a temporary folder beside ``DIR`` that then replaces it)::

    config.json         timm's Hugging Face config (timm students): ``architecture``, ``num_classes``,
                        ``label_names`` (the classes), ``pretrained_cfg`` with the run's preprocessing (input size
                        ``(3, s, s)``, mean/std, ``crop_pct: 1.0`` with bilinear resize: vlpl resizes to ``(s, s)``
                        without a crop) and a ``vlpl`` entry (student config, head, run summary, format)
    model.safetensors   timm's state dict: timm.create_model("local-dir:DIR") / ("hf-hub:REPO_ID") loads it
    classes.txt         one class name a line
    vlpl/               the whole classifier in vlpl's own format (:func:`vlpl.train.model_io.save_model`:
                        safetensors + model.json, rebuilt without pickle by :func:`~vlpl.train.model_io.load_model`)
    README.md           a model card (YAML front matter + how it was trained and how to load it)

What timm gets (``kind: timm`` students; by timm's own writer :func:`timm.models.save_for_hf`, safetensors):

* head ``linear``: the **whole classifier**. vlpl's linear head is ``fc(forward_head(features, pre_logits=True))``,
  which is exactly timm's ``forward_head`` with ``num_classes = C``; its weights become timm's classifier and the
  export checks that timm's logits equal vlpl's on a probe batch (else it falls back to the backbone alone).
  Scores are ``sigmoid(logits)`` (multi-label), not a softmax.
* any other head (text-embedding heads, plugins): the **backbone** (``num_classes = 0``: pooled features); the head
  stays in ``vlpl/``.

An ``open_clip`` student has no timm form: the folder holds ``vlpl/``, ``classes.txt``, the card and a ``config.json``
with only the ``vlpl`` entry.

**Push** (``--push-to-hub REPO_ID``): ``HfApi.create_repo(repo_type="model", exist_ok=True, private=...)``, a branch
for ``--revision``, then ``HfApi.upload_folder`` of the whole folder. The token is never handled here: it is the
standard Hugging Face login or ``HF_TOKEN``, found by ``huggingface_hub``; errors go through the dataset push's
step wrapper (:mod:`vlpl.export.hub`: the repo and the step named, the library's message redacted).
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

log = logging.getLogger(__name__)

FORMAT = "vlpl-model-export"
FORMAT_VERSION = 1
VLPL_SUBDIR = "vlpl"
#: the largest |timm logits - vlpl logits| accepted on the probe batch for the whole-classifier export
LOGITS_ATOL = 1e-4


class ModelExportError(ValueError):
    """A run that cannot be exported (no best/ model, a bad destination): the message names it."""


@dataclass
class ExportedModel:
    """What :func:`export_model` wrote: the folder, whether ``config.json`` + ``model.safetensors`` load in timm,
    whether that timm model is the whole classifier (else the backbone), and the Hub URL when pushed."""

    out: Path
    timm: bool
    timm_classifier: bool
    url: Optional[str] = None


def _summary(run: Path) -> Dict[str, Any]:
    p = run / "summary.json"
    if not p.is_file():
        return {}
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keep = ("method", "loss", "rule", "epochs_run", "best_epoch", "best_val_map", "test_map_at_best")
    return {k: s[k] for k in keep if k in s} if isinstance(s, dict) else {}


def _hub_dataset(run: Path) -> Optional[str]:
    """The Hub dataset repo id the run trained from (``store=hf:<id>[@rev][#config]`` that is not a local path),
    for the card's ``datasets:`` field; None for a store or a local export."""
    p = run / "config.yaml"
    if not p.is_file():
        return None
    from vlpl.config import yaml_load

    store = (yaml_load(p.read_text(encoding="utf-8")) or {}).get("store")
    if not isinstance(store, str) or not store.startswith("hf:"):
        return None
    from vlpl.store.hf_dataset import parse_source

    location, _, _, _ = parse_source(store)
    return None if Path(location).expanduser().exists() or location.count("/") != 1 else location


def _timm_model(model: Any, size: int) -> Any:
    """A timm model with ``model``'s backbone weights and, for a linear head, its classifier (checked on a probe
    batch); returns ``(timm model, whole classifier?)``."""
    import timm
    import torch

    bb = model.backbone.model
    arch = bb.pretrained_cfg.get("architecture") if getattr(bb, "pretrained_cfg", None) else None
    arch = arch or type(bb).__name__.lower()
    state = bb.state_dict()
    fc = getattr(model.head, "fc", None)
    if model.head.__class__.__name__ == "LinearHead" and isinstance(fc, torch.nn.Linear):
        tm = timm.create_model(arch, pretrained=False, num_classes=model.num_classes, **_model_args(bb))
        missing, unexpected = tm.load_state_dict(state, strict=False)
        clf = tm.get_classifier()
        if not unexpected and isinstance(clf, torch.nn.Linear) and clf.weight.shape == fc.weight.shape:
            with torch.no_grad():
                clf.weight.copy_(fc.weight)
                clf.bias.copy_(fc.bias)
            tm.eval()
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = float((tm(x) - model(x)).abs().max())
            if diff <= LOGITS_ATOL:
                return tm, True
            log.warning("timm %s with the linear head gives logits %.3g off vlpl's: exporting the backbone only",
                        arch, diff)
        else:
            log.warning("timm %s: the classifier does not take the linear head's weights (missing %s, unexpected %s); "
                        "exporting the backbone only", arch, missing[:3], unexpected[:3])
    tm = timm.create_model(arch, pretrained=False, num_classes=0, **_model_args(bb))
    tm.load_state_dict(state, strict=True)
    return tm.eval(), False


def _model_args(bb: Any) -> Dict[str, Any]:
    """Constructor arguments timm recorded for the backbone (other than the classifier's), so the rebuilt model
    has the same shape (e.g. ``global_pool``)."""
    args = dict(getattr(bb, "pretrained_cfg", {}) or {}).get("model_args") or {}
    return {k: v for k, v in args.items() if k not in ("num_classes", "pretrained")}


def _card(meta: Dict[str, Any], repo_id: Optional[str], title: str = "DIR") -> str:
    import yaml

    v = meta["vlpl"]
    front = {"library_name": "timm" if v["timm"] else "vlpl", "pipeline_tag": "image-classification",
             "tags": ["vlpl", "multi-label-image-classification", "image-classification", "pseudo-labels"],
             "license": "other"}
    if v.get("dataset"):
        front["datasets"] = [v["dataset"]]
    name = repo_id or title
    src = f"hf-hub:{repo_id}" if repo_id else "local-dir:DIR"
    run = v.get("run") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name.split('/')[-1]}", "",
             f"A multi-label image classifier ({v['student']['kind']} `{v['student']['name']}`, head "
             f"`{v['student']['head']['name']}`, {len(v['classes'])} classes, input {v['image_size']} px) trained with "
             f"vlpl {v['vlpl_version']} from incomplete labels and cached vision-language pseudo-labels.", ""]
    if v.get("dataset"):
        lines += [f"Trained from the pseudo-labelled dataset [{v['dataset']}](https://huggingface.co/datasets/"
                  f"{v['dataset']}).", ""]
    if run:
        lines += ["| " + " | ".join(run) + " |", "|" + "---|" * len(run),
                  "| " + " | ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in run.values()) + " |", ""]
    lines += ["Scores are `sigmoid(logits)`, one independent probability per class (multi-label).", "",
              "## Load it", "", "```python"]
    if v["timm"]:
        lines += ["import timm, torch", f"model = timm.create_model({src!r}, pretrained=True).eval()",
                  "tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
                  "x = tf(image)[None]  # the run's preprocessing: RGB, resize to (s, s) (squash), mean/std",
                  "probs = torch.sigmoid(model(x))" if v["timm_classifier"] else
                  "features = model(x)  # the backbone; the head is in vlpl/"]
    lines += ["# the whole classifier, as vlpl trained it:", "from vlpl.train.model_io import load_model",
              "model = load_model('DIR/vlpl')", "```", "",
              "or tag images: `vlpl predict RUN IMAGES... --out tags.csv` (see docs/PUBLISHING.md).", "",
              "## Preprocessing", "",
              f"Decode to RGB, resize to ({v['image_size']}, {v['image_size']}) bilinear (no crop), scale to [0, 1], "
              f"normalise with mean {v['mean']} and std {v['std']}.", ""]
    return "\n".join(lines) + "\n"


def build_export(run: Union[str, Path], dest: Path) -> ExportedModel:
    """Write the export of ``run`` into the (empty) folder ``dest``; returns what was written."""
    from timm.models import save_for_hf

    from vlpl.store.atomic import atomic_write_json, atomic_write_text
    from vlpl.train.model import TimmBackbone
    from vlpl.train.model_io import load_model, read_model_json, save_model

    run = Path(run)
    best = run / "best"
    if not best.is_dir():
        raise ModelExportError(f"vlpl export-model: {run} has no best model ({best} not found)")
    meta_json = read_model_json(best)
    model = load_model(best)
    from vlpl.config import StudentConfig, load_config

    cfg = load_config(StudentConfig, base=meta_json["student"], base_source=f"{best / 'model.json'} key 'student'")
    classes = list(model.context.names)
    size = int(cfg.image_size)
    save_model(dest / VLPL_SUBDIR, model, cfg)  # vlpl's own format, re-verified by load_model below
    atomic_write_text(dest / "classes.txt", "".join(f"{c}\n" for c in classes))
    vmeta: Dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "vlpl_version": meta_json["vlpl_version"],
        "student": meta_json["student"], "classes_file": "classes.txt", "vlpl_model": f"{VLPL_SUBDIR}/",
        "image_size": size, "mean": list(model.mean), "std": list(model.std),
        "preprocessing": f"RGB, resize ({size}, {size}) bilinear, /255, normalise (mean, std)",
        "scores": "sigmoid(logits) per class (multi-label)", "run": _summary(run), "dataset": _hub_dataset(run),
        "timm": False,
        "timm_classifier": False}
    is_timm = isinstance(model.backbone, TimmBackbone)
    whole = False
    if is_timm:
        tm, whole = _timm_model(model, size)
        vmeta.update(timm=True, timm_classifier=whole)
        save_for_hf(tm, str(dest), safe_serialization=True,
                    model_config={"label_names": classes, "vlpl": vmeta} if whole else {"vlpl": vmeta},
                    data_config={"input_size": (3, size, size), "mean": tuple(model.mean), "std": tuple(model.std),
                                 "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "squash"})
    else:
        atomic_write_json(dest / "config.json", {"vlpl": vmeta})
    atomic_write_text(dest / "README.md", _card({"vlpl": {**vmeta, "classes": classes}}, None, run.name))
    load_model(dest / VLPL_SUBDIR)  # the copy reads back (hashes, keys, weights)
    return ExportedModel(out=dest, timm=is_timm, timm_classifier=whole)


def push_model(out: Path, repo_id: str, *, private: bool = False, revision: Optional[str] = None) -> str:
    """Upload the export folder ``out`` to the model repo ``repo_id`` (see the module docstring); returns its URL."""
    from huggingface_hub import HfApi

    from vlpl.export.hub import _step
    from vlpl.store.atomic import atomic_write_text

    card = out / "README.md"
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    text = _card({"vlpl": {**cfg["vlpl"], "classes": (out / "classes.txt").read_text(encoding="utf-8").splitlines()}},
                 repo_id)
    atomic_write_text(card, text)  # the card names the repo it is pushed to
    api = HfApi()  # token: the standard login / HF_TOKEN, resolved by huggingface_hub, never seen here
    url = _step("create_repo", repo_id, api.create_repo, repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None and not str(revision).startswith("refs/pr/"):
        _step("create_branch", repo_id, api.create_branch, repo_id, branch=revision, repo_type="model", exist_ok=True)
    upload = functools.partial(api.upload_folder, repo_id=repo_id)  # _step's own second argument is repo_id
    _step("upload_folder", repo_id, upload, folder_path=str(out), repo_type="model", revision=revision,
          commit_message=f"vlpl export-model: {out.name}")
    link = str(getattr(url, "url", None) or f"https://huggingface.co/{repo_id}")
    log.info("pushed model %s to %s%s", out, link, f" (revision {revision})" if revision else "")
    return link


def export_model(run: Union[str, Path], out: Union[str, Path], *, push_to_hub: Optional[str] = None,
                 private: bool = False, revision: Optional[str] = None) -> ExportedModel:
    """Export ``run``'s best model to ``out`` (replaced whole, atomically) and push it when ``push_to_hub``."""
    from vlpl.store.atomic import atomic_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelExportError(f"vlpl export-model: --out {out} exists and is not a folder")
    if out.resolve() == Path(run).resolve() or Path(run).resolve() in out.resolve().parents:
        raise ModelExportError(f"vlpl export-model: --out {out} is inside the run {run}; choose another folder")
    with atomic_dir(out) as tmp:
        res = build_export(run, Path(tmp))
    res.out = out
    log.info("exported %s -> %s (%s)", run, out, "timm classifier" if res.timm_classifier else
             "timm backbone" if res.timm else "vlpl format")
    if push_to_hub:
        res.url = push_model(out, push_to_hub, private=private, revision=revision)
    return res


__all__ = ["export_model", "build_export", "push_model", "ExportedModel", "ModelExportError", "FORMAT_VERSION"]

"""vlpl: multi-label image recognition from incomplete labels, with cached vision-language pseudo-labels.

The command line only parses, loads and checks the configuration, then calls the stage function. A bad
configuration (unknown key, wrong type, missing file, unknown or bad rule / loss parameter) is reported
before torch or any model is imported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

log = logging.getLogger("vlpl")

_TOP_EPILOG = """\
stages:
  pseudolabel   score every image and view with a frozen CLIP teacher into a score store (once, GPU)
  train         train a classifier on a score store: observed labels + pseudo-labels from a rule, a loss
  evaluate      mAP, F1 and pseudo-label quality of a run or a store: report.json, report.md, plots
  inspect       summarise a score store (--verify: check every shard's hash)
  run           several stages from one pipeline file (pipelines/*.yaml)
  calibrate     per-class thresholds from a label-free two-Gaussian fit on a store's scores (a JSON file)
  sweep         train + evaluate a list of variants on a store, then one comparison table
  demo          the whole job on bundled photographs
  predict       tag new images (files, folders, lists, webdataset) with a trained run's model
  export-model  a run's model as safetensors + config.json (timm-loadable backbone), optionally pushed to the Hub
  export        a store's pseudo-labels as a Hugging Face dataset (+ card, push) or in Cole's / LAION's formats

first command to try:
  vlpl demo --offline        # tiny random models, no download: shows every stage (numbers mean nothing)
  vlpl demo                  # the same with a real CLIP teacher (downloads its weights)

then: vlpl COMMAND --help (examples for each command), vlpl train --list (methods, rules, losses).
"""

_PSEUDOLABEL_EPILOG = """\
examples:
  vlpl pseudolabel -c configs/datasets/coco256.yaml -c configs/models/tiny.yaml out=runs/coco256-store
  vlpl pseudolabel -c datasets/coco2014 -c models/clip_vit_b16 data.root=/data/coco out=stores/coco-b16
  vlpl pseudolabel ... views.grid=5 teacher.name=ViT-L-14-336 batch_size=64 data.max_samples=100
  accelerate launch -m vlpl pseudolabel ...     # several GPUs: the processes split the shards

keys: data.* (format, root, observed.*), teacher.* (backend, name, pretrained, templates), views.*
(grid, flips), out, batch_size, shard_size, overwrite, max_failed_fraction. An interrupted run resumes.
"""

_TRAIN_EPILOG = """\
examples:
  vlpl train method=aevlp dataset=coco2014 store=stores/coco-b16 out=runs/aevlp-coco
  vlpl train method=an -c configs/models/tiny_classifier.yaml store=runs/coco256-store out=runs/an epochs=3
  vlpl train ... loss.params.q2=0.01 pseudo.params.eta=0.3 student.name=resnet50 batch_size=16
  vlpl train ... loss.name=vlpl pseudo.rule=vlpl pseudo.params.threshold=0.3 resume=true
  accelerate launch -m vlpl train ...           # several GPUs; batch_size stays the global batch

keys: store, out, method, dataset, student.* (kind, name, pretrained, image_size, head), loss.name,
loss.params.*, pseudo.rule, pseudo.params.*, optim.*, epochs, batch_size, resume. `vlpl train --list`
shows every method, rule and loss with its parameters (also in docs/METHODS.md).
"""

_EVALUATE_EPILOG = """\
examples:
  vlpl evaluate run=runs/aevlp-coco store=stores/coco-b16     # a run (and its pseudo-labels' quality)
  vlpl evaluate store=stores/coco-b16                          # a store alone: zero-shot and rules
  vlpl evaluate store=stores/coco-b16 "rules={damp: {eta: 0.0}, topk: {k: 2}}"
  vlpl evaluate --compare runs/aevlp-coco/eval runs/an/eval
  vlpl evaluate --compare runs/sweep/an runs/sweep/aevlp --out runs/sweep/compare   # + JSON and a plot

keys: run, store, split, out, rules (default: the run's own rule and parameters), thresholds, plots.
"""

_RUN_EPILOG = """\
examples:
  vlpl run pipelines/coco256_aevlp.yaml
  vlpl run pipelines/coco_spml.yaml root=/data/coco work=runs/coco   # set the pipeline's vars
"""


def _setup_logging(verbose: int) -> None:
    """vlpl's own loggers at INFO; other libraries (open_clip logs on the root logger, accelerate,
    faiss) only from WARNING unless -v."""
    rank = os.environ.get("RANK", "0")
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == "0" else \
        f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if verbose > 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("vlpl").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML config (repeatable; later files win). Names are also looked up in configs/.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {example}")


def _missing(what: str, path: Optional[str], hint: str = "") -> None:
    """A ConfigError when ``path`` (a config value) does not exist: found before any heavy import."""
    from vlpl.config import ConfigError

    if path is not None and not Path(os.path.expanduser(path)).exists():
        raise ConfigError(f"{what}: {path!r} does not exist{hint}")


def _check_store(key: str, path: Any, ensembles: bool = False) -> None:
    """``path`` is a score store (``ensembles``: or a teacher-ensemble directory, or a list of stores)."""
    from vlpl.config import ConfigError

    if isinstance(path, (list, tuple)) and ensembles:  # a teacher ensemble given as a list of stores
        for i, p in enumerate(path):
            _check_store(f"{key}[{i}]", p)
        return
    if ensembles and path is not None:  # a `vlpl export` dataset (hf:ID, an export folder): checked when opened
        from vlpl.store.hf_dataset import is_dataset_source

        if is_dataset_source(path):
            return
    if isinstance(path, str) and "://" in path:  # a store on an fsspec URL (vlpl/store/fs.py, docs/REMOTE_STORES.md)
        from vlpl.store.fs import store_path

        if not (store_path(path) / "manifest.json").exists():
            raise ConfigError(f"{key}: {path!r} is not a score store (no manifest.json there); build one with "
                              f"`vlpl pseudolabel out={path}`")
        return
    _missing(key, path, "; build a score store with `vlpl pseudolabel`")
    if path is not None and (Path(os.path.expanduser(path)) / "ensemble.json").is_file() \
            and not (Path(os.path.expanduser(path)) / "manifest.json").is_file():
        if ensembles:
            return  # a teacher-ensemble directory (`vlpl pseudolabel` with teachers: [...], vlpl/store/ensemble.py)
        raise ConfigError(f"{key}: {path!r} is a teacher ensemble (ensemble.json); this command reads one store: "
                          f"give one of its members, {path}/teachers/<id>")
    if path is not None and not (Path(os.path.expanduser(path)) / "manifest.json").is_file():
        raise ConfigError(f"{key}: {path!r} is not a score store (no manifest.json in it); "
                          f"build one with `vlpl pseudolabel`")


def _check_data_paths(data: Any) -> None:
    """The data root and every file or folder the data config names explicitly (relative to the root):
    each must exist. Files a reader finds by its own defaults are checked by the reader."""
    from vlpl.config import resolve_path

    _missing("data.root", data.root)
    named = {"data.classes": data.classes, "data.labels": data.labels, "data.image_root": data.image_root,
             "data.observed.file": data.observed.file}
    named.update({f"data.annotations.{k}": v for k, v in data.annotations.items()})
    named.update({f"data.image_dirs.{k}": v for k, v in data.image_dirs.items()})
    for key, value in named.items():
        if value is not None:
            _missing(key, str(resolve_path(data.root, value)), f" (data.root is {data.root!r})")


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    from vlpl.config import PseudolabelConfig, load_config

    cfg = load_config(PseudolabelConfig, args.config, args.overrides)
    _check_data_paths(cfg.data)
    from vlpl.pseudolabel.stage import run_pseudolabel

    out = run_pseudolabel(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        from vlpl.store.ensemble import format_ensemble_summary, is_ensemble_source
        from vlpl.store.inspect import format_summary, summarize

        # a `teachers: [...]` run makes an ensemble directory (no manifest.json of its own): summarise its members
        print(format_ensemble_summary(out) if is_ensemble_source(out) else format_summary(summarize(out, max_failed=5)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    _check_store("store", args.store)
    from vlpl.store.inspect import format_summary, summarize

    verified = None
    if args.verify:  # first, so that every bad shard is listed (the summary stops at the first one)
        from vlpl.store.store import ScoreStore

        verified = ScoreStore(Path(args.store), require_complete=False).verify()
    s = summarize(args.store)
    if verified is not None:
        s["verify"] = verified
    print(json.dumps(s, indent=2, default=str) if args.json else format_summary(s))
    if args.verify and not args.json:
        v = s["verify"]
        print(f"verify: {v['shards']} shard(s), {v['bytes']} bytes: every sha256 and page checksum matches")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.list:
        from vlpl.catalog import format_catalog

        print(format_catalog(markdown=args.markdown), end="")
        return 0
    from vlpl.train.recipes import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        from vlpl.train.recipes import dry_run_text

        print(dry_run_text(cfg), end="")
        return 0
    _check_store("store", cfg.store, ensembles=True)
    _missing("data_root", cfg.data_root)
    from vlpl.train.loop import run_train

    run_train(cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, then print a short summary (headline, pseudo-label quality, in percent) and where the
    full report is; ``--compare`` prints one table across reports. The config is read before the stage
    (and torch) is imported, so a config error comes at once; ``--compare`` never imports torch."""
    from vlpl.eval.report import load_report, summary_text

    if args.compare:
        from vlpl.eval.compare import comparison, render_comparison, write_comparison

        if getattr(args, "compare_out", None):
            out = write_comparison(args.compare, args.compare_out)
            print((out / "compare.md").read_text(encoding="utf-8"), end="")
            return 0
        print(render_comparison(comparison(args.compare)), end="")
        return 0
    from vlpl.config import EvaluateConfig, load_config

    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    from vlpl.eval.stage import run_evaluate

    out = run_evaluate(cfg)
    print(summary_text(load_report(out / "report.json"), out), end="")
    return 0


_CALIBRATE_EPILOG = """\
examples:
  vlpl calibrate runs/coco256-store                                  # -> STORE/thresholds-global.json
  vlpl calibrate runs/coco256-store --aggregate damp --out runs/th-damp.json
  vlpl calibrate runs/coco256-store --knn-k 10 --knn-alpha 0.5 --out runs/th-knn.json   # for rule knn
  vlpl train ... pseudo.rule=calibrated pseudo.params.thresholds=runs/coco256-store/thresholds-global.json
  vlpl train ... pseudo.rule=threshold "pseudo.params={score: cosine, thresholds: runs/coco256-store/thresholds-global.json}"

per class, a two-Gaussian mixture fitted by EM on the train split's scores (the global view's cosine, or
DAMP's phi in logit space), anchored on the observed labels; threshold = the Bayes boundary (docs/SWEEPS.md).
"""

_SWEEP_EPILOG = """\
examples:
  vlpl sweep my_sweep.yaml
  vlpl sweep my_sweep.yaml work=/tmp/sweep                             # set the file's vars
  vlpl sweep sweeps/cole_grid.yaml store=STORE method=an dataset=coco2014 work=runs/cole_an   # lr x batch grid

a sweep file: {store: STORE, base: {config: [...], set: {...}}, variants: [{name: an, set: {method: an}}, ...],
out: DIR}. Each variant is a normal `vlpl train` run in OUT/<name> (finished ones are skipped, interrupted
ones resumed), then evaluated; the table is OUT/compare/compare.md (+ .json, .png). See docs/SWEEPS.md.
"""


def cmd_calibrate(args: argparse.Namespace) -> int:
    _check_store("store", args.store)
    if not args.out and "://" in str(args.store):  # the default (inside the store) would be ./<scheme>:/...
        from vlpl.config import ConfigError

        raise ConfigError(f"--out: the store {args.store} is an fsspec URL; give a local thresholds file "
                          f"(--out FILE.json), which the rules read")
    from vlpl.pseudolabel.calibrate import calibrate_store, write_thresholds

    knn = {"k": args.knn_k, "alpha": args.knn_alpha} if args.knn_k else None
    doc = calibrate_store(args.store, aggregate=args.aggregate, split=args.split, bins=args.bins, knn=knn)
    out = Path(args.out) if args.out else Path(args.store) / f"thresholds-{args.aggregate}.json"
    write_thresholds(out, doc)
    fallback = sum(d["fallback"] is not None for d in doc["diagnostics"])
    print(f"vlpl calibrate: {len(doc['classes'])} class thresholds on the {doc['aggregate']} aggregate "
          f"({doc['fit_space']}) of split {doc['split']}, {fallback} degenerate fit(s) -> {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vlpl.sweep import run_sweep

    out = run_sweep(args.sweep, args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print((out / "compare.md").read_text(encoding="utf-8"), end="")
        print(f"comparison: {out / 'compare.md'} ({out / 'compare.json'}, {out / 'compare.png'})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vlpl.demo import run_demo

    run_demo(args.out, offline=args.offline, epochs=args.epochs)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vlpl.predict import predict_images

    res = predict_images(args.run, args.images, args.out, thresholds=args.thresholds, threshold=args.threshold,
                         topk=args.topk, batch_size=args.batch_size, device=args.device, num_workers=args.num_workers)
    print(f"vlpl predict: {res.images} images ({res.failed} unreadable, recorded with their error), tags by "
          f"{res.tagging.source} -> {res.out}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from vlpl.export.model import export_model

    res = export_model(args.run, args.out, push_to_hub=args.push_to_hub, private=args.private,
                       revision=args.revision)
    kind = "timm classifier" if res.timm_classifier else "timm backbone + vlpl head" if res.timm else "vlpl format"
    print(f"vlpl export-model: {res.out} ({kind})" + (f"; pushed to {res.url}" if res.url else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vlpl.pipeline import run_pipeline

    run_pipeline(args.pipeline, args.overrides)
    return 0


_EXPORT_EPILOG = """\
examples:
  vlpl export runs/coco256-store --out runs/coco256-export                     # DAMP pseudo-labels, Parquet + card
  vlpl export runs/coco256-store --out runs/coco256-export --rule vlpl --rule-param threshold=0.3
  vlpl export runs/coco256-store --out runs/coco256-export --thresholds runs/coco256-store/thresholds-global.json
  vlpl export runs/coco256-store --out runs/exp --all-views --embeddings --sparse-topk 10 --save-to-disk runs/exp-disk
  vlpl export runs/coco256-store --out runs/exp --with-images --push-to-hub me/coco256-pseudo --private
  vlpl export runs/coco256-store --out runs/coco256-cole --format cole         # formatted_{train,val}_*.npy
  vlpl export runs/coco256-store --out runs/coco256-laion --format laion       # img_emb/ + metadata/ (clip-retrieval)

hf: OUT/README.md (the dataset card) + OUT/<teacher>_<rule>/<split>-*.parquet + vlpl_export.json; load it with
datasets.load_dataset("OUT", "<teacher>_<rule>"). --push-to-hub takes the token from `hf auth login` or HF_TOKEN
(never printed or written); images are uploaded only with --with-images. See docs/PUBLISHING.md.
"""


def cmd_export(args: argparse.Namespace) -> int:
    """Flags become dotted overrides after -c files and KEY=VALUE (flags win); checked before torch is imported."""
    from vlpl.config import ExportConfig, load_config

    flags = [f"store={json.dumps(args.store)}"]
    for key in ("out", "format", "rule", "thresholds", "teacher_name", "config_name", "data_root", "save_to_disk",
                "push_to_hub", "revision", "max_shard_size", "license"):
        if getattr(args, f"x_{key}") is not None:
            flags.append(f"{key}={json.dumps(getattr(args, f'x_{key}'))}")
    for key in ("with_images", "all_views", "embeddings", "private"):
        if getattr(args, f"x_{key}"):
            flags.append(f"{key}=true")
    for key in ("sparse_topk", "batch_size", "rows_per_file"):
        if getattr(args, f"x_{key}") is not None:
            flags.append(f"{key}={int(getattr(args, f'x_{key}'))}")
    if args.x_split:
        flags.append(f"splits={json.dumps(args.x_split)}")
    for kv in args.x_rule_param:
        if "=" not in kv:
            raise ValueError(f"--rule-param {kv!r}: expected NAME=VALUE (e.g. threshold=0.3)")
        flags.append(f"rule_params.{kv}")
    cfg = load_config(ExportConfig, args.config, [*args.overrides, *flags])
    _check_store("store", cfg.store, ensembles=True)
    from vlpl.export.stage import check_export_config, run_export

    check_export_config(cfg)
    result = run_export(cfg, sys.argv if argv_is_cli() else None)
    if cfg.format == "hf":
        rows = ", ".join(f"{k} {v}" for k, v in result.metadata["splits"].items())
        print(f"vlpl export: {result.config_name} ({rows} rows) -> {result.out}/{result.config_name}/, "
              f"card {result.out / 'README.md'}")
        if result.saved_to:
            print(f"  save_to_disk: {result.saved_to} (datasets.load_from_disk)")
        if result.pushed_to:
            print(f"  pushed: {result.pushed_to}")
    else:
        print(f"vlpl export: {cfg.format} files -> {result}")
    return 0


def argv_is_cli() -> bool:
    """Whether sys.argv is this command line (the console script or ``python -m vlpl``), to record it."""
    return bool(sys.argv) and Path(sys.argv[0]).name in ("vlpl", "__main__.py")


def _precheck(args: argparse.Namespace) -> None:
    """Checks that must come before a command imports its stage (and torch): evaluate's config."""
    if args.command == "evaluate" and not getattr(args, "compare", None):
        from vlpl.config import EvaluateConfig, load_config

        cfg = load_config(EvaluateConfig, args.config, args.overrides)
        _missing("run", cfg.run)
        _missing("store", cfg.store)
    elif args.command == "run":
        _missing("pipeline", args.pipeline)
    elif args.command == "sweep":
        _missing("sweep", args.sweep)
        from vlpl.sweep import load_sweep

        load_sweep(args.sweep, args.overrides)  # every variant's config checked before anything trains


def build_parser() -> argparse.ArgumentParser:
    from vlpl import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="vlpl", description=__doc__.splitlines()[0] if __doc__ else None,
                                     epilog=_TOP_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"vlpl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-vv: debug)")
    common.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: it may register losses, rules or heads (repeatable; "
                             "entry points in the 'vlpl.plugins' group are loaded too)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="a stage (listed below)")

    def add(name: str, help: str, epilog: Optional[str] = None) -> Any:
        # one line per stage is in _TOP_EPILOG; ``help`` becomes the command's own description
        return sub.add_parser(name, description=help, epilog=epilog, formatter_class=fmt, parents=[common])

    p = add("pseudolabel", "score every image and view with a frozen VLM into a score store", _PSEUDOLABEL_EPILOG)
    _add_config_args(p, "data.root=/data views.grid=5 out=STORE")
    p.set_defaults(func=cmd_pseudolabel)

    p = add("inspect", "summarise a score store", "example:\n  vlpl inspect runs/coco256-store --verify\n")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 and page checksums")
    p.set_defaults(func=cmd_inspect)

    p = add("train", "train a classifier on a score store (plain or under accelerate launch)", _TRAIN_EPILOG)
    _add_config_args(p, "store=STORE out=RUN method=aevlp dataset=coco2014 loss.params.q2=0.01")
    p.add_argument("--list", action="store_true",
                   help="list methods, pseudo-label rules, losses and heads with their parameters")
    p.add_argument("--markdown", action="store_true", help="with --list: Markdown (the text of docs/METHODS.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (recipe + files + overrides), the student weights and the "
                        "recipe's teacher, then stop (nothing is trained)")
    p.set_defaults(func=cmd_train)

    p = add("evaluate", "mAP, F1, pseudo-label quality: report.json, report.md and plots", _EVALUATE_EPILOG)
    _add_config_args(p, "run=RUN store=STORE split=test")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="one table across runs / eval folders")
    p.add_argument("--out", dest="compare_out", metavar="DIR", default=None,
                   help="with --compare: write compare.md, compare.json and compare.png (teacher baseline row, "
                        "masked mAP where labels are partial) into DIR")
    p.set_defaults(func=cmd_evaluate)

    p = add("run", "run a multi-stage pipeline (pipelines/*.yaml)", _RUN_EPILOG)
    p.add_argument("pipeline")
    p.add_argument("overrides", nargs="*", metavar="VAR=VALUE", help="set the pipeline's vars")
    p.set_defaults(func=cmd_run)

    p = add("calibrate", "per-class thresholds from a label-free two-Gaussian fit on a store's cached scores",
            _CALIBRATE_EPILOG)
    p.add_argument("store")
    p.add_argument("--out", default=None, metavar="FILE", help="thresholds file (default STORE/thresholds-AGG.json)")
    p.add_argument("--aggregate", default="global", choices=("global", "damp"),
                   help="what the thresholds apply to: the global view's cosine (default) or DAMP's phi")
    p.add_argument("--split", default="train", help="the split fitted on (default train)")
    p.add_argument("--bins", type=int, default=2048, help="histogram bins per class (default 2048)")
    p.add_argument("--knn-k", type=int, default=0, metavar="K",
                   help="fit on neighbour-smoothed scores (rule knn's k; 0: raw scores, the default)")
    p.add_argument("--knn-alpha", type=float, default=0.5, metavar="A", help="with --knn-k: rule knn's alpha")
    p.set_defaults(func=cmd_calibrate)

    p = add("sweep", "train and evaluate a list of variants on a store, then one comparison table", _SWEEP_EPILOG)
    p.add_argument("sweep")
    p.add_argument("overrides", nargs="*", metavar="VAR=VALUE", help="set the sweep file's vars")
    p.set_defaults(func=cmd_sweep)

    p = add("demo", "pseudolabel -> train -> evaluate on an embedded default (skimage photos)",
            "examples:\n  vlpl demo --offline\n  vlpl demo --out runs/demo --epochs 6\n")
    p.add_argument("--offline", action="store_true", help="use tiny random models (no download; numbers meaningless)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=6)
    p.set_defaults(func=cmd_demo)

    p = add("predict", "tag new images with a trained run's best model: per-class scores and tags (CSV, JSONL, Parquet)",
            "examples:\n  vlpl predict runs/aevlp-coco photos/ --out tags.csv\n"
            "  vlpl predict runs/aevlp-coco list.txt 'shards/{000..009}.tar' --out tags.parquet --topk 5\n"
            "  vlpl predict runs/aevlp-coco a.jpg b.png --threshold 0.3 --out tags.jsonl\n\n"
            "tags: the run's per-class thresholds (F1-optimal on its validation predictions) unless --threshold,\n"
            "--thresholds FILE or --topk is given. Unreadable images are rows with an error, never fatal.\n")
    p.add_argument("run", help="a training run folder (holds best/)")
    p.add_argument("images", nargs="+", help="image files, folders (recursive), .txt lists, webdataset .tar shards")
    p.add_argument("--out", default=None, metavar="FILE", help="a .csv, .jsonl or .parquet file "
                                                              "(default RUN/predict/predictions.csv)")
    p.add_argument("--thresholds", default=None, metavar="FILE", help="per-class probability thresholds (JSON)")
    p.add_argument("--threshold", type=float, default=None, metavar="X", help="one probability threshold")
    p.add_argument("--topk", type=int, default=None, metavar="K", help="the K best classes of each image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--num-workers", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="image decoding processes (default auto)")
    p.set_defaults(func=cmd_predict)

    p = add("export-model", "a run's best model as safetensors + config.json (+ a timm-loadable backbone folder)",
            "examples:\n  vlpl export-model runs/aevlp-coco --out models/aevlp-coco\n"
            "  vlpl export-model runs/aevlp-coco --out models/aevlp-coco --push-to-hub me/aevlp-coco --private\n\n"
            "the token comes from `hf auth login` or HF_TOKEN and is never printed or written.\n")
    p.add_argument("run", help="a training run folder (holds best/)")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (replaced whole)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload DIR to this model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--revision", default=None, help="with --push-to-hub: the branch to push to")
    p.set_defaults(func=cmd_export_model)

    p = add("export", "a store's pseudo-labels as a Hugging Face dataset with its card (save, push), or in the "
                      "papers' formats (Cole's formatted_*.npy, the clip-retrieval/LAION embedding layout)",
            _EXPORT_EPILOG)
    p.add_argument("store", help="a score store (or a teacher-ensemble directory)")
    _add_config_args(p, "rule_params.top_k=2 quality_rows=5000")
    p.add_argument("--out", dest="x_out", metavar="DIR", help="the export folder (required)")
    p.add_argument("--format", dest="x_format", choices=("hf", "cole", "laion"), help="output format (default hf)")
    p.add_argument("--rule", dest="x_rule", metavar="NAME",
                   help="pseudo-label rule (any registered rule; default damp, or calibrated with --thresholds)")
    p.add_argument("--rule-param", dest="x_rule_param", action="append", default=[], metavar="K=V",
                   help="a rule parameter (repeatable), e.g. --rule-param threshold=0.3")
    p.add_argument("--thresholds", dest="x_thresholds", metavar="FILE", help="a `vlpl calibrate` thresholds file")
    p.add_argument("--split", dest="x_split", action="append", default=[], metavar="NAME",
                   help="export only this store split (repeatable; default every split)")
    p.add_argument("--with-images", dest="x_with_images", action="store_true",
                   help="put the image bytes in the `image` column (default: the relative path)")
    p.add_argument("--all-views", dest="x_all_views", action="store_true",
                   help="add <teacher>_views: every cached view's scores (V x C), needed to re-run view rules")
    p.add_argument("--embeddings", dest="x_embeddings", action="store_true", help="add the image embeddings")
    p.add_argument("--sparse-topk", dest="x_sparse_topk", type=int, metavar="K",
                   help="add <teacher>_topk: the K best classes per image with their scores (large vocabularies)")
    p.add_argument("--teacher-name", dest="x_teacher_name", metavar="NAME",
                   help="column prefix (default: the teacher model's name)")
    p.add_argument("--config-name", dest="x_config_name", metavar="NAME", help="dataset config (default <teacher>_<rule>)")
    p.add_argument("--data-root", dest="x_data_root", metavar="DIR", help="where the images are now (--with-images)")
    p.add_argument("--save-to-disk", dest="x_save_to_disk", metavar="DIR", help="also DatasetDict.save_to_disk(DIR)")
    p.add_argument("--push-to-hub", dest="x_push_to_hub", metavar="REPO_ID",
                   help="upload to this Hub dataset repo (token: `hf auth login` or HF_TOKEN)")
    p.add_argument("--private", dest="x_private", action="store_true", help="with --push-to-hub: a private repo")
    p.add_argument("--revision", dest="x_revision", metavar="REV", help="with --push-to-hub: the branch")
    p.add_argument("--max-shard-size", dest="x_max_shard_size", metavar="SIZE", help="Parquet shard size (500MB)")
    p.add_argument("--license", dest="x_license", metavar="ID", help="the card's license (default other)")
    p.add_argument("--batch-size", dest="x_batch_size", type=int, metavar="N", help="rows read at a time (256)")
    p.add_argument("--rows-per-file", dest="x_rows_per_file", type=int, metavar="N",
                   help="--format laion: rows per img_emb/metadata file pair (1000000)")
    p.set_defaults(func=cmd_export)
    return parser


def _is_known_error(e: BaseException) -> bool:
    """An error whose message is the whole story (a bad input, named): vlpl's own error classes, and the
    plain file / value errors. Checked without importing any module that is not loaded already."""
    from vlpl.config import ConfigError
    from vlpl.registry import RegistryError

    if isinstance(e, (ConfigError, RegistryError, FileNotFoundError, PermissionError, ValueError)):
        return True
    return any((getattr(c, "__module__", "") or "").startswith("vlpl.") for c in type(e).__mro__)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may come before, between or after options: collect them wherever they are
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "markdown", False) and not getattr(args, "list", False):
        parser.error("--markdown goes with --list")
    _setup_logging(args.verbose)
    try:
        from vlpl.plugins import load_plugins

        load_plugins(args.plugin)
        _precheck(args)
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `vlpl train --list | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("vlpl: interrupted; completed shards/checkpoints are kept, re-run to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose or not _is_known_error(e):
            raise
        print(f"vlpl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

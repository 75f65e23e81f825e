"""``vlpl`` command line: parse, load the config, call the stage function. Nothing else lives here."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger("vlpl")


def _setup_logging(verbose: int) -> None:
    """vlpl's own loggers at INFO; other libraries (open_clip logs on the root logger, accelerate,
    faiss) only from WARNING unless -v."""
    rank = os.environ.get("RANK", "0")
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == "0" else \
        f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if verbose > 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("vlpl").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML config (repeatable; later files win). Names are also looked up in configs/.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.root=/data views.grid=5")


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel

    cfg = load_config(PseudolabelConfig, args.config, args.overrides)
    out = run_pseudolabel(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        from vlpl.store.inspect import format_summary, summarize

        print(format_summary(summarize(out, max_failed=5)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vlpl.store.inspect import format_summary, summarize

    s = summarize(args.store)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.list:
        from vlpl.registry import list_losses, list_rules
        from vlpl.train.losses import loss_defaults, loss_description
        from vlpl.train.recipes import list_methods

        print("methods (configs/methods, with per-dataset rows): " + ", ".join(list_methods()))
        print("pseudo-label rules: " + ", ".join(list_rules()))
        print("losses:")
        for name in list_losses():
            print(f"  {name:8s} {loss_description(name)}\n           defaults: {loss_defaults(name)}")
        return 0
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    run_train(cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vlpl.eval.stage import compare_runs, run_evaluate

    if args.compare:
        print(compare_runs(args.compare))
        return 0
    from vlpl.config import EvaluateConfig, load_config

    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    out = run_evaluate(cfg)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}  {out / 'report.json'}  plots: {out / 'plots'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vlpl.demo import run_demo

    run_demo(args.out, offline=args.offline, epochs=args.epochs)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vlpl.pipeline import run_pipeline

    run_pipeline(args.pipeline, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vlpl import __version__

    parser = argparse.ArgumentParser(prog="vlpl", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"vlpl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pseudolabel", help="score every image and view with a frozen VLM into a score store")
    _add_config_args(p)
    p.set_defaults(func=cmd_pseudolabel)

    p = sub.add_parser("inspect", help="summarise a score store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a classifier on a score store (plain or under accelerate launch)",
                       description="e.g. vlpl train method=aevlp dataset=coco2014 store=STORE out=RUN")
    _add_config_args(p)
    p.add_argument("--list", action="store_true", help="list methods, pseudo-label rules and losses")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="mAP, F1, pseudo-label quality: report.json, report.md and plots",
                       description="e.g. vlpl evaluate run=RUN store=STORE; vlpl evaluate --compare RUN1 RUN2")
    _add_config_args(p)
    p.add_argument("--compare", nargs="+", metavar="RUN", help="one table across runs / eval folders")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="run a multi-stage pipeline (pipelines/*.yaml)")
    p.add_argument("pipeline")
    p.add_argument("overrides", nargs="*", metavar="VAR=VALUE", help="set the pipeline's vars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="pseudolabel -> train -> evaluate on an embedded default (skimage photos)")
    p.add_argument("--offline", action="store_true", help="use tiny random models (no download; numbers meaningless)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=6)
    p.set_defaults(func=cmd_demo)
    return parser


def _known_errors() -> tuple:
    from vlpl.config import ConfigError
    from vlpl.data.records import ImageLoadError
    from vlpl.registry import RegistryError
    from vlpl.store.store import StoreError

    return (ConfigError, StoreError, RegistryError, ImageLoadError, FileNotFoundError, ValueError)


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
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `vlpl train --list | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("vlpl: interrupted; completed shards/checkpoints are kept, re-run to resume", file=sys.stderr)
        return 130
    except _known_errors() as e:
        if args.verbose:
            raise
        print(f"vlpl {args.command}: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())

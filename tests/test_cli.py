"""The command line: config errors before heavy imports, help with each command's own examples, a
torch-free ``--list`` citing docs that exist, docs/METHODS.md kept current, and plugins."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from vlpl.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent

# Runs vlpl's main() in a fresh interpreter and reports, as JSON on the last line: the exit code, whether
# torch (or timm / open_clip) was imported by then, and the seconds main() took.
_PROBE = """
import json, sys, time
sys.argv = ["vlpl"] + json.loads(sys.argv[1])
from vlpl.cli import main
t = time.perf_counter()
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "timm", "open_clip", "torchvision", "transformers") if m in sys.modules)
print(json.dumps({"rc": rc, "heavy": heavy, "seconds": time.perf_counter() - t}))
"""


def _probe(args: List[str], cwd: Optional[Path] = None, pythonpath: Optional[Path] = None) -> Dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                       cwd=cwd or REPO, env=env, timeout=300)
    out = r.stdout.strip().splitlines()
    assert out, f"no output; stderr: {r.stderr}"
    res = json.loads(out[-1])
    res["stdout"] = "\n".join(out[:-1])
    res["stderr"] = r.stderr
    return res


# --------------------------------------------------------------------------------------------------
# config errors before heavy imports (issue 8 item 8)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["train", "store=x", "out=y", "loss.params.bogus=1"], r"loss\.params: unknown option\(s\) 'bogus' \(loss 'gpr'"),
    (["train", "store=x", "out=y", "loss.params.q2=0"], r"loss\.params\.q2: must be > 0; got 0"),
    (["train", "store=x", "out=y", "pseudo.params.eta=high"], r"pseudo\.params\.eta: expected float, got 'high'"),
    (["train", "store=x", "out=y", "loss.name=gpx"], r"loss\.name: unknown loss 'gpx'"),
    (["train", "store=x", "out=y", "epochs=many"], r"epochs: expected int"),
    (["train", "store=x", "out=y", "optimm.lr=1"], r"unknown key 'optimm'"),
    (["train", "-c", "no/such/file.yaml", "store=x", "out=y"], r"config file 'no/such/file.yaml' not found"),
    (["train", "store=no/such/store", "out=y"], r"store: 'no/such/store' does not exist"),
    (["train", "method=aevlp", "dataset=coco", "store=x", "out=y"], r"no row for 'coco'"),
    (["pseudolabel", "data.root=.", "out=o", "views.gird=3"], r"unknown key 'views\.gird'"),
    (["pseudolabel", "data.root=no/such/root", "out=o"], r"data\.root: 'no/such/root' does not exist"),
    (["pseudolabel", "-c", "datasets/coco2014.yaml", "data.root=.", "out=o"],
     r"data\.annotations\.train: 'annotations/instances_train2014\.json' does not exist \(data\.root is '\.'\)"),
    (["pseudolabel", "data.root=.", "data.labels=lbls.csv", "out=o"], r"data\.labels: 'lbls\.csv' does not exist \(data\.root is '\.'\)"),
    (["evaluate", "store=x", "rules={damp: {negatives: maybe}}"], r"rules\.damp\.negatives: must be one of"),
    (["evaluate", "run=no/such/run"], r"run: 'no/such/run' does not exist"),
])
def test_config_errors_exit_2_naming_the_key_before_torch(args, expected):
    res = _probe(args)
    assert res["rc"] == 2, res
    assert re.search(expected, res["stderr"]), res["stderr"]
    assert f"vlpl {args[0]}: error:" in res["stderr"]
    assert res["heavy"] == [], f"imported {res['heavy']} before reporting a config error"
    assert res["seconds"] < 2.0, res


def test_load_config_error_in_python_imports_no_torch():
    """The library path too: loading a bad config raises ConfigError without torch in sys.modules."""
    code = textwrap.dedent("""
        import sys
        from vlpl.config import ConfigError
        from vlpl.train.recipes import load_train_config
        try:
            load_train_config([], ["method=aevlp", "dataset=voc2012", "store=s", "out=o", "loss.params.bogus=1"])
        except ConfigError as e:
            assert "torch" not in sys.modules, "torch imported"
            print("ERR", e)
        else:
            raise SystemExit("no error")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "loss.params: unknown option(s) 'bogus'" in r.stdout and "'loss.params.bogus=1'" in r.stdout


def test_a_valid_config_passes_the_checks_and_reaches_the_store(tmp_path):
    """Every check passes for a good config (recipe + per-dataset row); the first failure is the store."""
    res = _probe(["train", "method=aevlp", "dataset=voc2012", f"store={tmp_path}", f"out={tmp_path / 'run'}",
                  "pseudo.params.eta=0.2", "loss.params.q2=0.02"])
    assert res["rc"] == 2 and "is not a score store (no manifest.json" in res["stderr"], res
    assert res["heavy"] == []


# --------------------------------------------------------------------------------------------------
# help (issue 8 item 9)
# --------------------------------------------------------------------------------------------------


def _help(*args: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_train_help_shows_train_keys_not_pseudolabel_keys(capsys):
    text = _help("train", capsys=capsys)
    for example in ("store=", "out=", "method=aevlp dataset=coco2014", "loss.params.q2=0.01",
                    "pseudo.params.eta=0.3", "student.name=resnet50", "--list", "--plugin"):
        assert example in text, example
    assert "data.root" not in text and "views.grid" not in text


def test_each_command_has_its_own_examples(capsys):
    pl = _help("pseudolabel", capsys=capsys)
    assert "views.grid=5" in pl and "data.root=/data" in pl and "loss.params" not in pl
    ev = _help("evaluate", capsys=capsys)
    assert "vlpl evaluate run=" in ev and "--compare" in ev and "rules={damp:" in ev and "views.grid" not in ev
    for cmd in ("inspect", "run", "demo"):
        assert f"vlpl {cmd}" in _help(cmd, capsys=capsys)


def test_top_level_help_lists_stages_and_a_first_command(capsys):
    text = _help(capsys=capsys)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    stages = text.split("stages:")[1].split("first command")[0]
    assert set(re.findall(r"^  ([\w-]+)\s+\S", stages, re.M)) == set(sub.choices)  # each once, one line each
    assert "vlpl demo --offline" in text
    assert main([]) == 2  # no command: the same help, exit 2


def test_every_example_in_help_parses():
    """Each example line of every command's help is accepted by the parser (no stale flag or command)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for line in (p.epilog or "").splitlines():
            line = line.strip().split("#")[0].strip()
            if not line.startswith(f"vlpl {name}") or "..." in line:
                continue
            argv = line.split()[1:]
            args, extra = parser.parse_known_args([a.strip('"') for a in argv])
            assert args.command == name
            assert all("=" in e for e in extra), (line, extra)


# --------------------------------------------------------------------------------------------------
# --list and docs/METHODS.md
# --------------------------------------------------------------------------------------------------


def test_list_is_torch_free_and_shows_parameters_with_defaults_and_meanings():
    res = _probe(["train", "--list"])
    assert res["rc"] == 0 and res["heavy"] == [], res
    out = res["stdout"]
    # methods with their dataset rows
    assert re.search(r"^  aevlp\s+AEVLP", out, re.M) and "loss gpr, rule damp; dataset rows: coco2014, cub, nuswide, voc2012" in out
    # a rule and a loss parameter: name, default, meaning, constraint
    assert re.search(r"^      eta\s+0\.3\s+gate cap.*\(in \[0, 1\]\)$", out, re.M)
    assert re.search(r"^      lambda2\s+0\.5\s+lower bound of w\(p\)", out, re.M)
    assert re.search(r"^      beta\s+\[0, 10, -2, -8\]", out, re.M)
    # every cited document exists in the repository
    cited = set(re.findall(r"\b((?:docs/)?[A-Z]+\.md|configs/methods)\b", out))
    assert {"docs/METHODS.md", "README.md", "configs/methods"} <= cited
    for path in cited:
        assert (REPO / path).exists(), f"--list cites {path}, which is not in the repository"
    assert res["seconds"] < 2.0


def test_methods_doc_is_current():
    """docs/METHODS.md is generated from the schemas and recipes; regenerate with
    `vlpl train --list --markdown > docs/METHODS.md` when this fails."""
    # in a fresh process: tests register throw-away heads/losses in this process's registries
    out = subprocess.run([sys.executable, "-m", "vlpl", "train", "--list", "--markdown"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (REPO / "docs" / "METHODS.md").read_text(encoding="utf-8") == out.stdout, \
        "docs/METHODS.md is stale: run `vlpl train --list --markdown > docs/METHODS.md`"


def test_methods_doc_lists_every_rule_loss_and_parameter():
    from vlpl.registry import LOSSES, RULES

    doc = (REPO / "docs" / "METHODS.md").read_text(encoding="utf-8")
    for registry in (RULES, LOSSES):
        for name in registry.names():
            assert f"### `{name}`" in doc
            for p in registry.schema(name).describe():
                assert f"| `{p.name}` |" in doc
    assert "`voc2012`: `epochs=8`, `batch_size=8`, `loss.params.beta=[0, 2, -2, -2]`" in doc


# --------------------------------------------------------------------------------------------------
# plugins (issue 8 item 7)
# --------------------------------------------------------------------------------------------------

_PLUGIN = '''
"""A user's plugin: a rule with a parameter schema and a loss without one (schema from its signature)."""
from dataclasses import dataclass

from vlpl.params import Params, param
from vlpl.registry import HEADS, LOSSES, RULES


@dataclass(frozen=True)
class FirstKParams(Params):
    """The first k classes are pseudo-positive (a test rule)."""

    k: int = param(1, "how many of the first classes are positive", ge=0)


@RULES.register("first_k", params=FirstKParams)
def first_k(scores, observed, *, k=FirstKParams.k):
    import torch

    out = torch.zeros(scores.shape[0], scores.shape[2], dtype=torch.int8)
    out[:, :k] = 1
    return out


@HEADS.register("scaled_linear")
class ScaledLinear:
    """A test head: a scaled linear map."""

    def __init__(self, in_features, context, *, scale: float = 1.0):
        self.scale = scale


@LOSSES.register("mean_logit")
class MeanLogit:
    """Mean logit (a test loss)."""

    requires_pseudo = False

    def __init__(self, observed, *, scale: float = 2.0, center: bool = False):
        self.scale, self.center = scale, center

    def __call__(self, logits):
        return self.scale * (logits - (logits.mean() if self.center else 0)).mean()
'''


@pytest.fixture()
def plugin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "my_vlpl_plugin.py").write_text(_PLUGIN)
    return d


def test_plugin_entries_are_listed_and_validated_from_the_cli(plugin_dir, tmp_path):
    res = _probe(["train", "--plugin", "my_vlpl_plugin", "--list"], pythonpath=plugin_dir)
    assert res["rc"] == 0, res
    assert re.search(r"^  first_k\s+The first k classes are pseudo-positive", res["stdout"], re.M)
    assert re.search(r"^      k\s+1\s+how many of the first classes are positive \(>= 0\)", res["stdout"], re.M)
    assert re.search(r"^  mean_logit\s+Mean logit", res["stdout"], re.M)
    assert re.search(r"^      scale\s+2\s", res["stdout"], re.M) and re.search(r"^      center\s+False", res["stdout"], re.M)
    assert re.search(r"^  scaled_linear A test head: a scaled linear map\.\n      scale\s+1\s", res["stdout"], re.M)
    common = ["train", "--plugin", "my_vlpl_plugin", f"store={tmp_path}", "out=o", "loss.name=mean_logit",
              "pseudo.rule=first_k", "student.head=scaled_linear"]
    ok = _probe([*common, "pseudo.params.k=2", "loss.params.scale=0.5", "student.head.params.scale=2"],
                pythonpath=plugin_dir)
    assert ok["rc"] == 2 and "is not a score store" in ok["stderr"], ok  # the config itself validated
    bad = _probe([*common, "pseudo.params.k=-1"], pythonpath=plugin_dir)
    assert bad["rc"] == 2 and "pseudo.params.k: must be >= 0; got -1" in bad["stderr"], bad
    bad = _probe([*common, "loss.params.sclae=1"], pythonpath=plugin_dir)
    assert bad["rc"] == 2 and "loss.params: unknown option(s) 'sclae'" in bad["stderr"], bad
    bad = _probe([*common, "student.head.params.scale=big"], pythonpath=plugin_dir)
    assert bad["rc"] == 2 and "student.head.params.scale: expected float, got 'big'" in bad["stderr"], bad
    # --plugin is accepted by every command
    for cmd in (["pseudolabel", "--help"], ["evaluate", "--help"], ["inspect", "--help"], ["run", "--help"],
                ["demo", "--help"]):
        assert _probe([cmd[0], "--plugin", "my_vlpl_plugin", *cmd[1:]], pythonpath=plugin_dir)["rc"] == 0


def test_plugin_entries_work_in_process(plugin_dir, monkeypatch):
    import torch

    from vlpl.plugins import load_plugins
    from vlpl.pseudolabel.rules import apply_rule
    from vlpl.registry import HEADS, LOSSES, RULES

    monkeypatch.syspath_prepend(str(plugin_dir))
    try:
        load_plugins(["my_vlpl_plugin"], entry_points=False)
        scores = torch.zeros(2, 1, 3, 4)
        out = apply_rule("first_k", scores, torch.zeros(2, 4, dtype=torch.int8), dynamic=False, k=3)
        assert out.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
        loss = LOSSES.create("mean_logit", None, center=True)
        assert loss.scale == 2.0 and loss.center is True
        with pytest.raises(ValueError, match="center: expected bool"):
            LOSSES.create("mean_logit", None, center="yes")
    finally:  # leave the process-wide registries as they were
        for reg, name in ((RULES, "first_k"), (LOSSES, "mean_logit"), (HEADS, "scaled_linear")):
            reg._entries.pop(name, None)
            reg.schemas._entries.pop(name, None)


def test_entry_point_plugins_are_loaded(plugin_dir):
    dist = plugin_dir / "my_vlpl_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-vlpl-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vlpl.plugins]\nmine = my_vlpl_plugin\n")
    res = _probe(["train", "--list"], pythonpath=plugin_dir)
    assert res["rc"] == 0 and "first_k" in res["stdout"] and "mean_logit" in res["stdout"], res


def test_plugins_never_come_from_a_config(tmp_path):
    from vlpl.config import ConfigError, TrainConfig, load_config

    f = tmp_path / "c.yaml"
    f.write_text("store: s\nout: o\nplugins: [evil_module]\n")
    with pytest.raises(ConfigError, match=r"'plugins' in .*c\.yaml: plugins are never loaded from a configuration.*--plugin"):
        load_config(TrainConfig, [f])
    assert "evil_module" not in sys.modules


def test_bad_plugins_are_named(plugin_dir):
    res = _probe(["train", "--plugin", "no_such_vlpl_plugin", "--list"])
    assert res["rc"] == 2 and "--plugin 'no_such_vlpl_plugin': no module named 'no_such_vlpl_plugin'" in res["stderr"]
    (plugin_dir / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    res = _probe(["train", "--plugin", "broken_plugin", "--list"], pythonpath=plugin_dir)
    assert res["rc"] == 2 and "--plugin 'broken_plugin': importing it failed: RuntimeError: boom" in res["stderr"]
    (plugin_dir / "clash_plugin.py").write_text(
        "from vlpl.registry import RULES\n\n@RULES.register('damp')\ndef damp(scores, observed):\n    return None\n")
    res = _probe(["train", "--plugin", "clash_plugin", "--list"], pythonpath=plugin_dir)
    assert res["rc"] == 2 and "'damp' is a built-in pseudo-label rule" in res["stderr"], res


def test_config_and_schema_modules_import_without_torch():
    code = textwrap.dedent("""
        import sys
        import vlpl.catalog, vlpl.config, vlpl.plugins, vlpl.registry, vlpl.train.recipes
        from vlpl.pseudolabel.params import rule_params
        from vlpl.registry import list_losses, list_rules
        from vlpl.train.loss_params import loss_params
        assert list_rules() == ["calibrated", "damp", "knn", "threshold", "topk", "vlpl"], list_rules()
        assert "gpr" in list_losses() and loss_params("gpr", {"q2": 0.02}).q2 == 0.02
        assert rule_params("damp", {"eta": 0}).eta == 0.0
        heavy = [m for m in ("torch", "numpy", "timm", "open_clip", "pyarrow") if m in sys.modules]
        assert not heavy, heavy
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr


def test_inspect_verify(coco256_store, tmp_path, capsys):
    """`vlpl inspect --verify` checks every shard's hash and page checksums; a flipped bit is named."""
    import shutil

    assert main(["inspect", str(coco256_store), "--verify"]) == 0
    assert re.search(r"^verify: 2 shard\(s\), \d+ bytes: every sha256 and page checksum matches$",
                     capsys.readouterr().out, re.M)
    bad = tmp_path / "store"
    shutil.copytree(coco256_store, bad)
    shard = sorted((bad / "shards").glob("*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(bad), "--verify"]) == 2
    assert shard.name in capsys.readouterr().err


def test_a_pipeline_checks_every_stage_before_running_any(tmp_path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(textwrap.dedent(f"""
        vars: {{work: {tmp_path / 'work'}}}
        stages:
          - pseudolabel: {{config: [datasets/coco256.yaml, models/tiny.yaml], set: {{out: "${{work}}/store"}}}}
          - train: {{config: [models/tiny_classifier.yaml], set: {{method: aevlp, store: "${{work}}/store",
                     out: "${{work}}/run", loss: {{params: {{lamda1: 0.7}}}}}}}}
    """))
    res = _probe(["run", str(pipe)])
    assert res["rc"] == 2 and "loss.params: unknown option(s) 'lamda1' (loss 'gpr'" in res["stderr"], res
    assert res["heavy"] == [] and not (tmp_path / "work").exists()  # the first stage never started

"""The papers' recipes, exactly (issue 14, track 1): the student's weights, VLPL's teacher prompts, the shared
flip, the relation-GCN residual, and the training / teacher precision of each recipe."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vlpl.config import ConfigError, StudentConfig
from vlpl.train.model import ClassContext, create_classifier, timm_weights_tag
from vlpl.train.recipes import list_methods, load_train_config, recipe

REPO = Path(__file__).resolve().parent.parent
TINY_NET = str(REPO / "configs" / "models" / "tiny_classifier.yaml")
TRAIN = ["store=s", "out=o"]

# the papers that train torchvision's ResNet-50 with its V1 ImageNet weights (ALGORITHMS.md 2c, 3, 4, 5, 6d, 7e)
RESNET_PAPERS = ["an", "an_ls", "wan", "epr", "role", "em", "em_apl", "ll_r", "ll_ct", "ll_cp", "gr", "full",
                 "vlpl", "aevlp"]


# --------------------------------------------------------------------------------------------------
# 1. the student's exact weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RESNET_PAPERS)
def test_paper_recipes_name_torchvisions_v1_resnet50_weights(method):
    """Every dataset row of a ResNet-50 paper resolves to timm's ``resnet50.tv_in1k`` (torchvision V1), not
    ``pretrained: true`` on the bare name (which timm resolves to its own ``a1_in1k`` recipe)."""
    _, path = recipe(method, None)
    rows = sorted((yaml.safe_load(path.read_text()) or {}).get("datasets") or {})
    for dataset in [None, *rows]:
        cfg = load_train_config([], [f"method={method}", *([f"dataset={dataset}"] if dataset else []), *TRAIN])
        assert cfg.student.kind == "timm" and cfg.student.pretrained is True
        assert timm_weights_tag(cfg.student) == "resnet50.tv_in1k", (method, dataset)


def test_sigrl_recipe_names_openai_clip_vit_b16():
    cfg = load_train_config([], ["method=sigrl", "dataset=coco2014", *TRAIN])
    assert (cfg.student.kind, cfg.student.name, cfg.student.open_clip_pretrained) == ("open_clip", "ViT-B-16", "openai")


def test_every_shipped_recipe_names_exact_weights():
    """No recipe leaves the weights to a library default: a timm student names its tag in the name."""
    import timm.models

    for method in list_methods():
        cfg = load_train_config([], [f"method={method}", *TRAIN])
        if cfg.student.kind == "timm" and cfg.student.pretrained is True:
            assert timm.models.split_model_name_tag(cfg.student.name)[1], f"{method}: {cfg.student.name} has no tag"


def test_a_bare_name_records_timms_default_tag():
    import timm.models

    default = timm.models.get_pretrained_cfg("resnet50").tag
    assert timm_weights_tag(StudentConfig(name="resnet50")) == f"resnet50.{default}" == "resnet50.a1_in1k"
    assert timm_weights_tag(StudentConfig(name="resnet50.tv_in1k")) == "resnet50.tv_in1k"
    assert timm_weights_tag(StudentConfig(name="resnet50", pretrained=False)) is None
    assert timm_weights_tag(StudentConfig(name="hf-hub:timm/resnet50.tv_in1k")) == "hf-hub:timm/resnet50.tv_in1k"
    with pytest.raises(ConfigError, match=r"student.name=resnet50.tv_in1k"):
        timm_weights_tag(StudentConfig(name="resnet50", pretrained="tv_in1k"))


def test_the_recorded_tag_is_the_name_handed_to_timms_loader(monkeypatch):
    """No download: timm.create_model is replaced by a stand-in that "loads" a tiny model; the backbone asks timm
    for exactly the resolved ``<arch>.<tag>`` with pretrained=True and records that tag."""
    import timm

    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        calls.append((name, pretrained))
        return real("test_resnet", pretrained=False, **kw)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(timm, "create_model", fake)
    for name, want in (("resnet50", "resnet50.a1_in1k"), ("resnet50.tv_in1k", "resnet50.tv_in1k")):
        calls.clear()
        model = create_classifier(StudentConfig(name=name, image_size=64), _names())
        assert calls == [(want, True)] and model.pretrained_tag == want
    cfg = load_train_config([], ["method=aevlp", "dataset=coco2014", *TRAIN])
    calls.clear()
    assert create_classifier(cfg.student, _names()).pretrained_tag == "resnet50.tv_in1k"
    assert calls == [("resnet50.tv_in1k", True)]


def _names(n: int = 5) -> ClassContext:
    return ClassContext([f"c{i}" for i in range(n)])


def test_a_local_checkpoint_loads_real_weights_and_records_its_hash(tmp_path):
    """``pretrained: PATH.safetensors`` goes through timm's own loader (the file's classifier is dropped for the
    headless backbone); the recorded tag names the file and its sha256."""
    import hashlib

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    ref = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    torch.manual_seed(8)  # a different random init: only the file can make the weights equal
    model = create_classifier(StudentConfig(name="test_resnet", pretrained=str(path), image_size=64), _names())
    got = model.backbone.model.state_dict()
    want = ref.state_dict()
    assert got and all(torch.equal(v, want[k]) for k, v in got.items())
    assert "fc.weight" not in got  # headless (num_classes=0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert model.pretrained_tag == f"file:{path} sha256:{digest}"
    rand = create_classifier(StudentConfig(name="test_resnet", pretrained=False, image_size=64), _names())
    assert rand.pretrained_tag is None
    with pytest.raises(ConfigError, match=r"student.pretrained: checkpoint file .*missing.safetensors does not exist"):
        create_classifier(StudentConfig(name="test_resnet", pretrained=str(tmp_path / "missing.safetensors")), _names())


def test_unloadable_hub_weights_are_recorded_as_random(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="vlpl.train.model"):
        model = create_classifier(StudentConfig(name="test_resnet.r160_in1k", image_size=64), _names())
    assert model.pretrained_tag is None
    assert any("test_resnet.r160_in1k" in r.getMessage() for r in caplog.records)


def test_a_run_records_the_weights_it_loaded_and_resumes(coco256_store, tmp_path):
    """config.yaml of the run records ``student.pretrained_tag`` (what was loaded, not what was asked), and a
    resumed run (which starts with the field empty) is not refused for it."""
    import timm
    from safetensors.torch import save_file

    from vlpl.train.loop import run_train

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    out = tmp_path / "run"
    args = [f"store={coco256_store}", f"out={out}", "progress=false", "method=an", "epochs=1",
            "max_steps_per_epoch=1", f"student.pretrained={path}", "num_workers=0"]
    cfg = load_train_config([TINY_NET], args)
    assert cfg.student.pretrained_tag is None
    run_train(cfg)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["student"]["pretrained_tag"].startswith(f"file:{path} sha256:")
    assert json.loads((out / "best" / "model.json").read_text())["student"]["pretrained_tag"] == \
        saved["student"]["pretrained_tag"]
    run_train(load_train_config([TINY_NET], [*args, "epochs=2", "resume=true"]))
    assert (out / "summary.json").is_file()


# --------------------------------------------------------------------------------------------------
# 3. the shared flip: the teacher's cached views follow the student's flip (VLPL) or not (AEVLP)
# --------------------------------------------------------------------------------------------------


def _labelled_scores(b: int, g: int, c: int = 3) -> torch.Tensor:
    """(b, 2, 1+g*g, c) scores whose value names (sample, variant, view): 1000*n + 100*variant + view."""
    n_views = 1 + g * g
    s = torch.zeros(b, 2, n_views, c)
    for n in range(b):
        for v in range(2):
            for w in range(n_views):
                s[n, v, w] = 1000 * n + 100 * v + w
    return s


@pytest.mark.parametrize("g", [0, 1, 2, 3])
def test_follow_student_flip_gives_a_flipped_sample_the_mirrored_images_views(g):
    from vlpl.pseudolabel.rules import select_variants

    s = _labelled_scores(3, g)
    flips = torch.tensor([True, False, True])
    out = select_variants(s, None, variant="follow_student_flip", flips=flips)
    for n in range(3):
        got = out[n, :, 0].long().tolist()
        if flips[n]:
            # the mirrored image: its global view is the flipped global; its tile (i, j) is the flipped (i, g-1-j)
            want = [1000 * n + 100] + [1000 * n + 100 + 1 + i * g + (g - 1 - j) for i in range(g) for j in range(g)]
        else:
            want = [1000 * n + w for w in range(1 + g * g)]
        assert got == want, (n, got, want)
    # no random draw: the generator's state is untouched
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state().clone()
    select_variants(s, gen, variant="follow_student_flip", flips=flips)
    assert torch.equal(gen.get_state(), before)


def test_follow_student_flip_with_a_dense_view():
    """A store with views.dense has one more view per variant after the tiles (the global crop's patch-token score):
    a flipped sample reads the flipped dense view in its place, the tiles mirrored as without it."""
    from vlpl.pseudolabel.rules import select_variants

    s = _labelled_scores(2, 3)
    s = torch.cat([s, s[:, :, :1] + 50], dim=2)  # view 10 = dense: 1000n + 100v + 50
    out = select_variants(s, None, variant="follow_student_flip", flips=torch.tensor([True, False]))
    assert out[0, :, 0].long().tolist() == [100] + [100 + 1 + i * 3 + (2 - j) for i in range(3) for j in range(3)] + [150]
    assert out[1, :, 0].long().tolist() == [1000 + w for w in range(10)] + [1050]


def test_variant_options_and_their_failure_modes():
    from vlpl.pseudolabel.rules import select_variants

    s = _labelled_scores(4, 2)
    assert torch.equal(select_variants(s, None, variant="unflipped"), s[:, 0])
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    # variant=random is the Decision-4 draw, bit for bit the old dynamic=True path
    assert torch.equal(select_variants(s, gen(), variant="random"), select_variants(s, gen(), dynamic=True))
    assert torch.equal(select_variants(s, gen(), dynamic=False), s[:, 0])
    with pytest.raises(ValueError, match="needs each sample's flip"):
        select_variants(s, None, variant="follow_student_flip")
    with pytest.raises(ConfigError, match="pseudo.variant: expected one of random, follow_student_flip, unflipped"):
        select_variants(s, None, variant="mirror")
    with pytest.raises(ValueError, match="no flipped views"):
        select_variants(s[:, :1], None, variant="follow_student_flip", flips=torch.tensor([True, False, False, False]))


def _step_parts(store: Path, variant: str):
    from vlpl.config import OptimConfig
    from vlpl.store.store import ScoreStore
    from vlpl.train.losses import create_loss
    from vlpl.train.optim import create_optimizer
    from vlpl.train.step import RuleRunner, StepState

    st = ScoreStore(store)
    train = st.split("train")
    torch.manual_seed(0)
    model = create_classifier(StudentConfig(name="test_resnet", pretrained=False, image_size=32),
                              ClassContext.from_store(st)).train()
    obs = torch.from_numpy(np.ascontiguousarray(train.observed))
    loss = create_loss("an", obs).train()
    opt = create_optimizer(OptimConfig(name="adam", lr=1e-3, head_lr=1e-3), model, loss.param_groups(1e-3))
    rule = RuleRunner("damp", {}, True, lambda pos: torch.from_numpy(train.scores(pos)), obs, variant=variant)
    return train, obs, model, loss, rule, StepState(optimizer=opt, device=torch.device("cpu"), seed=5)


def test_the_step_hands_the_rule_each_samples_flip(coco256_store, monkeypatch):
    """Through train_step: with follow_student_flip the rule's input for a flipped sample is the flipped cached
    variant of every view (of the mirrored image), for an unflipped one variant 0; with two processes the rule
    (run on the global batch) reads the global batch's flips (TrainBatch.global_flip)."""
    import vlpl.pseudolabel.rules as rules
    from vlpl.train.step import TrainBatch, train_step

    seen = []
    real = rules.select_variants
    monkeypatch.setattr(rules, "select_variants", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    train, obs, model, loss, rule, state = _step_parts(coco256_store, "follow_student_flip")
    pos = np.array([4, 9, 2, 30, 7, 1, 50, 3])
    flips = torch.tensor([True, False, False, True, True, True, False, False])
    full = torch.from_numpy(train.scores(pos))  # (8, 2, 5, C): grid 2
    mirror = [0, 2, 1, 4, 3]
    want = torch.where(flips[:, None, None], full[:, 1, mirror], full[:, 0])
    # one process: the batch's own flips
    out = train_step(TrainBatch(images=torch.randn(8, 3, 32, 32), index=torch.from_numpy(pos), flip=flips,
                                epoch=1, step=0), model, loss, rule, state)
    assert torch.equal(seen[-1], want)
    assert torch.equal(out.pseudo, rules.apply_rule("damp", full, obs[torch.from_numpy(pos)], variant="follow_student_flip",
                                                    flips=flips))
    # process 0 of 2: it loads the first half, the rule runs on all 8 with the global flips
    train_step(TrainBatch(images=torch.randn(4, 3, 32, 32), index=torch.from_numpy(pos[:4]), flip=flips[:4],
                          epoch=1, step=1, global_index=pos, global_flip=flips), model, loss, rule, state)
    assert torch.equal(seen[-1], want)


def test_recipes_state_the_released_flip_behaviour(coco256_store, tmp_path):
    """VLPL's recipe follows the student's flip, AEVLP's draws each view's variant (Decision 4), and the trainer
    builds its rule with the recipe's choice."""
    from vlpl.train.loop import setup

    for method, want in (("vlpl", "follow_student_flip"), ("aevlp", "random")):
        cfg = load_train_config([TINY_NET], [f"store={coco256_store}", f"out={tmp_path / method}", f"method={method}",
                                             "dataset=coco2014", "progress=false", "num_workers=0"])
        assert cfg.pseudo.variant == want
        run = setup(cfg)
        assert run.rule.variant == want
    with pytest.raises(ConfigError, match="pseudo.variant"):
        load_train_config([], ["method=vlpl", "pseudo.variant=mirrored", *TRAIN])


# --------------------------------------------------------------------------------------------------
# 2. the paper's teacher and prompts, per dataset; 7. precision
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,templates", [("voc2012", ["{}"]), ("coco2014", ["{}"]),
                                               ("nuswide", ["a photo of a {}."]), ("cub", ["a photo of a {}."])])
def test_vlpl_teacher_prompts_per_dataset(dataset, templates):
    """VLPL's text features are bare class names for VOC and COCO (the *_labelonly files) and prompted for NUS-WIDE
    and CUB (ALGORITHMS.md 6b step 2); the teacher is OpenAI ViT-L/14@336 on the global view, in fp32."""
    from vlpl.train.recipes import recipe_teacher

    spec = recipe_teacher("vlpl", dataset)
    assert spec["templates"] == templates
    assert (spec["name"], spec["pretrained"], spec["grid"], spec["precision"]) == ("ViT-L-14-336", "openai", 0, "fp32")
    # the recipe's teacher key is not a training key
    assert "teacher" not in recipe("vlpl", dataset)[0]


def test_the_vlpl_teacher_config_builds_bare_name_prompts():
    from vlpl.config import PseudolabelConfig, load_config
    from vlpl.vlm.backend import template_strings

    cfg = load_config(PseudolabelConfig, ["models/clip_vit_l14_336_vlpl.yaml"], ["data.root=r", "out=o"])
    assert cfg.teacher.templates == "{}" and cfg.views.grid == 0 and cfg.teacher.precision == "fp32"
    assert [t.format("dining table") for t in template_strings(cfg.teacher.templates)] == ["dining table"]


@pytest.mark.parametrize("dataset,grid", [("voc2012", 4), ("coco2014", 4), ("nuswide", 4), ("cub", 5)])
def test_aevlp_teacher_is_openai_b16_with_a_photo_prompt_in_fp16(dataset, grid):
    from vlpl.train.recipes import recipe_teacher

    spec = recipe_teacher("aevlp", dataset)
    assert (spec["name"], spec["pretrained"], spec["templates"], spec["grid"], spec["precision"]) == \
        ("ViT-B-16", "openai", ["a photo of a {}."], grid, "fp16")


def test_training_on_a_store_with_other_prompts_warns_naming_both(coco256_store, tmp_path, caplog):
    from vlpl.store.store import read_manifest
    from vlpl.train.recipes import recipe_teacher, teacher_mismatches

    with caplog.at_level(logging.WARNING, logger="vlpl.train.recipes"):
        load_train_config([], ["method=vlpl", "dataset=coco2014", f"store={coco256_store}", f"out={tmp_path}"])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "prompt templates: the store's are 'a photo of a {}.', the paper's '{}'" in text, text
    assert "the store's is 'vlpl-tiny'" in text and "'ViT-L-14-336'" in text
    assert "view grid: the store's is 2, the paper's 0" in text
    assert "vlpl pseudolabel -c models/clip_vit_l14_336_vlpl.yaml" in text
    # a store scored as the paper did: no warning
    manifest = read_manifest(Path(coco256_store) / "manifest.json")
    spec = recipe_teacher("vlpl", "coco2014")
    same = {**manifest, "model": {**manifest["model"], "name": "ViT-L-14-336", "pretrained": "openai"},
            "templates": ["{}"], "views": {**manifest["views"], "grid": 0}}
    assert teacher_mismatches(spec, same) == []
    assert len(teacher_mismatches(spec, manifest)) == 3
    # methods without a teacher (no pseudo-labels) never warn
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlpl.train.recipes"):
        load_train_config([], ["method=an", f"store={coco256_store}", f"out={tmp_path}"])
    assert not caplog.records


@pytest.mark.parametrize("method", RESNET_PAPERS)
def test_paper_recipes_train_in_fp32(method):
    """The released codes train without autocast; vlpl's own default stays the fast bf16-on-CUDA one."""
    from vlpl.config import TrainConfig

    assert load_train_config([], [f"method={method}", *TRAIN]).mixed_precision == "no"
    assert TrainConfig(store="s", out="o").mixed_precision == "auto"


# --------------------------------------------------------------------------------------------------
# 4. AEVLP's relation-GCN residual on the teacher's text features (off by default, seeded, recorded)
# --------------------------------------------------------------------------------------------------


def test_relation_adjacency_by_hand():
    """S = [[1, .9, .5, .7], [.9, 1, .6, .4], [.5, .6, 1, .8], [.7, .4, .8, 1]], top-3 per row (the class itself
    included), diagonal zeroed, rows normalised, x 0.2, diagonal 0.8."""
    from vlpl.vlm.relation_gcn import relation_adjacency

    s = torch.tensor([[1, .9, .5, .7], [.9, 1, .6, .4], [.5, .6, 1, .8], [.7, .4, .8, 1]])
    a = relation_adjacency(s, sparse_topk=3, reweight=0.2)
    want = torch.tensor([[0.8, 0.2 * .9 / 1.6, 0, 0.2 * .7 / 1.6],
                         [0.2 * .9 / 1.5, 0.8, 0.2 * .6 / 1.5, 0],
                         [0, 0.2 * .6 / 1.4, 0.8, 0.2 * .8 / 1.4],
                         [0.2 * .7 / 1.5, 0, 0.2 * .8 / 1.5, 0.8]])
    assert torch.allclose(a, want, atol=1e-7)
    assert torch.allclose(a.sum(1), torch.ones(4))
    # a class with no neighbour left (top-1 keeps only itself) keeps only its own row weight
    assert torch.allclose(relation_adjacency(s, sparse_topk=1, reweight=0.2), 0.8 * torch.eye(4))
    assert torch.allclose(relation_adjacency(s, None, 0.2), relation_adjacency(s, 4, 0.2))


def test_relation_residual_is_the_formula_and_reproducible():
    """T_hat = normalize(T + A phi(A phi(A T W1) W2) W3), checked in float64 numpy from the same seeded weights;
    the same seed gives the same embeddings, another seed other ones; the weights are U(-1/sqrt(d_out), ..)."""
    from vlpl.vlm.relation_gcn import RelationGCN, gcn_weights, relation_adjacency, text_relation

    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 16, generator=g) * 3.0  # raw text features (not unit norm, as the encoder's output)
    gcn = RelationGCN(seed=11, sparse_topk=4, reweight=0.2, hidden=32)
    out = gcn(t)
    a = relation_adjacency(text_relation(t), 4, 0.2).double().numpy()
    w1, w2, w3 = (w.double().numpy() for w in gcn_weights(16, 32, 11))
    lrelu = lambda x: np.where(x > 0, x, 0.2 * x)  # noqa: E731
    ref = t.double().numpy() + a @ (lrelu(a @ (lrelu(a @ (t.double().numpy() @ w1)) @ w2)) @ w3)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(out.numpy(), ref, atol=1e-5)
    assert torch.equal(out, RelationGCN(seed=11, sparse_topk=4, hidden=32)(t))
    other = RelationGCN(seed=12, sparse_topk=4, hidden=32)(t)
    assert not torch.allclose(out, other) and (out - other).abs().max() > 1e-3
    assert float(w1.__abs__().max()) <= 1 / 32 ** 0.5 and float(w3.__abs__().max()) <= 1 / 16 ** 0.5
    assert gcn.identity() == {"seed": 11, "sparse_topk": 4, "reweight": 0.2, "hidden": 32, "relation": "text"}


def test_relation_gcn_in_the_teacher_and_the_store(coco256_root, tmp_path):
    """teacher.relation_gcn: off by default (embeddings unchanged); on, the store's text embeddings are the
    residual's output, the seed is recorded in the manifest's model identity and in the resolved config.yaml,
    and the same seed rebuilds the same embeddings."""
    from tests.conftest import TINY_TEACHER, make_subset_dataset
    from vlpl.config import PseudolabelConfig, TeacherConfig, load_config
    from vlpl.pseudolabel.stage import run_pseudolabel
    from vlpl.store.store import ScoreStore
    from vlpl.vlm.backend import create_backend

    classes = ["cat", "dog", "person", "pizza", "car"]
    plain = create_backend(TeacherConfig(name="vlpl-tiny", pretrained=None, device="cpu"))
    assert "relation_gcn" not in plain.identity()
    base = plain.encode_text(classes, ["a photo of a {}."])
    cfg = load_config(TeacherConfig, [], ["name=vlpl-tiny", "pretrained=null", "device=cpu", "relation_gcn.enabled=true",
                                          "relation_gcn.seed=7", "relation_gcn.sparse_topk=3"])
    on = create_backend(cfg)
    a = on.encode_text(classes, ["a photo of a {}."])
    assert not torch.allclose(a, base) and torch.allclose(a.norm(dim=1), torch.ones(5))
    assert torch.equal(a, create_backend(cfg).encode_text(classes, ["a photo of a {}."]))
    assert on.identity()["relation_gcn"]["seed"] == 7

    data = make_subset_dataset(coco256_root, tmp_path / "data", n_train=6)
    out = tmp_path / "store"
    run_pseudolabel(load_config(PseudolabelConfig, [TINY_TEACHER], [
        f"data.root={data}", f"out={out}", "num_workers=0", "progress=false", "views.grid=0", "index=false",
        "teacher.relation_gcn.enabled=true", "teacher.relation_gcn.seed=7"]))
    st = ScoreStore(out)
    assert st.manifest["model"]["relation_gcn"] == {"seed": 7, "sparse_topk": None, "reweight": 0.2, "hidden": 1024,
                                                    "relation": "text"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["teacher"]["relation_gcn"]["enabled"] is True and saved["teacher"]["relation_gcn"]["seed"] == 7
    stored = st.text_embeddings()
    seeded = create_backend(load_config(TeacherConfig, [], ["name=vlpl-tiny", "pretrained=null", "device=cpu",
                                                            "relation_gcn=true", "relation_gcn.seed=7"]))
    assert np.allclose(stored, seeded.encode_text(st.classes, ["a photo of a {}."]).numpy(), atol=1e-6)
    assert not np.allclose(stored, plain.encode_text(st.classes, ["a photo of a {}."]).numpy(), atol=1e-3)


# --------------------------------------------------------------------------------------------------
# 7. precision: how many DAMP pseudo-labels move between float32 and bfloat16 scoring
# --------------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)


def _moved(scores: torch.Tensor, observed: torch.Tensor) -> dict:
    """DAMP (temp 0.01, COCO row otherwise, unflipped views) on float32 scores vs the same scores rounded through
    bfloat16 (what a bf16 teacher's output can resolve; a bf16 forward pass adds its own error on top): the number
    of (image, class) pseudo-labels that differ, with the released neutral negatives and with the paper's -1."""
    from vlpl.pseudolabel.rules import apply_rule

    bf16 = scores.to(torch.bfloat16).float()
    out = {}
    for neg in ("neutral", "pseudo"):
        a = apply_rule("damp", scores, observed, dynamic=False, temp=0.01, negatives=neg)
        b = apply_rule("damp", bf16, observed, dynamic=False, temp=0.01, negatives=neg)
        out[neg] = int((a != b).sum())
    out["entries"] = int(observed.numel())
    return out


def test_bf16_scores_move_few_damp_pseudo_labels(coco256_store, shared_data):
    """Measured (docs/RECIPES.md): on the coco256 store (tiny random teacher, grid 2, 102 train images x 80 classes)
    no pseudo-label moves with the released neutral negatives and 16 of 8,160 with the paper's -1 negatives (the
    bottom-30% set by psi re-ranks); on informative synthetic scores built from the real CLIP ViT-L/14 COCO text
    features (cosines 0.275 true / 0.237 other, like a real ViT-L teacher's), 1 and 167 of 20,480."""
    from vlpl.store.store import ScoreStore

    sp = ScoreStore(coco256_store).split("train")
    scores = torch.from_numpy(sp.scores(np.arange(len(sp)))).float()
    observed = torch.from_numpy(np.ascontiguousarray(sp.observed))
    tiny = _moved(scores, observed)
    log.info("DAMP at temp 0.01, float32 vs bfloat16 scores, coco256 tiny-teacher store: %s", tiny)
    assert tiny == {"neutral": 0, "pseudo": 16, "entries": 8160}

    # informative scores: each view's embedding = 0.3 x (normalised sum of the image's true classes' real CLIP text
    # features) + noise, unit norm, 5 views, stored as float16 like a store; one observed positive per image
    t = np.load(shared_data / "clip_text_features" / "ViT-L-14-336" / "coco80.npy").astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    classes = (shared_data / "coco256" / "classes.txt").read_text().split("\n")[:80]
    import csv

    rows = list(csv.DictReader(open(shared_data / "coco256" / "labels.csv")))
    y = np.zeros((len(rows), 80))
    for i, r in enumerate(rows):
        for c in filter(None, r["labels"].split("|")):
            y[i, classes.index(c)] = 1
    rng = np.random.default_rng(0)
    m = y @ t
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)
    u = 0.3 * m[:, None, :] + np.sqrt(1 - 0.09) * rng.standard_normal((len(rows), 5, 768)) / np.sqrt(768)
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    synth = torch.from_numpy(u @ t.T).float().to(torch.float16).float()[:, None]
    obs = torch.zeros(len(rows), 80, dtype=torch.int8)
    for i in range(len(rows)):
        pos = np.flatnonzero(y[i])
        if len(pos):
            obs[i, rng.choice(pos)] = 1
    informative = _moved(synth, obs)
    log.info("DAMP at temp 0.01, float32 vs bfloat16 scores, informative synthetic scores: %s", informative)
    assert informative == {"neutral": 1, "pseudo": 167, "entries": 20480}
    assert informative["neutral"] < 0.001 * informative["entries"] and informative["pseudo"] < 0.01 * informative["entries"]


@pytest.mark.slow
def test_two_processes_follow_the_global_batchs_flips(coco256_store, tmp_path):
    """With two processes the rule runs on the global batch with the global batch's flips (the loop's
    TrainBatch.global_flip): the logged pseudo-labels per step equal a one-process run's, and differ from a run that
    ignores the flip (so the comparison sees the flips)."""
    import os
    import subprocess
    import sys

    def args(out: Path, *extra: str) -> list:
        return ["train", "-c", TINY_NET, f"store={coco256_store}", f"out={out}", "method=vlpl", "dataset=coco2014",
                "progress=false", "log_every=1", "epochs=1", "max_steps_per_epoch=6", "batch_size=16",
                "num_workers=0", "pseudo.params.threshold=0.05", *extra]

    def pseudo(out: Path) -> list:
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["pseudo_pos_per_image"] for r in recs if r.get("kind") == "step"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for out, extra in ((tmp_path / "one", ()), (tmp_path / "unflipped", ("pseudo.variant=unflipped",))):
        r = subprocess.run([sys.executable, "-m", "vlpl", *args(out, *extra)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                        "-m", "vlpl", *args(two)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(pseudo(tmp_path / "one")) == 6
    assert pseudo(two) == pseudo(tmp_path / "one")
    assert pseudo(tmp_path / "unflipped") != pseudo(tmp_path / "one")


def test_an_open_clip_student_records_its_tag_or_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from vlpl.vlm.backend import register_bundled_configs

    register_bundled_configs()
    cfg = StudentConfig(kind="open_clip", name="vlpl-tiny", open_clip_pretrained=None, image_size=64,
                        normalization="model")
    assert create_classifier(cfg, _names()).pretrained_tag is None
    torch.manual_seed(3)
    ref = open_clip.create_model("vlpl-tiny")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = create_classifier(StudentConfig(kind="open_clip", name="vlpl-tiny", open_clip_pretrained=str(path),
                                            image_size=64, normalization="model"), _names())
    assert model.pretrained_tag.startswith(f"file:{path} sha256:")
    want = ref.visual.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.backbone.visual.state_dict().items())

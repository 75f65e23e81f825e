"""SigRL's heads (vlpl/train/heads/sigrl.py): GATv2 by hand, SDA/VFR, chunking, the batch norm, the logit
scale, the real CLIP text embeddings, save/load, the recipes end to end on coco256, kill + resume.

Tiny dimensions throughout; the end-to-end runs use the bundled random ``vlpl-tiny`` open_clip student.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from vlpl.config import ConfigError, HeadConfig, StudentConfig
from vlpl.registry import HEADS
from vlpl.train.head_params import SigRLParams, head_params
from vlpl.train.heads.sigrl import (
    GMC,
    GATv2Layer,
    SigRLHead,
    chunked_over_classes,
    classes_per_chunk,
    knn_graph,
    semantic_mixing,
)
from vlpl.train.model import ClassContext, ModelOutput

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CLIP_FEATURES = SHARED / "clip_text_features" / "ViT-L-14-336"


def _ctx(c: int, d: int, seed: int = 0) -> ClassContext:
    g = torch.Generator().manual_seed(seed)
    return ClassContext([f"class {i}" for i in range(c)], torch.randn(c, d, generator=g).numpy())


def _head(c: int = 6, d: int = 8, f: int = 8, seed: int = 0, **params) -> SigRLHead:
    torch.manual_seed(seed)
    return HEADS.create("sigrl", in_features=f, context=_ctx(c, d), **params)


def _features(b: int = 3, n: int = 5, f: int = 8, seed: int = 1, grad: bool = False) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, f, generator=g).requires_grad_(grad)
    pooled = torch.randn(b, f, generator=g).requires_grad_(grad)
    return ModelOutput(pooled, tokens)


def _real(name: str) -> np.ndarray:
    path = CLIP_FEATURES / f"{name}.npy"
    if not path.is_file():
        pytest.skip(f"{path} not found (real test data lives in ../shared/data)")
    return np.load(path)


def _names(name: str) -> List[str]:
    return (SHARED / "classnames" / f"{name}.txt").read_text().splitlines()


# --------------------------------------------------------------------------------------------------
# GATv2 (GMC) against a hand computation
# --------------------------------------------------------------------------------------------------


def test_gatv2_two_nodes_one_head_matches_hand_computation():
    """h1 = (1, 0), h2 = (0, -1); W = [[1, 1], [0, 1]] so W h1 = (1, 0), W h2 = (-1, -1); a = (1, 2);
    LeakyReLU slope 0.2. e_ij = a . LReLU(W h_i + W h_j):
    e11 = a.(2, 0) = 2;  e12 = e21 = a.LReLU(0, -1) = a.(0, -0.2) = -0.4;  e22 = a.(-0.4, -0.4) = -1.2."""
    layer = GATv2Layer(2, 2, heads=1, concat=True, dropout=0.0, negative_slope=0.2)
    with torch.no_grad():
        layer.lin.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        layer.att.weight.copy_(torch.tensor([[1.0, 2.0]]))
    h = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    out = layer(h)

    def softmax(x, y):
        return math.exp(x) / (math.exp(x) + math.exp(y)), math.exp(y) / (math.exp(x) + math.exp(y))

    a11, a12 = softmax(2.0, -0.4)  # 0.9168, 0.0832
    a21, a22 = softmax(-0.4, -1.2)  # 0.6900, 0.3100
    want_alpha = torch.tensor([[a11, a12], [a21, a22]])
    assert torch.allclose(layer.last_attention[..., 0], want_alpha, atol=1e-6)
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -1.0])
    want = torch.stack([a11 * g1 + a12 * g2, a21 * g1 + a22 * g2])  # sum_j alpha_ij W h_j
    assert torch.allclose(out, want, atol=1e-6)
    assert out[0].tolist() == pytest.approx([0.8336, -0.0832], abs=1e-4)
    # the same graph given as neighbour lists (the knn path) gives the same result
    assert torch.allclose(layer(h, torch.tensor([[0, 1], [1, 0]])), want, atol=1e-6)
    # one node's own neighbourhood only (k = 1): attention 1 on itself, output W h_i
    assert torch.allclose(layer(h, torch.tensor([[0], [1]])), torch.stack([g1, g2]), atol=1e-6)


def test_gatv2_heads_share_the_attention_vector_and_weights():
    """labml's layer (the released code's): one W for both ends, one attention vector for every head, no
    bias; concat gives heads x hidden, the output layer averages its (single) head."""
    layer = GATv2Layer(5, 3, heads=4, concat=True, dropout=0.0, negative_slope=0.2)
    assert dict((k, tuple(v.shape)) for k, v in layer.state_dict().items()) == {"lin.weight": (12, 5),
                                                                                "att.weight": (1, 3)}
    h = torch.randn(7, 5)
    out = layer(h)
    assert out.shape == (7, 12)
    g = layer.lin(h).view(7, 4, 3)
    for head in range(4):  # each head = a 1-head layer with that head's slice of W and the same a
        one = GATv2Layer(5, 3, heads=1, concat=True, dropout=0.0, negative_slope=0.2)
        with torch.no_grad():
            one.lin.weight.copy_(layer.lin.weight[head * 3:(head + 1) * 3])
            one.att.weight.copy_(layer.att.weight)
        assert torch.allclose(one(h), out[:, head * 3:(head + 1) * 3], atol=1e-6)
    assert torch.allclose(layer.last_attention.sum(dim=1), torch.ones(7, 4))
    del g


def test_dense_gat_in_row_chunks_equals_one_chunk_with_gradients():
    torch.manual_seed(0)
    big = GMC(8, 8, heads=2, hidden=4, dropout=0.0, negative_slope=0.2, chunk_mb=64)
    small = GMC(8, 8, heads=2, hidden=4, dropout=0.0, negative_slope=0.2, chunk_mb=3 * 9 * 8 * 4 / 2**20)
    small.load_state_dict(big.state_dict())
    assert classes_per_chunk(small.layer1.chunk_mb, 9 * 8) == 3  # 3 rows per chunk of the 9 x 9 graph
    h1 = torch.randn(9, 8, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    o1, o2 = big(h1), small(h2)
    assert torch.allclose(o1, o2, atol=1e-6)
    o1.pow(2).sum().backward()
    o2.pow(2).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    for (n, p1), p2 in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5), n


# --------------------------------------------------------------------------------------------------
# The label graph and GMC on real CLIP text embeddings
# --------------------------------------------------------------------------------------------------


def test_knn_graph_of_real_clip_embeddings_links_related_classes():
    emb = _real("coco80")
    names = _names("coco80")
    nbr = knn_graph(emb, 4)
    assert nbr.shape == (80, 4) and (nbr[:, 0] == np.arange(80)).all()  # self first
    near = {names[i]: {names[j] for j in nbr[i, 1:]} for i in range(80)}
    assert "dog" in near["cat"] and "spoon" in near["fork"]
    # the cosine ranking by hand
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    want = np.argsort(-(e @ e.T), axis=1, kind="stable")[:, :4]
    assert (np.sort(nbr, axis=1) == np.sort(want, axis=1)).all()


@pytest.mark.parametrize("name,c", [("coco80", 80), ("cub312", 312)])
def test_gmc_runs_on_real_clip_text_embeddings_through_the_projection(name, c):
    emb = _real(name)
    assert emb.shape == (c, 768)
    ctx = ClassContext([f"c{i}" for i in range(c)], emb)
    torch.manual_seed(0)
    head = HEADS.create("sigrl", in_features=32, context=ctx, dropout=0.0)
    assert head.proj is not None and tuple(head.proj.weight.shape) == (32, 768)  # 768-d -> F = 32
    assert torch.allclose(head.text.norm(dim=1), torch.ones(c))  # normalised before use
    h = head.class_embeddings()
    h_hat = head.refined_embeddings(h)
    assert h_hat.shape == (c, 32) and torch.isfinite(h_hat).all()
    att = head.gmc.layer1.last_attention
    assert att.shape == (c, c, 4) and torch.allclose(att.sum(dim=1), torch.ones(c, 4), atol=1e-5)
    h_hat.pow(2).sum().backward()
    assert head.proj.weight.grad.abs().sum() > 0  # the projection learns through GMC
    # the knn graph over all C neighbours is the dense graph
    knn = HEADS.create("sigrl", in_features=32, context=ctx, dropout=0.0, graph="knn", graph_k=c)
    knn.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.allclose(knn.refined_embeddings(knn.class_embeddings()), h_hat.detach(), atol=1e-5)


def test_large_class_counts_get_the_sparse_graph():
    head = _head(c=40, d=8, f=8, dense_max_classes=30, graph_k=5)
    assert head.graph_kind == "knn" and tuple(head.neighbors.shape) == (40, 5)
    assert head(_features()).shape == (3, 40)
    assert head.gmc.layer1.last_attention.shape == (40, 5, 4)  # attention only over the 5 neighbours
    assert _head(c=40, dense_max_classes=40).graph_kind == "dense"
    assert _head(c=40, graph="knn").neighbors.shape == (40, 32)


# --------------------------------------------------------------------------------------------------
# SDA, semantic mixing, VFR, matching
# --------------------------------------------------------------------------------------------------


def test_sda_and_vfr_shapes_attention_and_gradients():
    head = _head(c=6, d=8, f=8, dropout=0.0, top_k=2)
    out = _features(b=3, n=5, f=8, grad=True)
    h = head.class_embeddings()
    assert h.shape == (6, 8)
    m = head.sda_features(out.tokens, h)
    assert m.shape == (3, 6, 8)
    # SDA's attention is a softmax over the patches for each (class, feature): M_c = sum_n a_nc * F_n
    x = torch.tanh(out.tokens[:, :, None, :] * h[None, None])
    a = torch.softmax(head.sda(x), dim=1)
    assert torch.allclose(a.sum(dim=1), torch.ones(3, 6, 8), atol=1e-6)
    assert torch.allclose(m, (a * out.tokens[:, :, None, :]).sum(dim=1), atol=1e-6)
    m_hat = head.svfr_tokens(out.tokens, h, head.refined_embeddings(h))
    assert m_hat.shape == (3, 5, 8)
    logits = head(out)
    assert logits.shape == (3, 6)
    logits.sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert out.tokens.grad.abs().sum() > 0 and out.pooled.grad.abs().sum() > 0


def test_matching_is_the_mean_of_normalised_local_topk_and_global_scores():
    """s = (lambda/||lambda|| + gamma/||gamma||)/2 with lambda_c the mean of the top-k patch scores;
    patches outside every class's top-k get no gradient from the local score (svfr off: raw tokens)."""
    head = _head(c=4, d=8, f=8, svfr=False, top_k=2, scale=1.0, learn_scale=False, bias=0.0, learn_bias=False)
    out = _features(b=2, n=6, f=8, grad=True)
    s = head(out)
    h = head.class_embeddings().detach()
    sim = torch.einsum("bnf,cf->bnc", out.tokens.detach(), h)
    local = sim.sort(dim=1, descending=True).values[:, :2].mean(dim=1)
    glob = out.pooled.detach() @ h.t()
    want = 0.5 * (local / local.norm(dim=1, keepdim=True) + glob / glob.norm(dim=1, keepdim=True))
    assert torch.allclose(s, want, atol=1e-6)
    assert s.abs().max() <= 1.0
    s.sum().backward()
    top = sim.topk(2, dim=1).indices  # (B, 2, C)
    used = torch.zeros(2, 6, dtype=torch.bool)
    for b in range(2):
        used[b, top[b].flatten()] = True
    grad_norm = out.tokens.grad.norm(dim=-1)
    assert (grad_norm[~used] == 0).all() and (grad_norm[used] > 0).all()
    # top_k above the patch count averages every patch
    assert _head(top_k=100)(_features(n=3)).shape == (3, 6)


def test_chunked_sda_and_vfr_equal_the_unchunked_result_and_gradients():
    b, n, f, c = 2, 5, 8, 7
    one = _head(c=c, d=8, f=f, dropout=0.0, chunk_mb=1024)
    per_class = b * n * f
    chunked = _head(c=c, d=8, f=f, dropout=0.0, chunk_mb=2 * per_class * 4 / 2**20)  # 2 classes per chunk
    chunked.load_state_dict(one.state_dict())
    assert chunked._chunk(torch.zeros(b, n, f)) == 2 and one._chunk(torch.zeros(b, n, f)) >= c
    x1, x2 = _features(b, n, f, grad=True), _features(b, n, f, grad=True)
    l1, l2 = one(x1), chunked(x2)
    assert torch.allclose(l1, l2, atol=1e-6)
    (l1 * torch.arange(c)).sum().backward()
    (l2 * torch.arange(c)).sum().backward()
    assert torch.allclose(x1.tokens.grad, x2.tokens.grad, atol=1e-5)
    for (name, p1), p2 in zip(one.named_parameters(), chunked.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5), name


def test_chunked_over_classes_concatenates_or_sums_and_recomputes_only_with_grad():
    calls = []

    def part(start, stop, x):
        calls.append((start, stop))
        return x[:, start:stop] * 2

    x = torch.arange(10.0).reshape(1, 10)
    assert torch.equal(chunked_over_classes(part, 10, 4, x), x * 2)
    assert calls == [(0, 4), (4, 8), (8, 10)]
    calls.clear()
    xs = x.clone().requires_grad_(True)
    y = chunked_over_classes(lambda s, e, t: t[:, s:e].sum(1, keepdim=True), 10, 3, xs, combine="sum")
    assert y.item() == 45.0
    y.backward()
    assert torch.equal(xs.grad, torch.ones(1, 10))


def test_batch_and_image_norm_differ_only_where_they_should():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 5, 8, generator=g)
    h = torch.randn(5, 8, generator=g)
    # batch of 1: the two norms are the same number
    assert torch.equal(semantic_mixing(m[:1], h, "batch"), semantic_mixing(m[:1], h, "image"))
    # any batch: the row normalisation of Q cancels the positive divisor, so the two agree to rounding
    assert torch.allclose(semantic_mixing(m, h, "batch"), semantic_mixing(m, h, "image"), rtol=1e-5, atol=1e-6)
    # ... except an image whose features are tiny next to its batch-mates': there the batch norm pushes
    # the rows of Q under F.normalize's eps (1e-12) and T shrinks; per image it does not. Its mates are equal.
    m[0] *= 1e-14
    tb, ti = semantic_mixing(m, h, "batch"), semantic_mixing(m, h, "image")
    assert torch.allclose(tb[1:], ti[1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tb[0], ti[0], rtol=1e-2, atol=0.0)  # 1e-18 vs 1e-14
    alone = semantic_mixing(m[:1], h, "batch")  # the tiny image in a batch of its own: as per image
    assert torch.allclose(alone, ti[:1], rtol=1e-5, atol=1e-30)
    # the head: batch of 1 equal whatever the option, batch of 3 close
    hb, hi = _head(dropout=0.0, norm="batch"), _head(dropout=0.0, norm="image")
    hi.load_state_dict(hb.state_dict())
    x = _features(b=3)
    one = ModelOutput(x.pooled[:1], x.tokens[:1])
    assert torch.equal(hb(one), hi(one))
    assert torch.allclose(hb(x), hi(x), atol=1e-5)


def test_mixing_runs_in_float32_under_autocast():
    m = torch.randn(2, 4, 8).bfloat16()
    h = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = semantic_mixing(m, h)
    assert t.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Logits: the scale and bias; GPR sees p over (0, 1)
# --------------------------------------------------------------------------------------------------


def test_fixed_unit_scale_is_the_released_sigmoid_and_the_learned_scale_leaves_the_band():
    fixed = _head(scale=1.0, learn_scale=False, bias=0.0, learn_bias=False)
    assert {n for n, _ in fixed.named_parameters()}.isdisjoint({"log_scale", "logit_bias"})
    p = torch.sigmoid(fixed(_features(b=8)))
    lo, hi = 1 / (1 + math.e), 1 / (1 + math.exp(-1))  # sigmoid(-1), sigmoid(1)
    assert p.min() >= lo - 1e-6 and p.max() <= hi + 1e-6
    learned = _head(c=6)
    assert learned.log_scale.requires_grad and learned.log_scale.item() == pytest.approx(math.log(math.sqrt(6)))
    assert learned.logit_bias.requires_grad and learned.logit_bias.item() == pytest.approx(-math.log(5))  # logit(1/6)
    assert _head(bias=0.5).logit_bias.item() == 0.5
    assert _head(scale=7.0).log_scale.item() == pytest.approx(math.log(7.0))


def _gpr_fit(head: SigRLHead, steps: int = 100):
    """GPR (pseudo-labels = the true labels) on 8 fixed toy images, head parameters only: the loss values and
    the final probabilities."""
    from vlpl.train.losses import LossBatch, create_loss

    torch.manual_seed(0)
    n, c = 8, head.num_classes
    labels = torch.zeros(n, c)
    labels[torch.arange(n), torch.arange(n) % c] = 1
    labels[torch.arange(n), (torch.arange(n) + 1) % c] = 1
    observed = torch.zeros(n, c)
    observed[torch.arange(n), torch.arange(n) % c] = 1
    loss = create_loss("gpr", observed)
    loss.set_epoch(1, 1)
    out = _features(b=n, n=5, f=head.in_features, seed=3)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    values = []
    for _ in range(steps):
        terms = loss(LossBatch(logits=head(out), index=torch.arange(n), pseudo=(2 * labels - 1).to(torch.int8)))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        values.append(float(terms["loss"].detach()))
    with torch.no_grad():
        p = torch.sigmoid(head(out))
    return values, p


def test_gpr_sees_probabilities_outside_the_sigmoid_band_with_the_learned_scale():
    """The released sigmoid(s) keeps p in [0.269, 0.731] whatever GPR asks; the learned scale and bias let
    GPR's gradients move p out of that band (the scale grows from its sqrt(C) start)."""
    band = (1 / (1 + math.e), 1 / (1 + math.exp(-1)))
    head = _head(c=6, dropout=0.0)
    start = head.log_scale.item()
    values, p = _gpr_fit(head)
    assert values[-1] < 0.6 * values[0]
    assert p.min() < 0.05 and p.max() > 0.8 and head.log_scale.item() > start + 0.5
    fixed_values, p_fixed = _gpr_fit(_head(c=6, dropout=0.0, scale=1.0, learn_scale=False, bias=0.0, learn_bias=False))
    assert p_fixed.min() >= band[0] - 1e-6 and p_fixed.max() <= band[1] + 1e-6
    assert min(fixed_values) > values[-1]  # the bounded head cannot fit GPR as far


# --------------------------------------------------------------------------------------------------
# Parameters, registry, save / load
# --------------------------------------------------------------------------------------------------


def test_head_parameters_are_validated_before_torch_and_named():
    assert head_params("sigrl", {"top_k": 8}).top_k == 8
    assert SigRLParams().top_k == 16 and SigRLParams().gat_heads == 4 and SigRLParams().dropout == 0.3
    with pytest.raises(ConfigError, match="top_k"):
        head_params("sigrl", {"top_k": 0})
    with pytest.raises(ConfigError, match="norm"):
        head_params("sigrl", {"norm": "layer"})
    with pytest.raises(ConfigError, match="tpo_k"):
        head_params("sigrl", {"tpo_k": 3})
    with pytest.raises(ConfigError, match="needs svfr=true"):
        head_params("sigrl", {"svfr": False, "reconstruct_dim": 16})
    with pytest.raises(ConfigError, match="needs class text embeddings"):
        HEADS.create("sigrl", in_features=8, context=ClassContext.from_names(["a", "b"]))


def test_reconstruction_feature_is_exposed_in_aux():
    head = _head(c=6, f=8, dropout=0.0)
    x = _features(b=3, f=8)
    head(x)
    assert tuple(head.aux["reconstruction"].shape) == (3, 8)
    proj = _head(c=6, f=8, dropout=0.0, reconstruct_dim=12)
    proj(x)
    assert tuple(proj.aux["reconstruction"].shape) == (3, 12)
    off = _head(svfr=False)
    off(x)
    assert off.aux == {}


@pytest.mark.parametrize("params", [{}, {"graph": "knn", "graph_k": 3, "learn_scale": False, "scale": 2.0}])
def test_saved_sigrl_classifier_rebuilds_with_the_same_logits(tmp_path, params):
    """A timm CNN student (its feature map as tokens) with the sigrl head over the real 768-d CLIP class
    embeddings: save_model -> load_model gives identical logits."""
    from vlpl.train.model import create_classifier
    from vlpl.train.model_io import load_model, save_model

    emb = _real("coco80")
    ctx = ClassContext(_names("coco80"), emb)
    cfg = StudentConfig(kind="timm", name="test_resnet", pretrained=False, image_size=64,
                        head=HeadConfig(name="sigrl", params=dict(params)))
    torch.manual_seed(0)
    model = create_classifier(cfg, ctx).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    save_model(tmp_path / "m", model, cfg)
    assert "head.text" not in json.dumps(list(model.state_dict()))  # embeddings travel in their own file
    back = load_model(tmp_path / "m")
    with torch.no_grad():
        got = back(x)
    assert want.shape == (2, 80) and torch.equal(got, want)
    if "graph" in params:
        assert torch.equal(back.head.neighbors, model.head.neighbors)


# --------------------------------------------------------------------------------------------------
# Several processes: the batch norm over the global batch
# --------------------------------------------------------------------------------------------------


def _two_images() -> ModelOutput:
    """Image 1's tokens are 1e13 times image 0's: the only case where the batch norm changes the result
    (see test_batch_and_image_norm_differ_only_where_they_should): with the batch's norm image 0's T
    vanishes next to H^ in VFR, with its own it does not. So it shows whether a process normalises by the
    global batch or by its own slice."""
    x = _features(b=2, n=5, f=8, seed=4)
    scale = torch.tensor([1.0, 1e13]).reshape(2, 1, 1)
    return ModelOutput(x.pooled, x.tokens * scale)


def _step(head: SigRLHead, rows: slice) -> Dict[str, torch.Tensor]:
    x = _two_images()
    logits = head(ModelOutput(x.pooled[rows], x.tokens[rows]))
    (logits * torch.arange(1.0, 7.0)).sum(dim=1).mean().backward()  # a per-image mean, as every loss
    res = {"logits": logits.detach()}
    res.update({n: p.grad.clone() for n, p in head.named_parameters()})
    return res


def _dist_worker(rank: int, init_file: str, out_dir: str, global_batch: bool) -> None:
    import torch.distributed as dist

    import vlpl.train.heads.sigrl as sigrl_mod

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if not global_batch:
            sigrl_mod._distributed = lambda: False  # each process normalises by its own slice
        head = _head(dropout=0.0).train()
        res = _step(head, slice(rank, rank + 1))
        for k, v in res.items():
            if k != "logits":
                dist.all_reduce(v)
                v /= 2  # what DDP does to the parameter gradients
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes
def test_two_processes_take_the_one_process_step_with_the_batch_norm(tmp_path):
    import torch.multiprocessing as mp

    ref = _step(_head(dropout=0.0).train(), slice(0, 2))
    got = {}
    for global_batch in (True, False):
        out = tmp_path / str(global_batch)
        out.mkdir()
        # spawn, not fork: forking a process whose intra-op thread pool has run can deadlock the children
        mp.spawn(_dist_worker, args=(str(tmp_path / f"init{global_batch}"), str(out), global_batch), nprocs=2,
                 join=True)
        got[global_batch] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    ranks = got[True]
    assert torch.allclose(torch.cat([ranks[0]["logits"], ranks[1]["logits"]]), ref["logits"], atol=1e-5)
    for name in ref:
        if name != "logits":
            assert torch.allclose(ranks[0][name], ref[name], atol=1e-5, rtol=1e-4), name
    # without the all-reduce, the process holding the tiny image computes another step
    assert not torch.allclose(got[False][0]["logits"], ref["logits"][:1], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------


def test_sigrl_recipe_is_the_released_spml_recipe_and_aevlp_sigrl_keeps_aevlps_rows(tmp_path):
    from vlpl.config import yaml_load
    from vlpl.train.recipes import load_train_config

    base = [f"store={tmp_path}", f"out={tmp_path / 'o'}"]
    voc = load_train_config([], ["method=sigrl", "dataset=voc2012", *base])
    coco = load_train_config([], ["method=sigrl", "dataset=coco2014", *base])
    s = voc.student
    assert (s.kind, s.name, s.open_clip_pretrained, s.image_size) == ("open_clip", "ViT-B-16", "openai", 224)
    assert s.head.name == "sigrl" and s.head.text_embeddings == "student"
    assert s.head.params == {"scale": 1.0, "learn_scale": False, "bias": 0.0, "learn_bias": False}  # sigmoid(s)
    assert (voc.loss.name, voc.loss.params["alpha"], coco.loss.params["alpha"]) == ("em", 0.2, 0.1)
    assert voc.pseudo.rule is None and (voc.batch_size, voc.epochs, voc.mixed_precision) == (1, 10, "no")
    assert (voc.optim.name, voc.optim.lr, voc.optim.head_lr) == ("adam", 1e-5, None)
    assert voc.early_stop_patience is None and voc.early_stop_drop is None
    mine = yaml_load((REPO / "configs" / "methods" / "aevlp_sigrl.yaml").read_text())
    theirs = yaml_load((REPO / "configs" / "methods" / "aevlp.yaml").read_text())
    assert mine["datasets"] == theirs["datasets"]  # AEVLP's per-dataset rows, unchanged
    for key in ("loss", "pseudo", "optim", "early_stop_patience", "early_stop_drop"):
        assert mine["defaults"][key] == theirs["defaults"][key], key
    assert mine["defaults"]["student"]["head"] == {"name": "sigrl", "text_embeddings": "student"}


# --------------------------------------------------------------------------------------------------
# End to end on coco256 (tiny open_clip student)
# --------------------------------------------------------------------------------------------------

TINY_OPEN_CLIP = ["student.name=vlpl-tiny", "student.open_clip_pretrained=null", "student.image_size=64",
                  "num_workers=0", "progress=false"]


# The recipes at the tiny scale: the learning rates of a tiny random model (the recipes' 1e-5 is for a
# pretrained ViT-B/16), batch 17, "val" = the training images (their full labels; 26 val images rank
# nothing), no flips, no early stop.
#
# Learning beyond the untrained start is asserted for sigrl over 16 epochs (below): with the random
# vlpl-tiny CLIP the class embeddings are random directions, the released sigmoid(s) keeps p in
# [0.27, 0.73] and EM's loss is nearly flat there, so the tower learns slowly (train images, untrained
# 7.61: 7.46 after 8 epochs, 10.60 after 16). aevlp_sigrl did not beat its start in any setting tried
# (3-6 epochs, lr 1e-3 / 3e-3: 6.4-6.95; DAMP pseudo-labels of a random teacher are noise), while the
# linear head on the same tower goes 6.12 -> 10.8 with aevlp: a real CLIP is needed to show it.
# At batch 4 (4x the steps) it does, this random teacher included: 7.61 -> 8.21 and 6.51 -> 10.41 (seeds 0, 1;
# 8 epochs, lr 1e-3). The asserted test (below) uses a store with an informative teacher.
E2E = {
    "sigrl": ["epochs=3", "batch_size=17", "optim.lr=1e-3"],
    "aevlp_sigrl": ["epochs=3", "batch_size=17", "optim.lr=1e-3", "optim.head_lr=1e-3", "early_stop_patience=null",
                    "early_stop_drop=null"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(E2E))
def test_recipe_trains_to_a_checkpoint_and_an_evaluate_report(method, coco256_store, tmp_path):
    from vlpl.config import EvaluateConfig, load_config
    from vlpl.eval.stage import run_evaluate
    from vlpl.train.loop import load_best, run_train
    from vlpl.train.recipes import load_train_config

    out = tmp_path / method
    cfg = load_train_config([], [f"store={coco256_store}", f"out={out}", f"method={method}", "dataset=coco2014",
                                 *TINY_OPEN_CLIP, *E2E[method], "val_split=train", "hflip=false"])
    assert cfg.student.head.name == "sigrl" and cfg.student.kind == "open_clip"
    run_train(cfg)
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    model, classes = load_best(out)
    assert isinstance(model.head, SigRLHead) and len(classes) == 80
    meta = json.loads((out / "best" / "model.json").read_text())
    assert meta["student"]["head"]["name"] == "sigrl" and meta["text_embeddings"]["source"] == "student"
    report = run_evaluate(load_config(EvaluateConfig, [], [f"run={out}", "plots=false"]))
    head = json.loads((Path(report) / "report.json").read_text())["headline"]
    run_row = next(r for r in head if r["kind"] == "run")
    assert run_row["split"] == "test" and run_row["map"] == pytest.approx(summary["test_map_at_best"], abs=1e-6)
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert len(epochs) == 3 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert 0 < summary["best_val_map"] <= 100


@pytest.mark.slow
def test_killed_sigrl_run_resumes_to_identical_weights(coco256_store, tmp_path):
    """aevlp_sigrl (DAMP + GPR + the sigrl head, its GMC dropout drawing from the step's RNG) killed -9
    mid-epoch resumes to the bytes of an uninterrupted run: weights, optimizer, loss state, RNG, best/,
    predictions and the logged losses (the kill switch VLPL_FAULT_KILL_AT of vlpl/train/checkpoint.py)."""
    from test_train import final_state, fork_train

    def args(out: Path, *extra: str) -> list:
        return [f"store={coco256_store}", f"out={out}", "log_every=1", "method=aevlp_sigrl", "dataset=coco2014",
                *TINY_OPEN_CLIP, "epochs=2", "batch_size=16", "max_steps_per_epoch=4", "checkpoint_every_steps=2",
                "early_stop_patience=null", "early_stop_drop=null", "optim.lr=1e-3", *extra]

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert fork_train(args(ref), files=()) == 0
    assert fork_train(args(run), kill_at="step:3", files=()) == -9
    assert fork_train(args(run, "resume=true"), files=()) == 0
    want, got = final_state(ref), final_state(run)
    assert got == want, [k for k in want if got.get(k) != want[k]]


# --------------------------------------------------------------------------------------------------
# The benchmark script does not rot
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # two child processes importing torch: ~20 s on an idle machine, minutes on a busy one
def test_sigrl_heads_benchmark_smoke(tmp_path):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("_bench_sigrl_heads", REPO / "benchmarks" / "sigrl_heads.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = tmp_path / "b.json"
    mod.main(["--classes", "12", "--batch-sizes", "2", "--patches", "4", "--features", "8", "--steps", "1",
              "--warmup", "0", "--unchunked-max-classes", "12", "--chunk-mb", str(2 * 2 * 4 * 8 * 4 / 2**20),
              "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["benchmark"] == "sigrl_heads" and res["environment"]["torch"] and res["date"]
    chunked, unchunked = res["rows"]
    assert (chunked["variant"], chunked["classes_per_chunk"], unchunked["classes_per_chunk"]) == ("chunked", 2, 12)
    assert chunked["graph"] == "dense" and chunked["graph_edges"] == 144
    assert chunked["step_s_median"] > 0 and chunked["peak_memory_mib"] >= 0


def _untrained_map(cfg, store: Path, split: str) -> float:
    """mAP on ``split`` of the run's own initial weights (same seed as setup()), predicted as the trainer does."""
    from accelerate.utils import set_seed

    from vlpl.data.images import ImageDataset, ImageSource
    from vlpl.eval.metrics import mean_average_precision
    from vlpl.store.store import ScoreStore
    from vlpl.train.data import image_transform
    from vlpl.train.model import create_classifier

    st = ScoreStore(store)
    rows = st.split(split)
    set_seed(cfg.seed)
    model = create_classifier(cfg.student, ClassContext.from_store(st)).eval()
    tf = image_transform(cfg.student.image_size, model.mean, model.std, False, False)
    ds = ImageDataset(ImageSource.from_store(st.dataset_info, None), rows.images, tf)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.stack([ds[i][0] for i in range(len(ds))]))).double().numpy()
    return mean_average_precision(rows.labels, p)["map"]


@pytest.mark.slow
def test_sigrl_recipe_beats_its_untrained_start(coco256_store, tmp_path):
    """The released recipe (EM, sigmoid(s), fixed scale) with the tiny open_clip student, 16 epochs at lr 1e-3
    on the training images (their full labels as "val"): measured 7.61 -> 10.60 when written (the curve
    rises steadily from epoch 2); asserted with a margin of 1.5 points."""
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    out = tmp_path / "sigrl16"
    cfg = load_train_config([], [f"store={coco256_store}", f"out={out}", "method=sigrl", "dataset=coco2014",
                                 *TINY_OPEN_CLIP, "epochs=16", "batch_size=17", "optim.lr=1e-3",
                                 "val_split=train", "hflip=false"])
    run_train(cfg)
    best = json.loads((out / "summary.json").read_text())["best_val_map"]
    base = _untrained_map(cfg, coco256_store, "train")
    assert best > base + 1.5, (best, base)


# --------------------------------------------------------------------------------------------------
# aevlp_sigrl with an informative teacher: a store over coco256's real images and true labels whose cached
# scores come from benchmarks/synthetic.py's generative model (positives score higher than negatives)
# --------------------------------------------------------------------------------------------------


def _synthetic_module():
    """benchmarks/synthetic.py as a module (the name tests/test_index.py uses, so it is loaded once)."""
    import importlib.util
    import sys

    name = "_bench_synthetic"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "synthetic.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _coco256_teacher_store(out: Path, seed: int = 0, informative: bool = True) -> Path:
    """A complete store (StoreWriter: manifest, checksums, text embeddings) with one row per coco256 image:
    its real split, its TRUE labels (labels.csv, C = 80) and one observed positive drawn among them (Cole et
    al.'s single-positive protocol; the 2 images without a label observe none), grid 2 with flips (V = 10).

    The cached scores are benchmarks/synthetic.py's CLIP-like cosines with the image's true labels as the
    positives: view embedding ``normalize(0.45 u + 0.15 sum_{p visible} t_p + 0.9 n_v)`` against the text
    embeddings ``t_c`` (D = 256; the global view sees every positive, a tile each with probability 0.4, a
    flipped tile what its mirror sees). ``informative=False``: no positive is visible anywhere, so the scores
    are the same generative noise without the labels (a random teacher)."""
    import csv

    from vlpl.store.store import StoreWriter

    syn = _synthetic_module()
    try:
        syn.image_refs()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    spec = syn.SyntheticSpec(rows=256, classes=80, grid=2, flips=True, dim=256, shard_size=256, seed=seed,
                             splits={"train": 0.5, "test": 0.5})
    gen = syn.Generator(spec)
    classes = syn.class_names(spec.classes)
    column = {c: i for i, c in enumerate(classes)}
    rows = list(csv.DictReader(open(syn.COCO256 / "labels.csv")))
    assert sorted(r["image"] for r in rows) == gen.images and len(classes) == 80
    n, c, d = len(rows), spec.classes, spec.dim
    labels = np.zeros((n, c), np.int8)
    for i, r in enumerate(rows):
        labels[i, [column[x] for x in r["labels"].split("|") if x.strip()]] = 1
    rng = np.random.default_rng([seed, 7])
    observed = np.zeros((n, c), np.int8)
    for i in np.flatnonzero(labels.any(axis=1)):
        observed[i, rng.choice(np.flatnonzero(labels[i]))] = 1
    vis = np.ones((n, spec.n_views, c), np.float32)
    vis[:, 1:] = rng.random((n, spec.n_views - 1, c)) < syn.TILE_VISIBLE
    vis = np.concatenate([vis, vis[:, gen.mirror]], axis=1) * labels[:, None, :] * float(informative)
    emb = syn.IMAGE_SHARED * gen.u + syn.SIGNAL * np.einsum("nvc,cd->nvd", vis, gen.text)
    emb = syn._normalize(emb + spec.noise / math.sqrt(d) * rng.standard_normal((n, spec.num_views, d)))
    emb = emb.astype(np.float32)
    data = {"sample_id": [f"coco256-{i:03d}" for i in range(n)], "image": [r["image"] for r in rows],
            "split": [r["split"] for r in rows], "labels": labels, "observed": observed,
            "view_embeddings": emb.astype(np.float16), "scores": (emb @ gen.text.T).astype(np.float16),
            "image_embedding": emb[:, 0].astype(np.float16), "ok": np.ones(n, bool)}
    ident = syn.identity(spec, gen)
    ident["splits"] = {s: data["split"].count(s) for s in sorted(set(data["split"]))}
    ident["model"]["informative"] = informative
    writer = StoreWriter(out)
    try:
        writer.prepare(ident, classes, gen.text)
        writer.write_shard(0, syn._shard_rows(data, syn.score_form(spec)))
        writer.finalize(ident, 1, build_index=False)
    finally:
        writer.close()
    return out


def _damp_new_positives(cfg, store: Path, split: str):
    """(precision against the true labels, count) of the positives the run's own rule (DAMP, its params)
    adds beyond the observed ones on ``split``, from the store's cached scores (unflipped variant)."""
    from vlpl.pseudolabel.rules import apply_rule
    from vlpl.store.store import ScoreStore

    rows = ScoreStore(store).split(split)
    observed = rows.observed.astype(np.int8)
    scores = torch.from_numpy(rows.scores(np.arange(len(rows.rows))))
    pseudo = apply_rule(cfg.pseudo.rule, scores, torch.from_numpy(observed), dynamic=False,
                        **cfg.pseudo.params).numpy()
    new = (pseudo == 1) & (observed != 1)
    return float((rows.labels[new] == 1).mean()), int(new.sum())


@pytest.mark.slow
def test_aevlp_sigrl_beats_its_untrained_start_with_an_informative_teacher(coco256_root, tmp_path):
    """aevlp_sigrl (DAMP + GPR + the sigrl head) with the tiny open_clip student, 8 epochs at lr 1e-3,
    batch 4, on a store whose cached teacher scores follow coco256's true labels; "val" = the training
    images (their full labels). Measured when written (untrained -> best val mAP, store and run seeds
    0 / 1 / 2): 6.83 -> 8.73, 6.44 -> 8.21, 5.84 -> 8.81; asserted (seed 0) with a margin of 1.0 point.

    The teacher is informative: DAMP (the recipe's coco2014 params) adds positives of precision 0.81 on
    this store, 0.0 on the same store with the labels taken out of the scores (measured). What this does
    NOT show: that the better pseudo-labels raise the student's mAP at this scale. The same run on the
    uninformative store measured 6.83 -> 9.76 (seed 0) and 6.44 -> 8.37 (seed 1): with the random 64 px
    tower the gain over the start comes from fitting the observed positives, and DAMP's ~0.5 extra
    positive per image is inside the epoch-to-epoch noise of the val curve. (At batch 17 the same
    recipe barely moved in 6-12 epochs: 6.83 -> 7.13 / 7.83, 6.44 -> 7.73 / 7.95 / 8.19 in 16.)"""
    from vlpl.train.loop import run_train
    from vlpl.train.recipes import load_train_config

    store = _coco256_teacher_store(tmp_path / "store", seed=0)
    out = tmp_path / "aevlp_sigrl"
    cfg = load_train_config([], [f"store={store}", f"out={out}", "method=aevlp_sigrl", "dataset=coco2014",
                                 *TINY_OPEN_CLIP, "epochs=8", "batch_size=4", "optim.lr=1e-3",
                                 "optim.head_lr=1e-3", "early_stop_patience=null", "early_stop_drop=null",
                                 "val_split=train", "hflip=false", "seed=0"])
    assert cfg.pseudo.rule == "damp" and cfg.loss.name == "gpr" and cfg.student.head.name == "sigrl"
    # the control: the teacher's cached scores make DAMP's extra positives mostly right, a random one's not
    precision, count = _damp_new_positives(cfg, store, "train")
    noise_precision, _ = _damp_new_positives(cfg, _coco256_teacher_store(tmp_path / "noise", informative=False),
                                             "train")
    assert count >= 30 and precision >= 0.6 and noise_precision <= 0.3, (precision, count, noise_precision)
    run_train(cfg)
    best = json.loads((out / "summary.json").read_text())["best_val_map"]
    base = _untrained_map(cfg, store, "train")
    assert best > base + 1.0, (best, base)

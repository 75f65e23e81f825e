#!/usr/bin/env python
"""Training throughput: pseudo-labels from CACHED CLIP scores vs CLIP in the training loop.

Two variants of one AEVLP training step (ALGORITHMS.md 7c, 7d, 7g.9), measured side by side in one
process, alternating their order round by round so that drift on a shared machine cancels:

Both variants run THE training step, :func:`vlpl.train.step.train_step` (what ``vlpl train`` runs), with a
different pseudo-label rule input:

* ``cached``  (vlpl): DAMP pseudo-labels from cached scores (``RuleRunner("damp", dynamic=True)`` over a
  score array standing in for the store: each view takes its cached flipped or unflipped variant,
  Decision 4, drawn from the step's seed) + backbone forward under autocast + GPR loss + backward +
  optimizer step.
* ``clip``    (AEVLP's released code): the same step, with the rule's scores computed every step from the
  batch's raw decoded uint8 images: the global view + g x g tiles (``make_views_batch``, flips off), a
  random horizontal flip of each view (p = 1/2), the frozen CLIP image tower on the 1 + g^2 views (no
  grad, autocast bf16 on GPU), cosine with the class text embeddings, then DAMP on those fresh scores.

Both variants use the same backbone, batch size, image size, loss, optimizer and batches of the same
images. Decoding is NOT measured in either variant: the images are decoded once and kept in memory, and
the backbone's input tensors (Resize + flip + normalise, the trainer's DataLoader work) are prepared
once too; each step only copies its batch to the device.

Also reports the FLOP-based expected ratio (torch's FlopCounterMode on one sample each)::

    expected_ratio = (3 F_backbone + V F_clip) / (3 F_backbone),   V = 1 + g^2 views

Example (GPU, the configuration of the roadmap target)::

    python benchmarks/train_throughput.py --backbone resnet50 --image-size 448 --clip ViT-B-16 \\
        --grid 4 --batch-size 16 --steps 20 --warmup 5 --rounds 5
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

log = logging.getLogger("benchmarks.train_throughput")

GPU_TARGET = ("GPU target (DESIGN.md Performance roadmap): ResNet-50@448 + CLIP ViT-B/16 x 17 views (g=4), batch 16, "
              "bf16: cached step >= 5x the CLIP-in-the-loop step; FLOP-expected ratio ~7x. Not measurable on a "
              "CPU-only machine; run on a GPU: python benchmarks/train_throughput.py --backbone resnet50 "
              "--image-size 448 --clip ViT-B-16 --grid 4 --batch-size 16 --steps 20 --warmup 5 --rounds 5")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="resnet50", help="timm model name of the trained classifier")
    p.add_argument("--image-size", type=int, default=448, help="backbone input size")
    p.add_argument("--clip", default="ViT-B-16", help="open_clip model name of the frozen CLIP (vlpl-tiny: bundled)")
    p.add_argument("--grid", type=int, default=4, help="g: the CLIP variant scores 1 + g^2 views per image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the first round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the order of the variants alternates")
    p.add_argument("--num-batches", type=int, default=4, help="distinct batches of images cycled through")
    p.add_argument("--flops-only", action="store_true",
                   help="only count FLOPs and print the expected ratio (no timing, no JSON); cheap on a CPU")
    C.add_common_args(p, "train_throughput-<device>-<date>")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from vlpl.config import OptimConfig, StudentConfig, TeacherConfig
    from vlpl.train import step as S  # S.train_step looked up at call time: the tests count its calls
    from vlpl.train.data import image_transform
    from vlpl.train.flops import count_flops, forward_flops, peak_flops
    from vlpl.train.losses import create_loss
    from vlpl.train.model import ClassContext, create_classifier
    from vlpl.train.optim import create_optimizer
    from vlpl.vlm.backend import create_backend
    from vlpl.vlm.views import ViewSpec, make_views_batch

    if args.grid < 1:
        raise SystemExit("--grid must be >= 1")
    device = C.resolve_device(args.device)
    torch.manual_seed(args.seed)
    B, Ncls, g = args.batch_size, args.classes, args.grid
    V = 1 + g * g
    n_img = B * args.num_batches
    amp = torch.bfloat16 if device.type == "cuda" else None  # vlpl train: mixed_precision auto
    pin = device.type == "cuda"

    # ---- images, decoded once -------------------------------------------------------------------
    pil, source = C.load_images(n_img, args.seed)

    # ---- trainable classifier, loss, optimizer (as vlpl.train.loop) ---------------------------
    model = create_classifier(StudentConfig(kind="timm", name=args.backbone, pretrained=False,
                                             image_size=args.image_size),
                              ClassContext.from_names(C.class_names(Ncls))).to(device)
    tf = image_transform(args.image_size, model.mean, model.std, train=False, hflip=False)
    gen = torch.Generator().manual_seed(args.seed)
    flip_batches = [torch.rand(B, generator=gen) < 0.5 for _ in range(args.num_batches)]  # recorded flips
    x_batches = [torch.stack([tf(im).flip(-1) if f else tf(im) for im, f in zip(pil[b * B:(b + 1) * B], flip_batches[b])])
                 for b in range(args.num_batches)]
    raw_all = [C.pil_to_uint8(im) for im in pil]
    if pin:
        x_batches = [x.pin_memory() for x in x_batches]
        raw_all = [r.pin_memory() for r in raw_all]
    idx_batches = [torch.arange(b * B, (b + 1) * B) for b in range(args.num_batches)]
    observed = torch.zeros(n_img, Ncls, dtype=torch.int8)
    observed[torch.arange(n_img), torch.randint(0, Ncls, (n_img,), generator=gen)] = 1  # one positive each
    cached = (0.2 + 0.05 * torch.randn(n_img, 2, V, Ncls, generator=gen)).to(torch.float16)  # the score store
    loss_fn = create_loss("gpr", observed)
    loss_fn.set_epoch(1, 8)
    loss_fn.to(device)
    opt = create_optimizer(OptimConfig(name="adam", lr=1e-5, head_lr=1e-4), model)  # vlpl train's defaults
    model.train()
    obs_dev = observed.to(device)

    # ---- frozen CLIP (what AEVLP runs every step) --------------------------------------------
    pretrained = None if str(args.clip_pretrained).lower() in ("none", "") else args.clip_pretrained
    backend = create_backend(TeacherConfig(name=args.clip, pretrained=pretrained, device=str(device)), device)
    text = backend.encode_text(C.class_names(Ncls), "a photo of a {}.").to(device)  # once, outside the steps
    spec = ViewSpec(g, False, backend.preprocess.image_size, "squash", backend.preprocess.interpolation)
    mean, std = backend.normalization()

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)

    state = S.StepState(optimizer=opt, device=device, seed=args.seed, autocast=autocast)
    rule_cached = S.RuleRunner("damp", {}, True, lambda pos: cached[torch.from_numpy(pos)], observed)

    @torch.no_grad()
    def clip_views(pos: torch.Tensor) -> torch.Tensor:
        imgs = [raw_all[int(p)].to(device, non_blocking=True) for p in pos]
        views = make_views_batch(imgs, spec, mean, std)  # (B*V, 3, h, w), unflipped
        flip = torch.rand(views.shape[0], device=device) < 0.5  # AEVLP: each view its own flip
        return torch.where(flip[:, None, None, None], views.flip(-1), views)

    @torch.no_grad()
    def clip_scores(pos: Any) -> torch.Tensor:
        p = torch.as_tensor(pos)
        feats = backend.encode_image(clip_views(p))  # unit norm, autocast bf16 on GPU
        return (feats @ text.T).view(len(p), 1, V, Ncls)  # fresh scores: one variant

    rule_clip = S.RuleRunner("damp", {}, False, clip_scores, obs_dev)
    counter = {"step": 0}

    def run_step(b: int, rule: Any) -> torch.Tensor:
        """One call of vlpl's train_step on batch b; the loss stays on the device (no per-step sync)."""
        batch = S.TrainBatch(images=x_batches[b].to(device, non_blocking=True), index=idx_batches[b],
                             flip=flip_batches[b], epoch=1, step=counter["step"])
        counter["step"] += 1
        return S.train_step(batch, model, loss_fn, rule, state).terms["loss"]

    def step_cached(b: int) -> torch.Tensor:
        return run_step(b, rule_cached)

    def step_clip(b: int) -> torch.Tensor:
        return run_step(b, rule_clip)

    variants: Dict[str, Callable[[int], torch.Tensor]] = {"cached": step_cached, "clip": step_clip}

    # ---- FLOPs (one sample each) ---------------------------------------------------------------
    f_bb = forward_flops(model, torch.zeros(1, 3, args.image_size, args.image_size, device=device))
    f_bb_train = count_flops(
        lambda: model(torch.zeros(2, 3, args.image_size, args.image_size, device=device)).sum().backward()) / 2
    opt.zero_grad(set_to_none=True)
    h, w = backend.preprocess.image_size
    f_clip = forward_flops(backend.model, torch.zeros(1, 3, h, w, device=device), backend.model.encode_image)
    expected_ratio = (3 * f_bb + V * f_clip) / (3 * f_bb)
    if args.flops_only:
        return {"flops_only": True, "args": vars(args), "expected_ratio": expected_ratio,
                "flops": {"backbone_forward_per_image": f_bb, "backbone_train_flops_counted": f_bb_train,
                          "clip_forward_per_view": f_clip, "views_per_image": V, "expected_ratio": expected_ratio}}

    # ---- warmup, then alternating rounds -------------------------------------------------------
    log.info("warmup: %d step(s) per variant", args.warmup)
    for s in range(args.warmup):
        for fn in variants.values():
            fn(s % args.num_batches)
    per_round: Dict[str, List[float]] = {k: [] for k in variants}
    peak_mem: Dict[str, Optional[float]] = {k: None for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with C.Timer(device) as t:
                for s in range(args.steps):
                    variants[name](s % args.num_batches)
            ips = args.steps * B / t.seconds
            per_round[name].append(ips)
            if device.type == "cuda":
                peak_mem[name] = max(peak_mem[name] or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
            log.info("round %d/%d %-6s %8.2f images/s", r + 1, args.rounds, name, ips)

    # view building alone (part of the clip step): AEVLP makes its views in DataLoader workers, where they
    # can overlap with the GPU; clip step time minus this gives the other bound of the ratio
    view_s: List[float] = []
    for _ in range(args.rounds):
        with C.Timer(device) as t:
            for s in range(args.steps):
                clip_views(idx_batches[s % args.num_batches])
        view_s.append(t.seconds / args.steps)
    views_ms = 1e3 * C.median(view_s)

    med = {k: C.median(v) for k, v in per_round.items()}
    ratio = med["cached"] / med["clip"]
    clip_ms = 1e3 * B / med["clip"]
    ratio_views_hidden = (clip_ms - views_ms) / (1e3 * B / med["cached"]) if clip_ms > views_ms else None
    peak = peak_flops(device)
    flops_per_image = {"cached": 3 * f_bb, "clip": 3 * f_bb + V * f_clip}
    variants_out: Dict[str, Any] = {}
    for k in variants:
        tf_s = flops_per_image[k] * med[k]
        variants_out[k] = {
            "images_per_s_median": med[k],
            "images_per_s_rounds": per_round[k],
            "ms_per_step_median": 1e3 * B / med[k],
            "model_flops_per_image": flops_per_image[k],
            "achieved_tflops_per_s": tf_s / 1e12,
            "mfu": tf_s / peak if peak else None,
            "peak_memory_gib": peak_mem[k],
        }
    date = C.now_date()
    notes = [
        "Decoding is not measured in either variant: images are decoded once and kept in memory; the backbone's "
        "input tensors (Resize + RandomHorizontalFlip + normalise) are also prepared once. Each step copies its "
        "batch to the device.",
        f"Images: {source}.",
        "cached: DAMP from a random float16 (N, 2, 1+g^2, C) score array standing in for the score store "
        "(speed only), one cached flip variant drawn per view per step; the rule runs on CPU as in vlpl.train.loop.",
        f"clip: per step {V} views per image (global + {g}x{g} tiles, each flipped with p=1/2, as AEVLP) from the "
        "raw uint8 images with vlpl's batched tensor ops on the device (AEVLP builds them with PIL in DataLoader "
        "workers, which overlaps with the GPU), frozen CLIP image tower under no_grad (bf16 autocast on GPU), "
        "cosine with the text embeddings, DAMP on the device.",
        "The class text embeddings are computed once, outside the steps (AEVLP's frozen prompt learner may run the "
        "text tower and its relation GCN each step; not counted here, which favours the clip variant).",
        "Both variants call vlpl.train.step.train_step (the function vlpl train runs) and share one model and "
        "optimizer; GPR loss (COCO defaults, epoch 1 of 8); Adam with lr 1e-5 (backbone) / 1e-4 (head) from "
        "vlpl.train.optim.create_optimizer; no per-step device sync (the trainer reads the loss every log_every "
        "steps), the timer syncs at the ends of each round.",
        "Weights are random (backbone and CLIP): speed does not depend on them.",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions only; attention counted on SDPA's math path, CLIP counted off nn.MultiheadAttention's fused no-grad fast path, which the counter misses), one sample; "
        "expected_ratio = (3 F_backbone + V F_clip) / (3 F_backbone). backbone_train_flops_counted is the "
        "counted forward+backward per image, a check of the 3x rule.",
        "images/s: median over rounds of (steps x batch) / wall time of the round's steps; ratio = median(cached) "
        "/ median(clip); ratio_per_round pairs the two variants of each round.",
        "clip_views_ms_per_step: view building alone (H2D of the raw images, crops, resizes, flips, normalise), "
        "timed separately after the rounds (median over rounds); ratio_views_hidden = (clip step - views) / cached "
        "step, the ratio if the views were made off the critical path (AEVLP's DataLoader workers).",
    ]
    if device.type == "cpu":
        notes.append("CPU result: a small configuration so that it finishes in minutes; it does not measure the GPU "
                     "target. " + GPU_TARGET)
    else:
        notes.append(GPU_TARGET)
    result = {
        "benchmark": "train_throughput",
        "date": date,
        "timestamp_utc": C.now_iso(),
        "environment": C.environment(device),
        "args": vars(args),
        "config": {"views_per_image": V, "clip_view_size": [h, w], "clip_pretrained": pretrained,
                   "autocast": str(amp) if amp else "none (fp32)", "loss": "gpr", "rule": "damp",
                   "num_classes": Ncls, "images_source": source},
        "variants": variants_out,
        "ratio": ratio,
        "ratio_per_round": [a / b for a, b in zip(per_round["cached"], per_round["clip"])],
        "clip_views_ms_per_step": views_ms,
        "ratio_views_hidden": ratio_views_hidden,
        "flops": {"backbone_forward_per_image": f_bb, "backbone_train_flops_counted": f_bb_train,
                  "clip_forward_per_view": f_clip, "views_per_image": V, "expected_ratio": expected_ratio},
        "expected_ratio": expected_ratio,
        "peak_flops_per_s": peak,
        "notes": notes,
    }
    out = Path(args.out) if args.out else C.default_out("train_throughput", device, date)
    result["out"] = str(C.write_json(out, result))
    return result


def report(res: Dict[str, Any]) -> str:
    if res.get("flops_only"):
        f, a = res["flops"], res["args"]
        return (f"{a['backbone']}@{a['image_size']}: {f['backbone_forward_per_image'] / 1e9:.2f} GFLOPs forward, "
                f"{f['backbone_train_flops_counted'] / 1e9:.2f} GFLOPs forward+backward (counted); {a['clip']}: "
                f"{f['clip_forward_per_view'] / 1e9:.2f} GFLOPs per view x {f['views_per_image']} views\n"
                f"FLOP-expected ratio (3 F_backbone + V F_clip) / (3 F_backbone): {res['expected_ratio']:.2f}x")
    rows = C.variant_rows(res["variants"], "ms_per_step_median", "mfu")
    a = res["args"]
    head = (f"train throughput on {res['environment']['device']} ({res['environment']['device_type']}): "
            f"{a['backbone']}@{a['image_size']} + {a['clip']} x {res['config']['views_per_image']} views, "
            f"batch {a['batch_size']}, {a['steps']} steps x {a['rounds']} rounds")
    tab = C.table(rows, ["variant", "img/s (median)", "img/s per round", "ms/step", "TFLOP/s", "MFU"])
    hid = res["ratio_views_hidden"]
    tail = (f"measured ratio cached/clip: {res['ratio']:.2f}x   FLOP-expected ratio: {res['expected_ratio']:.2f}x\n"
            f"views alone {res['clip_views_ms_per_step']:.1f} ms/step; ratio with views off the critical path: "
            f"{'-' if hid is None else f'{hid:.2f}x'}\n"
            f"(decoding not measured in either variant; images decoded once and kept in memory)\n"
            f"-> {res['out']}")
    return "\n".join([head, tab, tail])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return C.run_main(run, parse_args, report, argv)


if __name__ == "__main__":
    main()

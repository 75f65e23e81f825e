#!/usr/bin/env python
"""Pseudolabel scoring throughput: vlpl's batched ``Scorer`` vs a naive per-crop PIL loop.

Both score the same decoded images with the same frozen CLIP and the same class text embeddings, into
raw per-view cosines of the global view + g x g tiles, each also horizontally flipped
(2 (1 + g^2) views: 34 for g = 4), side by side in one process, alternating their order each round:

* ``scorer`` (vlpl): ``vlpl.pseudolabel.stage.Scorer`` on batches of ``--batch-size`` images: the uint8
  images go to the device, all views are made there with batched tensor ops (crop, antialiased
  bicubic resize, flip, normalise), one image-tower pass per batch (autocast bf16 on GPU).
* ``naive``: per image, a PIL ``crop`` of each tile, open_clip's own preprocess transform
  (``open_clip.image_transform``, eval mode) on each crop, with the flipped variant made by a PIL mirror of
  the resized view (before ToTensor / Normalize, as AEVLP's transform order), then one image-tower forward
  on that image's views.

Decoding is NOT measured: the images are decoded once and kept in memory (as PIL images for the naive loop,
as uint8 tensors for the Scorer). The two paths must agree: the max abs difference of their cosines is
reported (the resizes differ slightly: PIL vs ``torch.nn.functional.interpolate``; the Scorer stores float16).

Example (GPU, the roadmap's pseudolabel target model)::

    python benchmarks/pseudolabel_throughput.py --clip ViT-B-16 --num-images 256 --batch-size 64 --rounds 3
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

log = logging.getLogger("benchmarks.pseudolabel_throughput")

GPU_TARGET = ("GPU target (DESIGN.md Performance roadmap): ViT-B/16, g=4 + flips (34 views), pseudolabel scoring "
              ">= 50% of the FLOP-limited rate (fraction_of_flop_limit here, bf16 dense peak); single-view ViT-B/32 "
              ">= 10k images/s (--clip ViT-B-32 --grid 0 --no-flips). Run on a GPU: python "
              "benchmarks/pseudolabel_throughput.py --clip ViT-B-16 --num-images 256 --batch-size 64 --rounds 3")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clip", default="vlpl-tiny", help="open_clip model name (vlpl-tiny: bundled tiny config)")
    p.add_argument("--grid", type=int, default=4, help="g x g tiles besides the global view (0: global only)")
    p.add_argument("--no-flips", dest="flips", action="store_false", help="score unflipped views only")
    p.add_argument("--resize-mode", default="shortest", choices=("shortest", "squash"),
                   help="view resize, the same in both paths (shortest = open_clip's preprocess default)")
    p.add_argument("--num-images", type=int, default=64, help="images scored per variant per round")
    p.add_argument("--batch-size", type=int, default=64, help="images per Scorer call")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the order of the variants alternates")
    C.add_common_args(p, "pseudolabel_throughput-<clip>-bs<batch>-<device>-<date>")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import open_clip
    from PIL import Image
    from torchvision.transforms import Compose

    from vlpl.config import TeacherConfig
    from vlpl.pseudolabel.stage import Scorer
    from vlpl.train.flops import forward_flops, peak_flops
    from vlpl.vlm.backend import create_backend
    from vlpl.vlm.views import ViewSpec, tile_boxes

    device = C.resolve_device(args.device)
    torch.manual_seed(args.seed)
    N, g = args.num_images, args.grid

    pil, source = C.load_images(N, args.seed)
    raw = [C.pil_to_uint8(im) for im in pil]
    if device.type == "cuda":
        raw = [r.pin_memory() for r in raw]

    pretrained = None if str(args.clip_pretrained).lower() in ("none", "") else args.clip_pretrained
    backend = create_backend(TeacherConfig(name=args.clip, pretrained=pretrained, device=str(device)), device)
    text = backend.encode_text(C.class_names(args.classes), "a photo of a {}.").to(device)
    pp = backend.preprocess
    mean, std = backend.normalization()
    spec = ViewSpec(g, args.flips, pp.image_size, args.resize_mode, pp.interpolation)
    scorer = Scorer(backend, spec, text)
    # open_clip's own eval preprocess (Resize + CenterCrop / squash, ToTensor, Normalize), per PIL crop
    preprocess = open_clip.image_transform(pp.image_size, is_train=False, mean=mean, std=std,
                                           resize_mode=args.resize_mode, interpolation=pp.interpolation)

    # the flipped variant of a view is the mirror of that view (vlpl.vlm.views; AEVLP flips after its Resize):
    # geometric part of the preprocess (Resize, CenterCrop) on the crop, then PIL mirror, then the rest
    tfs = list(preprocess.transforms)
    cut = next(i for i, t in enumerate(tfs) if type(t).__name__ in ("MaybeConvertMode", "MaybeToTensor", "ToTensor"))
    geometric, to_tensor = Compose(tfs[:cut]), Compose(tfs[cut:])

    def run_scorer(images: List[torch.Tensor]) -> np.ndarray:
        out = [scorer(images[k:k + args.batch_size])[0] for k in range(0, len(images), args.batch_size)]
        return np.concatenate(out)

    @torch.no_grad()
    def run_naive(images: List[Any]) -> np.ndarray:
        out = []
        for im in images:
            w, h = im.size
            crops = [im] + ([im.crop((le, t, r, b)) for t, le, b, r in tile_boxes(h, w, g)] if g else [])
            views = [geometric(c) for c in crops]
            if args.flips:
                views += [v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for v in views]
            x = torch.stack([to_tensor(v) for v in views]).to(device)
            feats = backend.encode_image(x)
            out.append((feats @ text.T).float().cpu().numpy())
        return np.stack(out)

    variants = {"scorer": lambda: run_scorer(raw), "naive": lambda: run_naive(pil)}

    # FLOPs of one view, for the FLOP-limited rate on a GPU
    h, w = pp.image_size
    f_view = forward_flops(backend.model, torch.zeros(1, 3, h, w, device=device), backend.model.encode_image)
    V = spec.num_views

    log.info("warmup")
    run_scorer(raw[:min(N, args.batch_size)])
    run_naive(pil[:min(N, 2)])
    per_round: Dict[str, List[float]] = {k: [] for k in variants}
    outputs: Dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            with C.Timer(device) as t:
                outputs[name] = variants[name]()
            per_round[name].append(N / t.seconds)
            log.info("round %d/%d %-6s %9.2f images/s", r + 1, args.rounds, name, N / t.seconds)

    a, b = outputs["scorer"].astype(np.float32), outputs["naive"].astype(np.float32)
    diff = np.abs(a - b)
    agreement = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "score_std": float(b.std()),
        "max_abs_diff_per_view": [float(x) for x in diff.max(axis=(0, 2))],
        "tolerance": 0.02,
        "agree": bool(diff.max() < 0.02),
        "shape": list(a.shape),
    }
    med = {k: C.median(v) for k, v in per_round.items()}
    peak = peak_flops(device)
    limit = peak / (V * f_view) if peak else None
    variants_out = {k: {"images_per_s_median": med[k], "images_per_s_rounds": per_round[k],
                        "views_per_s_median": med[k] * V,
                        "achieved_tflops_per_s": med[k] * V * f_view / 1e12,
                        "fraction_of_flop_limit": med[k] / limit if limit else None} for k in variants}
    date = C.now_date()
    notes = [
        "Decoding is not measured in either path: images are decoded once and kept in memory (PIL images for the "
        "naive loop, uint8 tensors for the Scorer); every other step (crops, resizes, flips, normalisation, host to "
        "device copies, the image tower, the cosines) is.",
        f"Images: {source}; the same {N} images per variant per round.",
        "scorer: vlpl.pseudolabel.stage.Scorer (views made on the device with batched tensor ops, "
        f"{args.batch_size} images = {args.batch_size * V} views per image-tower pass); returns float16 scores as "
        "stored.",
        f"naive: per image, PIL crop of each tile + open_clip.image_transform (eval, resize_mode={args.resize_mode}) "
        "per crop, the flipped variant a PIL mirror of the resized view (flip after resize, as AEVLP's transform and "
        "vlpl's views: mirroring before a centre crop would shift odd-margin views by a pixel), ToTensor + Normalize "
        f"per view, one image-tower forward of the image's {V} views; float32.",
        "agreement: max abs difference of the two paths' cosines over all images, views and classes; they differ "
        "by PIL vs torch interpolation and the float16 store format. Random weights give cosines of small spread "
        "(score_std), so also compare max_abs_diff to score_std.",
        "FLOPs: FlopCounterMode (matmuls only; attention counted on SDPA's math path, off nn.MultiheadAttention's fused no-grad fast path, which the counter misses) on one view; flop_limited_images_per_s = peak / (V x F_view) with "
        "vlpl.train.flops.PEAK_FLOPS (dense bf16), GPU only.",
        "Weights are random (speed does not depend on them).",
    ]
    if device.type == "cpu":
        notes.append("CPU result; it does not measure the GPU target. " + GPU_TARGET)
    else:
        notes.append(GPU_TARGET)
    result = {
        "benchmark": "pseudolabel_throughput",
        "date": date,
        "timestamp_utc": C.now_iso(),
        "environment": C.environment(device),
        "args": vars(args),
        "config": {"views_per_image": V, "view_size": [h, w], "clip_pretrained": pretrained,
                   "autocast": str(backend.amp_dtype) if backend.amp_dtype else "none (fp32)",
                   "num_classes": args.classes, "images_source": source, "view_spec": spec.to_dict()},
        "variants": variants_out,
        "ratio": med["scorer"] / med["naive"],
        "ratio_per_round": [x / y for x, y in zip(per_round["scorer"], per_round["naive"])],
        "flops": {"clip_forward_per_view": f_view, "views_per_image": V,
                  "flop_limited_images_per_s": limit},
        "peak_flops_per_s": peak,
        "agreement": agreement,
        "notes": notes,
    }
    result["config"]["view_spec"].pop("names", None)
    out = Path(args.out) if args.out else C.default_out(f"pseudolabel_throughput-{C.slug(args.clip)}-bs{args.batch_size}", device, date)
    result["out"] = str(C.write_json(out, result))
    return result


def report(res: Dict[str, Any]) -> str:
    rows = C.variant_rows(res["variants"], "views_per_s_median", "fraction_of_flop_limit")
    a, ag = res["args"], res["agreement"]
    head = (f"pseudolabel throughput on {res['environment']['device']} ({res['environment']['device_type']}): "
            f"{a['clip']}, g={a['grid']}{' + flips' if a['flips'] else ''} ({res['config']['views_per_image']} views), "
            f"{a['num_images']} images x {a['rounds']} rounds")
    tab = C.table(rows, ["variant", "img/s (median)", "img/s per round", "views/s", "TFLOP/s", "of FLOP limit"])
    tail = (f"ratio scorer/naive: {res['ratio']:.2f}x   agreement: max |diff| {ag['max_abs_diff']:.4f} "
            f"(mean {ag['mean_abs_diff']:.5f}, score std {ag['score_std']:.4f}) -> "
            f"{'OK' if ag['agree'] else 'OVER'} tolerance {ag['tolerance']}\n"
            f"(decoding not measured in either path; images decoded once and kept in memory)\n-> {res['out']}")
    return "\n".join([head, tab, tail])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return C.run_main(run, parse_args, report, argv)


if __name__ == "__main__":
    main()

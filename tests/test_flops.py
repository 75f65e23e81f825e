"""FLOP counting for throughput / MFU: no side effects on the model, no blind spot on ViT attention."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlpl.config import StudentConfig
from vlpl.train.flops import forward_flops, peak_flops
from vlpl.train.model import create_classifier


def test_counting_leaves_batchnorm_statistics_and_mode_alone():
    model = create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False, image_size=32), 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a 32x32 conv net: its convolutions alone are well over a MFLOP
    assert forward_flops(model, torch.zeros(1, 3, 32, 32)) > 1e6
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm running stats were updated"


def test_vit_attention_is_counted_on_the_fast_path_too():
    model = create_classifier(StudentConfig(kind="open_clip", name="vlpl-tiny", pretrained=False, image_size=64,
                                             normalization="model"), 5)
    x = torch.zeros(1, 3, 64, 64)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:  # the fused inference path
        model(x)
    naive = fc.get_total_flops()
    counted = forward_flops(model, x)
    assert counted > naive > 0  # attention projections and products were missing from the naive count


def test_peak_flops_is_none_off_gpu():
    assert peak_flops(torch.device("cpu")) is None

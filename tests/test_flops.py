"""FLOP counting for throughput / MFU: exact counts computed by hand, no side effects on the model, no blind
spot on ViT attention.

FlopCounterMode counts a matmul (M x K) @ (K x N) as 2 M K N and a convolution as 2 x (output elements) x
(input channels x kernel area); biases, norms and activations are not counted.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlpl.config import StudentConfig
from vlpl.train.flops import forward_flops, peak_flops
from vlpl.train.model import create_classifier


def test_conv_linear_stack_exact_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 5))
    conv = 2 * (4 * 8 * 8) * (3 * 3 * 3)  # 13,824
    linear = 2 * (4 * 8 * 8) * 5  # 2,560
    assert forward_flops(model, torch.zeros(1, 3, 8, 8)) == conv + linear == 16_384
    assert forward_flops(model, torch.zeros(3, 3, 8, 8)) == 3 * 16_384  # linear in the batch


def test_counting_leaves_batchnorm_statistics_and_mode_alone():
    model = create_classifier(StudentConfig(kind="timm", name="test_resnet", pretrained=False, image_size=32), 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.zeros(1, 3, 32, 32)
    total = forward_flops(model, x)
    # the classifier = its backbone + the linear head's 2 F C (F = 96 features, C = 5 classes)
    assert model.num_features == 96
    assert total == forward_flops(model.backbone, x) + 2 * 96 * 5
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm running stats were updated"


# vlpl-tiny's image tower (vlpl/vlm/model_configs/vlpl-tiny.json) at 64 px: patch 16 -> 16 patches + CLS
T, W, HEADS, LAYERS, D = 17, 64, 2, 2, 32
PATCH_EMBED = 2 * (W * 4 * 4) * (3 * 16 * 16)  # conv1: 1,572,864
IN_PROJ = 2 * T * W * 3 * W  # 417,792
ATTN = 2 * (2 * T * T * (W // HEADS) * HEADS)  # QK^T and AV: 73,984
OUT_PROJ = 2 * T * W * W  # 139,264
MLP = 2 * (2 * T * W * 4 * W)  # 1,114,112
PROJ = 2 * W * D  # pooled @ proj: 4,096
LINEAR_HEAD = 2 * D * 5


def test_vit_attention_is_counted_exactly_and_on_the_fast_path_too():
    model = create_classifier(StudentConfig(kind="open_clip", name="vlpl-tiny", pretrained=False, image_size=64,
                                            normalization="model"), 5)
    x = torch.zeros(1, 3, 64, 64)
    counted = forward_flops(model, x)
    per_layer = IN_PROJ + ATTN + OUT_PROJ + MLP
    assert counted == PATCH_EMBED + LAYERS * per_layer + PROJ + LINEAR_HEAD == 5_067_584
    # the backbone alone also projects the 16 patch tokens (the linear head does not ask for them)
    assert forward_flops(model.backbone, x) == counted - LINEAR_HEAD + 2 * 16 * W * D
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:  # nn.MultiheadAttention's fused inference path
        model(x)
    # what the fused path hides from a naive count: exactly the attention blocks
    assert fc.get_total_flops() == counted - LAYERS * (IN_PROJ + ATTN + OUT_PROJ)


def test_peak_flops_is_none_off_gpu():
    assert peak_flops(torch.device("cpu")) is None

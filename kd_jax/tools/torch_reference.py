"""Dev check: the kd_jax model zoo against PyTorch reference definitions.

For every registered model this builds the reference PyTorch module (written out below, following
DAFL / CMI / Fast-Datafree / RepDistiller / torchvision / timm / VainF's DeepLabV3Plus-Pytorch;
the SegMNIST DeepLabV3 variants have none and are skipped), then checks
  1. the trainable parameter count equals the Flax `params` count,
  2. every state_dict entry maps, by the naming rule of `kd_jax.models` (implemented once, torch-
     free, in `kd_jax.tools.convert_torch`), onto a Flax leaf of the converted shape and no leaf
     is left over,
  3. (with --parity) logits and pre_logits agree after copying the weights over, in eval mode
     with non-trivial BatchNorm statistics.

Needs torch (CPU wheel), which kd_jax itself never imports:

    pip install torch==2.13.0
    python -m kd_jax.tools.torch_reference [--parity] [--models lenet5,vgg11]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Reference PyTorch definitions
# ----------------------------------------------------------------------------------------------


class LeNet5(tnn.Module):  # DAFL lenet.py
    def __init__(self, w=(6, 16, 120, 84), num_classes=10):
        super().__init__()
        self.conv1 = tnn.Conv2d(1, w[0], 5)
        self.conv2 = tnn.Conv2d(w[0], w[1], 5)
        self.conv3 = tnn.Conv2d(w[1], w[2], 5)
        self.fc1 = tnn.Linear(w[2], w[3])
        self.fc2 = tnn.Linear(w[3], num_classes)
        self.c3 = w[2]

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.conv3(x)).view(-1, self.c3)
        f = F.relu(self.fc1(x))
        return self.fc2(f), f


class CifarBasicBlock(tnn.Module):  # DAFL / CMI resnet.py
    def __init__(self, inp, planes, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.shortcut = tnn.Sequential()
        if stride != 1 or inp != planes:
            self.shortcut = tnn.Sequential(
                tnn.Conv2d(inp, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(tnn.Module):
    def __init__(self, nb, num_classes=10, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(widths[0])
        inp = widths[0]
        for i, (p, n, s) in enumerate(zip(widths, nb, (1, 2, 2, 2)), 1):
            blocks = []
            for j in range(n):
                blocks.append(CifarBasicBlock(inp, p, s if j == 0 else 1))
                inp = p
            setattr(self, f"layer{i}", tnn.Sequential(*blocks))
        self.linear = tnn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        f = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(f), f


class WRNBlock(tnn.Module):  # ZSKT / CMI wresnet.py
    def __init__(self, inp, outp, stride):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(inp)
        self.conv1 = tnn.Conv2d(inp, outp, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(outp)
        self.conv2 = tnn.Conv2d(outp, outp, 3, 1, 1, bias=False)
        self.equal = inp == outp
        self.convShortcut = None if self.equal else tnn.Conv2d(inp, outp, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class NetworkBlock(tnn.Module):
    def __init__(self, n, inp, outp, stride):
        super().__init__()
        self.layer = tnn.Sequential(
            *[WRNBlock(inp if i == 0 else outp, outp, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(tnn.Module):
    def __init__(self, depth, k, num_classes=10, base=16):
        super().__init__()
        n = (depth - 4) // 6
        ch = [base, base * k, 2 * base * k, 4 * base * k]
        self.conv1 = tnn.Conv2d(3, base, 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = tnn.BatchNorm2d(ch[3])
        self.fc = tnn.Linear(ch[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        f = F.adaptive_avg_pool2d(F.relu(self.bn1(x)), 1).flatten(1)
        return self.fc(f), f


VGG_CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
}


class VGG(tnn.Module):  # RepDistiller vgg.py, batch_norm=True
    def __init__(self, cfg, num_classes=10):
        super().__init__()
        inp = 3
        for b, widths in enumerate(cfg):
            layers = []
            for w in widths:
                layers += [tnn.Conv2d(inp, w, 3, padding=1), tnn.BatchNorm2d(w), tnn.ReLU()]
                inp = w
            setattr(self, f"block{b}", tnn.Sequential(*layers[:-1]))
        self.classifier = tnn.Linear(inp, num_classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if h == 64:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        f = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(f), f


class TVBasicBlock(tnn.Module):  # torchvision resnet.py
    expansion = 1

    def __init__(self, inp, planes, stride=1, dilation=1):
        super().__init__()
        if dilation > 1:  # as torchvision's BasicBlock
            raise NotImplementedError("dilation > 1 not supported in BasicBlock")
        self.conv1 = tnn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inp != planes:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(inp, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inp, planes, stride=1, dilation=1):
        super().__init__()
        outp = planes * 4
        self.conv1 = tnn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, outp, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(outp)
        self.downsample = None
        if stride != 1 or inp != outp:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(inp, outp, 1, stride, bias=False), tnn.BatchNorm2d(outp)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVResNet(tnn.Module):
    def __init__(
        self,
        block,
        layers,
        num_classes=1000,
        widths=(64, 128, 256, 512),
        replace_stride_with_dilation=(False, False, False),
    ):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(widths[0])
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        inp, dilation = widths[0], 1
        dilate = (False, *replace_stride_with_dilation)
        for i, (p, n, s, d) in enumerate(zip(widths, layers, (1, 2, 2, 2), dilate), 1):
            previous = dilation  # _make_layer: the stage's first block keeps the old dilation
            if d:
                dilation, s = dilation * s, 1
            blocks = []
            for j in range(n):
                blocks.append(block(inp, p, s if j == 0 else 1, previous if j == 0 else dilation))
                inp = p * block.expansion
            setattr(self, f"layer{i}", tnn.Sequential(*blocks))
        self.fc = tnn.Linear(widths[-1] * block.expansion, num_classes)

    def features(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        f = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.fc(f), f


def _cna(inp, outp, k, stride=1, groups=1):
    return tnn.Sequential(
        tnn.Conv2d(inp, outp, k, stride, (k - 1) // 2, groups=groups, bias=False),
        tnn.BatchNorm2d(outp),
        tnn.ReLU6(),
    )


class TVInvertedResidual(tnn.Module):  # torchvision mobilenetv2.py
    def __init__(self, inp, outp, stride, t):
        super().__init__()
        hidden = int(round(inp * t))
        self.use_res = stride == 1 and inp == outp
        layers = [] if t == 1 else [_cna(inp, hidden, 1)]
        layers += [
            _cna(hidden, hidden, 3, stride, hidden),
            tnn.Conv2d(hidden, outp, 1, bias=False),
            tnn.BatchNorm2d(outp),
        ]
        self.conv = tnn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


MBV2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class TVMobileNetV2(tnn.Module):
    def __init__(self, num_classes=1000, setting=None, last_channel=1280):
        super().__init__()
        setting = setting or MBV2_SETTING
        feats = [_cna(3, 32, 3, 2)]
        inp = 32
        for t, c, n, s in setting:
            for i in range(n):
                feats.append(TVInvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        feats.append(_cna(inp, last_channel, 1))
        self.features = tnn.Sequential(*feats)
        self.classifier = tnn.Sequential(tnn.Dropout(0.2), tnn.Linear(last_channel, num_classes))

    def forward(self, x):
        f = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(f), f


def _make_divisible(v, divisor=8):  # torchvision / VainF `_make_divisible`
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _cbr(inp, outp, k, dilation=1):
    return tnn.Sequential(
        tnn.Conv2d(inp, outp, k, padding=dilation if k == 3 else 0, dilation=dilation, bias=False),
        tnn.BatchNorm2d(outp),
        tnn.ReLU(),
    )


class ASPPPooling(tnn.Sequential):  # torchvision segmentation/deeplabv3.py (VainF: the same)
    def __init__(self, inp, ch):
        super().__init__(
            tnn.AdaptiveAvgPool2d(1),
            tnn.Conv2d(inp, ch, 1, bias=False),
            tnn.BatchNorm2d(ch),
            tnn.ReLU(),
        )

    def forward(self, x):
        y = super().forward(x)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(tnn.Module):
    """`convs` = [1x1, 3x3 at each rate, pooling], `project` = 1x1 + BN + ReLU + Dropout; the
    references fix the width at 256 (`ch` reduces it for fixtures)."""

    def __init__(self, inp, rates, ch=256, dropout=0.5):
        super().__init__()
        convs = [_cbr(inp, ch, 1)] + [_cbr(inp, ch, 3, r) for r in rates] + [ASPPPooling(inp, ch)]
        self.convs = tnn.ModuleList(convs)
        self.project = tnn.Sequential(
            tnn.Conv2d(len(convs) * ch, ch, 1, bias=False),
            tnn.BatchNorm2d(ch),
            tnn.ReLU(),
            tnn.Dropout(dropout),
        )

    def forward(self, x):
        return self.project(torch.cat([c(x) for c in self.convs], 1))


def deeplab_head(inp, num_classes, rates, ch=256, dropout=0.5):
    """torchvision's `DeepLabHead` (VainF's `DeepLabHead.classifier`): ASPP, 3x3 conv, BN, ReLU,
    1x1 conv with bias to the classes."""
    return tnn.Sequential(
        ASPP(inp, rates, ch, dropout),
        tnn.Conv2d(ch, ch, 3, padding=1, bias=False),
        tnn.BatchNorm2d(ch),
        tnn.ReLU(),
        tnn.Conv2d(ch, num_classes, 1),
    )


def _segment(head, features, size):
    """(logits upsampled to `size` (NCHW, bilinear, align_corners=False), the head's 256-ch map
    averaged over space = kd_jax's pre_logits)."""
    h = head[3](head[2](head[1](head[0](features))))
    logits = F.interpolate(head[4](h), size=size, mode="bilinear", align_corners=False)
    return logits, h.mean((2, 3))


def aspp_rates(output_stride):
    return (12, 24, 36) if output_stride == 8 else (6, 12, 18)


class TVDeepLabV3(tnn.Module):
    """torchvision `deeplabv3_resnet50(aux_loss=False)`: `backbone` = the ResNet as
    IntermediateLayerGetter(return_layers={'layer4': 'out'}) keeps it (no avgpool / fc), layer3/4
    dilated (output stride 8; 16: layer4 only), `classifier` = DeepLabHead(2048)."""

    def __init__(
        self,
        num_classes=21,
        layers=(3, 4, 6, 3),
        widths=(64, 128, 256, 512),
        output_stride=8,
        rates=None,
        aspp_channels=256,
    ):
        super().__init__()
        dilate = {8: (False, True, True), 16: (False, False, True)}[output_stride]
        self.backbone = TVResNet(TVBottleneck, layers, 1, widths, dilate)
        del self.backbone.fc
        self.classifier = deeplab_head(
            widths[-1] * TVBottleneck.expansion,
            num_classes,
            rates or aspp_rates(output_stride),
            aspp_channels,
            0.5,
        )

    def forward(self, x):
        return _segment(self.classifier, self.backbone.features(x), x.shape[-2:])


def _vainf_cbr6(inp, outp, k=3, stride=1, dilation=1, groups=1):
    # VainF's ConvBNReLU pads nothing: its stem is unpadded, blocks pad their input themselves.
    return tnn.Sequential(
        tnn.Conv2d(inp, outp, k, stride, 0, dilation=dilation, groups=groups, bias=False),
        tnn.BatchNorm2d(outp),
        tnn.ReLU6(),
    )


class VainFInvertedResidual(tnn.Module):  # VainF network/backbone/mobilenetv2.py
    def __init__(self, inp, outp, stride, dilation, t):
        super().__init__()
        hidden = int(round(inp * t))
        self.use_res = stride == 1 and inp == outp
        layers = [] if t == 1 else [_vainf_cbr6(inp, hidden, 1)]
        layers += [
            _vainf_cbr6(hidden, hidden, 3, stride, dilation, hidden),
            tnn.Conv2d(hidden, outp, 1, bias=False),
            tnn.BatchNorm2d(outp),
        ]
        self.conv = tnn.Sequential(*layers)
        self.pad = (dilation,) * 4  # fixed_padding(3, dilation), applied before the expansion

    def forward(self, x):
        y = self.conv(F.pad(x, self.pad))
        return x + y if self.use_res else y


class VainFMobileNetV2Backbone(tnn.Module):
    """VainF `mobilenet_v2(output_stride=...)` as `_segm_mobilenet` leaves it:
    `low_level_features` = features[:4], `high_level_features` = features[4:-1] (the 1x1 conv to
    1280 and the classifier dropped). Past the output stride a stage's stride becomes dilation
    (its first block keeps the previous one)."""

    def __init__(self, output_stride=8, width_mult=1.0, setting=MBV2_SETTING):
        super().__init__()
        inp = _make_divisible(32 * width_mult)
        feats = [_vainf_cbr6(3, inp, 3, 2)]
        current, dilation = 2, 1
        for t, c, n, s in setting:
            previous = dilation
            if current == output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current = s, current * s
            outp = int(c * width_mult)
            for i in range(n):
                feats.append(
                    VainFInvertedResidual(
                        inp, outp, stride if i == 0 else 1, previous if i == 0 else dilation, t
                    )
                )
                inp = outp
        self.out_channels = inp
        self.low_level_features = tnn.Sequential(*feats[:4])
        self.high_level_features = tnn.Sequential(*feats[4:])

    def forward(self, x):
        return self.high_level_features(self.low_level_features(x))


class VainFDeepLabHead(tnn.Module):  # VainF network/_deeplab.py: the Sequential is `classifier`
    def __init__(self, inp, num_classes, rates, ch=256):
        super().__init__()
        self.classifier = deeplab_head(inp, num_classes, rates, ch, 0.1)


class VainFDeepLabV3(tnn.Module):
    """VainF/DeepLabV3Plus-Pytorch `deeplabv3_mobilenet(num_classes, output_stride)`."""

    def __init__(
        self,
        num_classes=21,
        output_stride=8,
        rates=None,
        aspp_channels=256,
        width_mult=1.0,
        setting=MBV2_SETTING,
    ):
        super().__init__()
        self.backbone = VainFMobileNetV2Backbone(output_stride, width_mult, setting)
        rates = rates or aspp_rates(output_stride)
        self.classifier = VainFDeepLabHead(
            self.backbone.out_channels, num_classes, rates, aspp_channels
        )

    def forward(self, x):
        return _segment(self.classifier.classifier, self.backbone(x), x.shape[-2:])


class ViTAttention(tnn.Module):  # timm / DINO vision_transformer.py
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(dim, dim * 3)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ViTMlp(tnn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = tnn.Linear(dim, hidden)
        self.fc2 = tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(tnn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(tnn.Module):
    def __init__(self, dim, p):
        super().__init__()
        self.proj = tnn.Conv2d(3, dim, p, p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(tnn.Module):
    def __init__(self, dim, depth, heads, num_classes=1000, img=224, p=16):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, p)
        n = (img // p) ** 2
        self.cls_token = tnn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = tnn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = tnn.ModuleList([ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim, eps=1e-6)
        self.head = tnn.Linear(dim, num_classes) if num_classes > 0 else tnn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        f = self.norm(x)[:, 0]
        return self.head(f), f


REFERENCES = {
    "lenet5": lambda c: LeNet5((6, 16, 120, 84), c),
    "lenet5_half": lambda c: LeNet5((3, 8, 60, 42), c),
    "resnet18_cifar": lambda c: CifarResNet((2, 2, 2, 2), c),
    "resnet34_cifar": lambda c: CifarResNet((3, 4, 6, 3), c),
    "wrn16_1": lambda c: WideResNet(16, 1, c),
    "wrn16_2": lambda c: WideResNet(16, 2, c),
    "wrn40_1": lambda c: WideResNet(40, 1, c),
    "wrn40_2": lambda c: WideResNet(40, 2, c),
    "vgg8": lambda c: VGG(VGG_CFG["S"], c),
    "vgg11": lambda c: VGG(VGG_CFG["A"], c),
    "resnet18": lambda c: TVResNet(TVBasicBlock, (2, 2, 2, 2), c),
    "resnet34": lambda c: TVResNet(TVBasicBlock, (3, 4, 6, 3), c),
    "resnet50": lambda c: TVResNet(TVBottleneck, (3, 4, 6, 3), c),
    "mobilenet_v2": lambda c: TVMobileNetV2(c),
    "vit_b16": lambda c: ViT(768, 12, 12, c),
    "vit_s16": lambda c: ViT(384, 12, 6, c),
    "deeplabv3_resnet50": lambda c: TVDeepLabV3(c),
    "deeplabv3_mobilenetv2": lambda c: VainFDeepLabV3(c),
}

# ----------------------------------------------------------------------------------------------
# The naming rule lives in kd_jax.tools.convert_torch (torch-free): one mapping for both.
# ----------------------------------------------------------------------------------------------


def convert(sd: dict, variables: dict, arch: str = "") -> tuple[dict, list[str]]:
    """state_dict -> Flax variables of `variables`' tree by the converter's mapping (with its
    renaming of `arch`'s alternative namings, e.g. VainF's DeepLabV3); problems are returned as
    lines (the converter's error message) instead of raised."""
    from kd_jax.tools import convert_torch

    arrays = {k: v.detach().cpu().numpy() for k, v in sd.items()}
    arrays = convert_torch.rename_variant(arch, arrays)
    try:
        conv = convert_torch.convert_tree(arrays, variables)
    except convert_torch.ConversionError as e:
        return {}, str(e).splitlines()
    return conv, []


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parity", action="store_true", help="also compare logits after conversion")
    ap.add_argument("--models", default="", help="comma-separated subset")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from kd_jax.models import create_model, list_models, model_input_shape

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.manual_seed(0)
    names = args.models.split(",") if args.models else list_models()
    ok = True
    for name in names:
        if name not in REFERENCES:  # the SegMNIST DeepLabV3 variants follow no reference
            print(f"SKIP {name:16s} (no reference definition)", flush=True)
            continue
        nc = 1000 if model_input_shape(name)[0] == 224 else 10
        ref = REFERENCES[name](nc).eval()
        n_torch = sum(p.numel() for p in ref.parameters())
        model = create_model(name, nc)
        shape = model_input_shape(name)
        x = np.random.RandomState(0).randn(2, *shape).astype(np.float32)
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(x)))
        n_flax = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract["params"]))
        variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
        # Non-trivial BN statistics and affine params, so parity exercises them.
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, tnn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        conv, problems = convert(ref.state_dict(), variables, name)
        line = f"{name:16s} classes={nc:5d} torch={n_torch:>11,d} flax={n_flax:>11,d}"
        good = n_torch == n_flax and not problems
        if args.parity and good:
            with torch.no_grad():
                tl, tf = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
            if tl.ndim == 4:  # segmentation logits NCHW -> kd_jax's NHWC
                tl = tl.permute(0, 2, 3, 1)
            jl, jf = model.apply(conv, jnp.asarray(x), train=False)
            dl = float(np.max(np.abs(np.asarray(jl) - tl.numpy())))
            df = float(np.max(np.abs(np.asarray(jf["pre_logits"]) - tf.numpy())))
            line += f"  max|Δlogits|={dl:.2e} max|Δpre_logits|={df:.2e}"
            good = good and dl <= 1e-4 * max(1.0, float(np.abs(tl.numpy()).max())) and df <= 1e-3
        print(("OK   " if good else "FAIL ") + line, flush=True)
        for p in problems[:10]:
            print("     ", p)
        ok = ok and good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

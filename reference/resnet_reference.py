"""Reference values for the encode stage (models/resnet.ts, models/head.ts, models/model.ts).

Builds small SwAV models in torch float64 out of torchvision's own BasicBlock and
Bottleneck, with SwAV's forward (src/resnet50.py): crops grouped by resolution
with unique_consecutive, the backbone once per group, the projection head and
prototypes once on all features. Random weights (BatchNorm affine parameters and
running statistics included, so that every term is exercised) are exported in
swav-ts naming and layout, rounded to float32 so that both sides start from the
same numbers; then one train-mode forward on fresh inputs, the running stats
after it, the gradients of loss = sum(scores * R) for a fixed random R, and an
eval-mode forward with the updated running stats.

Also records torchvision's resnet18/34/50 state_dict names and shapes, to check
the parameter layout of the standard (width 64) networks.

Run: /usr/bin/python3 reference/resnet_reference.py  (writes test/fixtures/resnet.json)
"""

import base64
import copy
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(__file__), "..", "test", "fixtures", "resnet.json")


class SwavResNet(nn.Module):
    """SwAV's ResNet (src/resnet50.py) with a width multiplier and a CIFAR stem option."""

    def __init__(self, arch, width, in_channels, stem, hidden, out, prototypes):
        super().__init__()
        block, layers = {
            "resnet18": (BasicBlock, [2, 2, 2, 2]),
            "resnet34": (BasicBlock, [3, 4, 6, 3]),
            "resnet50": (Bottleneck, [3, 4, 6, 3]),
        }[arch]
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        feat = width * 8 * block.expansion
        if hidden == 0:
            self.projection_head = nn.Linear(feat, out)
        else:
            self.projection_head = nn.Sequential(
                nn.Linear(feat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
            )
        self.prototypes = nn.Linear(out, prototypes, bias=False)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_backbone(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, x):
        x = self.projection_head(x)
        x = nn.functional.normalize(x, dim=1, p=2)
        return x, self.prototypes(x)

    def forward(self, inputs):
        # SwAV: group consecutive crops of equal resolution, backbone once per group.
        idx_crops = torch.cumsum(
            torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in inputs]), return_counts=True)[1], 0
        )
        start_idx = 0
        outputs = []
        for end_idx in idx_crops:
            outputs.append(self.forward_backbone(torch.cat(inputs[start_idx:end_idx])))
            start_idx = end_idx
        features = torch.cat(outputs)
        z, scores = self.forward_head(features)
        return z, scores, features


def f32(t):
    """Rounds to float32 (the values the TS side sees), kept as float64."""
    return t.detach().to(torch.float32).to(torch.float64)


def to_ours(name, t):
    """torch layout -> swav-ts layout: conv [out, in, kh, kw] -> [kh, kw, in, out]; others unchanged."""
    t = t.detach()
    if t.dim() == 4:
        t = t.permute(2, 3, 1, 0)
    return t.contiguous()


def b64(t):
    return base64.b64encode(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()


def plain(t):
    # 10 significant digits: far below the tests' tolerances, and a smaller fixture.
    return [float("%.10g" % v) for v in t.detach().reshape(-1).tolist()]


def make_case(name, config, crops, batch, grad_params, seed):
    torch.manual_seed(seed)
    model = SwavResNet(**config)
    # torchvision init for convs (kaiming fan_out), then random BN parameters and stats.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(f32(t))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    params = {}
    for key, value in state.items():
        ours = key if key.startswith(("projection_head", "prototypes")) else "backbone." + key
        params[ours] = b64(to_ours(key, value))

    # Crops: list of (size, count); each crop is a batch [batch, C, size, size].
    inputs = [f32(torch.randn(batch, config["in_channels"], size, size)) for size, count in crops for _ in range(count)]
    groups = []
    start = 0
    for size, count in crops:
        group = torch.cat(inputs[start : start + count])  # crop-major, as SwAV
        groups.append({"shape": [group.shape[0], size, size, config["in_channels"]], "data": b64(group.permute(0, 2, 3, 1))})
        start += count

    # How far torch's own float32 forward is from float64 on this case (conditioning).
    model32 = copy.deepcopy(model).float().train()
    z32, scores32, _ = model32([x.float() for x in inputs])

    model.train()
    z, scores, features = model(inputs)
    float32_error = {
        "embeddings": float((z32.double() - z).norm() / z.norm()),
        "scores": float((scores32.double() - scores).norm() / scores.norm()),
    }
    R = f32(torch.randn(scores.shape))
    loss = (scores * R).sum()
    loss.backward()
    named = dict(model.named_parameters())
    grads = {}
    for ours in grad_params:
        key = ours[len("backbone."):] if ours.startswith("backbone.") else ours
        grads[ours] = plain(to_ours(key, named[key].grad))
    after = {}
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            ours = key if key.startswith("projection_head") else "backbone." + key
            after[ours] = plain(value)

    model.eval()
    with torch.no_grad():
        z_eval, scores_eval, _ = model(inputs)

    return {
        "name": name,
        "config": {
            "arch": config["arch"],
            "width": config["width"],
            "inputChannels": config["in_channels"],
            "stem": config["stem"],
            "hidden": config["hidden"],
            "out": config["out"],
            "prototypes": config["prototypes"],
        },
        "batch": batch,
        "torchFloat32Error": float32_error,
        "crops": [{"size": s, "count": c} for s, c in crops],
        "params": params,
        "groups": groups,
        "R": b64(R),
        "train": {"embeddings": plain(z), "scores": plain(scores), "features": plain(features), "loss": float(loss)},
        "grads": grads,
        "runningAfter": after,
        "eval": {"embeddings": plain(z_eval), "scores": plain(scores_eval)},
    }


def torchvision_layout():
    out = {}
    for arch in ["resnet18", "resnet34", "resnet50"]:
        net = getattr(torchvision.models, arch)()
        entries = []
        for key, value in net.state_dict().items():
            if key.startswith("fc.") or key.endswith("num_batches_tracked"):
                continue
            shape = list(value.shape)
            if len(shape) == 4:
                shape = [shape[2], shape[3], shape[1], shape[0]]
            entries.append({"name": "backbone." + key, "shape": shape})
        out[arch] = entries
    return out


def main():
    cases = [
        make_case(
            "resnet18-cifar-w4",
            dict(arch="resnet18", width=4, in_channels=3, stem="cifar", hidden=16, out=8, prototypes=10),
            crops=[(16, 2), (8, 3)],
            batch=3,
            grad_params=[
                "backbone.conv1.weight",
                "backbone.bn1.weight",
                "backbone.bn1.bias",
                "backbone.layer1.0.conv2.weight",
                "backbone.layer2.0.downsample.0.weight",
                "backbone.layer3.1.bn1.bias",
                "backbone.layer4.1.conv2.weight",
                "backbone.layer4.1.bn2.weight",
                "projection_head.0.weight",
                "projection_head.1.weight",
                "projection_head.3.weight",
                "prototypes.weight",
            ],
            seed=1,
        ),
        make_case(
            "resnet18-imagenet-w2-gray-linearhead",
            dict(arch="resnet18", width=2, in_channels=1, stem="imagenet", hidden=0, out=6, prototypes=7),
            crops=[(32, 2), (16, 2)],
            batch=2,
            grad_params=[
                "backbone.conv1.weight",
                "backbone.layer1.1.conv1.weight",
                "backbone.layer4.0.downsample.1.weight",
                "projection_head.weight",
                "projection_head.bias",
                "prototypes.weight",
            ],
            seed=2,
        ),
        make_case(
            "resnet50-imagenet-w4",
            dict(arch="resnet50", width=4, in_channels=3, stem="imagenet", hidden=12, out=8, prototypes=9),
            crops=[(64, 2), (48, 2)],
            batch=2,
            grad_params=[
                "backbone.conv1.weight",
                "backbone.layer1.0.conv3.weight",
                "backbone.layer1.0.downsample.0.weight",
                "backbone.layer2.0.conv2.weight",
                "backbone.layer4.2.bn3.weight",
                "projection_head.1.bias",
                "projection_head.3.bias",
                "prototypes.weight",
            ],
            seed=3,
        ),
        # Two adjacent groups of one size (a config listing [1, 1, 2] crops of [8, 8, 4] px): the reference
        # merges them into one backbone pass (one set of batch-norm statistics), then the 4 px group.
        make_case(
            "resnet18-cifar-w2-adjacent-equal-groups",
            dict(arch="resnet18", width=2, in_channels=3, stem="cifar", hidden=8, out=4, prototypes=5),
            crops=[(8, 1), (8, 1), (4, 2)],
            batch=3,
            grad_params=["backbone.conv1.weight", "backbone.bn1.weight", "backbone.layer4.1.bn2.bias"],
            seed=4,
        ),
    ]
    fixture = {
        "generator": "reference/resnet_reference.py (torch %s, torchvision %s, float64)"
        % (torch.__version__, torchvision.__version__),
        "cases": cases,
        "torchvision": torchvision_layout(),
    }
    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    for case in cases:
        print(case["name"], "torch float32 vs float64:", case["torchFloat32Error"])
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()

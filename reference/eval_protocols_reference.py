"""Reference values for the evaluation protocols (pipelines/linear_eval.ts, pipelines/semisup.ts,
data/eval_augment.ts), from torch float64 transcriptions of SwAV's eval_linear.py and eval_semisup.py.

Run with Debian's PyTorch:  /usr/bin/python3 reference/eval_protocols_reference.py
Writes test/fixtures/eval_protocols.json.

- transform: torchvision's Resize(int(size * 256 / 224)) + CenterCrop(size) on PIL images (what the
  reference scripts run) and on float64 tensors with antialias (the float semantics swav-ts uses),
  on fresh random images; plus the resize rule for every size 1..320.
- linear: a tiny SwAV ResNet (random weights and BatchNorm statistics, rounded to float32), frozen
  in eval mode; RegLog (global pooling; AvgPool2d to 2x2 + BatchNorm2d) trained for 3 epochs of one
  batch each on RandomResizedCrop + flip crops drawn here (boxes and flips recorded, the crops made
  by torchvision's resized_crop), SGD lr 0.3 momentum 0.9 wd 1e-6, CosineAnnealingLR(T_max 3).
- semisup: the same backbone + Linear(feat, classes), train mode, two SGD steps with parameter
  groups (trunk lr 0.01, head lr 0.2, momentum 0.9, wd 0), then an eval-mode forward.
"""

import base64
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet_reference import SwavResNet, b64, f32, plain, to_ours  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.manual_seed(20240614)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "eval_protocols.json")
MEAN = [0.485, 0.456, 0.406]
STD = [0.228, 0.224, 0.225]


def random_uint8(h, w):
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)


def hwc(t):
    return t.permute(1, 2, 0).reshape(-1).tolist()


fixture = {"resizeRule": [int(s * 256 / 224) for s in range(1, 321)]}

# --- Resize + CenterCrop ---------------------------------------------------------------------
cases = []
for h, w, size in [(37, 50, 24), (50, 37, 24), (28, 28, 28), (60, 45, 40)]:
    img = random_uint8(h, w)
    resize = int(size * 256 / 224)
    pil = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor()])(Image.fromarray(img.numpy()))
    x = F.resize(img.permute(2, 0, 1).to(torch.float64) / 255.0, [resize], antialias=True)
    tensor = F.center_crop(x, [size, size])
    cases.append({"height": h, "width": w, "size": size, "resize": resize, "image": img.reshape(-1).tolist(),
                  "pil": [round(v * 255) for v in hwc(pil.to(torch.float64))],
                  "tensor": [float("%.7g" % v) for v in hwc(tensor)]})
fixture["transform"] = cases

# --- The tiny model -----------------------------------------------------------------------------
CONFIG = dict(arch="resnet18", width=4, in_channels=3, stem="cifar", hidden=16, out=8, prototypes=20)
CLASSES = 3
SIZE = 24
BATCH = 8


def tiny_model():
    torch.manual_seed(7)
    model = SwavResNet(**CONFIG)
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
    return model


def export_params(model):
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    out = {}
    for key, value in state.items():
        ours = key if key.startswith(("projection_head", "prototypes")) else "backbone." + key
        out[ours] = b64(to_ours(key, value))
    return out


def feature_map(model, x):
    """SwAV's resnet forward with eval_mode=True: the last feature map, before pooling."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


images = [random_uint8(int(torch.randint(20, 36, ())), int(torch.randint(20, 36, ()))) for _ in range(BATCH)]
labels = torch.randint(0, CLASSES, (BATCH,))
test_images = [random_uint8(28, 30) for _ in range(5)]
test_labels = torch.randint(0, CLASSES, (5,))
fixture["images"] = [{"height": im.shape[0], "width": im.shape[1], "data": im.reshape(-1).tolist()} for im in images]
fixture["labels"] = labels.tolist()
fixture["testImages"] = [{"height": im.shape[0], "width": im.shape[1], "data": im.reshape(-1).tolist()}
                         for im in test_images]
fixture["testLabels"] = test_labels.tolist()


def crops_for_epoch():
    """RandomResizedCrop(SIZE) + RandomHorizontalFlip: boxes and flips drawn here, recorded for the TS side."""
    draws, batch = [], []
    for im in images:
        chw = im.permute(2, 0, 1).to(torch.float64) / 255.0
        top, left, h, w = T.RandomResizedCrop.get_params(chw, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        flip = bool(torch.rand(()) < 0.5)
        x = F.resized_crop(chw, top, left, h, w, [SIZE, SIZE], antialias=True)
        if flip:
            x = F.hflip(x)
        batch.append(F.normalize(x, MEAN, STD))
        draws.append({"box": {"top": top, "left": left, "height": h, "width": w}, "flip": flip})
    return draws, torch.stack(batch)


def test_batch():
    resize = int(SIZE * 256 / 224)
    xs = []
    for im in test_images:
        x = F.resize(im.permute(2, 0, 1).to(torch.float64) / 255.0, [resize], antialias=True)
        xs.append(F.normalize(F.center_crop(x, [SIZE, SIZE]), MEAN, STD))
    return torch.stack(xs)


EPOCHS = 3
epoch_crops = [crops_for_epoch() for _ in range(EPOCHS)]
# The crops of the first epoch, to check the transform; the loop recomputes every epoch's from its draws.
fixture["epochs"] = [{"draws": d} for d, _ in epoch_crops]
fixture["firstCrops"] = [float("%.7g" % v) for v in epoch_crops[0][1].permute(0, 2, 3, 1).reshape(-1).tolist()]
x_test = test_batch()


class RegLog(nn.Module):
    """eval_linear.py's RegLog; the variant's AvgPool2d kernel is side - 1 (6 on a 7x7 map)."""

    def __init__(self, feat, side, classes, global_avg, use_bn):
        super().__init__()
        self.bn = None
        if global_avg:
            s = feat
            self.av_pool = nn.AdaptiveAvgPool2d((1, 1))
        else:
            s = feat * 4
            self.av_pool = nn.AvgPool2d(side - 1, stride=1)
            if use_bn:
                self.bn = nn.BatchNorm2d(feat)
        self.linear = nn.Linear(s, classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        x = self.av_pool(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.linear(x.reshape(x.size(0), -1))


def linear_weight_ours(weight, feat, global_avg):
    """torch Linear weight [C, D] with D in (c, i, j) order -> swav-ts [D, C] with D in (i, j, c) order."""
    if global_avg:
        return weight.t().clone()
    c = weight.shape[0]
    return weight.reshape(c, feat, 2, 2).permute(2, 3, 1, 0).reshape(4 * feat, c)


model = tiny_model()
fixture["model"] = {"config": {"arch": CONFIG["arch"], "width": CONFIG["width"], "inputChannels": 3,
                               "stem": CONFIG["stem"], "hidden": CONFIG["hidden"], "out": CONFIG["out"],
                               "prototypes": CONFIG["prototypes"]},
                    "params": export_params(model), "size": SIZE, "classes": CLASSES, "mean": MEAN, "std": STD}
model.eval()
with torch.no_grad():
    side = feature_map(model, x_test).shape[-1]
feat = 8 * CONFIG["width"]

linear_cases = []
for name, global_avg, use_bn in [("global", True, False), ("avgpool+bn", False, True)]:
    torch.manual_seed(11)
    head = RegLog(feat, side, CLASSES, global_avg, use_bn)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(f32(p))
    init_w = linear_weight_ours(head.linear.weight.detach(), feat, global_avg)
    init_b = head.linear.bias.detach().clone()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.3, nesterov=False, momentum=0.9, weight_decay=1e-6)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS, eta_min=0)
    losses, lrs = [], []
    for epoch in range(EPOCHS):
        head.train()
        lrs.append(optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            out = feature_map(model, epoch_crops[epoch][1])
        loss = nn.CrossEntropyLoss()(head(out), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        scheduler.step()
    head.eval()
    with torch.no_grad():
        test_logits = head(feature_map(model, x_test))
    case = {"name": name, "pooling": "global" if global_avg else "avgpool", "batchNorm": use_bn,
            "init": {"weight": plain(init_w), "bias": plain(init_b)}, "lrs": lrs, "losses": losses,
            "weight": plain(linear_weight_ours(head.linear.weight.detach(), feat, global_avg)),
            "bias": plain(head.linear.bias), "testLogits": plain(test_logits)}
    if use_bn:
        case["bn"] = {"weight": plain(head.bn.weight), "bias": plain(head.bn.bias),
                      "running_mean": plain(head.bn.running_mean), "running_var": plain(head.bn.running_var)}
    linear_cases.append(case)
fixture["linear"] = linear_cases

# --- Semi-supervised fine-tuning: two steps --------------------------------------------------
model = tiny_model()
torch.manual_seed(12)
fc = nn.Linear(feat, CLASSES)
with torch.no_grad():
    for p in fc.parameters():
        p.copy_(f32(p))
init = {"weight": plain(fc.weight.detach().t()), "bias": plain(fc.bias)}
trunk = [p for n, p in model.named_parameters() if not n.startswith(("projection_head", "prototypes"))]
optimizer = torch.optim.SGD([{"params": trunk}, {"params": list(fc.parameters()), "lr": 0.2}],
                            lr=0.01, momentum=0.9, weight_decay=0)
model.train()
losses = []
for step in range(2):
    x = epoch_crops[step][1]
    logits = fc(torch.flatten(model.avgpool(feature_map(model, x)), 1))
    loss = nn.CrossEntropyLoss()(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(float(loss))
model.eval()
with torch.no_grad():
    test_logits = fc(torch.flatten(model.avgpool(feature_map(model, x_test)), 1))
watched = ["conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.running_var", "layer4.1.conv2.weight",
           "layer4.1.bn2.bias"]
state = model.state_dict()
fixture["semisup"] = {
    "init": init, "losses": losses, "testLogits": plain(test_logits),
    "weight": plain(fc.weight.detach().t()), "bias": plain(fc.bias),
    "params": {"backbone." + k: plain(to_ours(k, state[k])) for k in watched},
}

with open(OUT, "w") as f:
    json.dump(fixture, f, separators=(",", ":"))
print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")

"""PyTorch reference of bench/configs/fashion-mnist.json: SwAV on Fashion-MNIST, CPU.

The same recipe as ours, written the way the SwAV reference (main_swav.py,
src/multicropdataset.py, apex LARC) does it: ResNet-18 with a CIFAR stem at
width 16 on 1-channel 28x28 input, head 512 -> 128, 100 prototypes, 2 crops of
28 px (scale 0.2-1, flip, brightness/contrast jitter 0.4 with p 0.8), Sinkhorn
(eps 0.05, 3 iterations), temperature 0.1, LARC-SGD (momentum 0.9, wd 1e-6,
trust 0.001, no clip), warm-up 1 epoch then cosine from 0.6 to 0.0006,
prototypes frozen for the first 234 iterations, batch 256 with drop_last, no
queue. After every epoch: weighted kNN top-1/top-5 (k 200, T 0.1, cosine) of the
backbone's pooled features, train split against test split.

Run (same threads as ours, e.g. 2):
  /usr/bin/python3 bench/fashion_mnist_reference.py --epochs 2 --threads 2 --out runs/fm-ref.jsonl
Prints and appends one JSON line per epoch: {"epoch", "loss", "knn_top1", "knn_top5", "seconds"}.
"""
import argparse
import sys
import gzip
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batch-size", type=int, default=256)
p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke runs)")
p.add_argument("--workers", type=int, default=1)
p.add_argument("--seed", type=int, default=31)
p.add_argument("--out", default="")
p.add_argument("--baselines", action="store_true",
               help="print kNN of raw pixels and of the untrained network (this seed's init), then exit")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
np.random.seed(args.seed)

MEAN, STD = 0.286, 0.353


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


train_x = idx(os.path.join(args.data, "train-images-idx3-ubyte.gz"))
train_y = idx(os.path.join(args.data, "train-labels-idx1-ubyte.gz")).astype(np.int64)
test_x = idx(os.path.join(args.data, "t10k-images-idx3-ubyte.gz"))
test_y = idx(os.path.join(args.data, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)

crop = T.Compose([
    T.RandomResizedCrop(28, scale=(0.2, 1.0)),
    T.RandomHorizontalFlip(p=0.5),
    T.RandomApply([T.ColorJitter(0.4, 0.4, 0, 0)], p=0.8),
    T.ToTensor(),
    T.Normalize([MEAN], [STD]),
])


class MultiCrop(torch.utils.data.Dataset):
    def __len__(self):
        return len(train_x)

    def __getitem__(self, i):
        image = Image.fromarray(train_x[i], mode="L")
        return [crop(image), crop(image)]


def conv3(i, o, s=1):
    return nn.Conv2d(i, o, 3, s, 1, bias=False)


class Basic(nn.Module):
    def __init__(self, i, o, s):
        super().__init__()
        self.conv1, self.bn1 = conv3(i, o, s), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = conv3(o, o), nn.BatchNorm2d(o)
        self.downsample = None
        if s != 1 or i != o:
            self.downsample = nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class SwAV(nn.Module):
    def __init__(self, width=16, hidden=512, out=128, prototypes=100):
        super().__init__()
        self.conv1, self.bn1 = conv3(1, width), nn.BatchNorm2d(width)
        layers, c = [], width
        for s, planes in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [Basic(c, planes, 1 if s == 0 else 2), Basic(planes, planes, 1)]
            c = planes
        self.layers = nn.Sequential(*layers)
        self.projection_head = nn.Sequential(
            nn.Linear(c, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
        self.prototypes = nn.Linear(out, prototypes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def backbone(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1)

    def forward(self, x):
        z = F.normalize(self.projection_head(self.backbone(x)), dim=1, p=2)
        return z, self.prototypes(z)


@torch.no_grad()
def sinkhorn(out, eps=0.05, iters=3):
    q = torch.exp(out / eps).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


class LARC:
    """apex.parallel.LARC with clip=False around torch SGD."""

    def __init__(self, optim, trust=0.001, eps=1e-8):
        self.optim, self.trust, self.eps = optim, trust, eps

    @torch.no_grad()
    def step(self):
        wds = []
        for group in self.optim.param_groups:
            wd = group["weight_decay"]
            wds.append(wd)
            group["weight_decay"] = 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                pn, gn = torch.norm(p.data), torch.norm(p.grad.data)
                if pn != 0 and gn != 0:
                    adaptive = self.trust * pn / (gn + pn * wd + self.eps)
                    p.grad.data += wd * p.data
                    p.grad.data *= adaptive
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, wds):
            group["weight_decay"] = wd


@torch.no_grad()
def features(model, images):
    model.eval()
    out = []
    for s in range(0, len(images), 1000):
        x = torch.from_numpy(np.array(images[s:s + 1000])).float().div(255).sub(MEAN).div(STD).unsqueeze(1)
        out.append(model.backbone(x))
    model.train()
    return torch.cat(out)


def pixels(images):
    return torch.from_numpy(np.array(images)).float().div(255).sub(MEAN).div(STD).reshape(len(images), -1)


@torch.no_grad()
def knn(model, k=200, t=0.1, classes=10):
    """Weighted kNN on the backbone's features, or on raw pixels when model is None."""
    embed = pixels if model is None else (lambda images: features(model, images))
    bank = F.normalize(embed(train_x), dim=1)
    query = F.normalize(embed(test_x), dim=1)
    labels = torch.from_numpy(train_y)
    truth = torch.from_numpy(test_y)
    top1 = top5 = 0
    for s in range(0, len(query), 500):
        sim = query[s:s + 500] @ bank.t()
        w, i = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), classes).scatter_add_(1, labels[i], (w / t).exp())
        ranked = votes.topk(5, dim=1).indices
        y = truth[s:s + 500]
        top1 += (ranked[:, 0] == y).sum().item()
        top5 += (ranked == y[:, None]).any(dim=1).sum().item()
    return top1 / len(query), top5 / len(query)


model = SwAV()
if args.baselines:
    for name, baseline in (("raw_pixels", None), ("random_init", model)):
        top1, top5 = knn(baseline)
        line = {"baseline": name, "knn_top1": top1, "knn_top5": top5, "seed": args.seed}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
    sys.exit(0)
loader = torch.utils.data.DataLoader(MultiCrop(), batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers, persistent_workers=args.workers > 0)
iters = len(loader)
base_lr, final_lr, warmup_epochs, freeze = 0.6, 0.0006, 1, 234
warmup = np.linspace(0, base_lr, iters * warmup_epochs)
cos_iters = np.arange(iters * (args.epochs - warmup_epochs))
cosine = np.array([final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / len(cos_iters)))
                   for t in cos_iters])
schedule = np.concatenate((warmup, cosine))
optimizer = LARC(torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=1e-6))
step = 0
for epoch in range(args.epochs):
    start = time.time()
    losses = []
    for it, crops in enumerate(loader):
        if args.max_steps and it >= args.max_steps:
            break
        for g in optimizer.optim.param_groups:
            g["lr"] = schedule[step]
        with torch.no_grad():
            w = F.normalize(model.prototypes.weight.data.clone(), dim=1, p=2)
            model.prototypes.weight.copy_(w)
        bs = crops[0].shape[0]
        _, scores = model(torch.cat(crops))
        loss = 0
        for a in [0, 1]:
            q = sinkhorn(scores[bs * a: bs * (a + 1)].detach())
            x = scores[bs * (1 - a): bs * (2 - a)] / 0.1
            loss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss /= 2
        optimizer.optim.zero_grad()
        loss.backward()
        if step < freeze:
            model.prototypes.weight.grad = None
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if it % 20 == 0:
            print(f"epoch {epoch + 1} step {it}/{iters} loss {loss.item():.4f} ({time.time() - start:.0f} s)",
                  flush=True)
    train_seconds = time.time() - start
    top1, top5 = knn(model)
    line = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "knn_top1": top1, "knn_top5": top5,
            "train_seconds": train_seconds, "seconds": time.time() - start, "threads": args.threads}
    print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")

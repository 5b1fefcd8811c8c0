"""PyTorch reference for `deno task bench`: the same SwAV training step, same shapes, same threads.

    /usr/bin/python3 bench/torch_step.py [--threads 2] [--reps 5] [--stage step] [--width 16]
        [--batch 64] [--crops 2x32+4x16] [--hidden 2048] [--out 128] [--prototypes 3000]
        [--precision fp32|bf16|auto]

Prints one JSON line per stage, {"stage", "ms" (median), "images_per_s" (batch / s), ...}, with the
stage names of bench/bench.ts: decode (PIL PNG decode of a batch of 32x32 images), multicrop
(torchvision RandomResizedCrop + flip + colour distortion + normalise, then stacking), encode_forward,
encode_backward (forward + backward with a fixed upstream gradient, minus forward), sinkhorn (the
reference's distributed_sinkhorn, 3 iterations, eps 0.05), swapped_loss (loss and its gradient with
respect to the scores), optimise (LARC around SGD with momentum, as apex), step (normalise prototypes,
forward, codes, loss, backward, update). The model is SwAV's ResNet-18 with the CIFAR stem (3x3/1 conv,
no max-pool) at the given width, projection head Linear-BN1d-ReLU-Linear, L2 normalisation, and
prototypes without bias, in float32 on the CPU, training mode. With --precision bf16 the model's
forward runs under torch.autocast("cpu", dtype=torch.bfloat16) (its backward follows the forward's
types) and the scores are cast back to float32 before Sinkhorn and the loss, as ours keeps them;
auto takes bf16 where /proc/cpuinfo has avx512_bf16 or amx_bf16.
"""

import argparse
import io
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--stage", default=None)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--crops", default="2x32")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--out", type=int, default=128)
    p.add_argument("--prototypes", type=int, default=3000)
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    return p.parse_args()


STAGES = ["decode", "multicrop", "encode_forward", "encode_backward", "sinkhorn", "swapped_loss", "optimise", "step"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SwavResNet18(nn.Module):
    """SwAV's resnet50.py ResNet (BasicBlock, [2, 2, 2, 2]) with the CIFAR stem, head and prototypes."""

    def __init__(self, width, hidden, out, prototypes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], width
        for i, blocks in enumerate([2, 2, 2, 2]):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.projection_head = nn.Sequential(
            nn.Linear(inplanes, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )
        self.prototypes = nn.Linear(out, prototypes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_backbone(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return torch.flatten(self.avgpool(self.layers(x)), 1)

    def forward(self, inputs):
        # As SwAV: the backbone once per resolution group, the head once on all features.
        feats = torch.cat([self.forward_backbone(x) for x in inputs])
        z = F.normalize(self.projection_head(feats), dim=1, p=2)
        return z, self.prototypes(z)


@torch.no_grad()
def sinkhorn(out, epsilon=0.05, iterations=3):
    """main_swav.py's distributed_sinkhorn, one process."""
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def swapped_loss(output, codes, bs, nmb_crops, crops_for_assign, temperature=0.1):
    loss = 0
    total = sum(nmb_crops)
    for i, crop_id in enumerate(crops_for_assign):
        q = codes[i]
        subloss = 0
        for v in [c for c in range(total) if c != crop_id]:
            x = output[bs * v : bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (total - 1)
    return loss / len(crops_for_assign)


def assign(scores, bs, crops_for_assign):
    with torch.no_grad():
        return [sinkhorn(scores[bs * c : bs * (c + 1)].detach()) for c in crops_for_assign]


class LARC:
    """apex.parallel.LARC (clip False) around an optimizer, as main_swav.py uses it."""

    def __init__(self, optimizer, trust_coefficient=0.001, clip=False, eps=1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.clip = clip

    @property
    def param_groups(self):
        return self.optim.param_groups

    def step(self):
        with torch.no_grad():
            weight_decays = []
            for group in self.optim.param_groups:
                weight_decay = group.get("weight_decay", 0)
                weight_decays.append(weight_decay)
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    param_norm = torch.norm(p.data)
                    grad_norm = torch.norm(p.grad.data)
                    if param_norm != 0 and grad_norm != 0:
                        adaptive_lr = self.trust_coefficient * param_norm / (grad_norm + param_norm * weight_decay + self.eps)
                        if self.clip:
                            adaptive_lr = min(adaptive_lr / group["lr"], 1)
                        p.grad.data += weight_decay * p.data
                        p.grad.data *= adaptive_lr
        self.optim.step()
        for i, group in enumerate(self.optim.param_groups):
            group["weight_decay"] = weight_decays[i]


def png_batch(count, size):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def timed(reps, fn):
    # The warm-up rule of bench/bench.ts: one run, repeated up to 20 times while under half a second.
    start = time.perf_counter()
    for i in range(20):
        if i > 0 and time.perf_counter() - start >= 0.5:
            break
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main():
    args = parse()
    threads = args.threads or torch.get_num_threads()
    precision = args.precision
    if precision == "auto":
        flags = open("/proc/cpuinfo").read()
        precision = "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"
    torch.set_num_threads(threads)
    crops_spec = [tuple(int(v) for v in part.split("x")) for part in args.crops.split("+")]
    nmb_crops = [n for n, _ in crops_spec]
    bs = args.batch
    crops_for_assign = [c for c in [0, 1] if c < sum(nmb_crops)]
    stages = STAGES if args.stage is None else [args.stage]
    if args.stage is not None and args.stage not in STAGES:
        sys.exit(f"--stage: unknown stage {args.stage!r} (one of {', '.join(STAGES)})")

    def report(stage, ms):
        print(json.dumps({"stage": stage, "ms": round(ms, 3),
                          "images_per_s": round(bs / (ms / 1000), 2) if ms > 0 else None,
                          "reps": args.reps, "backend": "torch", "threads": threads, "torch": torch.__version__,
                          "precision": precision}),
              flush=True)

    if "decode" in stages:
        from PIL import Image

        pngs = png_batch(bs, 32)

        def decode():
            for b in pngs:
                im = Image.open(io.BytesIO(b))
                im.convert("RGB").load()

        report("decode", timed(args.reps, decode))
    if "multicrop" in stages:
        import torchvision.transforms as T
        from PIL import Image

        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in png_batch(bs, 32)]
        jitter = T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8)
        trans = []
        for g, (n, size) in enumerate(crops_spec):
            scale = (0.14, 1.0) if g == 0 else (0.08, 0.4)
            trans += [T.Compose([T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(0.5), jitter,
                                 T.RandomGrayscale(0.2), T.ToTensor(),
                                 T.Normalize([0.485, 0.456, 0.406], [0.228, 0.224, 0.225])])] * n

        def multicrop():
            per = [[t(im) for t in trans] for im in images]
            start = 0
            for n, _ in crops_spec:
                torch.stack([per[b][start + v] for v in range(n) for b in range(bs)])
                start += n

        report("multicrop", timed(args.reps, multicrop))

    if not any(s in stages for s in STAGES[2:]):
        return
    torch.manual_seed(1)
    model = SwavResNet18(args.width, args.hidden, args.out, args.prototypes)
    model.train()

    def encode(x):
        # bf16: the forward under autocast; embeddings and scores back in float32 for Sinkhorn and the loss.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            z, scores = model(x)
        return z.float(), scores.float()
    inputs = [torch.randn(n * bs, 3, s, s) for n, s in crops_spec]
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-6)
    optimizer = LARC(sgd, trust_coefficient=0.001, clip=False)
    with torch.no_grad():
        _, scores0 = encode(inputs)

    forward_ms = None
    if "encode_forward" in stages or "encode_backward" in stages:
        def forward():
            encode(inputs)

        forward_ms = timed(args.reps, forward)
        if "encode_forward" in stages:
            report("encode_forward", forward_ms)
    if "encode_backward" in stages:
        upstream = torch.randn(scores0.shape) / scores0.numel()

        def forward_backward():
            model.zero_grad(set_to_none=True)
            _, s = encode(inputs)
            (s * upstream).sum().backward()

        report("encode_backward", max(0.0, timed(args.reps, forward_backward) - forward_ms))
    if "sinkhorn" in stages:
        report("sinkhorn", timed(args.reps, lambda: assign(scores0, bs, crops_for_assign)))
    if "swapped_loss" in stages:
        codes = assign(scores0, bs, crops_for_assign)

        def loss_and_grad():
            s = scores0.detach().requires_grad_(True)
            swapped_loss(s, codes, bs, nmb_crops, crops_for_assign).backward()

        report("swapped_loss", timed(args.reps, loss_and_grad))
    if "optimise" in stages:
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)) * 1e-3
        report("optimise", timed(args.reps, optimizer.step))
    if "step" in stages:
        def step():
            with torch.no_grad():
                w = model.prototypes.weight.data.clone()
                w = F.normalize(w, dim=1, p=2)
                model.prototypes.weight.copy_(w)
            model.zero_grad(set_to_none=True)
            _, scores = encode(inputs)
            codes = assign(scores, bs, crops_for_assign)
            loss = swapped_loss(scores, codes, bs, nmb_crops, crops_for_assign)
            loss.backward()
            optimizer.step()
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss {loss.item()}")

        report("step", timed(args.reps, step))


if __name__ == "__main__":
    main()

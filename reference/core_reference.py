#!/usr/bin/python3
"""Reference values for the SwAV core maths (issue 3), computed in float64.

Run from the repository root with Debian's PyTorch:

    /usr/bin/python3 reference/core_reference.py

Writes test/fixtures/core.json. The code below transcribes the authors'
facebookresearch/swav main_swav.py (distributed_sinkhorn, the swapped
prediction loop of train(), the queue, the lr schedule) and apex's LARC wrapper
(apex/parallel/LARC.py) around torch.optim.SGD, in float64 and on one process.

Sinkhorn below eps ~ 0.0014 overflows even float64 (exp(1/eps) > 1.8e308), so
small-eps fixtures come from a float64 log-domain iteration, which this script
first checks against the direct reference where both are finite.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
generator = torch.Generator().manual_seed(20240603)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def cosine_scores(rows, k, dim=16):
    """Scores like SwAV's: unit embeddings times unit prototypes, so |s| <= 1."""
    z = F.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    c = F.normalize(torch.randn(k, dim, generator=generator), dim=1)
    return z @ c.t()


# --- Sinkhorn -----------------------------------------------------------------


@torch.no_grad()
def distributed_sinkhorn(out, epsilon, iterations):
    """main_swav.py's distributed_sinkhorn with world_size 1."""
    Q = torch.exp(out / epsilon).t()  # Q is K-by-B for consistency with notations from our paper
    B = Q.shape[1]  # number of samples to assign
    K = Q.shape[0]  # how many prototypes

    # make the matrix sums to 1
    sum_Q = torch.sum(Q)
    Q /= sum_Q

    for it in range(iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K

        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B

    Q *= B  # the colomns must sum to 1 so that Q is an assignment
    return Q.t()


@torch.no_grad()
def log_domain_sinkhorn(out, epsilon, iterations):
    """The same iteration on log Q: every division becomes a logsumexp subtraction."""
    B, K = out.shape
    log_q = (out / epsilon).t()
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)
    for it in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(K)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(B)
    return torch.exp(log_q + math.log(B)).t()


def sinkhorn_reference(out, epsilon, iterations):
    direct = distributed_sinkhorn(out.clone(), epsilon, iterations)
    logd = log_domain_sinkhorn(out, epsilon, iterations)
    if torch.isfinite(direct).all():
        err = (direct - logd).norm() / direct.norm()
        assert err < 1e-12, f"log-domain iteration differs from the reference: {err}"
        return direct, "direct"
    return logd, "log-domain"


def sinkhorn_cases():
    cases = []
    # (rows, K, epsilon, iterations); rows include queue rows where there is a queue.
    for rows, k, eps, iters in [
        (8, 5, 0.05, 3),
        (32, 16, 0.05, 3),
        (16, 30, 0.02, 5),
        (64, 10, 0.1, 3),
        (12, 7, 0.05, 0),
        (12, 7, 0.05, 1),
        (40, 25, 0.03, 10),
        (16, 12, 0.005, 3),
        (20, 8, 0.001, 3),
        (24, 40, 0.001, 10),
    ]:
        # low-dimensional embeddings give cosines near 1, where exp(1/eps) overflows even float64
        scores = cosine_scores(rows, k, dim=3 if eps < 0.002 else 16)
        codes, source = sinkhorn_reference(scores, eps, iters)
        cases.append({
            "rows": rows,
            "k": k,
            "epsilon": eps,
            "iterations": iters,
            "source": source,
            "scores": flat(scores),
            "codes": flat(codes),
        })
    return cases


# --- Swapped prediction loss ----------------------------------------------------


def swapped_loss(output, bs, nmb_crops, crops_for_assign, temperature, epsilon, iterations, queue_scores):
    """The loss loop of main_swav.py's train(); queue_scores[i] stands for
    torch.mm(queue[i], prototypes.weight.t()) (the queue is full)."""
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue_scores is not None:
                out = torch.cat((queue_scores[i], out))
            q, _ = sinkhorn_reference(out, epsilon, iterations)
            q = q[-bs:]
        subloss = 0
        for v in np.delete(np.arange(np.sum(nmb_crops)), crop_id):
            x = output[bs * v: bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (np.sum(nmb_crops) - 1)
    loss /= len(crops_for_assign)
    return loss


def loss_cases():
    cases = []
    for bs, nmb_crops, crops_for_assign, k, queue_length, eps, iters, temperature in [
        (4, [2], [0, 1], 10, 0, 0.05, 3, 0.1),
        (6, [2, 4], [0, 1], 12, 0, 0.05, 3, 0.1),
        (4, [2], [0, 1], 10, 8, 0.05, 3, 0.1),
        (3, [2, 4], [0, 1], 9, 12, 0.05, 3, 0.1),
        (5, [2, 3], [0], 7, 0, 0.03, 5, 0.2),
        (8, [2, 6], [0, 1], 16, 16, 0.05, 3, 0.1),
    ]:
        total = int(np.sum(nmb_crops))
        scores = cosine_scores(bs * total, k).requires_grad_(True)
        queue_scores = (
            [cosine_scores(queue_length, k) for _ in crops_for_assign] if queue_length > 0 else None
        )
        loss = swapped_loss(scores, bs, nmb_crops, crops_for_assign, temperature, eps, iters, queue_scores)
        loss.backward()
        cases.append({
            "batchSize": bs,
            "nmbCrops": nmb_crops,
            "cropsForAssign": crops_for_assign,
            "k": k,
            "epsilon": eps,
            "iterations": iters,
            "temperature": temperature,
            "queueLength": queue_length,
            "scores": flat(scores),
            "queueScores": [flat(s) for s in queue_scores] if queue_scores is not None else None,
            "loss": float(loss),
            "grad": flat(scores.grad),
        })
    return cases


# --- LARC-SGD -------------------------------------------------------------------


class LARC(object):
    """apex.parallel.LARC, transcribed (float64, no apex dependency)."""

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
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
                # absorb weight decay control from optimizer
                weight_decay = group['weight_decay'] if 'weight_decay' in group else 0
                weight_decays.append(weight_decay)
                group['weight_decay'] = 0
                for p in group['params']:
                    if p.grad is None:
                        continue
                    param_norm = torch.norm(p.data)
                    grad_norm = torch.norm(p.grad.data)

                    if param_norm != 0 and grad_norm != 0:
                        # calculate adaptive lr + weight decay
                        adaptive_lr = self.trust_coefficient * (param_norm) / (
                            grad_norm + param_norm * weight_decay + self.eps)

                        # clip learning rate for LARC
                        if self.clip:
                            # calculation of adaptive_lr so that when multiplied by lr it equals `min(adaptive_lr, lr)`
                            adaptive_lr = min(adaptive_lr / group['lr'], 1)

                        p.grad.data += weight_decay * p.data
                        p.grad.data *= adaptive_lr

        self.optim.step()
        # return weight decay control to optimizer
        for i, group in enumerate(self.optim.param_groups):
            group['weight_decay'] = weight_decays[i]


def lr_schedule(start_warmup, base_lr, final_lr, warmup_iters, total_iters):
    """main_swav.py's schedule, with len(train_loader) * epochs folded into iteration counts."""
    warmup_lr_schedule = np.linspace(start_warmup, base_lr, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    cosine_lr_schedule = np.array([final_lr + 0.5 * (base_lr - final_lr) * (
        1 + math.cos(math.pi * t / (total_iters - warmup_iters))) for t in iters])
    return np.concatenate((warmup_lr_schedule, cosine_lr_schedule))


def optimiser_cases():
    cases = []
    for name, momentum, weight_decay, trust, clip, freeze_iters, steps, schedule in [
        ("swav defaults", 0.9, 1e-6, 0.001, False, 0, 6, (0.0, 0.6, 0.0006, 2, 6)),
        ("large weight decay, frozen prototypes", 0.9, 0.05, 0.001, False, 3, 7, (0.1, 4.8, 0.0048, 3, 7)),
        ("clip", 0.8, 1e-4, 0.02, True, 1, 5, (0.0, 0.3, 0.003, 0, 5)),
    ]:
        shapes = {"conv": [3, 2, 2, 4], "bias": [4], "head": [5, 3], "prototypes": [6, 3]}
        params = {}
        for key, shape in shapes.items():
            init = torch.zeros(shape) if key == "bias" else torch.randn(shape, generator=generator)
            params[key] = torch.nn.Parameter(init)
        initial = {key: flat(p) for key, p in params.items()}
        sgd = torch.optim.SGD(list(params.values()), lr=0.1, momentum=momentum, weight_decay=weight_decay)
        optimizer = LARC(sgd, trust_coefficient=trust, clip=clip, eps=1e-8)
        lrs = lr_schedule(*schedule)
        step_records = []
        for it in range(steps):
            grads = {}
            for key, p in params.items():
                g = torch.randn(p.shape, generator=generator) * 0.5
                if key == "head" and it == 2:
                    g = torch.zeros(p.shape)  # grad norm 0: LARC skipped, plain SGD step
                grads[key] = g
                p.grad = g.clone()
            for group in optimizer.optim.param_groups:
                group["lr"] = float(lrs[it])
            # as main_swav.py: cancel gradients for the prototypes
            if it < freeze_iters:
                params["prototypes"].grad = None
            optimizer.step()
            step_records.append({
                "lr": float(lrs[it]),
                "grads": {key: flat(g) for key, g in grads.items()},
                "params": {key: flat(p) for key, p in params.items()},
            })
        cases.append({
            "name": name,
            "momentum": momentum,
            "weightDecay": weight_decay,
            "trustCoefficient": trust,
            "clip": clip,
            "eps": 1e-8,
            "freezePrototypesIters": freeze_iters,
            "shapes": shapes,
            "initial": initial,
            "steps": step_records,
        })
    return cases


def schedule_cases():
    cases = []
    for start, base, final, warmup, total in [
        (0.0, 0.6, 0.0006, 0, 50),
        (0.0, 4.8, 0.0048, 10, 60),
        (0.3, 0.6, 0.0006, 7, 40),
        (0.05, 1.0, 0.0, 1, 9),
    ]:
        cases.append({
            "startWarmup": start,
            "baseLr": base,
            "finalLr": final,
            "warmupIters": warmup,
            "totalIters": total,
            "lrs": [float(v) for v in lr_schedule(start, base, final, warmup, total)],
        })
    return cases


def main():
    fixture = {
        "generator": "reference/core_reference.py (float64, torch " + torch.__version__ + ")",
        "sinkhorn": sinkhorn_cases(),
        "loss": loss_cases(),
        "optimiser": optimiser_cases(),
        "schedule": schedule_cases(),
    }
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "test", "fixtures", "core.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()

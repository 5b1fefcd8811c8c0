#!/usr/bin/python3
"""Reference values for data-parallel SwAV maths (issue 13), computed in float64.

Run from the repository root with Debian's PyTorch:

    /usr/bin/python3 reference/distributed_reference.py

Writes test/fixtures/distributed.json, read by the rank scripts under test/mpi/
(run by test/distributed_math_test.ts under mpiexec):

- sinkhorn: main_swav.py's distributed_sinkhorn transcribed in float64, with the
  world simulated (each rank's block of rows; dist.all_reduce becomes a sum over
  the blocks; B = rows per rank x world size), checked equal to the same
  function on the concatenated matrix with world size 1. A rank script holding
  block r must return rows [r*b, (r+1)*b) of `codes`.
- batch_norm: torch's batch norm in train mode on the concatenated batch (what
  SyncBatchNorm computes over all ranks), forward, running statistics and the
  gradients of sum(y * dy); and, per world size, each rank's values when it
  normalises its own shard alone (no synchronisation), the expected difference.
"""
import json
import math

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
generator = torch.Generator().manual_seed(20240713)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


# --- Sinkhorn -----------------------------------------------------------------


@torch.no_grad()
def distributed_sinkhorn(blocks, epsilon, iterations):
    """main_swav.py's distributed_sinkhorn run by len(blocks) ranks, each holding one [b, K] block."""
    world_size = len(blocks)
    Qs = [torch.exp(out / epsilon).t() for out in blocks]  # Q is K-by-B
    B = Qs[0].shape[1] * world_size  # number of samples to assign
    K = Qs[0].shape[0]  # how many prototypes

    # make the matrix sums to 1
    sum_Q = sum(torch.sum(Q) for Q in Qs)  # dist.all_reduce(sum_Q)
    Qs = [Q / sum_Q for Q in Qs]

    for it in range(iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = sum(torch.sum(Q, dim=1, keepdim=True) for Q in Qs)  # dist.all_reduce(sum_of_rows)
        Qs = [Q / sum_of_rows / K for Q in Qs]

        # normalize each column: total weight per sample must be 1/B
        Qs = [Q / torch.sum(Q, dim=0, keepdim=True) / B for Q in Qs]

    return [(Q * B).t() for Q in Qs]  # the colomns must sum to 1 so that Q is an assignment


def cosine_scores(rows, k, dim=16):
    z = F.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    c = F.normalize(torch.randn(k, dim, generator=generator), dim=1)
    return z @ c.t()


def sinkhorn_case(rows, k, epsilon, iterations, scores=None, note=""):
    scores = cosine_scores(rows, k) if scores is None else scores
    whole = distributed_sinkhorn([scores], epsilon, iterations)[0]
    for world in (2, 4):
        split = torch.cat(distributed_sinkhorn(list(scores.chunk(world, dim=0)), epsilon, iterations), dim=0)
        assert torch.allclose(split, whole, rtol=1e-12, atol=1e-14), (rows, k, epsilon, world)
    assert torch.isfinite(whole).all()
    return {
        "rows": rows,
        "k": k,
        "epsilon": epsilon,
        "iterations": iterations,
        "note": note,
        "scores": flat(scores),
        "codes": flat(whole),
    }


def uneven_spread_scores(rows, k):
    """Rows of the first half within +-0.1, of the second half within +-1: at eps 0.0015 the
    first ranks' own spread / eps is under 600 (plain domain) and the last ranks' over it."""
    s = cosine_scores(rows, k)
    s[: rows // 2] *= 0.1
    return s


sinkhorn = [
    sinkhorn_case(24, 30, 0.05, 3, note="the reference's defaults"),
    sinkhorn_case(16, 12, 0.05, 0, note="no iteration: Q / sum(Q) * B"),
    sinkhorn_case(8, 40, 0.02, 1),
    sinkhorn_case(24, 20, 0.1, 5),
    sinkhorn_case(16, 10, 0.0015, 3, scores=uneven_spread_scores(16, 10),
                  note="global spread over the plain-domain limit, the first ranks' own spread under it"),
]

# --- Batch norm -----------------------------------------------------------------

EPS = 1e-5
MOMENTUM = 0.1


def batch_norm(x_nhwc, gamma, beta, dy, relu):
    """y, mean, biased variance, running stats after one update from (0, 1), dx, dgamma, dbeta."""
    x = x_nhwc.clone().requires_grad_(True)
    g = gamma.clone().requires_grad_(True)
    b = beta.clone().requires_grad_(True)
    c = x.shape[-1]
    xc = x.reshape(-1, c)  # [N*H*W, C]: the same statistics as NCHW batch norm
    running_mean = torch.zeros(c)
    running_var = torch.ones(c)
    y = F.batch_norm(xc, running_mean, running_var, g, b, training=True, momentum=MOMENTUM, eps=EPS)
    if relu:
        y = F.relu(y)
    y = y.reshape(x.shape)
    (y * dy).sum().backward()
    return {
        "y": flat(y),
        "mean": flat(xc.mean(0)),
        "variance": flat(xc.var(0, unbiased=False)),
        "runningMean": flat(running_mean),
        "runningVar": flat(running_var),
        "dx": flat(x.grad),
        "dgamma": flat(g.grad),
        "dbeta": flat(b.grad),
    }


def bn_case(shape, relu, splits, far=False):
    c = shape[-1]
    x = torch.randn(*shape, generator=generator) * (1 + 0.3 * torch.arange(c)) + (torch.arange(c) - c / 2) * 0.5
    if far:  # channel means far from zero against their spread: |mean| / std ~ 60
        x = 30 + 0.5 * torch.randn(*shape, generator=generator)
    gamma = 0.5 + torch.rand(c, generator=generator)
    beta = torch.randn(c, generator=generator)
    dy = torch.randn(*shape, generator=generator)
    whole = batch_norm(x, gamma, beta, dy, relu)
    local = {}
    for world, sizes in splits.items():
        assert sum(sizes) == shape[0] and len(sizes) == int(world)
        parts = [batch_norm(xs, gamma, beta, dys, relu)
                 for xs, dys in zip(x.split(sizes), dy.split(sizes))]
        local[world] = parts
    return {
        "shape": list(shape),
        "relu": relu,
        "epsilon": EPS,
        "momentum": MOMENTUM,
        "splits": splits,
        "x": flat(x),
        "gamma": flat(gamma),
        "beta": flat(beta),
        "dy": flat(dy),
        "global": whole,
        "local": local,
    }


# No shard of 2 rows: two values normalise to +-sqrt(v / (v + eps)) whatever they are, so their dx is
# O(eps / v), a cancellation float32 cannot resolve (see test/batch_norm_test.ts).
batch_norm_cases = [
    bn_case((8, 3, 3, 5), True, {"2": [4, 4], "4": [2, 2, 2, 2]}),
    bn_case((8, 2, 3, 4), False, {"2": [4, 4], "4": [2, 2, 2, 2]}),
    bn_case((16, 10), True, {"2": [8, 8], "4": [4, 4, 4, 4]}),
    bn_case((12, 7), False, {"2": [5, 7], "4": [3, 3, 3, 3]}),
    bn_case((13, 5), True, {"2": [6, 7], "4": [4, 3, 3, 3]}, far=True),
]

with open("test/fixtures/distributed.json", "w") as f:
    json.dump({"sinkhorn": sinkhorn, "batchNorm": batch_norm_cases}, f)
print("wrote test/fixtures/distributed.json:", len(sinkhorn), "sinkhorn cases,",
      len(batch_norm_cases), "batch norm cases")

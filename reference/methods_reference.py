#!/usr/bin/python3
"""Reference values for DeepCluster-v2 and SimCLR, computed in float64.

Run from the repository root with Debian's PyTorch:

    /usr/bin/python3 reference/methods_reference.py

Writes test/fixtures/methods.json. DeepCluster-v2: a float64 transcription, on
one process, of facebookresearch/swav main_deepclusterv2.py's init_memory (the
positional memory bank and its index, one forward per assignment crop), the
bank update of train() (crop c's rows emb[c*bs:(c+1)*bs]), cluster_memory
(per head h, k-means on bank h mod len(crops_for_assign): E step by the largest
dot product, M step the mean of the members with empty clusters kept, centroids
normalised, a final E step; targets -100 outside the bank) and the loss
(cross-entropy with ignore_index -100 of output[h] / T against the targets
repeated per crop, summed over heads and divided by their number). The random
starting rows are injected (given as sample ids) so that the test can start
from the same ones. SimCLR: solo-learn's multi-crop NT-Xent
(solo/losses/simclr.py) on unit-norm inputs, its value and its gradient.
"""
import json

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
g = torch.Generator().manual_seed(20261207)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def unit(n, d):
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def kmeans(bank, centroids, iters):
    """cluster_memory's loop for one head, on one process."""
    k = centroids.shape[0]
    for n_iter in range(iters + 1):
        assignments = (bank @ centroids.t()).max(dim=1)[1]
        if n_iter == iters:
            break
        counts = torch.zeros(k)
        sums = torch.zeros(k, bank.shape[1])
        for c in range(k):
            members = assignments == c
            if members.any():
                sums[c] = bank[members].sum(0)
                counts[c] = members.sum()
        mask = counts > 0
        centroids = centroids.clone()
        centroids[mask] = sums[mask] / counts[mask].unsqueeze(1)
        centroids = F.normalize(centroids, dim=1, p=2)
    return centroids, assignments


def cluster_memory(index, banks, size, heads, starts, iters):
    """Per head, k-means from the rows of the injected start ids; targets -100 outside the bank."""
    assignments = -100 * torch.ones(len(heads), size, dtype=torch.long)
    centroids_all = []
    j = 0
    for h, k in enumerate(heads):
        pos = [int((index == s).nonzero()[0][0]) for s in starts[h]]
        centroids, local = kmeans(banks[j], banks[j][pos].clone(), iters)
        centroids_all.append(centroids)
        assignments[h][index] = local
        j = (j + 1) % len(banks)
    return centroids_all, assignments


def dc_case(name, size, bs, nmb_crops, crops_for_assign, heads, dim, iters, empty_cluster):
    crops = sum(nmb_crops)
    batches = size // bs  # drop_last: the remainder is never in the bank
    order = torch.randperm(size, generator=g)
    # init_memory: one forward per assignment crop; a positional bank and its index
    init = [[unit(bs, dim) for _ in crops_for_assign] for _ in range(batches)]
    n = batches * bs
    index = torch.zeros(n, dtype=torch.long)
    banks = [torch.zeros(n, dim) for _ in crops_for_assign]
    for b in range(batches):
        idx = order[b * bs:(b + 1) * bs]
        index[b * bs:(b + 1) * bs] = idx
        for i, emb in enumerate(init[b]):
            banks[i][b * bs:(b + 1) * bs] = emb
    def starts_for(epoch, index):
        bank_ids = sorted(int(i) for i in index)
        gen = torch.Generator().manual_seed(epoch + 5)
        out = []
        for k in heads:
            ids = [bank_ids[int(p)] for p in torch.randperm(len(bank_ids), generator=gen)[:k]]
            if empty_cluster and k >= 2:
                ids[1] = ids[0]  # a duplicate start row: its cluster is empty from the first E step
            out.append(ids)
        return out

    starts0 = starts_for(0, index)
    cent0, targets0 = cluster_memory(index, banks, size, heads, starts0, iters)
    # one epoch of training in another order: train()'s bank update from all crops' embeddings
    order1 = torch.randperm(size, generator=g)
    steps = []
    index1 = torch.zeros(n, dtype=torch.long)
    for b in range(batches):
        idx = order1[b * bs:(b + 1) * bs]
        emb = unit(crops * bs, dim)
        steps.append({"indices": [int(i) for i in idx], "embeddings": flat(emb)})
        index1[b * bs:(b + 1) * bs] = idx
        for i, c in enumerate(crops_for_assign):
            banks[i][b * bs:(b + 1) * bs] = emb[c * bs:(c + 1) * bs]
    starts1 = starts_for(1, index1)
    cent1, targets1 = cluster_memory(index1, banks, size, heads, starts1, iters)

    # the loss of one batch against targets1, with a sample without target (a id outside the bank)
    missing = [i for i in range(size) if i not in set(int(x) for x in index1)]
    idx = torch.tensor([int(order1[0]), missing[0] if missing else int(order1[1])] + [int(x) for x in order1[2:bs]])
    z = unit(crops * bs, dim).requires_grad_(True)
    loss = 0
    for h in range(len(heads)):
        scores = z @ cent1[h].t() / 0.1
        t = targets1[h][idx].repeat(crops)
        loss = loss + F.cross_entropy(scores, t, ignore_index=-100)
    loss = loss / len(heads)
    loss.backward()
    return {
        "name": name,
        "size": size,
        "batchSize": bs,
        "nmbCrops": nmb_crops,
        "cropsForAssign": crops_for_assign,
        "heads": heads,
        "dim": dim,
        "iterations": iters,
        "init": [{"indices": [int(i) for i in order[b * bs:(b + 1) * bs]], "crops": [flat(e) for e in init[b]]}
                 for b in range(batches)],
        "starts0": starts0,
        "centroids0": [flat(c) for c in cent0],
        "targets0": [[int(v) for v in t] for t in targets0],
        "steps": steps,
        "starts1": starts1,
        "centroids1": [flat(c) for c in cent1],
        "targets1": [[int(v) for v in t] for t in targets1],
        "loss": {"indices": [int(i) for i in idx], "embeddings": flat(z), "value": float(loss),
                 "grad": flat(z.grad), "temperature": 0.1},
    }


def nt_xent(z, bs, temperature):
    """solo-learn's simclr_loss_func on one process, with the image index of each crop's row."""
    indexes = torch.arange(bs).repeat(z.shape[0] // bs).unsqueeze(0)
    sim = torch.exp(z @ z.t() / temperature)
    pos_mask = indexes.t() == indexes
    pos_mask.fill_diagonal_(0)
    neg_mask = indexes.t() != indexes
    pos = torch.sum(sim * pos_mask, 1)
    neg = torch.sum(sim * neg_mask, 1)
    return -(torch.mean(torch.log(pos / (pos + neg))))


def simclr_case(name, bs, crops, dim, temperature):
    z = unit(crops * bs, dim).requires_grad_(True)
    loss = nt_xent(z, bs, temperature)
    loss.backward()
    return {"name": name, "batchSize": bs, "crops": crops, "dim": dim, "temperature": temperature,
            "embeddings": flat(z), "value": float(loss), "grad": flat(z.grad)}


fixture = {
    "deepclusterv2": [
        dc_case("one assignment crop", 44, 8, [2], [0], [5, 5, 3], 6, 10, False),
        dc_case("two assignment crops, 2+2 crops, an empty cluster", 37, 6, [2, 2], [0, 1], [4, 6, 3], 5, 10, True),
    ],
    "simclr": [
        simclr_case("2 crops", 6, 2, 8, 0.1),
        simclr_case("2+4 crops", 5, 6, 8, 0.1),
        simclr_case("2 crops, temperature 0.5", 7, 2, 4, 0.5),
    ],
}
with open("test/fixtures/methods.json", "w") as f:
    json.dump(fixture, f)
print("wrote test/fixtures/methods.json")

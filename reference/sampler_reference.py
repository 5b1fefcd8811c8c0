"""Writes PyTorch DistributedSampler's shards (shuffle off, drop_last off) for test/sampler_test.ts.

shardOrder (data/loader.ts) applies the same padding and striding to an epoch's permutation; with
shuffle off the permutation is 0..n-1, which is what is compared here.

Run: /usr/bin/python3 reference/sampler_reference.py
"""
import json
import os

from torch.utils.data.distributed import DistributedSampler

out = os.path.join(os.path.dirname(__file__), "..", "test", "fixtures", "sampler.json")
cases = []
for n in [1, 3, 7, 10, 12, 13, 64]:
    for size in [1, 2, 3, 4, 5]:
        shards = [list(DistributedSampler(list(range(n)), num_replicas=size, rank=r, shuffle=False))
                  for r in range(size)]
        cases.append({"n": n, "size": size, "shards": shards})
with open(out, "w") as f:
    json.dump(cases, f)

"""PyTorch DDP reference for `deno task bench --stage step --procs N`: the data-parallel SwAV step.

    /usr/bin/python3 bench/torch_ddp_step.py [--procs 2] [--threads 1] [--reps 5] [--warmup 3]
        [--width 16] [--batch 64] [--crops 2x32] [--hidden 2048] [--out 128] [--prototypes 3000]

Starts `--procs` processes (torch.multiprocessing, gloo over 127.0.0.1), each with `--threads`
intra-op threads, each training the model of bench/torch_step.py (SwAV's ResNet-18 with the CIFAR
stem, projection head, prototypes) wrapped in DistributedDataParallel on its `--batch / --procs`
images. The step is main_swav.py's: normalise the prototypes, forward, codes by the reference's
`distributed_sinkhorn` (dist.all_reduce of the total and of the row sums, B = local batch x world
size), swapped loss, backward (DDP all-reduces and averages the gradients in buckets, overlapped with
the backward), LARC-SGD. Batch norm is plain, per process: PyTorch 1.13's SyncBatchNorm runs on CUDA
only. Every rank runs `--warmup` untimed steps then `--reps` timed ones (the same count on every rank:
collectives must match); rank 0 prints one JSON line: {"stage": "step", "ms" (median wall time of one
data-parallel step, each timed between barriers), "images_per_s" (global batch / s), "procs", ...}.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_step import LARC, SwavResNet18, swapped_loss  # noqa: E402


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["step"], default="step", help="only the whole step (as bench --stage step)")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="global batch, split evenly across the processes")
    p.add_argument("--crops", default="2x32")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--out", type=int, default=128)
    p.add_argument("--prototypes", type=int, default=3000)
    return p.parse_args()


@torch.no_grad()
def distributed_sinkhorn(out, epsilon=0.05, iterations=3):
    """main_swav.py's distributed_sinkhorn."""
    Q = torch.exp(out / epsilon).t()  # Q is K-by-B for consistency with notations from our paper
    B = Q.shape[1] * dist.get_world_size()  # number of samples to assign
    K = Q.shape[0]  # how many prototypes

    # make the matrix sums to 1
    sum_Q = torch.sum(Q)
    dist.all_reduce(sum_Q)
    Q /= sum_Q

    for it in range(iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        dist.all_reduce(sum_of_rows)
        Q /= sum_of_rows
        Q /= K

        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B

    Q *= B  # the colomns must sum to 1 so that Q is an assignment
    return Q.t()


def worker(rank, args, port, queue):
    torch.set_num_threads(args.threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=args.procs)
    crops_spec = [tuple(int(v) for v in part.split("x")) for part in args.crops.split("+")]
    nmb_crops = [n for n, _ in crops_spec]
    crops_for_assign = [c for c in [0, 1] if c < sum(nmb_crops)]
    bs = args.batch // args.procs
    torch.manual_seed(1)  # the same initial model on every rank (DDP broadcasts rank 0's anyway)
    model = SwavResNet18(args.width, args.hidden, args.out, args.prototypes)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own images
    inputs = [torch.randn(n * bs, 3, s, s, generator=generator) for n, s in crops_spec]
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-6)
    optimizer = LARC(sgd, trust_coefficient=0.001, clip=False)

    def step():
        with torch.no_grad():
            w = model.prototypes.weight.data.clone()
            w = F.normalize(w, dim=1, p=2)
            model.prototypes.weight.copy_(w)
        ddp.zero_grad(set_to_none=True)
        _, scores = ddp(inputs)
        with torch.no_grad():
            codes = [distributed_sinkhorn(scores[bs * c : bs * (c + 1)].detach()) for c in crops_for_assign]
        loss = swapped_loss(scores, codes, bs, nmb_crops, crops_for_assign)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"rank {rank}: loss {loss.item()}")

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        times.append((time.perf_counter() - t0) * 1000)
    if rank == 0:
        ms = statistics.median(times)
        queue.put({
            "stage": "step", "ms": round(ms, 3), "images_per_s": round(args.batch / (ms / 1000), 2),
            "procs": args.procs, "threads": args.threads, "reps": args.reps, "batch": args.batch,
            "width": args.width, "crops": args.crops, "prototypes": args.prototypes, "backend": "torch-ddp",
            "sync_bn": False, "torch": torch.__version__,
        })
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    args = parse()
    if args.batch % args.procs != 0:
        sys.exit(f"--batch {args.batch} is not a multiple of --procs {args.procs}")
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args, free_port(), queue), nprocs=args.procs, join=True)
    print(json.dumps(queue.get()), flush=True)


if __name__ == "__main__":
    main()

/**
 * What synchronised batch norm costs over per-rank batch norm, per training
 * step, on the batch-norm calls of the benchmark model (ResNet-18 cifar stem,
 * width 16: 20 backbone calls on 2x32 crops, the head's on [2·bs, 2048]).
 * Run under mpiexec:
 *
 *   mpiexec -n 2 -bind-to none $(ls -d node_modules/.deno/deno@*\/node_modules/deno/deno | head -1) \
 *     run -A bench/sync_batch_norm_bench.ts [--batch 64] [--rounds 5] [--reps 5]
 *
 * `--batch` is the global batch (each rank holds batch / size images, two crops each). Every round
 * times forward + backward of all the calls with and without synchronisation, alternated, on the
 * oneDNN path and the tensor-op path; rank 0 prints one JSON line per path with the median ms of each,
 * their ratio (a side-by-side ratio, meaningful on a busy machine where absolute times are not), the
 * collectives per pass and the median ms spent inside them (waiting for the other ranks included:
 * on an oversubscribed machine each one waits for every rank to be scheduled), so that the compute
 * the synchronisation adds is the rest.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import { batchNormTrain } from "../backend/batch_norm.ts";
import { type Communicator, CommunicatorService } from "../backend/communicator.ts";
import { loadDnnl } from "../backend/onednn.ts";
import { initBackend, withKernelSettings } from "../backend/tensor_backend.ts";

const arg = (name: string, fallback: number): number => {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Number(Deno.args[i + 1]) : fallback;
};

const main = async (world: Communicator): Promise<void> => {
  // Counts the collectives and the time inside them. The kernels call the installed communicator,
  // this very object, so wrapping its method here sees all of them (a measurement, not library code).
  let collectives = 0;
  let collectiveMs = 0;
  const allReduce = world.allReduce;
  (world as { allReduce: Communicator["allReduce"] }).allReduce = (data, op) => {
    const start = performance.now();
    allReduce(data, op);
    collectiveMs += performance.now() - start;
    collectives++;
  };
  const batch = arg("--batch", 64);
  const rounds = arg("--rounds", 5);
  const reps = arg("--reps", 5);
  const images = 2 * (batch / world.size);

  /** The benchmark model's batch-norm inputs on one rank: [shape, calls]. */
  const layers: [number[], number][] = [
    [[images, 32, 32, 16], 5],
    [[images, 16, 16, 32], 5],
    [[images, 8, 8, 64], 5],
    [[images, 4, 4, 128], 5],
    [[images, 2048], 1],
  ];

  await initBackend("wasm");
  const inputs = layers.map(([shape]) => {
    const c = shape[shape.length - 1]!;
    return {
      x: tf.randomNormal(shape),
      dy: tf.randomNormal(shape),
      gamma: tf.ones([c]) as tf.Tensor1D,
      beta: tf.zeros([c]) as tf.Tensor1D,
    };
  });

  /** Forward + backward of every call once: milliseconds, collectives and ms inside them. */
  const pass = () => {
    world.barrier();
    collectives = 0;
    collectiveMs = 0;
    const start = performance.now();
    for (const [i, [, calls]] of layers.entries()) {
      const { x, dy, gamma, beta } = inputs[i]!;
      for (let c = 0; c < calls; c++) {
        tf.dispose(
          tf.grads((xi, gi, bi) =>
            tf.sum(
              tf.mul(batchNormTrain(xi!, gi as tf.Tensor1D, bi as tf.Tensor1D, 1e-5, { relu: true }).y, dy),
            )
          )([x, gamma, beta]),
        );
      }
    }
    const ms = performance.now() - start;
    world.barrier();
    return { ms, collectives, collectiveMs };
  };

  const median = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)]!;
  for (const path of loadDnnl() === undefined ? ["tensor ops"] : ["oneDNN", "tensor ops"]) {
    const times: Record<"sync" | "local", number[]> = { sync: [], local: [] };
    const inside: number[] = [];
    let count = 0;
    for (let r = 0; r < rounds; r++) {
      for (const sync of r % 2 === 0 ? [true, false] : [false, true]) {
        await withKernelSettings({ nativeBatchNorm: path === "oneDNN", syncBatchNorm: sync }, () => {
          pass(); // warm-up (plans, first allocations)
          for (let i = 0; i < reps; i++) {
            const p = pass();
            times[sync ? "sync" : "local"].push(p.ms);
            if (sync) {
              inside.push(p.collectiveMs);
              count = p.collectives;
            }
          }
          return Promise.resolve();
        });
      }
    }
    if (world.rank === 0) {
      const sync = median(times.sync);
      const local = median(times.local);
      console.log(JSON.stringify({
        path,
        procs: world.size,
        batch,
        syncMs: Math.round(sync * 10) / 10,
        localMs: Math.round(local * 10) / 10,
        ratio: Math.round((sync / local) * 100) / 100,
        collectives: count,
        collectiveMs: Math.round(median(inside) * 10) / 10,
      }));
    }
  }
};

// The communicator stays installed (for the kernels) while main runs.
await Effect.runPromise(
  Effect.gen(function* () {
    const world = yield* CommunicatorService;
    yield* Effect.promise(() => main(world));
    world.barrier();
  }).pipe(Effect.provide(CommunicatorService.auto)),
);
Deno.exit(0);

/**
 * What a pretraining run writes into its folder besides metrics: the run's
 * records at the start (config, seed, environment) and its checkpoints (queue
 * and memory bank gathered over the ranks, rank 0 writing, old ones pruned).
 */
import { Effect } from "effect";
import type { Communicator } from "../backend/communicator.ts";
import type { RunConfig } from "../config/config.ts";
import { serialise as serialiseQueue } from "../state/queue.ts";
import {
  assembleCheckpoint,
  pruneCheckpoints,
  type RunPosition,
  type RunState,
  writeCheckpoint,
} from "./checkpoint.ts";
import { gatherQueue } from "./data_parallel.ts";
import { mergedBank } from "./data_parallel_methods.ts";
import { environmentReport } from "./environment.ts";
import { type RunFolder, writeJsonFile } from "./run_folder.ts";

/**
 * The run's records, written once the folder is ours: the resolved config, the
 * seed, and the machine it runs on (the `doctor --json` report).
 */
export const writeRunRecords = (folder: RunFolder, config: RunConfig, backend: string) =>
  Effect.gen(function* () {
    yield* writeJsonFile(folder, "config.json", config);
    yield* writeJsonFile(folder, "seed.json", { seed: config.train.seed });
    const report = yield* environmentReport({ webgpu: backend === "webgpu" });
    yield* writeJsonFile(folder, "environment.json", {
      ...report,
      precision: { ...report.precision, run: config.train.precision },
    });
  });

/**
 * Writes the run's checkpoint at a position with the owner's temp name, then
 * prunes old ones; its path. With several ranks every rank calls it (the
 * queues are gathered) and rank 0, the folder's owner, writes.
 */
export const checkpointWriter = (
  folder: RunFolder | undefined,
  keep: number,
  run: () => RunState,
  comm: Communicator,
) =>
(position: RunPosition) =>
  Effect.gen(function* () {
    const state = run();
    const savedQueue = comm.size > 1 && state.queue !== undefined
      ? gatherQueue(yield* serialiseQueue(state.queue), comm)
      : undefined;
    // DeepCluster-v2's bank as one process holds it (each rank has its shard's rows).
    const memoryBank = state.memoryBank === undefined ? undefined : mergedBank(state.memoryBank, comm);
    if (folder === undefined) return undefined;
    const checkpoint = yield* assembleCheckpoint(position, { ...state, savedQueue, memoryBank });
    const path = yield* writeCheckpoint(folder.path, checkpoint, folder.tempPathFor);
    yield* pruneCheckpoints(folder.path, keep);
    return path;
  });

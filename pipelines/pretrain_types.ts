/**
 * What a pretraining run reports and returns: its metrics lines, epoch reports,
 * callbacks and result, and the error for an epoch that gave no batch.
 */
import { Schema } from "effect";

/** One line of `metrics.jsonl`. */
export interface StepMetrics {
  /** The epoch (1-based). */
  readonly epoch: number;
  /** Optimiser steps taken, this one included. */
  readonly step: number;
  /** The step's loss. */
  readonly loss: number;
  /** The learning rate the step used. */
  readonly lr: number;
  /** Training throughput over the step. */
  readonly images_per_s: number;
  /** What the method has: SwAV the codes' entropy and prototypes in use, DeepCluster-v2 prototypes in use. */
  readonly code_entropy?: number;
  /** Distinct prototypes that are some sample's code's argmax or target in the batch. */
  readonly prototypes_in_use?: number;
  /** SimCLR's collapse signal (pipelines/simclr.ts). */
  readonly embedding_std?: number;
}

/** What an epoch of pretraining reports: its mean loss, the kNN check and the online probe when they run, and its duration. */
export interface EpochReport {
  /** The epoch (1-based). */
  readonly epoch: number;
  /** The mean of the epoch's step losses. */
  readonly meanLoss: number;
  /** kNN top-1 on the labelled test split (train.knnEvery). */
  readonly knnTop1?: number;
  /** Test top-1 of the online probe (train.onlineProbe), when it runs. */
  readonly onlineProbeTop1?: number;
  /** The epoch's wall-clock time (DeepCluster-v2's fill and k-means included). */
  readonly seconds: number;
  /** DeepCluster-v2: seconds of the memory bank's first fill at this epoch's start (0 after the first). */
  readonly fillSeconds?: number;
  /** DeepCluster-v2: seconds of this epoch's k-means (0 at a resumed epoch's start). */
  readonly kmeansSeconds?: number;
}

/** Callbacks of a pretraining run: after each step and epoch, and for warnings and information lines. */
export interface PretrainHooks {
  /** After every step. */
  readonly onStep?: (
    metrics: StepMetrics,
    progress: { stepInEpoch: number; stepsPerEpoch: number; totalSteps: number },
  ) => void;
  /** After every epoch. */
  readonly onEpoch?: (report: EpochReport) => void;
  /** A warning (skipped samples, signs of collapse, --resume without a checkpoint). */
  readonly onWarning?: (message: string) => void;
  /** An information line (the precision, the queue created, the checkpoint resumed from). */
  readonly onInfo?: (message: string) => void;
}

/** What a pretraining run returns: how far it got, its last loss, the epochs' reports and where it wrote. */
export interface PretrainResult {
  /** Optimiser steps taken in total. */
  readonly steps: number;
  /** Epochs completed. */
  readonly epochs: number;
  /** The last step's loss. */
  readonly lastLoss: number;
  /** Every epoch's report. */
  readonly epochReports: readonly EpochReport[];
  /** The run folder (train.out). */
  readonly runFolder: string;
  /** The last checkpoint written, if any. */
  readonly checkpoint: string | undefined;
  /** Samples skipped as undecodable (data.onError: skip). */
  readonly skippedSamples: number;
}

/** An epoch gave no batch at all: nothing was trained, no checkpoint written. */
export class NoTrainingBatch extends Schema.TaggedError<NoTrainingBatch>()("NoTrainingBatch", {
  epoch: Schema.Number,
  batchSize: Schema.Number,
  samples: Schema.Number,
  skipped: Schema.Number,
}) {
  /** The epoch, why it gave no batch, and what to do. */
  override get message(): string {
    return `epoch ${this.epoch} gave no batch of ${this.batchSize}: ${this.skipped} of the ${this.samples} ` +
      "samples were unreadable (listed in the run folder's skipped.jsonl), so nothing was trained and no " +
      "checkpoint written: fix or remove the unreadable files, or lower train.batchSize";
  }
}

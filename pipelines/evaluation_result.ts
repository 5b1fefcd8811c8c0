/**
 * What an evaluation returns (kNN, the linear protocols, semi-supervised
 * fine-tuning) with the sources it ran on, and its `eval --json` record.
 */
import type { ImageEvaluation, Pooling } from "./linear_eval.ts";
import type { ProbeEpoch } from "./linear_probe.ts";

/** Linear evaluation on augmented images through the frozen backbone (`paper`, eval_linear.py) or a fast probe on precomputed features (`features`). */
export type LinearProtocol = "paper" | "features";

/** The result of a kNN evaluation. */
export interface KnnEvaluation {
  /** "knn". */
  readonly method: "knn";
  /** Shorter side of the test-time resize (undefined: none). */
  readonly resize: number | undefined;
  /** Top-1 accuracy, a fraction in [0, 1]. */
  readonly top1: number;
  /** Top-5 accuracy, a fraction in [0, 1]. */
  readonly top5: number;
  /** Neighbours that voted. */
  readonly k: number;
  /** Vote temperature. */
  readonly temperature: number;
  /** Top-1 accuracy of each class. */
  readonly perClassAccuracy: number[];
  /** confusion[truth][predicted] counts over the test set. */
  readonly confusion: number[][];
  /** Class names, label i is classes[i]. */
  readonly classes: readonly string[];
  /** Training images used. */
  readonly trainSamples: number;
  /** Test images scored. */
  readonly testSamples: number;
  /** The checkpoint file or export folder evaluated. */
  readonly checkpoint: string;
  /** Optimiser steps of the checkpoint (undefined for an exported encoder). */
  readonly step: number | undefined;
}

/** The result of a linear evaluation, with its per-epoch history. */
export interface LinearEvaluation {
  /** "linear". */
  readonly method: "linear";
  /** The protocol that ran. */
  readonly protocol: LinearProtocol;
  /** Paper protocol only: RegLog's pooling and BatchNorm. */
  readonly pooling: Pooling | undefined;
  /** Paper protocol only: whether BatchNorm preceded the linear layer. */
  readonly batchNorm: boolean | undefined;
  /** Shorter side of the test-time resize (undefined: none). */
  readonly resize: number | undefined;
  /** Best epoch's top-1 (and its top-5), as the reference reports. */
  readonly top1: number;
  /** Top-5 accuracy, a fraction in [0, 1]. */
  readonly top5: number;
  /** The last epoch's top-1. */
  readonly lastTop1: number;
  /** The last epoch's top-5. */
  readonly lastTop5: number;
  /** The epoch (1-based) whose top-1 is reported. */
  readonly bestEpoch: number;
  /** Training epochs of the classifier. */
  readonly epochs: number;
  /** Top-1 accuracy of each class. */
  readonly perClassAccuracy: number[];
  /** confusion[truth][predicted] counts over the test set. */
  readonly confusion: number[][];
  /** Every epoch's learning rate, loss and accuracies. */
  readonly history: readonly ProbeEpoch[];
  /** Class names, label i is classes[i]. */
  readonly classes: readonly string[];
  /** Training images used. */
  readonly trainSamples: number;
  /** Test images scored. */
  readonly testSamples: number;
  /** The checkpoint file or export folder evaluated. */
  readonly checkpoint: string;
  /** Optimiser steps of the checkpoint (undefined for an exported encoder). */
  readonly step: number | undefined;
}

/** The result of semi-supervised fine-tuning on a label subset. */
export interface SemisupEvaluation extends ImageEvaluation {
  /** "semisup". */
  readonly method: "semisup";
  /** The `--labels` given (`1%`, `10%` or the file). */
  readonly labels: string;
  /** Labelled training images used. */
  readonly subsetSamples: number;
  /** Training epochs of the classifier. */
  readonly epochs: number;
  /** Shorter side of the test-time resize (undefined: none). */
  readonly resize: number | undefined;
  /** Class names, label i is classes[i]. */
  readonly classes: readonly string[];
  /** Training images used. */
  readonly trainSamples: number;
  /** Test images scored. */
  readonly testSamples: number;
  /** The checkpoint file or export folder evaluated. */
  readonly checkpoint: string;
  /** Optimiser steps of the checkpoint (undefined for an exported encoder). */
  readonly step: number | undefined;
}

/** The sources an evaluation used, and whether they are the run's own splits (not given by --train/--test). */
export interface EvaluatedSources {
  /** The training SOURCE spec used. */
  readonly trainSource: string;
  /** The test SOURCE spec used. */
  readonly testSource: string;
  /** Whether both are the run's own splits (not given by --train / --test). */
  readonly ownSplits: boolean;
}

/** What `evaluate` returns: the method's result and the sources it used. */
export type Evaluation = (KnnEvaluation | LinearEvaluation | SemisupEvaluation) & EvaluatedSources;

/** The `--json` line: snake_case keys, accuracies as fractions in [0, 1]. */
export const evaluationJson = (result: Evaluation): Record<string, unknown> => {
  const common = {
    top1: result.top1,
    top5: result.top5,
    per_class_accuracy: result.perClassAccuracy,
    confusion: result.confusion,
    classes: result.classes,
    train_samples: result.trainSamples,
    test_samples: result.testSamples,
    checkpoint: result.checkpoint,
    step: result.step ?? null,
    train_source: result.trainSource,
    test_source: result.testSource,
    own_splits: result.ownSplits,
  };
  if (result.method === "knn") {
    return {
      method: "knn",
      ...common,
      k: result.k,
      temperature: result.temperature,
      resize: result.resize ?? null,
    };
  }
  const trained = {
    last_top1: result.lastTop1,
    last_top5: result.lastTop5,
    best_epoch: result.bestEpoch,
    epochs: result.epochs,
    resize: result.resize ?? null,
    history: result.history,
  };
  return result.method === "linear"
    ? {
      method: "linear",
      protocol: result.protocol,
      ...common,
      ...trained,
      ...(result.protocol === "paper" ? { pooling: result.pooling, batch_norm: result.batchNorm } : {}),
    }
    : {
      method: "semisup",
      labels: result.labels,
      subset_samples: result.subsetSamples,
      ...common,
      ...trained,
    };
};

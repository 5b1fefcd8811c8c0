/**
 * What evaluation fails with: `EvaluationError` (it cannot run as asked), and the unions of tagged
 * errors that `loadForEvaluation` and `evaluate` can fail with, so callers can switch on `_tag`.
 */
import { Schema } from "effect";
import type { DecodeError } from "../data/image_codec.ts";
import type { LoaderError } from "../data/loader.ts";
import type { SourceError } from "../data/sources.ts";
import type { TorchCheckpointError } from "../data/torch_checkpoint.ts";
import type { ModelWeightsError } from "../models/model.ts";
import type { TorchWeightsError } from "../models/torch_names.ts";
import type { CheckpointError } from "./checkpoint_format.ts";
import type { EncoderError } from "./export.ts";
import type { EvaluationInputError } from "./knn.ts";

/** Evaluation cannot run as asked: wrong data, wrong checkpoint, nothing to compare. */
export class EvaluationError extends Schema.TaggedError<EvaluationError>()("EvaluationError", {
  message: Schema.String,
}) {}

/**
 * How `loadForEvaluation` fails: no checkpoint, run folder, export or torch file that reads and verifies at
 * the path (CheckpointError, EncoderError, TorchCheckpointError), or weights that do not fit the model
 * (ModelWeightsError, TorchWeightsError, EvaluationError).
 */
export type LoadForEvaluationError =
  | CheckpointError
  | EncoderError
  | TorchCheckpointError
  | TorchWeightsError
  | ModelWeightsError
  | EvaluationError;

/**
 * How `evaluate` fails: the checkpoint does not load (LoadForEvaluationError), a SOURCE does not open
 * (SourceError), its images cannot be read (LoaderError, DecodeError), or the evaluation cannot run as
 * asked (EvaluationError, EvaluationInputError).
 */
export type EvaluateError =
  | LoadForEvaluationError
  | SourceError
  | LoaderError
  | DecodeError
  | EvaluationInputError;

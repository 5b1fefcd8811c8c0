/**
 * swav-ts: SwAV self-supervised image representation learning (Caron et al. 2020)
 * on Deno with TensorFlow.js and Effect.
 *
 * The public API: stages, pipelines, the backend service and resource helpers.
 * @module
 */

// Backend and resources
export {
  BackendName,
  BackendUnavailable,
  initBackend,
  probeWebGpu,
  TensorBackend,
} from "./backend/tensor_backend.ts";
export { disposeAll, liveTensors, scoped, scopedPromise, type TensorContainer } from "./backend/resources.ts";

// Stage abstraction
export { andThen, ConfigError, configure, defineStage, type Stage } from "./stages/stage.ts";

// Randomness keyed by (seed, epoch, sample index)
export { type Rng, rngFor, rngFromState } from "./data/rng.ts";

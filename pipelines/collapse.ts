/**
 * The collapse check: a warning, once per epoch, when training looks collapsed
 * (the loss stuck near ln K, or few prototypes in use) after the prototypes
 * have been free for a while. A pure function of one step's numbers.
 */

/** What the check needs from the run config. */
export interface CollapseSettings {
  /** K, the number of prototypes. */
  readonly prototypes: number;
  readonly freezePrototypesIters: number;
}

/** The warning for step `step` (1-based, after the update), or undefined when training looks healthy. */
export const collapseWarning = (
  step: number,
  loss: number,
  prototypesInUse: number,
  settings: CollapseSettings,
): string | undefined => {
  if (step <= settings.freezePrototypesIters + 20) return undefined;
  const logK = Math.log(settings.prototypes);
  const stuck = Math.abs(loss - logK) < 0.02 * logK;
  const few = prototypesInUse <= Math.max(1, Math.min(4, settings.prototypes / 20));
  if (!stuck && !few) return undefined;
  return `training looks collapsed at step ${step}: ` +
    (stuck ? `loss ${loss.toFixed(3)} is stuck near ln K = ${logK.toFixed(3)}` : "") +
    (stuck && few ? "; " : "") +
    (few ? `only ${prototypesInUse} prototypes in use` : "") +
    ". Remedies (SwAV reference notes): fewer prototypes (about 10x the classes), " +
    "start the queue later (swav.queueStartEpoch) or not at all, a smaller swav.epsilon, a larger batch.";
};

/**
 * SimCLR's collapse check (it has no prototypes): the unit-norm embeddings' spread, the mean over
 * dimensions of the batch's standard deviation (`embeddingStd`), about 1/√D when they spread over the
 * sphere; a warning when it falls under a tenth of that after the first 20 steps.
 */
export const embeddingCollapseWarning = (
  step: number,
  embeddingStd: number,
  dim: number,
): string | undefined => {
  const spread = 1 / Math.sqrt(dim);
  if (step <= 20 || embeddingStd >= 0.1 * spread) return undefined;
  return `training looks collapsed at step ${step}: the embeddings' spread ${
    embeddingStd.toExponential(2)
  } is ` +
    `under a tenth of 1/√D = ${
      spread.toFixed(3)
    } (every image maps to nearly one point). Remedies: a lower ` +
    "optim.baseLr, a larger batch (more negatives), a larger simclr.temperature.";
};

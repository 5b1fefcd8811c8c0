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

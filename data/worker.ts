/**
 * Entry point of a data worker (started by `data/loader.ts`): decodes a raw
 * sample and runs the prepare function on it, keyed by (seed, epoch, index),
 * and posts the view buffers back, transferred. Messages follow `WorkerRequest`
 * / `WorkerResponse`; a decode failure is reported as `decode` (subject to the
 * skip/fail policy), anything else as `fatal`.
 */
/// <reference lib="deno.worker" />
import { decodeImagePromise, type JpegDecoder } from "../stages/decode.ts";
import { asViews, importPrepare, type PrepareFn, type PrepareRef, transferable } from "./loader.ts";
import type { WorkerRequest, WorkerResponse } from "./loader.ts";
import { rngFor } from "./rng.ts";

let prepare: PrepareRef | undefined;
let loaded: Promise<PrepareFn> | undefined;
let jpeg: JpegDecoder = "auto";

const reasonOf = (cause: unknown) => cause instanceof Error ? cause.message : String(cause);
const reply = (message: WorkerResponse, transfer: ArrayBuffer[] = []) => self.postMessage(message, transfer);

self.onmessage = async (event: MessageEvent<WorkerRequest>) => {
  const message = event.data;
  if (message.type === "init") {
    prepare = message.prepare;
    jpeg = message.jpeg;
    loaded = importPrepare(prepare);
    loaded.catch(() => {}); // reported per task below
    return;
  }
  const { id, seed, epoch, index, raw } = message;
  let fn: PrepareFn;
  try {
    if (!loaded || !prepare) throw new Error("worker was not initialised");
    fn = await loaded;
  } catch (cause) {
    return reply({
      type: "error",
      id,
      kind: "fatal",
      path: raw.path,
      reason: `cannot load prepare: ${reasonOf(cause)}`,
    });
  }
  let image;
  try {
    image = raw.kind === "encoded" ? await decodeImagePromise(raw.bytes, { jpeg }) : raw.image;
  } catch (cause) {
    return reply({ type: "error", id, kind: "decode", path: raw.path, reason: reasonOf(cause) });
  }
  try {
    const views = asViews(fn(image, prepare.config, rngFor(seed, epoch, index)));
    reply({ type: "done", id, views }, views.flatMap(transferable));
  } catch (cause) {
    reply({ type: "error", id, kind: "fatal", path: raw.path, reason: `prepare failed: ${reasonOf(cause)}` });
  }
};

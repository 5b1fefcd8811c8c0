/**
 * Entry point of a data worker (started by `data/loader.ts`): decodes a raw
 * sample and runs the prepare function on it, keyed by (seed, epoch, index),
 * and posts the view buffers back, transferred. Messages follow `WorkerRequest`
 * / `WorkerResponse`; a decode failure is reported as `decode` (subject to the
 * skip/fail policy), anything else as `fatal`.
 */
/// <reference lib="deno.worker" />
import { decodeImageResult, type JpegDecoder, type RgbImage } from "./image_codec.ts";
import { reasonOf } from "./errors.ts";
import { Result } from "effect";
import { asViews, importPrepareOnce, type PrepareFn, type PrepareRef, transferable } from "./loader.ts";
import type { WorkerRequest, WorkerResponse } from "./loader.ts";
import { rngFor } from "./rng.ts";

let prepare: PrepareRef | undefined;
let loaded: ReturnType<typeof importPrepareOnce> | undefined;
let jpeg: JpegDecoder = "auto";

const reply = (message: WorkerResponse, transfer: ArrayBuffer[] = []) => self.postMessage(message, transfer);

self.onmessage = async (event: MessageEvent<WorkerRequest>) => {
  const message = event.data;
  if (message.type === "init") {
    prepare = message.prepare;
    jpeg = message.jpeg;
    loaded = importPrepareOnce(prepare); // a failure is reported per task below
    return;
  }
  const { id, seed, epoch, index, raw } = message;
  const fatal = (reason: string) => reply({ type: "error", id, kind: "fatal", path: raw.path, reason });
  if (!loaded || !prepare) return fatal("cannot load prepare: worker was not initialised");
  const imported = await loaded;
  if (Result.isFailure(imported)) return fatal(imported.failure.reason);
  const fn: PrepareFn = imported.success;
  let image: RgbImage;
  if (raw.kind === "encoded") {
    const decoded = await decodeImageResult(raw.bytes, { jpeg });
    if ("reason" in decoded) {
      return reply({ type: "error", id, kind: "decode", path: raw.path, reason: decoded.reason });
    }
    image = decoded.image;
  } else image = raw.image;
  try {
    const views = asViews(fn(image, prepare.config, rngFor(seed, epoch, index)));
    reply({ type: "done", id, views }, views.flatMap(transferable));
  } catch (cause) {
    fatal(`prepare failed: ${reasonOf(cause)}`);
  }
};

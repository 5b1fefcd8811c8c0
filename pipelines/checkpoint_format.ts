/**
 * The checkpoint file format (version 1), little-endian:
 *
 *   bytes 0..7    magic "SWAVCKPT"
 *   bytes 8..11   uint32 format version (1)
 *   bytes 12..15  uint32 header length H
 *   bytes 16..    H bytes of UTF-8 JSON header:
 *                 { version, step, epoch, batchInEpoch, config, extra, checksum,
 *                   tensors: [{ name, shape, dtype, offset, length }] }
 *   then          the tensor payload: each tensor's float32 (or int32) values, 4-byte aligned,
 *                 at `offset` bytes from the payload start, `length` elements long.
 *
 * Tensor names: model variables by their model name (`backbone.layer1.0.conv1.weight`, ...),
 * optimiser slots as `optimiser/<variable name>`, queue as `queue/<crop index>`. Decoding
 * validates the header (a Schema), the layout against the bytes, and the payload checksum.
 */
import { createHash } from "node:crypto";
import { Effect, Schema, SchemaIssue } from "effect";
import { NonNegativeInt } from "../models/schema.ts";

export const checkpointFormatVersion = 1;
const magic = new TextEncoder().encode("SWAVCKPT");

import type { NamedArray } from "../models/model.ts";
export type { NamedArray };

/** The content of a checkpoint. */
export interface Checkpoint {
  /** Optimiser steps taken (the next step's index). */
  readonly step: number;
  /** The epoch to continue with, and how many batches of it are already done. */
  readonly epoch: number;
  /** Batches of that epoch already done. */
  readonly batchInEpoch: number;
  /** The resolved config of the run (JSON). */
  readonly config: unknown;
  /** Anything else small and JSON-able (RNG seed and counters, metrics so far). */
  readonly extra: Record<string, unknown>;
  /** Model weights, optimiser slots, the queue: every array by name. */
  readonly arrays: readonly NamedArray[];
}

/** A checkpoint that cannot be written, read or verified; `path` names it, `reason` says why. */
export class CheckpointError extends Schema.TaggedError<CheckpointError>()("CheckpointError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  /** The file and the reason, on one line. */
  override get message(): string {
    return `checkpoint ${this.path}: ${this.reason}`;
  }
}

interface HeaderEntry {
  name: string;
  shape: number[];
  dtype: "float32" | "int32";
  offset: number;
  length: number;
}

/** The payload checksum the header carries from now on (version-1 files written before it have none). */
const checksumAlgorithm = "sha256";
const payloadChecksum = (payload: Uint8Array): string =>
  createHash(checksumAlgorithm).update(payload).digest("hex");

/** Serialises a checkpoint to bytes. */
export const encodeCheckpoint = (checkpoint: Checkpoint): Uint8Array => {
  let offset = 0;
  const entries: HeaderEntry[] = checkpoint.arrays.map((array) => {
    const entry: HeaderEntry = {
      name: array.name,
      shape: [...array.shape],
      dtype: array.values instanceof Int32Array ? "int32" : "float32",
      offset,
      length: array.values.length,
    };
    offset += array.values.length * 4;
    return entry;
  });
  // The payload is the arrays back to back (offsets above), so its checksum is theirs in order.
  const hash = createHash(checksumAlgorithm);
  const views = checkpoint.arrays.map((array) =>
    new Uint8Array(array.values.buffer, array.values.byteOffset, array.values.byteLength)
  );
  for (const part of views) hash.update(part);
  const header = new TextEncoder().encode(JSON.stringify({
    version: checkpointFormatVersion,
    step: checkpoint.step,
    epoch: checkpoint.epoch,
    batchInEpoch: checkpoint.batchInEpoch,
    config: checkpoint.config,
    extra: checkpoint.extra,
    tensors: entries,
    checksum: { algorithm: checksumAlgorithm, payload: hash.digest("hex") },
  }));
  // Pad the header so the payload starts 4-byte aligned (typed-array views need it).
  const headerLength = Math.ceil(header.length / 4) * 4;
  const payloadStart = 16 + headerLength;
  const bytes = new Uint8Array(payloadStart + offset);
  bytes.set(magic, 0);
  const view = new DataView(bytes.buffer);
  view.setUint32(8, checkpointFormatVersion, true);
  view.setUint32(12, headerLength, true);
  bytes.fill(0x20, 16, payloadStart); // spaces: valid trailing JSON whitespace
  bytes.set(header, 16);
  views.forEach((part, i) => bytes.set(part, payloadStart + entries[i]!.offset));
  return bytes;
};

/** The header JSON of format version 1; `checksum` is absent in files written before it existed. */
const CheckpointHeader = Schema.Struct({
  version: Schema.optionalKey(Schema.Literal(checkpointFormatVersion)),
  step: NonNegativeInt,
  epoch: NonNegativeInt,
  batchInEpoch: Schema.optionalKey(NonNegativeInt),
  config: Schema.Unknown,
  extra: Schema.optionalKey(Schema.Record(Schema.String, Schema.Unknown)),
  tensors: Schema.Array(Schema.Struct({
    name: Schema.String.check(Schema.isNonEmpty()),
    shape: Schema.Array(NonNegativeInt),
    dtype: Schema.Literals(["float32", "int32"]),
    offset: NonNegativeInt,
    length: NonNegativeInt,
  })),
  checksum: Schema.optionalKey(Schema.Struct({
    algorithm: Schema.Literal(checksumAlgorithm),
    payload: Schema.String.check(Schema.isPattern(/^[0-9a-f]{64}$/)),
  })),
});
type CheckpointHeader = typeof CheckpointHeader.Type;

/** The largest checkpoint file read (a model, its optimiser slots and queue fit the 4 GiB wasm heap twice). */
export const maxCheckpointBytes = 8 * 2 ** 30;

/** What the caller is told about a checkpoint that loads but is not fully verified (an older file). */
export interface ReadOptions {
  readonly onWarning?: ((message: string) => void) | undefined;
}

export const readWarning = (options: ReadOptions | undefined, message: string): Effect.Effect<void> =>
  options?.onWarning === undefined
    ? Effect.logWarning(message)
    : Effect.sync(() => options.onWarning!(message));

/**
 * Checks the tensor table against the payload: every tensor 4-byte aligned,
 * inside the file, as long as its shape says, none overlapping another, names
 * unique. Returns the problem, or undefined.
 */
const layoutProblem = (tensors: CheckpointHeader["tensors"], payloadLength: number): string | undefined => {
  const names = new Set<string>();
  for (const entry of tensors) {
    if (names.has(entry.name)) return `tensor ${entry.name} appears twice`;
    names.add(entry.name);
    const count = entry.shape.reduce((a, b) => a * b, 1);
    if (count !== entry.length) {
      return `tensor ${entry.name} has length ${entry.length}, its shape [${entry.shape}] holds ${count}`;
    }
    if (entry.offset % 4 !== 0) return `tensor ${entry.name} has offset ${entry.offset}, not 4-byte aligned`;
    if (entry.offset + entry.length * 4 > payloadLength) return `truncated payload for ${entry.name}`;
  }
  const sorted = [...tensors].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const before = sorted[i - 1]!;
    if (before.offset + before.length * 4 > sorted[i]!.offset) {
      return `tensors ${before.name} and ${sorted[i]!.name} overlap`;
    }
  }
  return undefined;
};

const issueFormatter = SchemaIssue.makeFormatterStandardSchemaV1();

/**
 * The header's schema issues on one line, each as `field path: problem`
 * (`tensors[2].name: Expected a value with a length of at least 1`): the
 * schema's own message puts each path on a line of its own, and a checkpoint
 * error is one line in the run's log and on the command line.
 */
const headerIssues = (issue: SchemaIssue.Issue): string =>
  issueFormatter(issue).issues.map(({ message, path }) => {
    const keys = (path ?? []).map((key) => typeof key === "object" ? key.key : key);
    const field = keys.map((key, i) =>
      typeof key === "number" ? `[${key}]` : i === 0 ? String(key) : `.${String(key)}`
    )
      .join("");
    return `${field === "" ? "" : `${field}: `}${message.replace(/\s*\n\s*/g, " ")}`;
  }).join("; ");

/**
 * Parses checkpoint bytes; `path` only names the file in errors. The header is
 * validated by its schema and the tensor table against the payload before any
 * tensor is copied out; the payload checksum is checked where the file has one
 * (a file without one loads with a warning).
 */
export const decodeCheckpoint = (
  bytes: Uint8Array,
  path: string,
  options?: ReadOptions,
): Effect.Effect<Checkpoint, CheckpointError> =>
  Effect.gen(function* () {
    const fail = (reason: string) => new CheckpointError({ path, reason });
    if (bytes.length < 16 || magic.some((b, i) => bytes[i] !== b)) {
      return yield* fail("not a swav-ts checkpoint (bad magic)");
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const version = view.getUint32(8, true);
    if (version !== checkpointFormatVersion) {
      return yield* fail(
        `format version ${version} is not supported (this build reads version ${checkpointFormatVersion})`,
      );
    }
    const headerLength = view.getUint32(12, true);
    if (16 + headerLength > bytes.length) {
      return yield* fail(
        `truncated header: the file has ${bytes.length} bytes, its header ends at byte ${16 + headerLength}`,
      );
    }
    const json = yield* Effect.try({
      try: () => JSON.parse(new TextDecoder().decode(bytes.subarray(16, 16 + headerLength))) as unknown,
      catch: (error) => fail(`corrupt header: ${error instanceof Error ? error.message : String(error)}`),
    });
    const header = yield* Schema.decodeUnknownEffect(CheckpointHeader)(json, { errors: "all" }).pipe(
      Effect.mapError((error) => fail(`invalid header: ${headerIssues(error.issue)}`)),
    );
    const payloadStart = 16 + headerLength;
    const payload = bytes.subarray(payloadStart);
    const problem = layoutProblem(header.tensors, payload.length);
    if (problem !== undefined) return yield* fail(problem);
    if (header.checksum === undefined) {
      yield* readWarning(
        options,
        `checkpoint ${path} has no payload checksum (written by an older build): loaded unverified`,
      );
    } else if (payloadChecksum(payload) !== header.checksum.payload) {
      return yield* fail(`payload checksum mismatch: the file is damaged`);
    }
    const arrays = header.tensors.map((entry): NamedArray => {
      // Copy out so the arrays own aligned buffers independent of the file bytes.
      const raw = payload.slice(entry.offset, entry.offset + entry.length * 4);
      const values = entry.dtype === "int32" ? new Int32Array(raw.buffer) : new Float32Array(raw.buffer);
      return { name: entry.name, shape: [...entry.shape], values };
    });
    return {
      step: header.step,
      epoch: header.epoch,
      batchInEpoch: header.batchInEpoch ?? 0,
      config: header.config,
      extra: header.extra ?? {},
      arrays,
    };
  });

/**
 * The README's config table is checked against the schema: every field of every
 * section appears in its row with its default, and the row names no other field.
 */
import assert from "node:assert/strict";
import { Schema } from "effect";
import {
  DataConfig,
  DeepClusterV2Config,
  OptimConfig,
  RunConfig,
  SimclrConfig,
  SwavConfig,
  TrainConfig,
} from "../config/config.ts";
import { ModelConfig } from "../models/model.ts";
import { MulticropConfig } from "../stages/multicrop.ts";

const sections = {
  data: DataConfig,
  multicrop: MulticropConfig,
  model: ModelConfig,
  swav: SwavConfig,
  deepclusterv2: DeepClusterV2Config,
  simclr: SimclrConfig,
  optim: OptimConfig,
  train: TrainConfig,
} as const;

const readme = await Deno.readTextFile(new URL("../README.md", import.meta.url));
const defaults = Schema.decodeUnknownSync(RunConfig)({}) as unknown as Record<
  string,
  Record<string, unknown>
>;

/** The table row of `section`: its second cell. */
const rowOf = (section: string): string => {
  const line = readme.split("\n").find((l) => l.startsWith(`| \`${section}\``));
  assert.ok(line !== undefined, `README's config table has no row for ${section}`);
  return line.split("|")[2]!;
};

/** Ways the README may write a default: numbers to 4 significant digits or in short exponent form. */
const renderings = (value: unknown): string[] => {
  if (typeof value === "number") {
    return [String(Number(value.toPrecision(4))), value.toExponential().replace("e+", "e")];
  }
  if (typeof value === "string") return [`\`${value}\``];
  if (Array.isArray(value)) {
    return [`[${value.map((v) => renderings(v)[0]).join(", ")}]`];
  }
  return [String(value)];
};

Deno.test("README's config table lists every field of the schema with its default, and nothing else", () => {
  for (const [section, schema] of Object.entries(sections)) {
    const row = rowOf(section);
    const fields = Object.keys((schema as unknown as { fields: Record<string, unknown> }).fields);
    // Field names are the backticked words outside parentheses (values and notes sit inside them).
    const named = [...row.replace(/\([^()]*\)/g, "").matchAll(/`([A-Za-z]+)`/g)].map((m) => m[1]!);
    assert.deepEqual([...named].sort(), [...fields].sort(), `README row ${section}: fields`);
    for (const field of fields) {
      const value = defaults[section]![field];
      if (value === undefined) continue; // optional, no default
      const after = row.slice(row.indexOf(`\`${field}\``));
      const note = after.match(/\(([^()]*)\)/)?.[1] ?? "";
      assert.ok(
        renderings(value).some((r) => note.includes(r)),
        `README row ${section}: ${field} should show its default ${renderings(value)[0]}, shows (${note})`,
      );
    }
  }
});

Deno.test("README's custom-pipeline example is the one examples/custom_pipeline.ts runs (tested in pretrain_test)", async () => {
  const example = await Deno.readTextFile(new URL("../examples/custom_pipeline.ts", import.meta.url));
  const block = readme.match(/const hardAssignStage = tensorStage\(\{[\s\S]*?\n\}\);/)?.[0];
  assert.ok(block !== undefined, "README shows hardAssignStage");
  assert.ok(example.includes(`export ${block}`), "README's hardAssignStage differs from the example's");
  assert.match(readme, /pretrain\(config, \{ stages: \{ assign: hardAssignStage \} \}\)/);
});

/**
 * `KEY=JSON` settings (`pretrain --set`, `sweep --grid`): a dotted key into the
 * run config and a JSON value, checked against the config's schema on their
 * own, so that a typo or a wrong type is one line naming the key before
 * anything runs (the whole config is validated again once merged).
 */
import { Schema, type SchemaAST } from "effect";
import { InvalidConfig, RunConfig } from "./config.ts";

/** One parsed setting: the key's path and its value. */
export interface Setting {
  readonly key: string;
  readonly path: readonly string[];
  readonly value: unknown;
}

const fail = (label: string, message: string) =>
  new InvalidConfig({ source: label, message: `${label}: ${message}` });

/** The object's own keys, or undefined where the AST is not an object (a leaf, a union). */
const objectFields = (ast: SchemaAST.AST): readonly SchemaAST.PropertySignature[] | undefined =>
  ast._tag === "Objects" ? ast.propertySignatures : undefined;

/**
 * The schema of the config field at `path`, or the one-line reason it names nothing
 * (`unknown key "epsilonn" in swav (known: temperature, epsilon, ...)`).
 */
export const fieldAt = (path: readonly string[]): SchemaAST.AST | string => {
  let ast: SchemaAST.AST = RunConfig.ast;
  for (let i = 0; i < path.length; i++) {
    const where = i === 0 ? "the config" : path.slice(0, i).join(".");
    const fields = objectFields(ast);
    if (fields === undefined) return `${where} is a value, not a section: it has no key "${path[i]}"`;
    const field = fields.find((f) => f.name === path[i]);
    if (field === undefined) {
      return `unknown key "${path[i]}" in ${where} (known: ${fields.map((f) => String(f.name)).join(", ")})`;
    }
    ast = field.type;
  }
  return ast;
};

/** The schema's complaint on one line ("Expected number at [1]"). */
const oneLine = (message: string) => message.split("\n").map((line) => line.trim()).join(" ");

/**
 * Parses `KEY=JSON` (the key dotted, e.g. `swav.epsilon=0.03`) and checks the key and the
 * value's type against the schema; `label` prefixes the message (e.g. `--set swav.epsilon=0.03`).
 */
export const parseSetting = (text: string, label = text): Setting | InvalidConfig => {
  const eq = text.indexOf("=");
  if (eq <= 0) return fail(label, "expected KEY=JSON, e.g. swav.epsilon=0.03 or multicrop.nmbCrops=[2,4]");
  const key = text.slice(0, eq).trim();
  const path = key.split(".");
  if (path.some((part) => part === "")) return fail(label, `"${key}" is not a dotted key, e.g. swav.epsilon`);
  const json = text.slice(eq + 1);
  let value: unknown;
  try {
    value = JSON.parse(json);
  } catch {
    return fail(
      label,
      `the value ${JSON.stringify(json)} is not JSON (strings need double quotes, e.g. '${key}="text"')`,
    );
  }
  return checkSetting({ key, path, value }, label);
};

/** Checks a setting's key and value against the config's schema (defaults apply inside a section). */
export const checkSetting = (setting: Setting, label: string): Setting | InvalidConfig => {
  const ast = fieldAt(setting.path);
  if (typeof ast === "string") return fail(label, ast);
  const decoded = Schema.decodeUnknownExit(Schema.make<Schema.Codec<unknown>>(ast))(setting.value, {
    errors: "first",
    onExcessProperty: "error",
  });
  if (decoded._tag === "Failure") {
    const error = decoded.cause.reasons.find((r) => r._tag === "Fail")?.error;
    const why = error instanceof Error ? oneLine(error.message) : "not a valid value";
    return fail(label, `${setting.key}: ${why}, got ${JSON.stringify(setting.value)}`);
  }
  return setting;
};

/** Settings as a partial config to merge (later settings of the same key win). */
export const settingsObject = (settings: readonly Setting[]): Record<string, unknown> => {
  const out: Record<string, unknown> = {};
  for (const { path, value } of settings) {
    let node = out;
    for (const part of path.slice(0, -1)) {
      const next = node[part];
      node = (typeof next === "object" && next !== null && !Array.isArray(next)
        ? next
        : (node[part] = {})) as Record<string, unknown>;
    }
    node[path[path.length - 1]!] = value;
  }
  return out;
};

/**
 * Issue 18's reliability and security probe: every case of the issue tried black box through the CLI.
 *
 *   npx deno run -A bench/reliability_probe.ts [--json] [--only NAME,NAME]
 *
 * Each case records: `crash` (a bad input ended in a stack trace, a multi-line error, or an exit code other
 * than 0/1), `lost` (data lost or a silently wrong result), `outside` (a file outside its folder was opened,
 * seen with strace), `unbounded` (peak RSS over 1 GB on a tiny input). Every run has a hard timeout and an
 * RSS watchdog (killed over 2 GB: `ulimit -v` cannot be used, wasm reserves tens of GB of address space).
 * Temporary folders live under /tmp and are removed at the end.
 */
import { corpusFolder, goodImage, lastJson, tinyConfig, writeCorruptDataset } from "./corrupt_dataset.ts";
import * as hostileCheckpoints from "./hostile_checkpoints.ts";

const json = Deno.args.includes("--json");
const onlyAt = Deno.args.indexOf("--only");
const only = onlyAt < 0 ? undefined : Deno.args[onlyAt + 1]!.split(",");
const cli = new URL("../cli/main.ts", import.meta.url).pathname;
const wrapper = new URL("../node_modules/.bin/deno", import.meta.url).pathname;
const env = { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "2" };
const MAX_RSS_MB = 2000;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  killedForMemory: boolean;
  peakMb: number;
  /** Files opened (strace), when asked. */
  opened: string[];
}

const rssMb = (pid: number): number => {
  try {
    const m = /VmRSS:\s+(\d+)/.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
    return m ? Number(m[1]) / 1024 : 0;
  } catch {
    return 0;
  }
};

/** Runs the CLI with a timeout and an RSS watchdog; `strace` logs the files it opens. */
const run = async (
  args: string[],
  options: { timeoutMs?: number; strace?: boolean; extraEnv?: Record<string, string> } = {},
): Promise<Run> => {
  const traceFile = options.strace ? await Deno.makeTempFile({ prefix: "swav-strace-" }) : undefined;
  const argv = [Deno.execPath(), "run", "--allow-all", cli, ...args];
  const cmd = traceFile
    ? new Deno.Command("strace", {
      args: ["-f", "-qq", "-e", "trace=open,openat", "-o", traceFile, ...argv],
      env: { ...env, ...options.extraEnv },
      stdout: "piped",
      stderr: "piped",
    })
    : new Deno.Command(argv[0]!, {
      args: argv.slice(1),
      env: { ...env, ...options.extraEnv },
      stdout: "piped",
      stderr: "piped",
    });
  const child = cmd.spawn();
  let peakMb = 0;
  let killedForMemory = false;
  let timedOut = false;
  const kill = () => {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  };
  const watchdog = setInterval(() => {
    // Under strace the trainer is strace's child: sum the process tree's RSS.
    const pids = [child.pid, ...childrenOf(child.pid)];
    const mb = pids.reduce((s, p) => s + rssMb(p), 0);
    peakMb = Math.max(peakMb, mb);
    if (mb > MAX_RSS_MB) {
      killedForMemory = true;
      for (const p of pids.reverse()) killPid(p);
    }
  }, 50);
  const timer = setTimeout(() => {
    timedOut = true;
    for (const p of [...childrenOf(child.pid)].reverse()) killPid(p);
    kill();
  }, options.timeoutMs ?? 90_000);
  const out = await child.output();
  clearInterval(watchdog);
  clearTimeout(timer);
  let opened: string[] = [];
  if (traceFile) {
    const log = await Deno.readTextFile(traceFile);
    opened = [...log.matchAll(/open(?:at)?\([^"]*"([^"]+)"[^)]*\)\s*=\s*(\d+)/g)].map((m) => m[1]!);
    await Deno.remove(traceFile);
  }
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
    timedOut,
    killedForMemory,
    peakMb,
    opened,
  };
};

const childrenOf = (pid: number): number[] => {
  const out: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) out.push(Number(entry.name), ...childrenOf(Number(entry.name)));
    } catch {
      // exited meanwhile
    }
  }
  return out;
};

const killPid = (pid: number) => {
  try {
    Deno.kill(pid, "SIGKILL");
  } catch {
    // gone
  }
};

const alive = (pid: number) => {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return !/\) Z /.test(stat);
  } catch {
    return false;
  }
};

/** A clean failure: exit 1 and exactly one line starting `error:`, no stack trace. */
const oneLine = (r: Run): boolean => {
  const lines = r.stderr.split("\n").filter((l) =>
    l.trim() !== "" && !/^(warning|epoch|train|test|features)\b/.test(l)
  );
  return r.code === 1 && !r.timedOut && !r.killedForMemory && lines.length === 1 &&
    /^error: /.test(lines[0]!) &&
    !/\n\s+at |Stack backtrace|panicked/.test(r.stderr);
};
/** Bad input handled: a clean one-line failure, or success (then judged by the case). */
const crashed = (r: Run) =>
  !(r.code === 0 && !/\n\s+at |Stack backtrace|panicked/.test(r.stderr)) && !oneLine(r);

interface Verdict {
  name: string;
  badInputs: number;
  crash: boolean;
  lost: boolean;
  outside: boolean;
  unbounded: boolean;
  note: string;
}

const tmp = await Deno.makeTempDir({ prefix: "swav-probe-" });
const cases: Array<[string, (dir: string) => Promise<Omit<Verdict, "name">>]> = [];
const add = (name: string, body: (dir: string) => Promise<Omit<Verdict, "name">>) => cases.push([name, body]);
const v = (badInputs: number, note: string, flags: Partial<Verdict> = {}): Omit<Verdict, "name"> => ({
  badInputs,
  crash: false,
  lost: false,
  outside: false,
  unbounded: false,
  note,
  ...flags,
});
const short = (s: string) => s.trim().split("\n").at(-1)!.slice(0, 140);

/** Good-image folder `root/{a,b}` of `n` images per class, `format` alternating or fixed. */
const goodFolder = async (root: string, n: number, format?: "png" | "jpg") => {
  for (const [label, c] of ["a", "b"].entries()) {
    await Deno.mkdir(`${root}/${c}`, { recursive: true });
    for (let i = 0; i < n; i++) {
      const f = format ?? (i % 2 ? "jpg" : "png");
      await Deno.writeFile(
        `${root}/${c}/g${String(i).padStart(3, "0")}.${f}`,
        await goodImage(label, i, 32, f),
      );
    }
  }
};
const config = async (dir: string, source: string, train: Record<string, unknown>, extra: object = {}) => {
  await Deno.writeTextFile(`${dir}/c.json`, JSON.stringify({ ...tinyConfig(source, train), ...extra }));
  return `${dir}/c.json`;
};
/** A tiny trained run folder (2 epochs of 16 images per class) for checkpoint cases. */
const tinyRun = async (dir: string, train: Record<string, unknown> = {}) => {
  await goodFolder(`${dir}/data`, 8, "png");
  const c = await config(dir, `${dir}/data`, { epochs: 2, batchSize: 8, seed: 1, ...train });
  const r = await run(["pretrain", "--config", c, "--out", `${dir}/run`, "--json"]);
  return { config: c, r, run: `${dir}/run` };
};
const checkpoints = (folder: string): string[] => {
  try {
    return [...Deno.readDirSync(folder)].map((e) => e.name).filter((n) => /^checkpoint-\d+\.swav$/.test(n))
      .sort();
  } catch {
    return [];
  }
};

/** Checkpoint (version 1) header and payload, as README "Checkpoint format (version 1)" describes. */
const readCkpt = (bytes: Uint8Array) => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = view.getUint32(12, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(16, 16 + headerLength)));
  return { header, headerLength, payloadStart: 16 + headerLength };
};
/** The same payload under a new header (padded so the payload stays 4-byte aligned). */
const writeCkpt = (bytes: Uint8Array, header: unknown): Uint8Array => {
  const { payloadStart } = readCkpt(bytes);
  const text = new TextEncoder().encode(JSON.stringify(header));
  const headerLength = Math.ceil(text.length / 4) * 4;
  const out = new Uint8Array(16 + headerLength + bytes.length - payloadStart);
  out.set(bytes.subarray(0, 12));
  new DataView(out.buffer).setUint32(12, headerLength, true);
  out.fill(0x20, 16, 16 + headerLength);
  out.set(text, 16);
  out.set(bytes.subarray(payloadStart), 16 + headerLength);
  return out;
};
const nonFiniteTensors = (bytes: Uint8Array): string[] => {
  const { header, payloadStart } = readCkpt(bytes);
  const bad: string[] = [];
  for (const t of header.tensors as Array<{ name: string; dtype: string; offset: number; length: number }>) {
    if (t.dtype !== "float32") continue;
    const values = new Float32Array(
      bytes.slice(payloadStart + t.offset, payloadStart + t.offset + 4 * t.length).buffer,
    );
    if (values.some((x) => !Number.isFinite(x))) bad.push(t.name);
  }
  return bad;
};

// ---- the cases ----------------------------------------------------------------------------------------

add("corpus", async (dir) => {
  const data = await writeCorruptDataset(`${dir}/data`, { perClass: 24, testPerClass: 4, size: 32 });
  const c = await config(dir, `${dir}/data:train`, { epochs: 2, batchSize: 8, seed: 7 });
  const a = await run(["pretrain", "--config", c, "--out", `${dir}/r1`, "--json"]);
  const b = await run(["pretrain", "--config", c, "--out", `${dir}/r2`, "--json"]);
  const sa = lastJson(a.stdout), sb = lastJson(b.stdout);
  const expected = 2 * Math.floor(data.goodTrain / 8);
  const crash = crashed(a) || crashed(b);
  const lost = sa?.steps !== expected || sa?.loss !== sb?.loss || sa?.skipped !== sb?.skipped;
  return v(
    data.bad.length,
    `steps ${sa?.steps}/${expected}, skipped ${sa?.skipped} vs ${sb?.skipped}, loss ${sa?.loss} vs ${sb?.loss}`,
    { crash, lost },
  );
});

add("jpeg-50-good-2-bad", async (dir) => {
  await goodFolder(`${dir}/data`, 50, "jpg");
  await Deno.copyFile(`${corpusFolder}header17_random.jpg`, `${dir}/data/a/bad1.jpg`);
  await Deno.copyFile(`${corpusFolder}zero_dim.jpg`, `${dir}/data/a/bad2.jpg`);
  const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 10, seed: 3 });
  const a = await run(["pretrain", "--config", c, "--out", `${dir}/r1`, "--json"]);
  const b = await run(["pretrain", "--config", c, "--out", `${dir}/r2`, "--json"]);
  const sa = lastJson(a.stdout), sb = lastJson(b.stdout);
  const lost = sa?.skipped !== 2 || sb?.skipped !== 2 || sa?.loss !== sb?.loss || sa?.steps !== 10;
  return v(
    2,
    `skipped ${sa?.skipped} / ${sb?.skipped} (want 2), steps ${sa?.steps}/10, loss ${sa?.loss} vs ${sb?.loss}`,
    {
      crash: crashed(a) || crashed(b),
      lost,
    },
  );
});

add("skips-end-training-early+resume", async (dir) => {
  await goodFolder(`${dir}/data`, 60, "png");
  for (let i = 0; i < 10; i++) {
    for (const c of ["a", "b"]) {
      const p = `${dir}/data/${c}/g${String(i * 6).padStart(3, "0")}.png`;
      const bytes = await Deno.readFile(p);
      await Deno.writeFile(p, bytes.subarray(0, bytes.length >> 1));
    }
  }
  const c = await config(dir, `${dir}/data`, { batchSize: 10, seed: 2 });
  const a = await run(["pretrain", "--config", c, "--epochs", "5", "--out", `${dir}/r`, "--json"]);
  const b = await run([
    "pretrain",
    "--config",
    c,
    "--epochs",
    "5",
    "--out",
    `${dir}/r`,
    "--resume",
    "--json",
  ]);
  const sa = lastJson(a.stdout), sb = lastJson(b.stdout);
  return v(20, `--epochs 5: ${sa?.steps} steps (want 50); --resume: ${sb?.steps} steps`, {
    crash: crashed(a) || crashed(b),
    lost: sa?.steps !== 50 || sb?.steps !== 50,
  });
});

add("two-runs-one-out", async (dir) => {
  await goodFolder(`${dir}/data`, 16, "png");
  const c = await config(dir, `${dir}/data`, { epochs: 8, batchSize: 8, checkpointEvery: 1 });
  const [a, b] = await Promise.all([
    run(["pretrain", "--config", c, "--seed", "1", "--out", `${dir}/r`, "--json"]),
    run(["pretrain", "--config", c, "--seed", "2", "--out", `${dir}/r`, "--json"]),
  ]);
  const both = a.code === 0 && b.code === 0;
  const seed = JSON.parse(await Deno.readTextFile(`${dir}/r/seed.json`).catch(() => "null"));
  const last = checkpoints(`${dir}/r`).at(-1);
  const ckSeed = last
    ? readCkpt(await Deno.readFile(`${dir}/r/${last}`)).header.config?.train?.seed
    : undefined;
  const refused = [a, b].some((r) => oneLine(r) && /lock|in use|held|another/i.test(r.stderr));
  return v(
    1,
    `exit ${a.code}/${b.code}; seed.json ${JSON.stringify(seed)}, latest checkpoint seed ${ckSeed}; ${
      refused ? "second refused" : "no lock"
    } ${[a, b].filter((r) => r.code !== 0).map((r) => short(r.stderr)).join(" | ")}`,
    {
      crash: [a, b].some((r) => r.code !== 0 && !oneLine(r)),
      lost: both || !refused,
    },
  );
});

add("kill-9-wrapper-orphan", async (dir) => {
  await goodFolder(`${dir}/data`, 16, "png");
  const c = await config(dir, `${dir}/data`, { epochs: 1000, batchSize: 8 });
  const child = new Deno.Command(wrapper, {
    args: ["run", "--allow-all", cli, "pretrain", "--config", c, "--out", `${dir}/r`],
    env,
    stdout: "null",
    stderr: "null",
  }).spawn();
  let trainers: number[] = [];
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    trainers = childrenOf(child.pid);
    if (trainers.length > 0 && checkpoints(`${dir}/r`).length > 0) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  Deno.kill(child.pid, "SIGKILL");
  await child.status;
  await new Promise((r) => setTimeout(r, 2000));
  const orphans = trainers.filter(alive);
  for (const p of orphans) killPid(p);
  return v(
    0,
    `${trainers.length} child process(es) of the wrapper; ${orphans.length} still running 2 s after kill -9`,
    {
      lost: orphans.length > 0,
    },
  );
});

for (
  const [name, optim] of [["lr-trust-1e30", { baseLr: 1e30, finalLr: 1e30, trust: 1e30 }], ["lr-1e6", {
    baseLr: 1e6,
    finalLr: 1e6,
  }]] as const
) {
  add(name, async (dir) => {
    await goodFolder(`${dir}/data`, 16, "png");
    const c = await config(dir, `${dir}/data`, { epochs: 2, batchSize: 8, checkpointEvery: 1 }, {
      optim,
    });
    const r = await run(["pretrain", "--config", c, "--out", `${dir}/r`, "--json"]);
    const last = checkpoints(`${dir}/r`).at(-1);
    const bad = last ? nonFiniteTensors(await Deno.readFile(`${dir}/r/${last}`)) : [];
    return v(
      1,
      `exit ${r.code}; latest ${last}: ${bad.length} non-finite tensors ${bad.slice(0, 2).join(", ")}`,
      {
        crash: crashed(r),
        lost: bad.length > 0,
      },
    );
  });
}

/** An exported encoder of a tiny run, with `paths` in model.json replaced. */
const exportedWith = async (dir: string, paths: string[]) => {
  const t = await tinyRun(dir, { epochs: 1 });
  const folder = `${dir}/x/y/z/export`;
  await run(["export", "--checkpoint", t.run, "--out", folder]);
  const model = JSON.parse(await Deno.readTextFile(`${folder}/model.json`));
  for (const group of model.weightsManifest) group.paths = paths;
  await Deno.writeTextFile(`${folder}/model.json`, JSON.stringify(model));
  return folder;
};

add("model.json-paths-etc-passwd", async (dir) => {
  const folder = await exportedWith(dir, ["../../../../../../../../../../etc/passwd"]);
  const r = await run([
    "eval",
    "--checkpoint",
    folder,
    "--train",
    `${dir}/data`,
    "--test",
    `${dir}/data`,
    "--k",
    "3",
  ], {
    strace: true,
    timeoutMs: 60_000,
  });
  const outside = r.opened.some((p) => p.endsWith("/etc/passwd"));
  return v(
    1,
    `exit ${r.code}; ${outside ? "opened /etc/passwd" : "did not open /etc/passwd"}: ${short(r.stderr)}`,
    {
      crash: crashed(r),
      outside,
    },
  );
});

add("model.json-paths-dev-zero", async (dir) => {
  const folder = await exportedWith(dir, ["../../../../../../../../../../dev/zero"]);
  const r = await run([
    "eval",
    "--checkpoint",
    folder,
    "--train",
    `${dir}/data`,
    "--test",
    `${dir}/data`,
    "--k",
    "3",
  ], {
    strace: true,
    timeoutMs: 30_000,
  });
  const outside = r.opened.some((p) => p.endsWith("/dev/zero"));
  return v(
    1,
    `exit ${r.code}, peak ${r.peakMb.toFixed(0)} MB${r.killedForMemory ? " (killed at 2 GB)" : ""}${
      r.timedOut ? " (timed out)" : ""
    }: ${short(r.stderr)}`,
    { crash: crashed(r), outside, unbounded: r.peakMb > 1000 },
  );
});

add("png-20000x20000-bomb", async (dir) => {
  await goodFolder(`${dir}/data`, 8, "png");
  // IHDR 20000x20000 RGB, then a full zlib stream of zero rows (1.2 GB raw, about 1.2 MB compressed).
  const rows = 20000 * (1 + 20000 * 3);
  const crc = (b: Uint8Array) => {
    let c = ~0;
    for (const x of b) {
      c ^= x;
      for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
    }
    return ~c >>> 0;
  };
  const chunk = (type: string, data: Uint8Array) => {
    const body = new Uint8Array(4 + data.length);
    body.set(new TextEncoder().encode(type));
    body.set(data, 4);
    const out = new Uint8Array(12 + data.length);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, data.length);
    out.set(body, 4);
    dv.setUint32(8 + data.length, crc(body));
    return out;
  };
  const ihdr = new Uint8Array(13);
  new DataView(ihdr.buffer).setUint32(0, 20000);
  new DataView(ihdr.buffer).setUint32(4, 20000);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const zeros = new Uint8Array(1 << 20);
  const stream = new ReadableStream<BufferSource>({
    pull(controller) {
      if (sent >= rows) return controller.close();
      const n = Math.min(zeros.length, rows - sent);
      sent += n;
      controller.enqueue(zeros.subarray(0, n));
    },
  });
  let sent = 0;
  const idat = new Uint8Array(
    await new Response(stream.pipeThrough(new CompressionStream("deflate"))).arrayBuffer(),
  );
  const png = [
    new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", idat),
    chunk("IEND", new Uint8Array()),
  ];
  await Deno.writeFile(`${dir}/data/a/bomb.png`, new Uint8Array(await new Blob(png).arrayBuffer()));
  const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 8 }, {
    data: { source: `${dir}/data`, workers: 0 },
  });
  const r = await run(["pretrain", "--config", c, "--out", `${dir}/r`, "--json"], { timeoutMs: 90_000 });
  return v(
    1,
    `${(idat.length / 1e6).toFixed(1)} MB file; exit ${r.code}, peak RSS ${r.peakMb.toFixed(0)} MB${
      r.killedForMemory ? " (killed at 2 GB)" : ""
    }; skipped ${lastJson(r.stdout)?.skipped}`,
    { crash: crashed(r), unbounded: r.peakMb > 1000 },
  );
});

add("gzip-idx-bomb", async (dir) => {
  await Deno.mkdir(`${dir}/idx`);
  const n = 64;
  const header = new Uint8Array(16);
  new DataView(header.buffer).setUint32(0, 0x803);
  new DataView(header.buffer).setUint32(4, n);
  new DataView(header.buffer).setUint32(8, 28);
  new DataView(header.buffer).setUint32(12, 28);
  // 64 images promised, then about 1 GB of trailing zeros: the gzip is about 1 MB.
  await Deno.writeFile(`${dir}/header.bin`, header);
  const gz = await new Deno.Command("bash", {
    args: [
      "-c",
      `(cat "$1"; head -c 1000000000 /dev/zero) | gzip -1 > "$2"`,
      "x",
      `${dir}/header.bin`,
      `${dir}/idx/train-images-idx3-ubyte.gz`,
    ],
  }).output();
  if (!gz.success) throw new Error("gzip failed");
  const labels = new Uint8Array(8 + n);
  new DataView(labels.buffer).setUint32(0, 0x801);
  new DataView(labels.buffer).setUint32(4, n);
  for (let i = 0; i < n; i++) labels[8 + i] = i % 10;
  await Deno.writeFile(`${dir}/idx/train-labels-idx1-ubyte`, labels);
  const c = await config(dir, `${dir}/idx`, { epochs: 1, batchSize: 8 }, {
    data: { source: `${dir}/idx`, workers: 0, channels: 1 },
    model: {
      arch: "resnet18",
      width: 4,
      stem: "cifar",
      hidden: 16,
      out: 8,
      prototypes: 20,
      inputChannels: 1,
    },
    multicrop: {
      nmbCrops: [2],
      sizeCrops: [16],
      minScaleCrops: [0.3],
      maxScaleCrops: [1],
      blur: false,
      channels: 1,
    },
  });
  const r = await run(["pretrain", "--config", c, "--out", `${dir}/r`, "--json"], { timeoutMs: 90_000 });
  const size = (await Deno.stat(`${dir}/idx/train-images-idx3-ubyte.gz`)).size;
  return v(
    1,
    `${(size / 1e6).toFixed(1)} MB gzip of 1 GB; exit ${r.code}, peak RSS ${r.peakMb.toFixed(0)} MB${
      r.killedForMemory ? " (killed at 2 GB)" : ""
    }: ${short(r.code === 0 ? r.stdout : r.stderr)}`,
    {
      crash: crashed(r),
      lost: r.code === 0,
      unbounded: r.peakMb > 1000,
    },
  );
});

add("checkpoint-header-fields", async (dir) => {
  const t = await tinyRun(dir, { epochs: 1 });
  const file = `${t.run}/${checkpoints(t.run).at(-1)}`;
  const bytes = await Deno.readFile(file);
  const { header } = readCkpt(bytes);
  const variants: Array<[string, (h: typeof header) => void]> = [
    ["step abc", (h) => (h.step = "abc")],
    ["negative offset", (h) => (h.tensors[1].offset = -4)],
    ["misaligned offset", (h) => (h.tensors[1].offset += 1)],
    ["float64 dtype", (h) => (h.tensors[1].dtype = "float64")],
  ];
  const accepted: string[] = [];
  let crash = false;
  for (const [label, patch] of variants) {
    const h = structuredClone(header);
    patch(h);
    await Deno.writeFile(`${dir}/bad.swav`, writeCkpt(bytes, h));
    const r = await run([
      "export",
      "--checkpoint",
      `${dir}/bad.swav`,
      "--out",
      `${dir}/exp-${accepted.length}`,
    ]);
    if (r.code === 0) accepted.push(label);
    if (crashed(r)) crash = true;
  }
  return v(variants.length, accepted.length ? `accepted: ${accepted.join(", ")}` : "all rejected", {
    crash,
    lost: accepted.length > 0,
  });
});

add("no-fallback-to-previous-checkpoint", async (dir) => {
  const t = await tinyRun(dir, { epochs: 2, checkpointEvery: 2, keepCheckpoints: 3 });
  const names = checkpoints(t.run);
  if (names.length < 2) throw new Error(`tiny run left ${names.length} checkpoints: ${short(t.r.stderr)}`);
  const latest = `${t.run}/${names.at(-1)}`;
  const bytes = await Deno.readFile(latest);
  await Deno.writeFile(latest, bytes.subarray(0, bytes.length - 100));
  const r = await run([
    "pretrain",
    "--config",
    t.config,
    "--out",
    t.run,
    "--epochs",
    "3",
    "--resume",
    "--json",
  ]);
  return v(1, `exit ${r.code}: ${short(r.code === 0 ? r.stderr : r.stderr)}`, {
    crash: crashed(r),
    lost: r.code !== 0,
  });
});

add("tmp-pile-up", async (dir) => {
  // ENOSPC cannot be made without mounting a small file system; stale temp files of a crashed writer stand in.
  const t = await tinyRun(dir, { epochs: 1 });
  const stale = `${t.run}/checkpoint-000000001.swav.00000000-0000-4000-8000-000000000000.tmp`;
  await Deno.writeFile(stale, new Uint8Array(1000));
  const r = await run([
    "pretrain",
    "--config",
    t.config,
    "--out",
    t.run,
    "--epochs",
    "2",
    "--resume",
    "--json",
  ]);
  const tmps = [...Deno.readDirSync(t.run)].filter((e) => e.name.endsWith(".tmp")).length;
  return v(
    1,
    `exit ${r.code}; ${tmps} .tmp file(s) left (a stale one of another writer: removed = not owner-only)`,
    {
      crash: crashed(r),
    },
  );
});

add("metrics-repeat-after-resume", async (dir) => {
  await goodFolder(`${dir}/data`, 16, "png");
  const c = await config(dir, `${dir}/data`, { epochs: 1000, batchSize: 8, checkpointEvery: 3 });
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", cli, "pretrain", "--config", c, "--out", `${dir}/r`],
    env,
    stdout: "null",
    stderr: "null",
  }).spawn();
  const lines = () =>
    Deno.readTextFileSync(`${dir}/r/metrics.jsonl`).trim().split("\n").filter(Boolean).length;
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    try {
      if (lines() >= 5 && lines() % 3 !== 0) break;
    } catch {
      // not there yet
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill("SIGKILL");
  await child.status;
  const r = await run([
    "pretrain",
    "--config",
    c,
    "--out",
    `${dir}/r`,
    "--resume",
    "--max-steps",
    "10",
    "--json",
  ]);
  const steps = Deno.readTextFileSync(`${dir}/r/metrics.jsonl`).trim().split("\n").map((l) =>
    JSON.parse(l).step
  );
  const repeated = steps.length - new Set(steps).size;
  return v(1, `exit ${r.code}; ${steps.length} lines, ${repeated} repeated steps`, {
    crash: crashed(r),
    lost: repeated > 0,
  });
});

add("cifar-label-255", async (dir) => {
  await Deno.mkdir(`${dir}/cifar`);
  for (const name of ["data_batch_1.bin", "test_batch.bin"]) {
    const n = 24;
    const bytes = new Uint8Array(n * 3073);
    for (let i = 0; i < n; i++) {
      bytes[i * 3073] = i === 5 ? 255 : i % 10;
      for (let p = 1; p < 3073; p++) bytes[i * 3073 + p] = (i * 37 + p * 11) & 255;
    }
    await Deno.writeFile(`${dir}/cifar/${name}`, bytes);
  }
  const c = await config(dir, `${dir}/cifar`, { epochs: 1, batchSize: 8 });
  const p = await run(["pretrain", "--config", c, "--out", `${dir}/r`, "--json"]);
  const e = await run(["eval", "--checkpoint", `${dir}/r`, "--method", "knn", "--k", "3"]);
  return v(1, `pretrain exit ${p.code}; eval exit ${e.code}: ${short(e.stderr)}`, {
    crash: crashed(p) || crashed(e),
    lost: p.code === 0,
  });
});

add("shape-mismatch-on-resume", async (dir) => {
  const t = await tinyRun(dir, { epochs: 1 });
  const c = await config(dir, `${dir}/data`, { epochs: 2, batchSize: 8 }, {
    model: { arch: "resnet18", width: 8, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
  });
  const r = await run(["pretrain", "--config", c, "--out", t.run, "--resume", "--json"]);
  return v(1, `exit ${r.code}: ${short(r.stderr)}`, { crash: crashed(r), lost: r.code === 0 });
});

add("unusable-out", async (dir) => {
  await goodFolder(`${dir}/data`, 8, "png");
  await Deno.writeTextFile(`${dir}/file`, "x");
  const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 8 });
  const r = await run(["pretrain", "--config", c, "--out", `${dir}/file/run`, "--json"]);
  return v(1, `exit ${r.code}: ${short(r.stderr)}`, { crash: crashed(r), lost: r.code === 0 });
});

add("workers-64", async (dir) => {
  await goodFolder(`${dir}/data`, 8, "png");
  const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 8 });
  const r = await run(["pretrain", "--config", c, "--workers", "64", "--out", `${dir}/r`, "--json"], {
    timeoutMs: 60_000,
  });
  const warned = /workers/i.test(r.stderr);
  return v(
    1,
    `exit ${r.code}, peak RSS ${r.peakMb.toFixed(0)} MB${r.killedForMemory ? " (killed at 2 GB)" : ""}${
      warned ? ", warned" : ", no warning"
    }`,
    { crash: crashed(r), lost: r.code === 0 && !warned, unbounded: r.peakMb > 1000 },
  );
});

add("json-array-config", async (dir) => {
  await goodFolder(`${dir}/data`, 8, "png");
  await Deno.writeTextFile(`${dir}/arr.json`, "[]");
  const r = await run([
    "pretrain",
    "--config",
    `${dir}/arr.json`,
    "--data",
    `${dir}/data`,
    "--epochs",
    "1",
    "--max-steps",
    "1",
    "--batch-size",
    "2",
    "--out",
    `${dir}/r`,
    "--json",
  ], {
    timeoutMs: 60_000,
  });
  const rejected = oneLine(r) && /array|object/i.test(r.stderr);
  return v(1, `exit ${r.code}${r.timedOut ? " (timed out: training on defaults)" : ""}: ${short(r.stderr)}`, {
    crash: crashed(r) && !r.timedOut && !r.killedForMemory,
    lost: !rejected,
  });
});

add("extract-unusable-out", async (dir) => {
  const t = await tinyRun(dir, { epochs: 1 });
  await Deno.writeTextFile(`${dir}/file`, "x");
  const r = await run([
    "extract",
    "--checkpoint",
    t.run,
    "--data",
    `${dir}/data`,
    "--out",
    `${dir}/file/feat`,
  ]);
  const late = /features \d+\/\d+/.test(r.stderr);
  return v(1, `exit ${r.code}${late ? ", after computing every feature" : ""}: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: late || r.code === 0,
  });
});

// ---- report and dashboard cases (second round: large evaluations, escaping, where they write and listen) ----

/** Runs `cli/<script>` (report and dashboard are their own entry points) with a timeout and RSS watchdog;
 * a server is stopped once `until` matches its stdout. */
const runScript = async (
  script: string,
  args: string[],
  options: { timeoutMs?: number; until?: RegExp } = {},
) => {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", new URL(`../cli/${script}`, import.meta.url).pathname, ...args],
    env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let peakMb = 0;
  let killedForMemory = false;
  let timedOut = false;
  let stdout = "";
  const watchdog = setInterval(() => {
    const mb = rssMb(child.pid);
    peakMb = Math.max(peakMb, mb);
    if (mb > MAX_RSS_MB) (killedForMemory = true, killPid(child.pid));
  }, 50);
  const timer = setTimeout(() => (timedOut = true, killPid(child.pid)), options.timeoutMs ?? 90_000);
  const stderrText = new Response(child.stderr).text();
  for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
    stdout += chunk;
    if (options.until?.test(stdout)) child.kill("SIGTERM");
  }
  const status = await child.status;
  clearInterval(watchdog);
  clearTimeout(timer);
  return {
    code: options.until?.test(stdout) ? 0 : status.code,
    stdout,
    stderr: await stderrText,
    timedOut,
    killedForMemory,
    peakMb,
    opened: [],
  } satisfies Run;
};
const internal = (r: Run) => /internal error/.test(r.stderr);

add("report-1500-classes", async (dir) => {
  const { syntheticEval } = await import("../test/_synthetic_eval.ts");
  await Deno.mkdir(`${dir}/run`);
  await Deno.writeTextFile(`${dir}/run/eval-knn.json`, JSON.stringify(syntheticEval(1500)));
  const r = await runScript("run_report.ts", [`${dir}/run`], { timeoutMs: 120_000 });
  const size = await Deno.stat(`${dir}/run/report.html`).then((s) => s.size).catch(() => 0);
  return v(
    1,
    `exit ${r.code}${r.code === 0 ? "" : ` (${short(r.stderr).slice(0, 70)})`}, peak ${
      r.peakMb.toFixed(0)
    } MB, report ${(size / 1e6).toFixed(2)} MB (bound 2 MB)`,
    {
      // A valid evaluation that ends in an internal error (out of memory, stack overflow) is a crash.
      crash: (crashed(r) || internal(r) || r.code !== 0) && !r.timedOut && !r.killedForMemory,
      unbounded: r.timedOut || r.killedForMemory || size > 2e6,
    },
  );
});

add("report-script-in-metrics", async (dir) => {
  await Deno.mkdir(`${dir}/run`);
  const hostile = "<script>document.title='pwned'</script>";
  await Deno.writeTextFile(
    `${dir}/run/metrics.jsonl`,
    JSON.stringify({ step: 1, epoch: hostile, loss: 1, lr: 0.1, images_per_s: 1, code_entropy: 1 }) + "\n",
  );
  await Deno.writeTextFile(
    `${dir}/run/events.jsonl`,
    JSON.stringify({ step: 1, kind: "x", text: hostile }) + "\n",
  );
  await Deno.writeTextFile(
    `${dir}/run/eval-knn.json`,
    JSON.stringify({ method: hostile, classes: [hostile] }),
  );
  const r = await runScript("run_report.ts", [`${dir}/run`]);
  const html = await Deno.readTextFile(`${dir}/run/report.html`).catch(() => "");
  const raw = (html.match(/<script/gi) ?? []).length;
  return v(1, `exit ${r.code}: ${raw} raw <script> tags from the run folder in the page`, {
    crash: crashed(r),
    lost: raw > 0,
  });
});

add("report-out-anywhere", async (dir) => {
  await Deno.mkdir(`${dir}/run`);
  await Deno.writeTextFile(`${dir}/notes.txt`, "my notes");
  const a = await runScript("run_report.ts", [`${dir}/run`, "--out", `${dir}/notes.txt`]);
  const b = await runScript("run_report.ts", [`${dir}/run`, "--out", `${dir}/new/folder/r.html`]);
  const kept = await Deno.readTextFile(`${dir}/notes.txt`) === "my notes";
  const created = await Deno.stat(`${dir}/new`).then(() => true, () => false);
  return v(
    2,
    `over a text file: exit ${a.code}, ${
      kept ? "kept" : "overwritten"
    }; into a missing folder: exit ${b.code}${created ? ", created it" : ""}: ${short(a.stderr)}`,
    {
      crash: crashed(a) || crashed(b),
      lost: !kept,
      outside: created,
    },
  );
});

add("report-fifo-metrics", async (dir) => {
  await Deno.mkdir(`${dir}/run`);
  await new Deno.Command("mkfifo", { args: [`${dir}/run/metrics.jsonl`] }).output();
  const r = await runScript("run_report.ts", [`${dir}/run`], { timeoutMs: 30_000 });
  return v(1, `exit ${r.code}${r.timedOut ? " (hung on the FIFO, killed at 30 s)" : ""}`, {
    crash: crashed(r) && !r.timedOut,
    unbounded: r.timedOut,
  });
});

add("dashboard-bad-port-host", async (dir) => {
  const busy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = String((busy.addr as Deno.NetAddr).port);
  try {
    const runs = await Promise.all(
      [["--port", "abc"], ["--port", "70000"], ["--port", port], ["--port", "0", "--host", "192.0.2.1"]].map((
        args,
      ) => runScript("dashboard.ts", [dir, ...args], { timeoutMs: 60_000, until: /dashboard of/ })),
    );
    const bad = runs.filter((r) => !oneLine(r) || internal(r));
    return v(
      runs.length,
      `${bad.length} of ${runs.length} not a one-line input error: ${
        short(bad[0]?.stderr ?? runs[0]!.stderr)
      }`,
      {
        crash: bad.length > 0,
      },
    );
  } finally {
    busy.close();
  }
});

add("dashboard-every-interface", async (dir) => {
  const r = await runScript("dashboard.ts", [dir, "--port", "0", "--host", "0.0.0.0"], {
    timeoutMs: 60_000,
    until: /dashboard of/,
  });
  const warned = /^warning: .*0\.0\.0\.0/m.test(r.stderr);
  return v(1, `${warned ? "warned" : "no warning"}: ${short(r.stderr || r.stdout)}`, {
    crash: crashed(r),
    lost: !warned,
  });
});

// ---- end of the report and dashboard cases ------------------------------------------------------------

// ---- second round: run folders, process knobs, wrong results reported as fine (begin) -------------------

/** Every file of a folder (not below it) as name -> bytes, for before/after comparisons. */
const folderBytes = (folder: string): Map<string, string> => {
  const out = new Map<string, string>();
  for (const e of Deno.readDirSync(folder)) {
    if (e.isFile && e.name !== ".lock") {
      out.set(e.name, new TextDecoder().decode(Deno.readFileSync(`${folder}/${e.name}`)));
    }
  }
  return out;
};
const sameBytes = (a: Map<string, string>, b: Map<string, string>) =>
  a.size === b.size && [...a].every(([k, x]) => b.get(k) === x);

add("rerun-into-run-folder", async (dir) => {
  const t = await tinyRun(dir, { epochs: 1 });
  const before = folderBytes(t.run);
  await Deno.writeTextFile(
    `${dir}/wide.json`,
    JSON.stringify({
      ...tinyConfig(`${dir}/data`, { epochs: 1, batchSize: 8 }),
      model: { arch: "resnet18", width: 8, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
    }),
  );
  const r = await run([
    "pretrain",
    "--config",
    `${dir}/wide.json`,
    "--out",
    t.run,
    "--max-steps",
    "1",
    "--json",
  ]);
  const kept = sameBytes(before, folderBytes(t.run));
  return v(1, `exit ${r.code}; earlier run ${kept ? "kept" : "changed"}: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: !kept || !(oneLine(r) && /--resume/.test(r.stderr)),
  });
});

add("force-moves-run-aside", async (dir) => {
  const t = await tinyRun(dir, { epochs: 1 });
  const before = folderBytes(t.run);
  const r = await run([
    "pretrain",
    "--config",
    t.config,
    "--out",
    t.run,
    "--max-steps",
    "1",
    "--force",
    "--json",
  ]);
  let moved = false;
  try {
    moved = sameBytes(before, folderBytes(`${t.run}/previous-1`));
  } catch {
    moved = false;
  }
  return v(1, `exit ${r.code}; earlier run ${moved ? "in previous-1, byte for byte" : "not kept"}`, {
    crash: crashed(r),
    lost: r.code !== 0 || !moved,
  });
});

add("failed-start-keeps-run", async (dir) => {
  const t = await tinyRun(dir, { epochs: 1 });
  const before = folderBytes(t.run);
  const r = await run(["pretrain", "--config", t.config, "--out", t.run, "--batch-size", "4096", "--force"]);
  const kept = sameBytes(before, folderBytes(t.run));
  return v(1, `exit ${r.code}; earlier run ${kept ? "kept" : "changed"}: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: !kept || r.code === 0,
  });
});

add("threads-100000", async (dir) => {
  await goodFolder(`${dir}/data`, 8, "png");
  const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 8 });
  const r = await run([
    "pretrain",
    "--config",
    c,
    "--out",
    `${dir}/r`,
    "--threads",
    "100000",
    "--max-steps",
    "1",
    "--json",
  ], {
    timeoutMs: 90_000,
  });
  const warned = /capped at \d+/.test(r.stderr);
  return v(
    1,
    `exit ${r.code}${r.timedOut ? " (timed out)" : ""}; ${warned ? "capped with a warning" : "not capped"}`,
    {
      crash: crashed(r),
      lost: r.code !== 0 || !warned,
    },
  );
});

for (const procs of ["0", "-3", "3"]) {
  add(`procs-${procs}`, async (dir) => {
    await goodFolder(`${dir}/data`, 8, "png");
    const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 8 });
    const r = await run([
      "pretrain",
      "--config",
      c,
      "--out",
      `${dir}/r`,
      "--procs",
      procs,
      "--max-steps",
      "1",
    ]);
    // Refused by the launching process itself: no rank's line, no mpiexec banner.
    const early = oneLine(r) && !/rank \d+ of/.test(r.stderr);
    return v(1, `exit ${r.code}: ${short(r.stderr)}`, { crash: crashed(r), lost: !early });
  });
}

add("hostfile-slots-0", async (dir) => {
  await goodFolder(`${dir}/data`, 8, "png");
  const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 8 });
  await Deno.writeTextFile(`${dir}/hosts`, "localhost:0\n");
  const r = await run([
    "pretrain",
    "--config",
    c,
    "--out",
    `${dir}/r`,
    "--procs",
    "2",
    "--hostfile",
    `${dir}/hosts`,
  ]);
  const promised = /stays usable/.test(r.stderr) && checkpoints(`${dir}/r`).length === 0;
  return v(1, `exit ${r.code}: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: promised || !/hosts/.test(r.stderr),
  });
});

add("all-images-unreadable", async (dir) => {
  for (const c of ["a", "b"]) {
    await Deno.mkdir(`${dir}/data/${c}`, { recursive: true });
    for (let i = 0; i < 10; i++) await Deno.writeTextFile(`${dir}/data/${c}/x${i}.png`, `junk ${i}`);
  }
  const c = await config(dir, `${dir}/data`, { epochs: 1, batchSize: 8 });
  const r = await run(["pretrain", "--config", c, "--out", `${dir}/r`, "--json"]);
  const written = checkpoints(`${dir}/r`).length;
  return v(20, `exit ${r.code}, ${written} checkpoints: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: r.code === 0 || written > 0,
  });
});

const torchFixture = (name: string) => new URL(`../test/fixtures/torch/${name}`, import.meta.url).pathname;

for (const name of ["resnet18_nan.pth", "resnet18_negative_var.pth"]) {
  add(`eval-${name}`, async (dir) => {
    await goodFolder(`${dir}/data`, 4, "png");
    const r = await run([
      "eval",
      "--checkpoint",
      torchFixture(name),
      "--train",
      `${dir}/data`,
      "--test",
      `${dir}/data`,
      "--k",
      "3",
    ]);
    const named = /running_var|conv1\.weight/.test(r.stderr);
    return v(1, `exit ${r.code}: ${short(r.stderr)}`, { crash: crashed(r), lost: r.code === 0 || !named });
  });
}

add("export-head-backbone-only", async (dir) => {
  const r = await run([
    "export",
    "--checkpoint",
    torchFixture("resnet18_backbone.pt"),
    "--out",
    `${dir}/h.onnx`,
    "--format",
    "onnx",
    "--head",
  ]);
  const wrote = (() => {
    try {
      return Deno.statSync(`${dir}/h.onnx`).isFile;
    } catch {
      return false;
    }
  })();
  return v(1, `exit ${r.code}${wrote ? ", wrote a head" : ""}: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: wrote || r.code === 0,
  });
});

add("export-out-is-checkpoint", async (dir) => {
  await Deno.copyFile(torchFixture("resnet18.pth"), `${dir}/m.pth`);
  const before = await Deno.readFile(`${dir}/m.pth`);
  await Deno.symlink(`${dir}/m.pth`, `${dir}/link`);
  const r = await run([
    "export",
    "--checkpoint",
    `${dir}/m.pth`,
    "--out",
    `${dir}/link`,
    "--format",
    "safetensors",
  ]);
  const after = await Deno.readFile(`${dir}/m.pth`);
  const same = before.length === after.length && before.every((b, i) => after[i] === b);
  return v(1, `exit ${r.code}; input ${same ? "kept" : "overwritten"}: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: !same,
  });
});

add("export-through-symlink", async (dir) => {
  await Deno.writeTextFile(`${dir}/victim`, "keep");
  await Deno.symlink(`${dir}/victim`, `${dir}/out.safetensors`);
  const r = await run([
    "export",
    "--checkpoint",
    torchFixture("resnet18.pth"),
    "--out",
    `${dir}/out.safetensors`,
    "--format",
    "safetensors",
  ]);
  const kept = (await Deno.readTextFile(`${dir}/victim`)) === "keep";
  return v(1, `exit ${r.code}; symlink target ${kept ? "kept" : "overwritten"}`, {
    crash: crashed(r),
    lost: !kept,
  });
});

add("eval-other-sources-keep-own", async (dir) => {
  // A run on a folder with train/ and test/ splits, so that its own splits can be evaluated.
  await goodFolder(`${dir}/d/train`, 8, "png");
  await goodFolder(`${dir}/d/test`, 4, "png");
  await goodFolder(`${dir}/other`, 4, "png");
  const c = await config(dir, `${dir}/d:train`, { epochs: 1, batchSize: 8, seed: 1 });
  await run(["pretrain", "--config", c, "--out", `${dir}/run`, "--json"]);
  const own = await run(["eval", "--checkpoint", `${dir}/run`, "--k", "3", "--json"]);
  const ownText = await Deno.readTextFile(`${dir}/run/eval-knn.json`).catch(() => "");
  const r = await run([
    "eval",
    "--checkpoint",
    `${dir}/run`,
    "--train",
    `${dir}/other`,
    "--test",
    `${dir}/other`,
    "--k",
    "3",
    "--json",
  ]);
  const after = await Deno.readTextFile(`${dir}/run/eval-knn.json`).catch(() => "");
  const recorded = lastJson(r.stdout)?.train_source === `${dir}/other`;
  return v(
    1,
    `exit ${own.code}/${r.code}; eval-knn.json ${after === ownText ? "kept" : "replaced"}; sources ${
      recorded ? "recorded" : "not recorded"
    }`,
    {
      crash: crashed(own) || crashed(r),
      lost: ownText === "" || after !== ownText || !recorded,
    },
  );
});

add("labels-name-in-two-classes", async (dir) => {
  const t = await tinyRun(dir, { epochs: 1 });
  // goodFolder names files alike in both classes: a/g000.png and b/g000.png.
  await Deno.writeTextFile(`${dir}/labels.txt`, "g000.png\ng001.png\n");
  const r = await run([
    "eval",
    "--checkpoint",
    t.run,
    "--method",
    "semisup",
    "--labels",
    `${dir}/labels.txt`,
    "--train",
    `${dir}/data`,
    "--test",
    `${dir}/data`,
    "--epochs",
    "1",
  ]);
  return v(1, `exit ${r.code}: ${short(r.stderr)}`, {
    crash: crashed(r),
    lost: !(oneLine(r) && /a\/g000\.png.*b\/g000\.png/.test(r.stderr)),
  });
});

// ---- second round (end) ------------------------------------------------------------------------------------

// ---- second round: hostile files to every reader, and Ctrl-C during a load (bench/hostile_checkpoints.ts) ----
// `unbounded` here also marks a hang or a run past its stated bound: each case says its bound in its note.

/** A run that never ended in time or grew past 1 GB. */
const overBound = (r: Run) => r.timedOut || r.killedForMemory || r.peakMb > 1000;
const described = (r: Run) =>
  `exit ${r.code}${r.timedOut ? " (timed out)" : ""}, peak ${
    r.peakMb.toFixed(0)
  } MB, ${r.stderr.length} bytes on stderr: ${short(r.stderr)}`;

for (
  // `refused`: the checkpoint reader itself must refuse the file (a faked record is merely not a tensor).
  const [name, make, commands, refused] of [
    ["pth-zip64-loop", hostileCheckpoints.zip64Loop, ["export", "eval", "extract", "pretrain-init"], true],
    ["pth-stride-zero-x4", () => hostileCheckpoints.strideZero(), ["export"], true],
    ["pth-overlapping-entries", () => hostileCheckpoints.overlappingEntries(), ["export"], true],
    ["pth-nested-entry", hostileCheckpoints.nestedEntry, ["export"], true],
    ["pth-sizes-disagree", hostileCheckpoints.sizesDisagree, ["export"], true],
    ["pth-inflates-past-size", hostileCheckpoints.inflatesPastDeclared, ["export"], true],
    ["pth-long4-512k", () => hostileCheckpoints.long4(2 ** 19), ["export"], true],
    ["pth-shared-list-shape", () => hostileCheckpoints.sharedListShape(40), ["export"], true],
    ["pth-faked-tensor-record", hostileCheckpoints.fakedTensorRecord, ["export"], false],
    ["pth-build-on-storage-type", hostileCheckpoints.buildOnStorageType, ["export"], true],
  ] as const
) {
  add(name, async (dir) => {
    await goodFolder(`${dir}/data`, 4, "png");
    const file = `${dir}/hostile.pth`;
    await Deno.writeFile(file, make());
    const notes: string[] = [];
    let crash = false, unbounded = false, lost = false;
    for (const command of commands) {
      const args = command === "pretrain-init"
        ? [
          "pretrain",
          "--config",
          await config(dir, `${dir}/data`, { epochs: 1, batchSize: 4 }),
          "--init",
          file,
          "--out",
          `${dir}/r`,
          "--max-steps",
          "1",
        ]
        : command === "export"
        ? ["export", "--checkpoint", file, "--out", `${dir}/out`]
        : command === "eval"
        ? ["eval", "--checkpoint", file, "--train", `${dir}/data`, "--test", `${dir}/data`]
        : ["extract", "--checkpoint", file, "--data", `${dir}/data`, "--out", `${dir}/feat`];
      // Bound: refused within 30 s (each is refused in well under a second) and under 1 GB.
      const r = await run(args, { timeoutMs: 30_000 });
      // An "internal error" line for a bad file is a crash; a file the reader should refuse and did not is lost.
      crash ||= (crashed(r) && !r.timedOut && !r.killedForMemory) ||
        /internal error, not your input/.test(r.stderr);
      unbounded ||= overBound(r) || r.stderr.length > 4000;
      lost ||= r.code === 0 || (refused && !r.timedOut && !/TorchCheckpointError/.test(r.stderr));
      notes.push(`${command}: ${described(r)}`);
    }
    return v(1, notes.join("; "), { crash, unbounded, lost });
  });
}

add("checkpoint-fifo-and-dev-zero", async (dir) => {
  const fifo = `${dir}/pipe.pth`;
  await new Deno.Command("mkfifo", { args: [fifo] }).output();
  const notes: string[] = [];
  let crash = false, unbounded = false;
  for (const path of [fifo, "/dev/zero"]) {
    // Bound: refused within 30 s without opening the FIFO (opening it blocks until a writer comes).
    const r = await run(["export", "--checkpoint", path, "--out", `${dir}/out`], { timeoutMs: 30_000 });
    crash ||= crashed(r) && !r.timedOut;
    unbounded ||= overBound(r);
    notes.push(`${path.slice(dir.length + 1) || path}: ${described(r)}`);
  }
  return v(2, notes.join("; "), { crash, unbounded });
});

add("labels-dev-zero-and-binary", async (dir) => {
  await goodFolder(`${dir}/data`, 4, "png");
  const binary = `${dir}/labels.bin`;
  await Deno.writeFile(binary, Uint8Array.from({ length: 4096 }, (_, i) => (i * 37) & 0xff));
  const notes: string[] = [];
  let crash = false, unbounded = false, lost = false;
  for (const labels of ["/dev/zero", binary]) {
    const r = await run([
      "eval",
      "--checkpoint",
      new URL("../test/fixtures/torch/resnet18.pth", import.meta.url).pathname,
      "--train",
      `${dir}/data`,
      "--test",
      `${dir}/data`,
      "--method",
      "semisup",
      "--labels",
      labels,
    ], { timeoutMs: 60_000 });
    // Bound: refused within 60 s and under 1 GB (13 GB in 25 s before); the line has no raw control bytes.
    crash ||= crashed(r) && !r.timedOut && !r.killedForMemory;
    unbounded ||= overBound(r);
    // deno-lint-ignore no-control-regex
    lost ||= r.code === 0 || /[\x00-\x08\x0b-\x1f\x7f]/.test(r.stderr);
    notes.push(`${labels.startsWith(dir) ? "binary file" : labels}: ${described(r)}`);
  }
  return v(2, notes.join("; "), { crash, unbounded, lost });
});

/** Peak RSS (MB) of a CLI run that fails at once on a missing checkpoint: the CLI's own footprint. */
const footprintMb = async (dir: string) =>
  (await run(["export", "--checkpoint", `${dir}/missing.pth`, "--out", `${dir}/x`])).peakMb;
/** Waits until `pid` holds `mb` MB: the slow file's inflated storages (128 MiB) mean the load is under way. */
const grownTo = async (pid: number, mb: number) => {
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline && rssMb(pid) < mb) await new Promise((r) => setTimeout(r, 20));
  return rssMb(pid) >= mb;
};

for (const signal of ["SIGINT", "SIGTERM"] as const) {
  add(`${signal.toLowerCase()}-during-checkpoint-load`, async (dir) => {
    const footprint = await footprintMb(dir);
    await Deno.writeFile(`${dir}/slow.pth`, hostileCheckpoints.slowToLoad(4, 4096));
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", cli, "export", "--checkpoint", `${dir}/slow.pth`, "--out", `${dir}/out`],
      env,
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const loading = await grownTo(child.pid, footprint + 80);
    const sent = performance.now();
    child.kill(signal);
    const timer = setTimeout(() => killPid(child.pid), 60_000);
    const out = await child.output();
    clearTimeout(timer);
    const seconds = (performance.now() - sent) / 1000;
    // Bound: ends within 3 s of the signal (the rest of the load takes over 5 s; over 100 s before).
    return v(
      1,
      `${signal} during the load${loading ? "" : " (never saw it start)"}: ended after ${
        seconds.toFixed(1)
      } s, exit ${out.code}`,
      {
        unbounded: seconds > 3,
        lost: out.code === 0,
        crash: /\n\s+at |panicked/.test(new TextDecoder().decode(out.stderr)),
      },
    );
  });
}

add("kill-9-wrapper-during-checkpoint-load", async (dir) => {
  const footprint = await footprintMb(dir);
  await Deno.writeFile(`${dir}/slow.pth`, hostileCheckpoints.slowToLoad(4, 4096));
  const child = new Deno.Command(wrapper, {
    args: ["run", "--allow-all", cli, "export", "--checkpoint", `${dir}/slow.pth`, "--out", `${dir}/out`],
    env,
    stdout: "null",
    stderr: "null",
  }).spawn();
  let loaders: number[] = [];
  const deadline = Date.now() + 30_000;
  while (loaders.length === 0 && Date.now() < deadline) {
    loaders = childrenOf(child.pid);
    await new Promise((r) => setTimeout(r, 20));
  }
  if (loaders.length > 0) await grownTo(loaders[0]!, footprint + 80);
  Deno.kill(child.pid, "SIGKILL");
  await child.status;
  await new Promise((r) => setTimeout(r, 5000));
  const orphans = loaders.filter(alive);
  for (const p of orphans) killPid(p);
  // Bound: no process of the wrapper left 5 s after it is killed.
  return v(
    0,
    `${loaders.length} child process(es); ${orphans.length} still running 5 s after kill -9 of the wrapper`,
    { unbounded: orphans.length > 0 },
  );
});
// ---- end of the second round's file and signal cases ----

// ---- run them -------------------------------------------------------------------------------------------

const verdicts: Verdict[] = [];
for (const [name, body] of cases) {
  if (only && !only.includes(name)) continue;
  const dir = await Deno.makeTempDir({ dir: tmp, prefix: `${name}-` });
  const started = performance.now();
  let verdict: Verdict;
  try {
    verdict = { name, ...(await body(dir)) };
  } catch (error) {
    verdict = { name, ...v(0, `probe error: ${error instanceof Error ? error.message : String(error)}`) };
  }
  await Deno.remove(dir, { recursive: true }).catch(() => undefined);
  verdicts.push(verdict);
  if (!json) {
    const flag = (b: boolean) => (b ? "X" : ".");
    console.log(
      `${name.padEnd(36)} ${String(verdict.badInputs).padStart(3)}  ${flag(verdict.crash)} ${
        flag(verdict.lost)
      } ${flag(verdict.outside)} ${flag(verdict.unbounded)}  ${
        ((performance.now() - started) / 1000).toFixed(0).padStart(3)
      } s  ${verdict.note}`,
    );
  }
}
await Deno.remove(tmp, { recursive: true }).catch(() => undefined);

const totals = {
  bad_inputs: verdicts.reduce((s, x) => s + x.badInputs, 0),
  crashes_without_one_line_error: verdicts.filter((x) => x.crash).length,
  lost_or_silently_wrong: verdicts.filter((x) => x.lost).length,
  read_outside_folder: verdicts.filter((x) => x.outside).length,
  unbounded_memory: verdicts.filter((x) => x.unbounded).length,
};
if (json) console.log(JSON.stringify({ totals, cases: verdicts }));
else {
  console.log("columns: bad inputs, crash (X), lost/wrong (X), read outside (X), unbounded memory (X)");
  console.log(
    `totals: ${totals.bad_inputs} bad inputs tried, ${totals.crashes_without_one_line_error} crashes without a one-line error, ${totals.lost_or_silently_wrong} lost data / silently wrong, ${totals.read_outside_folder} read outside their folder, ${totals.unbounded_memory} unbounded memory (peak RSS > 1 GB)`,
  );
}

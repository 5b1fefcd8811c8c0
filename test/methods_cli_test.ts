/**
 * Kill -9 mid-epoch and `--resume` give the same losses as an uninterrupted run, for DeepCluster-v2 (its
 * memory bank and targets restored) and SimCLR, through the command line.
 */
import assert from "node:assert/strict";
import { writeDemoDataset } from "../data/demo_dataset.ts";

const cli = new URL("../cli/main.ts", import.meta.url).pathname;
const env = { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "2" };

const command = (args: string[]) =>
  new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", cli, ...args],
    env,
    stdout: "null",
    stderr: "piped",
  });

const losses = async (run: string) =>
  (await Deno.readTextFile(`${run}/metrics.jsonl`)).trim().split("\n").map((l) => JSON.parse(l))
    .map((m: { step: number; loss: number }) => [m.step, m.loss]);

const exists = (path: string) => {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
};

for (const method of ["deepclusterv2", "simclr"]) {
  Deno.test(`${method}: kill -9 mid-epoch and --resume give the uninterrupted run's losses`, async () => {
    const folder = await Deno.makeTempDir({ prefix: "swav-kill-" });
    try {
      await writeDemoDataset({
        folder: `${folder}/data`,
        perClassTrain: 12,
        perClassTest: 4,
        size: 16,
        seed: 1,
      });
      const config = `${folder}/config.json`;
      await Deno.writeTextFile(
        config,
        JSON.stringify({
          data: { source: `${folder}/data:train`, workers: 0 },
          multicrop: {
            nmbCrops: [2],
            sizeCrops: [16],
            minScaleCrops: [0.3],
            maxScaleCrops: [1],
            blur: false,
          },
          model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
          optim: { baseLr: 0.3, finalLr: 0.003, warmupEpochs: 0 },
          // 7 steps an epoch, a checkpoint every 2: step 10 is mid-way through the second epoch.
          train: { method, epochs: 2, batchSize: 16, seed: 3, checkpointEvery: 2 },
        }),
      );
      const straight = await command(["pretrain", "--config", config, "--out", `${folder}/a`]).output();
      assert.equal(straight.code, 0, new TextDecoder().decode(straight.stderr));

      const child = command(["pretrain", "--config", config, "--out", `${folder}/b`]).spawn();
      const mid = `${folder}/b/checkpoint-000000010.swav`;
      while (!exists(mid)) await new Promise((r) => setTimeout(r, 20));
      child.kill("SIGKILL");
      await child.output();
      assert.ok(!exists(`${folder}/b/checkpoint-000000014.swav`), "killed before the end");
      const resumed = await command(["pretrain", "--config", config, "--out", `${folder}/b`, "--resume"])
        .output();
      assert.equal(resumed.code, 0, new TextDecoder().decode(resumed.stderr));
      assert.deepEqual(await losses(`${folder}/b`), await losses(`${folder}/a`));
    } finally {
      await Deno.remove(folder, { recursive: true });
    }
  });
}

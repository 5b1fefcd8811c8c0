/**
 * An `eval --json` result of `classes` classes, as an ImageNet-sized evaluation writes it: `perClass`
 * test images per class, each class right with its own seeded rate, its errors mostly on two
 * neighbouring classes and the rest anywhere. Seeded, so the same call gives the same file.
 */
import { seededRandom } from "../pipelines/run_report.ts";

export const syntheticEval = (classes: number, perClass = 50, seed = 1): Record<string, unknown> => {
  const random = seededRandom(seed);
  const confusion = Array.from({ length: classes }, () => new Array<number>(classes).fill(0));
  confusion.forEach((row, c) => {
    const rate = 0.2 + 0.75 * random();
    for (let i = 0; i < perClass; i++) {
      const u = random();
      const predicted = u < rate
        ? c
        : u < rate + (1 - rate) * 0.6
        ? (c + 1 + Math.floor(random() * 2)) % classes
        : Math.floor(random() * classes);
      row[predicted]! += 1;
    }
  });
  const total = classes * perClass;
  const right = confusion.reduce((s, row, c) => s + row[c]!, 0);
  return {
    method: "knn",
    top1: right / total,
    top5: Math.min(1, (right / total) * 1.3),
    per_class_accuracy: confusion.map((row, c) => row[c]! / perClass),
    confusion,
    classes: Array.from({ length: classes }, (_, c) => `n${String(1440000 + c).padStart(8, "0")}`),
    train_samples: total * 20,
    test_samples: total,
    checkpoint: "runs/imagenet/checkpoint-000100000.swav",
    step: 100000,
    k: 200,
    temperature: 0.1,
    resize: null,
  };
};

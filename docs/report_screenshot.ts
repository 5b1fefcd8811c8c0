/**
 * Makes docs/report.png from a real demo run: opens the run folder's
 * report.html (which the demo writes at its end) in headless Chromium and
 * saves the viewport.
 *
 *   npx deno task demo --out runs/demo
 *   npx deno run -A docs/report_screenshot.ts runs/demo docs/report.png
 */
import { findBrowser, inspectPage } from "../test/_browser.ts";

const [folder, target = "docs/report.png"] = Deno.args;
if (folder === undefined) {
  console.error("usage: deno run -A docs/report_screenshot.ts RUN_FOLDER [OUT.png]");
  Deno.exit(2);
}
const browser = findBrowser();
if (browser === undefined) {
  console.error("no headless Chromium found: apt-get install chromium-headless-shell");
  Deno.exit(1);
}
const report = `${await Deno.realPath(folder)}/report.html`;
const demo = JSON.parse(await Deno.readTextFile(`${folder}/demo.json`).catch(() => "null"));
if (demo === null) {
  console.error(
    `${folder} has no demo.json: make the screenshot from a folder that \`deno task demo\` wrote`,
  );
  Deno.exit(1);
}
const page = await inspectPage(browser, `file://${report}`, `document.querySelectorAll("svg").length`);
if (page.errors.length > 0) {
  console.error(`the report has errors: ${page.errors.join("; ")}`);
  Deno.exit(1);
}
await Deno.writeFile(target, page.screenshot);
console.log(`${target}: ${page.screenshot.length} bytes, ${page.value} plots, from ${report}`);
// The DevTools connection's timers can outlive the page: end here rather than wait on them.
Deno.exit(0);

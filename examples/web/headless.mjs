// Drive index.html in headless Chromium (puppeteer-core and the system's Chromium; nothing
// is downloaded) and print what the page's functions return, as JSON.
//
//   node headless.mjs PAGE_URL CALLS.json [--chromium /usr/bin/chromium] [--timeout-ms 120000]
//
// CALLS.json is a list of {"fn": "classifyImages" | "classifyPixels", "args": [...]}: the
// functions of app.js, called in order on `window.deitPort`. Prints
// {"results": [...], "console": [page console lines]}; exits 1 on a page error.
import fs from "node:fs";
import { parseArgs } from "node:util";

import puppeteer from "puppeteer-core";

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    chromium: { type: "string", default: process.env.CHROMIUM ?? "/usr/bin/chromium" },
    "timeout-ms": { type: "string", default: "120000" },
  },
});
const [pageUrl, callsFile] = positionals;
if (!pageUrl || !callsFile) {
  console.error("usage: node headless.mjs PAGE_URL CALLS.json [--chromium PATH]");
  process.exit(2);
}
const calls = JSON.parse(fs.readFileSync(callsFile, "utf8"));
const timeout = Number(opts["timeout-ms"]);

const browser = await puppeteer.launch({
  executablePath: opts.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  timeout,
});
const consoleLines = [];
let status = 0;
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(timeout);
  page.on("console", (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (error) => consoleLines.push(`pageerror: ${error.message}`));
  await page.goto(pageUrl, { waitUntil: "load" });
  await page.waitForFunction(() => window.deitPort !== undefined);
  const results = [];
  for (const { fn, args } of calls) {
    results.push(await page.evaluate((fn, args) => window.deitPort[fn](...args), fn, args));
  }
  process.stdout.write(JSON.stringify({ results, console: consoleLines }) + "\n");
} catch (error) {
  console.error(`headless.mjs: ${error.message}`);
  console.error(consoleLines.join("\n"));
  status = 1;
} finally {
  await browser.close();
}
process.exit(status);

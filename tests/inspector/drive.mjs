// Drives the MCP Inspector's web UI (2.x) in headless Chromium, as a person
// does: connect to a server of its catalog, log in at Keycloak when the
// Inspector sends the browser there (identifier-first: username, then
// password; then the consent screen of a self-registered client), then list
// the tools, call `add`, and wait for a published message in the log pane.
//
//   node drive.mjs --ui URL --server NAME --user U --password P --shots DIR
//                  [--expect connected|refused] [--message TEXT] [--timeout-ms N]
//
// With --expect refused, TEXT is what the refused answer must contain.
//
// Prints one line per step on stdout ("STEP name", "CONNECTED", "RESULT
// text", "LOG text", "REFUSED text") so the test can act between steps (it
// publishes TEXT after CONNECTED), and saves a screenshot per step in DIR.
// Exits 0 when the expected outcome was seen, 1 otherwise (with "FAIL why").
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opt } = parseArgs({
  options: {
    ui: { type: "string" },
    server: { type: "string" },
    user: { type: "string" },
    password: { type: "string" },
    shots: { type: "string" },
    expect: { type: "string", default: "connected" },
    message: { type: "string", default: "" },
    "timeout-ms": { type: "string", default: "90000" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
const timeout = Number(opt["timeout-ms"]);
const deadline = Date.now() + timeout;
const left = () => Math.max(1000, deadline - Date.now());
fs.mkdirSync(opt.shots, { recursive: true });

let shot = 0;
async function step(page, name) {
  shot += 1;
  const file = path.join(opt.shots, `${String(shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  console.log(`STEP ${name} ${file}`);
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "ratatosk-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: opt.chromium,
  headless: true,
  viewport: { width: 1400, height: 900 },
  // As root, without a sandbox; no background traffic (the network is closed).
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
// The UI asks for web fonts elsewhere: every request stays on loopback.
await context.route(/^(?!https?:\/\/(127\.0\.0\.1|localhost)[:/])/, (route) => route.abort());
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(20000);

const status = page.getByTestId("connection-status");
const alerts = page.locator(".mantine-Notification-root[role=alert]");
const onUi = () => page.url().startsWith(opt.ui);

try {
  await page.goto(`${opt.ui}/`);
  await step(page, "inspector");
  // A Mantine switch: its track takes the click, hence force.
  await page.getByRole("switch", { name: `Connect or disconnect "${opt.server}"` }).click({ force: true });

  const seen = new Set();
  let outcome = null;
  while (Date.now() < deadline && !outcome) {
    if (!onUi()) {
      // At Keycloak: fill whichever page it shows, once per page kind.
      const password = page.locator("#password");
      const username = page.locator("#username");
      const accept = page.locator("[name=accept]");
      if (await password.isVisible().catch(() => false)) {
        if (!seen.has("password")) await step(page, "keycloak-password");
        seen.add("password");
        await password.fill(opt.password);
        await page.click("#kc-login");
      } else if (await username.isVisible().catch(() => false)) {
        if (!seen.has("username")) await step(page, "keycloak-login");
        seen.add("username");
        await username.fill(opt.user);
        await page.click("#kc-login");
      } else if (await accept.isVisible().catch(() => false)) {
        if (!seen.has("consent")) await step(page, "keycloak-consent");
        seen.add("consent");
        await accept.click();
      }
      await page.waitForLoadState().catch(() => {});
    } else {
      const state = await status.getAttribute("data-status").catch(() => null);
      const texts = await alerts.allInnerTexts().catch(() => []);
      const failure = texts.find((t) => /Re-authentication required|Failed to connect|authorization failed|Cannot connect|Error/i.test(t));
      const failed = await page.getByText("Failed", { exact: true }).isVisible().catch(() => false);
      if (state === "connected") outcome = "connected";
      else if (failure || failed || state === "error") outcome = `refused ${failure ?? state ?? "Failed"}`;
    }
    if (!outcome) await page.waitForTimeout(200);
  }
  if (!outcome) throw new Error(`neither connected nor refused within ${timeout} ms (at ${page.url()})`);
  console.log(`LOGIN ${[...seen].join(",")}`);

  if (opt.expect === "refused") {
    if (outcome === "connected") throw new Error("connected, but a refusal was expected");
    await step(page, "refused");
    // The refused request's answer, in the Network pane: what the gateway said.
    let said = "";
    while (!said && Date.now() < deadline) {
      await page.getByRole("button", { name: "Expand all" }).click().catch(() => {});
      const text = await page.locator("body").innerText().catch(() => "");
      said = text.split("\n").find((line) => line.includes(opt.message)) ?? "";
      if (!said) await page.waitForTimeout(500);
    }
    if (!said) throw new Error(`no answer containing "${opt.message}" in the Network pane`);
    await page.getByText(opt.message).first().scrollIntoViewIfNeeded().catch(() => {});
    await step(page, "refusal-answer");
    console.log(`REFUSED ${outcome.slice("refused ".length).replace(/\s+/g, " ")} | ${said.trim()}`);
  } else {
    if (outcome !== "connected") throw new Error(`not connected: ${outcome}`);
    await step(page, "connected");
    console.log("CONNECTED");
    await page.locator('header label[for$="-Tools"]').click();
    const tools = page.getByTestId("tools-screen");
    await tools.getByRole("heading", { name: /Tools \(\d+\)/ }).waitFor();
    await tools.getByRole("button", { name: "add", exact: true }).click();
    await tools.getByRole("textbox", { name: /^a\b/ }).fill("2");
    await tools.getByRole("textbox", { name: /^b\b/ }).fill("3");
    await step(page, "tools");
    await tools.getByRole("button", { name: "Execute Tool" }).click();
    await tools.getByRole("heading", { name: "Results" }).waitFor();
    const result = (await tools.innerText()).split("Results").pop().trim().replace(/\s+/g, " ");
    await step(page, "tool-result");
    console.log(`RESULT ${result}`);
    if (opt.message) {
      // The test publishes the message into the session after CONNECTED. A
      // server without the logging capability gets no Logs pane: the
      // message shows in the Protocol pane's history, once expanded.
      await page.locator('label[for$="-Protocol"]').click();
      const pane = page.locator("body");
      let found = false;
      while (!found && Date.now() < deadline) {
        await page.getByRole("button", { name: "Expand all" }).click().catch(() => {});
        found = (await pane.innerText().catch(() => "")).includes(opt.message);
        if (!found) await page.waitForTimeout(500);
      }
      if (!found) throw new Error(`the published message did not show within ${timeout} ms`);
      await page.getByText(opt.message).first().scrollIntoViewIfNeeded().catch(() => {});
      await step(page, "published-message");
      console.log(`LOG ${opt.message}`);
    }
  }
} catch (e) {
  await step(page, "failure").catch(() => {});
  console.log(`FAIL ${String(e.message).split("\n")[0]} (at ${page.url()})`);
  process.exitCode = 1;
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}

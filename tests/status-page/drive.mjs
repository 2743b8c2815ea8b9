// Loads the gateway's status page (GET / on the admin listener) in headless
// Chromium three times: without credentials, with a wrong password, and
// with the admin secret as the password of HTTP Basic, as a person does
// when the browser asks. playwright-core comes from the Inspector's test
// install (tests/inspector/setup); the browser is Debian's chromium.
//
//   node drive.mjs --url URL --user U --password P --playwright DIR
//                  --shot FILE [--chromium PATH]
//
// Prints one JSON line: for each load its HTTP status and headers, and for
// the authorised one what the page shows, read from its `data-*`
// attributes. Saves a full-page screenshot of the authorised load in FILE.
import path from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" },
    user: { type: "string" },
    password: { type: "string" },
    playwright: { type: "string" },
    shot: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
const { chromium } = await import(pathToFileURL(path.join(opt.playwright, "index.mjs")).href);

const browser = await chromium.launch({
  executablePath: opt.chromium,
  headless: true,
  // As root, without a sandbox; no background traffic (the network is closed).
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

/// One load of the page in a fresh context; `read` gets the page once loaded.
async function load(httpCredentials, read) {
  const context = await browser.newContext({ httpCredentials, viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(20000);
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  // Every answer, in order: Chromium retries with the credentials after a
  // challenge, and gives up (the navigation fails) when they are refused.
  const answers = [];
  page.on("response", async (r) => answers.push({ status: r.status(), headers: await r.allHeaders() }));
  const out = { requests, answers };
  try {
    const response = await page.goto(opt.url, { waitUntil: "load" });
    out.status = response.status();
    out.headers = await response.allHeaders();
    out.text = await page.evaluate(() => document.body.innerText);
  } catch (e) {
    out.error = String(e.message).split("\n")[0];
  }
  if (read && !out.error) {
    Object.assign(out, await read(page));
  }
  await context.close();
  return out;
}

function shown() {
  const text = (el) => (el ? el.textContent.trim() : null);
  const fieldsOf = (root) =>
    Object.fromEntries([...root.querySelectorAll("[data-field]")].map((el) => [el.dataset.field, text(el)]));
  const fields = {};
  for (const root of document.querySelectorAll("h1, #node, #auth, #errors > p")) {
    Object.assign(fields, fieldsOf(root));
  }
  const orgs = Object.fromEntries([...document.querySelectorAll("tr[data-org]")].map((tr) => [tr.dataset.org, fieldsOf(tr)]));
  const replicas = Object.fromEntries([...document.querySelectorAll("tr[data-replica]")].map((tr) => [
    tr.dataset.replica,
    { server: tr.dataset.server, in_rotation: text(tr.querySelector('[data-field="in-rotation"]')),
      outstanding: text(tr.querySelector('[data-field="outstanding"]')) },
  ]));
  const servers = Object.fromEntries([...document.querySelectorAll('[data-field="era-configured"]')].map((td) => [
    td.closest("tr").dataset.server,
    { configured: td.dataset.value, resolved: text(td.querySelector('[data-field="era-resolved"]')) },
  ]));
  const federations = Object.fromEntries([...document.querySelectorAll("[data-federation]")].map((p) => [
    p.dataset.federation, [...p.querySelectorAll("[data-member]")].map((s) => s.dataset.member),
  ]));
  const errors = [...document.querySelectorAll("tr[data-error]")].map(fieldsOf);
  return { title: document.title, fields, orgs, replicas, servers, federations, errors };
}

const result = {};
result.anonymous = await load(undefined);
result.wrong = await load({ username: opt.user, password: `${opt.password}-wrong` });
result.page = await load({ username: opt.user, password: opt.password }, async (page) => {
  await page.screenshot({ path: opt.shot, fullPage: true });
  return page.evaluate(shown);
});
await browser.close();
console.log(JSON.stringify(result));

// The browser driver of tests/e2e for Firefox: Debian's firefox-esr driven by
// puppeteer-core over WebDriver BiDi (no geckodriver, no downloaded browser). It
// reads the same scenario as drive.mjs (stdin JSON) and prints the same report,
// for the ops the cross-domain journeys use:
//   goto {url | url_from, wait_until?}, eval {js, save?}, wait_js {js}, mark {}, click {selector},
//   wait_url {pattern, save?}, url {save}, cookies {save}, new_context {}, sleep {ms},
//   poll {url}, wait_requests {path, count?, contains?, timeout_ms?}, wait_cookie {name, present?}
// Firefox's BiDi does not hand request bodies to the driver: `requests` carry no
// post_data, and wait_requests with `contains` waits until that payload reached the
// fake upstream (the site's /__e2e/upstream route) instead of watching the browser.
// Host names: the scenario's `hosts` all resolve to 127.0.0.1 (network.dns.localDomains).
import puppeteer from 'puppeteer-core';

import { clip, newReport, readStdin, runScenario, stepFailed, upstreamSeen, waitUntil } from './driver_common.mjs';

const MP_PATH = /^\/(mp(-decide)?|hub|a1|seg)\//;
const MAX_CONSOLE = 400;

const scenario = JSON.parse(await readStdin());
const out = newReport();
const pages = [];
const contexts = [];
const tracked = [];   // {entry, request}
const documents = []; // {entry, request}
let browser = null;
let mark = 0;

// What BiDi cannot tell (UnsupportedOperation) is reported as unknown.
function safe(read, fallback) {
  try { return read(); } catch { return fallback; }
}

function headerList(headers) {
  return Object.entries(headers || {}).map(([name, value]) => ({ name, value: String(value) }));
}

function watch(page, index, contextIndex) {
  page.on('console', (msg) => {
    if (out.console.length < MAX_CONSOLE) {
      out.console.push({ type: msg.type(), text: clip(msg.text()), url: (msg.location() || {}).url || '', page: index });
    }
  });
  page.on('pageerror', (err) => out.page_errors.push(clip(String(err && err.stack || err))));
  page.on('framenavigated', (frame) => {
    if (frame === page.mainFrame()) out.navigations.push({ page: index, context: contextIndex, url: frame.url() });
  });
  page.on('request', (request) => {
    let url;
    try { url = new URL(request.url()); } catch { return; }
    const main = safe(() => request.isNavigationRequest() && request.frame() === page.mainFrame(), false);
    if (main) {
      documents.push({ request, entry: { page: index, context: contextIndex, method: request.method(), url: request.url(),
        headers: safe(() => request.headers(), {}), status: null, location: null, response_headers: null, failure: null } });
    }
    if (MP_PATH.test(url.pathname)) {
      tracked.push({ request, entry: { page: index, method: request.method(), url: request.url(),
        resource_type: safe(() => request.resourceType(), null), headers: safe(() => request.headers(), {}), post_data: null, status: null,
        response_headers: null, failure: null, finished: false } });
    }
  });
  page.on('response', (response) => {
    const request = response.request();
    for (const item of [...tracked, ...documents]) {
      if (item.request !== request) continue;
      item.entry.status = safe(() => response.status(), null);
      item.entry.response_headers = headerList(safe(() => response.headers(), {}));
      const location = item.entry.response_headers.find((h) => h.name.toLowerCase() === 'location');
      if ('location' in item.entry) item.entry.location = location ? location.value : null;
      item.entry.finished = true;
    }
  });
  page.on('requestfailed', (request) => {
    for (const item of [...tracked, ...documents]) {
      if (item.request !== request) continue;
      item.entry.failure = safe(() => (request.failure() || {}).errorText, null) || 'failed';
      item.entry.finished = true;
    }
  });
}

async function openPage(context) {
  const page = await context.newPage();
  pages.push(page);
  watch(page, pages.length - 1, contexts.indexOf(context));
  return page;
}

async function openContext(first) {
  const context = first ? browser.defaultBrowserContext() : await browser.createBrowserContext();
  contexts.push(context);
  return context;
}

// The test site, as node reaches it (node does not know the test host names).
const siteOf = (page) => `127.0.0.1:${new URL(page.url()).port || 80}`;

async function main() {
  browser = await puppeteer.launch({
    browser: 'firefox',
    executablePath: scenario.firefox || '/usr/bin/firefox-esr',
    headless: true,
    timeout: 30000,
    extraPrefsFirefox: {
      'network.dns.localDomains': (scenario.hosts || []).join(','),
      'network.proxy.type': 0,
      'browser.shell.checkDefaultBrowser': false,
      'datareporting.policy.dataSubmissionEnabled': false,
      'toolkit.telemetry.enabled': false,
      'app.update.enabled': false,
      'browser.safebrowsing.malware.enabled': false,
      'browser.safebrowsing.phishing.enabled': false,
      'network.captive-portal-service.enabled': false,
      'network.connectivity-service.enabled': false,
      ...(scenario.prefs || {}),
    },
  });
  let context = await openContext(true);
  let page = await openPage(context);
  for (let i = 0; i < scenario.steps.length; i++) {
    const step = scenario.steps[i];
    const timeout = step.timeout_ms || 10000;
    try {
      switch (step.op) {
        case 'goto': {
          const url = step.url_from ? out.results[step.url_from] : step.url;
          if (typeof url !== 'string') throw new Error(`no URL saved as ${JSON.stringify(step.url_from)}`);
          await page.goto(url, { waitUntil: step.wait_until === 'commit' ? 'domcontentloaded' : 'load', timeout });
          break;
        }
        case 'eval': {
          let timer;
          const value = await Promise.race([
            page.evaluate(`(async () => { ${step.js}\n})()`),
            new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`eval timed out after ${timeout} ms`)), timeout); }),
          ]).finally(() => clearTimeout(timer));
          if (step.save) out.results[step.save] = value === undefined ? null : value;
          break;
        }
        case 'wait_js':
          // Polled, a navigation in between (a landing script's round trip) tolerated.
          await waitUntil(() => page.evaluate(`(() => (${step.js}))()`), timeout, step.js);
          break;
        case 'mark':
          mark = tracked.length;
          break;
        case 'wait_requests': {
          if (step.contains) {
            await upstreamSeen(siteOf(page), step.path, step.contains, step.count || 1, timeout);
            break;
          }
          const deadline = Date.now() + timeout;
          while (tracked.slice(mark).filter((t) => new URL(t.entry.url).pathname.startsWith(step.path) && t.entry.finished).length < (step.count || 1)) {
            if (Date.now() > deadline) throw new Error(`waited ${timeout} ms for requests to ${step.path}`);
            await new Promise((r) => setTimeout(r, 50));
          }
          break;
        }
        case 'poll': {
          const deadline = Date.now() + timeout;
          for (;;) {
            try {
              const res = await fetch(step.url, { signal: AbortSignal.timeout(2000) });
              if (res.status === 200) break;
            } catch { /* not yet */ }
            if (Date.now() > deadline) throw new Error(`polled ${step.url} for ${timeout} ms`);
            await new Promise((r) => setTimeout(r, 100));
          }
          break;
        }
        case 'click':
          await page.click(step.selector);
          break;
        case 'wait_url': {
          const pattern = new RegExp(step.pattern);
          const deadline = Date.now() + timeout;
          for (;;) {
            let ready = false;
            if (pattern.test(page.url())) {
              try { ready = await page.evaluate(() => document.readyState === 'complete'); } catch { ready = false; }
            }
            if (ready) break;
            if (Date.now() > deadline) throw new Error(`waited ${timeout} ms for a URL matching ${step.pattern} (at ${page.url()})`);
            await new Promise((r) => setTimeout(r, 50));
          }
          if (step.save) out.results[step.save] = page.url();
          break;
        }
        case 'url':
          out.results[step.save] = page.url();
          break;
        case 'cookies': {
          const cookies = context.cookies ? await context.cookies() : await page.cookies();
          out.results[step.save] = cookies.map((c) => ({ ...c, httpOnly: !!c.httpOnly }));
          break;
        }
        case 'wait_cookie': {
          // Until a cookie named `name` is set (present, the default) or gone (present: false)
          // anywhere in the browser: a bounce-tracking purge of another site's cookie.
          const want = step.present !== false;
          await waitUntil(async () => {
            const cookies = context.cookies ? await context.cookies() : await page.cookies();
            return cookies.some((c) => c.name === step.name) === want;
          }, timeout, `the cookie ${step.name} ${want ? 'set' : 'gone'}`);
          break;
        }
        case 'new_context':
          context = await openContext(false);
          page = await openPage(context);
          break;
        case 'sleep':
          await new Promise((r) => setTimeout(r, step.ms));
          break;
        default:
          throw new Error(`op ${JSON.stringify(step.op)} is not in the Firefox driver`);
      }
    } catch (e) {
      stepFailed(out, i, step, e);
      break;
    }
  }
}

await runScenario(out, scenario.timeout_ms || 45000, main, () => browser && browser.close(), () => {
  out.requests = tracked.map(({ entry }) => entry);
  out.documents = documents.map(({ entry }) => entry);
});

// Thin browser driver for tests/e2e: runs one scenario in Debian's headless
// chromium through playwright-core and prints what it saw as JSON.
//
// Input (stdin, JSON):
//   {"chromium": "/usr/bin/chromium", "args": [...], "timeout_ms": 45000,
//    "steps": [{"op": "goto", "url": "..."}, ...]}
// Output (stdout, one JSON object):
//   {"ok": bool, "error": str|null, "failed_step": int|null, "results": {name: value},
//    "console": [{type, text, url, page}], "page_errors": [str],
//    "requests": [{method, url, resource_type, headers, post_data, status, response_headers, failure, page}],
//    "navigations": [{page, context, url}],
//    "documents": [{page, context, method, url, headers, status, location, response_headers, failure}]}
// `navigations` lists every committed main-frame navigation of every page (tab), in
// order; `documents` every main-frame document request, redirects included (a 302
// hop is one entry with its `location`). Pages and contexts are numbered from 0 in
// the order they were opened.
//
// Ops (every wait is bounded by the step's timeout_ms, default 10 s):
//   goto {url}                  navigate the page (waits for "load")
//   reload {}                   reload the page
//   eval {js, save?}            run `js` as the body of an async function in the page; save its result
//   wait_js {js, timeout_ms?}   wait until the expression `js` is truthy in the page
//   mark {}                     later wait_requests count only requests started after this
//   wait_requests {path, count?, contains?, timeout_ms?}
//                               wait until `count` (default 1) requests whose URL path starts with
//                               `path`, started since the last mark, have finished or failed; with
//                               `contains`, only requests whose decoded payload JSON (compact)
//                               contains that text, e.g. '"event":"Page A"'
//   poll {url, timeout_ms?}     fetch `url` from node (not the page) until it answers 200: for
//                               what the page cannot see, e.g. a beacon sent while it unloads
//   cookies {save}              every cookie of the browser context (HttpOnly included)
//   wipe_script_storage {}      what Safari's ITP does to script-writable storage: clear
//                               localStorage/sessionStorage of the current origin and every
//                               cookie that is not HttpOnly; HttpOnly cookies stay
//   mouse {moves?}              move the mouse around (user activity, for session replay)
//   sleep {ms}                  wait a fixed time (only where nothing can be awaited)
//   click {selector}            click an element of the page (a link: the navigation is
//                               not awaited here, follow with wait_url)
//   wait_url {pattern, save?}   wait until the page's URL matches the regular expression
//                               `pattern` and that document has loaded; save the URL
//   wait_landing {pattern, count?, save?}
//                               wait until the current page has requested a document whose
//                               URL matches `pattern` (its address bar may since have been
//                               cleaned by history.replaceState) and has loaded; save that URL
//                               (with `count`, the count-th such document)
//   url {save}                  the page's current URL
//   new_page {}                 open a new tab in the current browser context; it becomes
//                               the current page
//   new_context {}              open a new, separate browser context (another person: its
//                               own cookies and storage) with one tab; it becomes current
//   use_page {page}             make page number `page` current again
//   screenshot {path, width?, height?, full_page?}
//                               save a PNG of the current page (at that viewport size, if given)
// `goto` also takes {url_from: name}: the URL saved earlier under that name;
// {wait_until: "commit"} (for a page that navigates away before its load event, e.g.
// hub.js's redirect; follow with wait_url); {referer}: the Referer the page is opened with.
//
// The driver asserts nothing: the Python tests do, against what the fake
// upstream recorded and what this prints.

import { chromium } from 'playwright-core';

import { clip, newReport, readStdin, runScenario, stepFailed } from './driver_common.mjs';

// The proxy's paths: /mp/ and /mp-decide/ (the SDK's, /mp/go, link.js, hub.js), the neutral
// mount the tests configure (/a1/), Segment's /seg/ (calls and the first-party CDN), and the
// identity hub's /hub/ (ping, resolve).
const MP_PATH = /^\/(mp(-decide)?|hub|a1|seg)\//;
const MAX_CONSOLE = 400;

const scenario = JSON.parse(await readStdin());
const out = newReport();
const pages = [];     // every tab opened, in order
const contexts = [];  // every browser context opened, in order
const documents = []; // {entry, request}: main-frame document requests
let browser = null;
const tracked = [];  // {entry, request, settled}: every request to /mp/, /mp-decide/ or /hub/

function collectRequests() {
  out.requests = tracked.map(({ entry }) => {
    const { _settle, _completing, ...rest } = entry;
    return rest;
  });
  out.documents = documents.map(({ entry }) => entry);
}

function pageIndex(page) {
  const i = pages.indexOf(page);
  return i < 0 ? null : i;
}

function requestPage(request) {
  try { return pageIndex(request.frame().page()); } catch { return null; }
}

function trackDocument(request, contextIndex) {
  let main = false;
  try { main = request.isNavigationRequest() && request.frame() === request.frame().page().mainFrame(); } catch { main = false; }
  if (!main) return;
  let settle;
  const settled = new Promise((r) => { settle = r; });
  documents.push({
    request,
    settled,
    settle,
    entry: {
      page: requestPage(request), context: contextIndex, method: request.method(), url: request.url(),
      headers: null, status: null, location: null, response_headers: null, failure: null,
    },
  });
}

async function completeDocument(request, failure) {
  const item = documents.find((d) => d.request === request);
  if (!item) return;
  const { entry } = item;
  try { entry.headers = await request.allHeaders(); } catch { entry.headers = request.headers(); }
  if (failure) {
    entry.failure = failure;
  } else {
    try {
      const response = await request.response();
      if (response) {
        entry.status = response.status();
        entry.response_headers = await response.headersArray();
        const location = entry.response_headers.find((h) => h.name.toLowerCase() === 'location');
        entry.location = location ? location.value : null;
      }
    } catch (e) { entry.failure = String(e); }
  }
  item.settle();
}

function track(request) {
  let url;
  try { url = new URL(request.url()); } catch { return; }
  if (!MP_PATH.test(url.pathname)) return;
  const entry = {
    page: requestPage(request),
    method: request.method(),
    url: request.url(),
    resource_type: request.resourceType(),
    headers: null,
    post_data: null,
    status: null,
    response_headers: null,
    failure: null,
    finished: false,
  };
  // Text bodies as text; binary ones (session replay's gzip) as base64.
  let body = null;
  try { body = request.postDataBuffer(); } catch { body = null; }
  if (body) {
    const text = body.toString('utf8');
    if (Buffer.from(text, 'utf8').equals(body) && !text.includes('\uFFFD')) entry.post_data = text;
    else entry.post_data_base64 = body.toString('base64');
  }
  let settle;
  const settled = new Promise((r) => { settle = r; });
  entry._settle = settle;
  tracked.push({ entry, request, settled });
}

async function completeEntry(request, failure) {
  const item = tracked.find((t) => t.request === request);
  if (!item) return;
  const { entry } = item;
  if (entry.finished || entry._completing) return;  // its answer's head, then "finished"
  entry._completing = true;
  try { entry.headers = await request.allHeaders(); } catch { entry.headers = request.headers(); }
  if (failure) {
    entry.failure = failure;
  } else {
    try {
      const response = await request.response();
      if (response) {
        entry.status = response.status();
        entry.response_headers = await response.headersArray();
      }
    } catch (e) { entry.failure = String(e); }
  }
  entry.finished = true;
  entry._settle();
}

// The JSON a mixpanel-js request carries (data=<base64 JSON> or data=<JSON>, in
// the body or the query), re-serialized compactly; else the raw body.
function payloadText(entry) {
  let data = null;
  if (entry.post_data) {
    data = new URLSearchParams(entry.post_data).get('data');
    if (data === null) return entry.post_data;
  } else {
    data = new URL(entry.url).searchParams.get('data');
    if (data === null) return '';
  }
  try {
    const text = /^\s*[[{]/.test(data) ? data : Buffer.from(data, 'base64').toString('utf8');
    return JSON.stringify(JSON.parse(text));
  } catch {
    return data;
  }
}

let mark = 0;
async function waitRequests(path, count, contains, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const matching = tracked.slice(mark).filter((t) => new URL(t.entry.url).pathname.startsWith(path)
      && (!contains || payloadText(t.entry).includes(contains)));
    const finished = matching.filter((t) => t.entry.finished);
    if (finished.length >= count) return finished.length;
    if (Date.now() > deadline) {
      throw new Error(`waited ${timeoutMs} ms for ${count} finished request(s) to ${path}` +
        (contains ? ` carrying ${JSON.stringify(contains)}` : '') + '; ' +
        `saw ${matching.length} started, ${finished.length} finished`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function openPage(context) {
  const page = await context.newPage();
  pages.push(page);
  const index = pages.length - 1;
  page.on('console', (msg) => {
    if (out.console.length < MAX_CONSOLE) {
      out.console.push({ type: msg.type(), text: clip(msg.text()), url: (msg.location() || {}).url || '', page: index });
    }
  });
  page.on('pageerror', (err) => out.page_errors.push(clip(String(err && err.stack || err))));
  page.on('framenavigated', (frame) => {
    if (frame === page.mainFrame()) {
      out.navigations.push({ page: index, context: contexts.indexOf(context), url: frame.url() });
    }
  });
  return page;
}

async function openContext() {
  // scenario.headers: sent on every request of the context, as a browser setting
  // would (e.g. Sec-GPC: 1 from a browser with Global Privacy Control on).
  const context = await browser.newContext({ serviceWorkers: 'block', extraHTTPHeaders: scenario.headers || {} });
  contexts.push(context);
  const index = contexts.length - 1;
  context.setDefaultTimeout(10000);
  context.on('request', (r) => { track(r); trackDocument(r, index); });
  context.on('requestfinished', (r) => { completeEntry(r, null); completeDocument(r, null); });
  // A fetch whose answer the page never reads (analytics.js ignores the body)
  // may never report "finished": its answer's head is enough here.
  context.on('response', (response) => { completeEntry(response.request(), null); });
  context.on('requestfailed', (r) => {
    const failure = (r.failure() || {}).errorText || 'failed';
    completeEntry(r, failure);
    completeDocument(r, failure);
  });
  return context;
}

async function main() {
  browser = await chromium.launch({
    executablePath: scenario.chromium || '/usr/bin/chromium',
    headless: true,
    args: scenario.args || [],
    timeout: 20000,
  });
  let context = await openContext();
  let page = await openPage(context);

  for (let i = 0; i < scenario.steps.length; i++) {
    const step = scenario.steps[i];
    const timeout = step.timeout_ms || 10000;
    try {
      switch (step.op) {
        case 'goto': {
          const url = step.url_from ? out.results[step.url_from] : step.url;
          if (typeof url !== 'string') throw new Error(`no URL saved as ${JSON.stringify(step.url_from)}`);
          await page.goto(url, { waitUntil: step.wait_until || 'load', timeout, referer: step.referer });
          break;
        }
        case 'reload':
          await page.reload({ waitUntil: 'load', timeout });
          break;
        case 'eval': {
          let timer;
          const value = await Promise.race([
            page.evaluate(`(async () => { ${step.js}\n})()`),
            new Promise((_, reject) => {
              timer = setTimeout(() => reject(new Error(`eval timed out after ${timeout} ms`)), timeout);
            }),
          ]).finally(() => clearTimeout(timer));
          if (step.save) out.results[step.save] = value === undefined ? null : value;
          break;
        }
        case 'wait_js': {
          // Polled from here with page.evaluate (not waitForFunction, which a
          // page's CSP without 'unsafe-eval' refuses: the live view's).
          const deadline = Date.now() + timeout;
          for (;;) {
            let value = false;
            try { value = await page.evaluate(`(() => (${step.js}))()`); } catch (e) {
              if (!/Execution context was destroyed|navigat/i.test(String(e))) throw e;  // a navigation in between
            }
            if (value) break;
            if (Date.now() > deadline) throw new Error(`waited ${timeout} ms for ${step.js}`);
            await new Promise((r) => setTimeout(r, 50));
          }
          break;
        }
        case 'mark':
          mark = tracked.length;
          break;
        case 'wait_requests':
          await waitRequests(step.path, step.count || 1, step.contains || null, timeout);
          break;
        case 'poll': {
          const deadline = Date.now() + timeout;
          let last = 'no answer';
          for (;;) {
            try {
              const res = await fetch(step.url, { signal: AbortSignal.timeout(2000) });
              last = `${res.status} ${(await res.text()).slice(0, 300)}`;
              if (res.status === 200) break;
            } catch (e) { last = String(e); }
            if (Date.now() > deadline) throw new Error(`polled ${step.url} for ${timeout} ms; last answer: ${last}`);
            await new Promise((r) => setTimeout(r, 100));
          }
          break;
        }
        case 'cookies':
          out.results[step.save] = await context.cookies();
          break;
        case 'wipe_script_storage': {
          await page.evaluate(() => { localStorage.clear(); sessionStorage.clear(); });
          const kept = (await context.cookies()).filter((c) => c.httpOnly);
          await context.clearCookies();
          if (kept.length) await context.addCookies(kept);
          break;
        }
        case 'mouse':
          for (let m = 0; m < (step.moves || 10); m++) {
            await page.mouse.move(20 + 17 * m, 30 + 11 * m, { steps: 2 });
          }
          break;
        case 'sleep':
          await new Promise((r) => setTimeout(r, step.ms));
          break;
        case 'click':
          await page.click(step.selector, { timeout, noWaitAfter: true });
          break;
        case 'wait_url':
          await page.waitForURL(new RegExp(step.pattern), { waitUntil: 'load', timeout });
          if (step.save) out.results[step.save] = page.url();
          break;
        case 'wait_landing': {
          // A landing script takes the token out of the address bar as soon as it has
          // redeemed it, so page.url() may never show it: wait for the document request.
          const pattern = new RegExp(step.pattern);
          const index = pageIndex(page);
          const deadline = Date.now() + timeout;
          const nth = step.count || 1;
          let found = null;
          while (!(found = documents.filter((d) => d.entry.page === index && pattern.test(d.entry.url))[nth - 1])) {
            if (Date.now() > deadline) throw new Error(`waited ${timeout} ms for a document ${step.pattern}`);
            await new Promise((r) => setTimeout(r, 25));
          }
          // The request is seen before its navigation commits, and until then the
          // page still runs the document before it (whose 'load' has fired): wait
          // until the page's own navigation entry is this document (its address
          // as requested: the landing script's replaceState does not change it).
          const target = found.entry.url;
          const landed = async () => {
            try {
              return (await page.evaluate(() => (performance.getEntriesByType('navigation')[0] || {}).name || '')) === target;
            } catch (e) {
              return false; // the context went away: the navigation is under way
            }
          };
          while (!(await landed())) {
            if (Date.now() > deadline) throw new Error(`waited ${timeout} ms for the page to run ${target}`);
            await new Promise((r) => setTimeout(r, 25));
          }
          await page.waitForLoadState('load', { timeout });
          if (step.save) out.results[step.save] = found.entry.url;
          break;
        }
        case 'url':
          out.results[step.save] = page.url();
          break;
        case 'new_page':
          page = await openPage(context);
          break;
        case 'new_context':
          context = await openContext();
          page = await openPage(context);
          break;
        case 'screenshot':
          if (step.width) await page.setViewportSize({ width: step.width, height: step.height || 900 });
          await page.screenshot({ path: step.path, fullPage: !!step.full_page });
          break;
        case 'use_page': {
          const chosen = pages[step.page];
          if (!chosen) throw new Error(`no page number ${step.page}`);
          page = chosen;
          context = chosen.context();
          break;
        }
        default:
          throw new Error(`unknown op ${JSON.stringify(step.op)}`);
      }
    } catch (e) {
      stepFailed(out, i, step, e);
      break;
    }
  }
  // Let in-flight responses settle (bounded) so their answers are reported. An
  // XHR or fetch always ends (answered or failed): up to 15 s, for a loaded
  // machine. The SDK may start one more batch after the last step (its flush
  // timer: 100 ms in these pages), so settle until no request has started for
  // 300 ms. A beacon's end is not always reported: the rest gets 2 s.
  const bounded = (items, ms) => Promise.race([
    Promise.all(items.map((t) => t.settled)),
    new Promise((r) => setTimeout(r, Math.max(0, ms))),
  ]);
  const until = Date.now() + 15000;
  for (;;) {
    const count = tracked.length;
    await bounded(tracked.filter((t) => t.entry.resource_type !== 'ping'), until - Date.now());
    await new Promise((r) => setTimeout(r, 300));
    if (tracked.length === count || Date.now() >= until) break;
  }
  await bounded([...tracked, ...documents], 2000);
}

await runScenario(out, scenario.timeout_ms || 45000, main, () => browser && browser.close(), collectRequests);

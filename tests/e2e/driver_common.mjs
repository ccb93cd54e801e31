// What the three browser drivers of tests/e2e share (drive.mjs: chromium through
// playwright-core; drive_firefox.mjs: firefox-esr over WebDriver BiDi; drive_webkit.mjs:
// WebKitGTK through WebKitWebDriver): the scenario on stdin, the report they print,
// and the waits that ask the test site instead of the browser.

const MAX_TEXT = 600;

export function readStdin() {
  return new Promise((resolve, reject) => {
    let data = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (chunk) => { data += chunk; });
    process.stdin.on('end', () => resolve(data));
    process.stdin.on('error', reject);
  });
}

export function clip(text) {
  return text.length > MAX_TEXT ? text.slice(0, MAX_TEXT) + '…' : text;
}

// The report every driver prints (one JSON object on stdout).
export function newReport() {
  return {
    ok: false, error: null, failed_step: null, results: {}, console: [], page_errors: [], requests: [],
    navigations: [], documents: [],
  };
}

// Poll `read` (an async function; a throw counts as "not yet": a navigation in
// between) until it returns something truthy, at most `timeoutMs`.
export async function waitUntil(read, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let value = false;
    try { value = await read(); } catch { value = false; }
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`waited ${timeoutMs} ms for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// Until `count` requests carrying `contains` to `path` (a proxy path: /mp/track/) have
// reached the fake upstream, as the test site's /__e2e/upstream route (on `site`,
// "127.0.0.1:<port>") tells: for drivers that see no request bodies.
export async function upstreamSeen(site, path, contains, count, timeoutMs) {
  const upstreamPath = path.replace(/^\/(mp|seg|a1)\//, '/').replace(/\/$/, '');
  const query = new URLSearchParams({ path: upstreamPath, contains, count: String(count) });
  await waitUntil(async () => {
    const res = await fetch(`http://${site}/__e2e/upstream?${query}`, { signal: AbortSignal.timeout(2000) });
    return res.status === 200;
  }, timeoutMs, `${count} upstream request(s) to ${path} carrying ${contains}`);
}

// A failed step, as every driver reports it: the step's number and op, and why.
export function stepFailed(out, i, step, e) {
  out.error = `step ${i} (${step.op}): ${e && e.message ? e.message : e}`;
  out.failed_step = i;
}

// The driver's whole run: `main` (its steps) under a watchdog of `timeoutMs`, then
// `close` (the browser, bounded) and the report on stdout; `complete` adds what was
// collected on the way (the requests) just before it is printed. Exits 0 when every
// step passed, 1 when one failed, 3 when the watchdog fired.
export async function runScenario(out, timeoutMs, main, close, complete = () => {}) {
  let done = false;
  const finish = (code) => {
    if (done) return;
    done = true;
    complete();
    process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(code));
  };
  const bounded = (ms) => Promise.race([Promise.resolve().then(close).catch(() => {}), new Promise((r) => setTimeout(r, ms))]);
  const watchdog = setTimeout(() => {
    out.error = out.error || `scenario timed out after ${timeoutMs} ms`;
    bounded(3000).then(() => finish(3));
  }, timeoutMs);
  try {
    await main();
  } catch (e) {
    out.error = out.error || `driver: ${e && e.stack ? e.stack : e}`;
  }
  out.ok = out.error === null;
  clearTimeout(watchdog);
  await bounded(5000);
  finish(out.ok ? 0 : 1);
}

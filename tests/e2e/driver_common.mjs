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

// The browser driver of tests/e2e for WebKit: WebKitGTK's MiniBrowser (Debian's
// libwebkit2gtk-4.1) under Xvfb, driven through WebKitWebDriver (webkit2gtk-driver)
// by selenium-webdriver. It reads the same scenario as drive.mjs (stdin JSON) and
// prints the same report for the ops the cross-domain journeys use:
//   goto {url | url_from}, eval {js, save?}, wait_js {js}, mark {}, click {selector},
//   wait_url {pattern, save?}, url {save}, cookies {save}, sleep {ms},
//   wait_requests {path, count?, contains?, timeout_ms?}
// Classic WebDriver sees no network: `requests` stay empty, waits for a payload
// wait until it reached the fake upstream (the site's /__e2e/upstream), and
// `cookies` are those of the current page's site (HttpOnly included), as
// WebDriver's Get All Cookies gives them. Host names: the scenario's `site`
// (127.0.0.1:<port>) is the browser's HTTP proxy, so every *.test name reaches it.
import { spawn } from 'node:child_process';
import net from 'node:net';
import { Builder, By } from 'selenium-webdriver';

import { newReport, readStdin, runScenario, stepFailed, upstreamSeen, waitUntil } from './driver_common.mjs';

const scenario = JSON.parse(await readStdin());
const out = newReport();
const children = [];
let driver = null;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => { const { port } = server.address(); server.close(() => resolve(port)); });
    server.on('error', reject);
  });
}

function listening(port, timeoutMs) {
  return waitUntil(() => new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true); });
    socket.on('error', () => resolve(false));
  }), timeoutMs, `something to listen on ${port}`);
}

function stopChildren() {
  for (const child of children.reverse()) {
    try { child.kill('SIGTERM'); } catch { /* gone */ }
  }
}

async function main() {
  // A display of our own (Xvfb), then WebKitWebDriver on a free port.
  const display = 90 + Math.floor(Math.random() * 800);
  children.push(spawn(scenario.xvfb || '/usr/bin/Xvfb', [`:${display}`, '-screen', '0', '1280x900x24', '-nolisten', 'tcp'],
    { stdio: 'ignore' }));
  const port = await freePort();
  children.push(spawn(scenario.webdriver || '/usr/bin/WebKitWebDriver', [`--port=${port}`, '--host=127.0.0.1'],
    { stdio: 'ignore', env: { ...process.env, DISPLAY: `:${display}` } }));
  await listening(port, 10000);
  driver = await new Builder()
    .usingServer(`http://127.0.0.1:${port}`)
    .withCapabilities({
      browserName: 'MiniBrowser',
      'webkitgtk:browserOptions': {
        binary: scenario.webkit,
        args: ['--automation', `--proxy=http://${scenario.site}`],
      },
    })
    .build();
  await driver.manage().setTimeouts({ script: 15000, pageLoad: 20000 });
  for (let i = 0; i < scenario.steps.length; i++) {
    const step = scenario.steps[i];
    const timeout = step.timeout_ms || 10000;
    try {
      switch (step.op) {
        case 'goto': {
          const url = step.url_from ? out.results[step.url_from] : step.url;
          if (typeof url !== 'string') throw new Error(`no URL saved as ${JSON.stringify(step.url_from)}`);
          await driver.get(url);
          out.navigations.push({ page: 0, context: 0, url });
          break;
        }
        case 'eval': {
          const value = await driver.executeAsyncScript(
            `const done = arguments[arguments.length - 1];
             (async () => { ${step.js}\n})().then((v) => done({ v: v === undefined ? null : v }), (e) => done({ e: String(e) }));`,
          );
          if (value && value.e) throw new Error(value.e);
          if (step.save) out.results[step.save] = value ? value.v : null;
          break;
        }
        case 'wait_js':
          // Polled, a navigation in between (a landing script's round trip) tolerated.
          await waitUntil(() => driver.executeScript(`return (${step.js});`), timeout, step.js);
          break;
        case 'mark':
          break;
        case 'wait_requests':
          if (!step.contains) throw new Error('the WebKit driver waits for payloads only (wait_requests needs contains)');
          await upstreamSeen(scenario.site, step.path, step.contains, step.count || 1, timeout);
          break;
        case 'click':
          await (await driver.findElement(By.css(step.selector))).click();
          break;
        case 'wait_url': {
          const pattern = new RegExp(step.pattern);
          const deadline = Date.now() + timeout;
          for (;;) {
            let url = '';
            let ready = false;
            try {
              url = await driver.getCurrentUrl();
              ready = pattern.test(url) && (await driver.executeScript('return document.readyState')) === 'complete';
            } catch { ready = false; }
            if (ready) break;
            if (Date.now() > deadline) throw new Error(`waited ${timeout} ms for a URL matching ${step.pattern} (at ${url})`);
            await new Promise((r) => setTimeout(r, 50));
          }
          if (step.save) out.results[step.save] = await driver.getCurrentUrl();
          break;
        }
        case 'url':
          out.results[step.save] = await driver.getCurrentUrl();
          break;
        case 'cookies':
          out.results[step.save] = (await driver.manage().getCookies()).map((c) => ({ ...c, httpOnly: !!c.httpOnly }));
          break;
        case 'sleep':
          await new Promise((r) => setTimeout(r, step.ms));
          break;
        default:
          throw new Error(`op ${JSON.stringify(step.op)} is not in the WebKit driver`);
      }
    } catch (e) {
      stepFailed(out, i, step, e);
      break;
    }
  }
}

await runScenario(out, scenario.timeout_ms || 45000, main, () => driver && driver.quit(), stopChildren);

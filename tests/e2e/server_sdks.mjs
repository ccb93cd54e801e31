// The server SDKs from npm, configured as their users would point them at the proxy:
//   node server_sdks.mjs <base url> <mixpanel token> <segment write key> <device id>
// mixpanel (mixpanel-node): track (no time of its own), people.set, a $merge-free alias;
// @segment/analytics-node: host and path apart (the mount in `path`);
// analytics-node 6 (legacy): the mount in `host`.
// Prints {sdk: "ok" | error} as JSON and exits; every request goes to <base url> only.
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const Mixpanel = require('mixpanel');
const { Analytics } = require('@segment/analytics-node');
const LegacyAnalytics = require('analytics-node');

const [base, token, writeKey, device] = process.argv.slice(2);
const url = new URL(base);
const results = {};
const done = (name, resolve) => (err) => { results[name] = err ? String(err) : 'ok'; resolve(); };

const mp = Mixpanel.init(token, {
  host: url.hostname, port: Number(url.port), protocol: 'http', path: '/mp', verbose: true, keepAlive: false,
});
await new Promise((r) => mp.track('Node track', { distinct_id: device, plan: 'pro' }, done('mixpanel.track', r)));
await new Promise((r) => mp.people.set('user-node', { plan: 'pro' }, done('mixpanel.people', r)));

const next = new Analytics({ writeKey, host: base, path: '/seg/v1/batch', maxEventsInBatch: 1 });
next.on('error', (err) => { results['analytics-node'] = String(err.reason || err.code || err); });
next.track({ anonymousId: device, event: 'Node next track', properties: { sdk: 'next' } });
await next.closeAndFlush({ timeout: 10000 });
results['analytics-node'] ??= 'ok';

const legacy = new LegacyAnalytics(writeKey, { host: `${base}/seg`, flushAt: 1, enable: true });
legacy.track({ anonymousId: device, event: 'Node legacy track', properties: { sdk: 'legacy' } });
await new Promise((r) => legacy.flush(done('analytics-node@6', r)));

console.log(JSON.stringify(results));

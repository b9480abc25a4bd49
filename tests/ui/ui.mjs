// Drives meshbridge's admin web UI in a real headless Chromium (via playwright-core) and
// checks what each page shows. Run by tests/ui_e2e.rs against a real `meshbridge run`:
//
//   node tests/ui/ui.mjs '{"url": "http://127.0.0.1:9090/", "screenshots": "target/ui-screenshots",
//                          "services": ["frontend", "orders"], "proxy": "frontend-1", ...}'
//
// Expectations (JSON keys; all but url and screenshots optional):
//   url            the admin server's base URL
//   screenshots    directory for one full-page PNG per page
//   services       service names the services page must list
//   search         {query, match: [names shown], hidden: [names filtered out]}
//   service        {name, instances: N, dependent_proxy: NODE, access_action, unknown_callers: [..],
//                   text: [strings the page must show], escaped: "text that must appear literally",
//                   ejections / latency: text the status line of that button's answer shows}
//   proxy          node id of a connected proxy with an Envoy admin
//   stats          {filter: REGEX, expect: "a stat name the output must contain"}
//   clusters       a string the Clusters output must contain
//   log_level      level to apply (default debug)
//   missing_service  a service name that does not exist: its page must show the API error
//   compare        {overall: badge text, peers: N, text: [strings some peer's card shows]}
//   changes_min    least number of rows on the changes page
//   allow_nack     do not fail when the proxies page shows a NACK
//   board          the migration board: {services: {NAME: {runs_on, text: [strings its row shows]}},
//                   edges: [[caller, callee]], summary: [strings], order: {service, order,
//                   expect: "what its row shows once the leader carried the order out"}}
//   board_only     check the migration board only, not the other pages
//
// Exits 0 when every expectation holds; otherwise prints what failed (with the page's console
// errors and failed requests) to stderr, saves failure.png, and exits 1. Every wait is bounded.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const STEP_TIMEOUT_MS = 8000;
const OVERALL_TIMEOUT_MS = 120000;

function usage(msg) {
  console.error(`ui.mjs: ${msg}\nusage: node tests/ui/ui.mjs '{"url": "http://127.0.0.1:9090/", "screenshots": "DIR", ...}'`);
  process.exit(2);
}

let cfg;
try {
  cfg = JSON.parse(process.argv[2] || '');
} catch (e) {
  usage(`the argument must be one JSON object (${e.message})`);
}
if (!cfg || typeof cfg.url !== 'string') usage('"url" is required');
if (typeof cfg.screenshots !== 'string') usage('"screenshots" is required');

let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  console.error(`ui.mjs: playwright-core is not installed (${e.message}): run tests/ui/setup.sh (or make test)`);
  process.exit(1);
}

const executablePath = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
if (!fs.existsSync(executablePath)) {
  console.error(`ui.mjs: no Chromium at ${executablePath}: run tests/ui/setup.sh (or make test), or set CHROMIUM_BIN`);
  process.exit(1);
}

const base = new URL(cfg.url);
const shots = path.resolve(cfg.screenshots);
fs.mkdirSync(shots, { recursive: true });
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'meshbridge-ui-'));

/** Problems seen on the page: console errors, uncaught exceptions, failed requests. */
const problems = [];
/** Responses with an error status the test causes on purpose: {path, status}, consumed once seen. */
const expectedFailures = [];
const log = (msg) => console.log(`ui: ${msg}`);

class Failed extends Error {}
function check(cond, msg) {
  if (!cond) throw new Failed(msg);
}

let browser;
let page;
const watchdog = setTimeout(() => finish(new Failed(`the whole run took longer than ${OVERALL_TIMEOUT_MS / 1000}s`)), OVERALL_TIMEOUT_MS);

async function finish(err) {
  clearTimeout(watchdog);
  let code = 0;
  if (!err && problems.length) err = new Failed('the page reported problems');
  if (err) {
    code = 1;
    console.error(`ui.mjs: FAILED: ${err instanceof Failed ? err.message : err.stack || err}`);
    for (const p of problems) console.error(`  page problem: ${p}`);
    if (page) {
      try {
        if (await page.isVisible('#error')) console.error(`  error box: ${(await page.locator('#error-text').textContent({ timeout: 1000 })).trim()}`);
        await page.screenshot({ path: path.join(shots, 'failure.png'), fullPage: true, timeout: 5000 });
        console.error(`  screenshot: ${path.join(shots, 'failure.png')}`);
      } catch (_) { /* the page is gone */ }
    }
  }
  try {
    if (browser) await browser.close();
  } catch (_) { /* already gone */ }
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(code);
}

/** Waits until the router finished rendering `name`; fails with the error box when it could not. */
async function waitPage(name) {
  const sel = `#main[data-page="${name}"][data-loaded="true"], #main[data-page="${name}"][data-loaded="error"]`;
  try {
    await page.waitForSelector(sel, { timeout: STEP_TIMEOUT_MS });
  } catch (_) {
    const state = await page.evaluate(() => ({ hash: location.hash, page: document.querySelector('#main')?.dataset.page, loaded: document.querySelector('#main')?.dataset.loaded }));
    throw new Failed(`page ${name} did not render within ${STEP_TIMEOUT_MS} ms (at ${JSON.stringify(state)})`);
  }
  if ((await page.getAttribute('#main', 'data-loaded')) === 'error') {
    throw new Failed(`page ${name} could not load: ${(await page.textContent('#error-text')).trim()}`);
  }
}

async function goto(hash, name) {
  await page.goto(new URL('/' + hash, base).href, { waitUntil: 'domcontentloaded', timeout: STEP_TIMEOUT_MS });
  await waitPage(name);
}

async function clickNav(route) {
  await page.click(`#nav a[data-route="${route}"]`);
  await waitPage(route);
}

async function screenshot(name) {
  const file = path.join(shots, name + '.png');
  await page.screenshot({ path: file, fullPage: true, timeout: STEP_TIMEOUT_MS });
  log(`screenshot ${file}`);
}

async function text(sel) {
  return ((await page.locator(sel).first().textContent({ timeout: STEP_TIMEOUT_MS })) || '').trim();
}

/** Clicks a diagnostics button and waits for its result; fails with the status line on error. */
async function diagnostic(button, kind) {
  await page.click(button);
  const done = `#diag-result[data-kind="${kind}"][data-state="done"], #diag-result[data-kind="${kind}"][data-state="error"]`;
  try {
    await page.waitForSelector(done, { timeout: STEP_TIMEOUT_MS });
  } catch (_) {
    throw new Failed(`${kind}: no result within ${STEP_TIMEOUT_MS} ms (status: ${await text('#diag-status')})`);
  }
  const state = await page.getAttribute('#diag-result', 'data-state');
  check(state === 'done', `${kind}: ${await text('#diag-status')}`);
  const errorShown = await page.isVisible('#error');
  check(!errorShown, `${kind}: the error box is shown: ${await text('#error-text')}`);
}

async function run() {
  // A persistent context on a fresh, empty profile directory (removed at the end).
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    timeout: 30000,
    viewport: { width: 1440, height: 900 },
    deviceScaleFactor: 1,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  page = browser.pages()[0] || (await browser.newPage());
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  page.setDefaultNavigationTimeout(STEP_TIMEOUT_MS);

  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const t = msg.text();
    // Chromium logs every error response of a fetch; the deliberate ones are expected.
    const failed = t.match(/Failed to load resource: the server responded with a status of (\d+)/);
    if (failed) {
      const status = Number(failed[1]);
      const url = msg.location()?.url || '';
      if (expectedFailures.some((f) => f.status === status && (!url || url.includes(f.path)))) return;
    }
    problems.push(`console error: ${t}`);
  });
  page.on('pageerror', (e) => problems.push(`uncaught exception: ${e.message}`));
  page.on('requestfailed', (r) => problems.push(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    if (r.status() < 400) return;
    const u = new URL(r.url());
    const i = expectedFailures.findIndex((f) => f.status === r.status() && u.pathname === f.path);
    if (i >= 0) return;
    problems.push(`HTTP ${r.status()} for ${r.request().method()} ${r.url()}`);
  });
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (u.protocol !== 'data:' && u.origin !== base.origin) problems.push(`request to another origin: ${r.url()}`);
  });

  if (cfg.board_only) {
    await boardPage();
    return;
  }

  // --- services -------------------------------------------------------------------------
  await page.goto(base.href, { waitUntil: 'domcontentloaded', timeout: STEP_TIMEOUT_MS });
  await waitPage('services');
  check((await page.evaluate(() => location.hash)) === '#/services', 'the root page does not open #/services');
  const listed = await page.$$eval('tr[data-testid="service-row"]', (rows) => rows.map((r) => r.dataset.name));
  for (const s of cfg.services || []) check(listed.includes(s), `services page: ${s} is not listed (listed: ${listed.join(', ')})`);
  log(`services page lists ${listed.join(', ')}`);
  if (cfg.search) {
    await page.fill('#service-search', cfg.search.query);
    const visible = await page.$$eval('tr[data-testid="service-row"]', (rows) => rows.filter((r) => !r.hidden && r.offsetParent !== null).map((r) => r.dataset.name));
    for (const s of cfg.search.match || []) check(visible.includes(s), `search "${cfg.search.query}": ${s} is not shown (shown: ${visible.join(', ')})`);
    for (const s of cfg.search.hidden || []) check(!visible.includes(s), `search "${cfg.search.query}": ${s} is still shown`);
    check((await text('#services-count')).includes(`${visible.length} of ${listed.length}`), `search: the count says "${await text('#services-count')}"`);
    await page.fill('#service-search', 'zz-no-such-service-zz');
    check(await page.isVisible('#services-no-match'), 'search with no match: no "No service matches" row');
    await page.fill('#service-search', '');
    const all = await page.$$eval('tr[data-testid="service-row"]', (rows) => rows.filter((r) => !r.hidden).length);
    check(all === listed.length, `clearing the search shows ${all} of ${listed.length} services`);
    log(`search "${cfg.search.query}" shows ${visible.join(', ')}`);
  }
  await screenshot('services');

  // --- one service ----------------------------------------------------------------------
  if (cfg.service) {
    const s = cfg.service;
    await page.click(`tr[data-testid="service-row"][data-name="${s.name}"] a`);
    await waitPage('service');
    check((await text('#service-name')) === s.name, `service page: title is not ${s.name}`);
    const rows = await page.locator('tr[data-testid="instance-row"]').count();
    if (s.instances !== undefined) check(rows === s.instances, `service ${s.name}: ${rows} instance rows, expected ${s.instances}`);
    if (s.dependent_proxy) {
      const proxies = await text('#dependents-proxies');
      check(proxies.includes(s.dependent_proxy), `service ${s.name}: proxy ${s.dependent_proxy} is not among its dependents: ${proxies}`);
    }
    if (s.dependent_services) {
      const deps = await text('#dependents-services');
      for (const d of s.dependent_services) check(deps.includes(d), `service ${s.name}: ${d} not among dependent services: ${deps}`);
    }
    if (s.access_action) check((await text('#access-action')) === s.access_action, `service ${s.name}: access action is "${await text('#access-action')}"`);
    for (const u of s.unknown_callers || []) check((await text('#unknown-callers')).includes(u), `service ${s.name}: unknown caller ${u} not shown`);
    const body = await text('#main');
    for (const t of s.text || []) check(body.includes(t), `service ${s.name}: the page does not show "${t}"`);
    if (s.escaped) {
      check(body.includes(s.escaped), `service ${s.name}: "${s.escaped}" is not shown literally`);
      const injected = await page.$$eval('#main img, #main script, #main b, #main i', (els) => els.length);
      check(injected === 0, `service ${s.name}: API text was inserted as HTML (${injected} injected elements)`);
    }
    for (const prefix of ['ejections', 'latency']) {
      if (!s[prefix]) continue;
      await page.click(`#btn-${prefix}`);
      await page.waitForSelector(`#${prefix}-result[data-state="done"], #${prefix}-result[data-state="error"]`, { timeout: STEP_TIMEOUT_MS });
      const status = await text(`#${prefix}-status`);
      check((await page.getAttribute(`#${prefix}-result`, 'data-state')) === 'done', `service ${s.name}: ${prefix}: ${status}`);
      check(status.includes(s[prefix]), `service ${s.name}: ${prefix} says "${status}", not "${s[prefix]}"`);
      log(`service page of ${s.name}: ${status}`);
    }
    log(`service page of ${s.name}: ${rows} instances`);
    await screenshot('service');
  }

  // --- proxies --------------------------------------------------------------------------
  await clickNav('proxies');
  const nodes = await page.$$eval('tr[data-testid="proxy-row"]', (rows) => rows.map((r) => r.dataset.node));
  if (cfg.proxy) check(nodes.includes(cfg.proxy), `proxies page: ${cfg.proxy} is not listed (listed: ${nodes.join(', ')})`);
  const nacks = await page.locator('[data-testid="nack"]').count();
  if (!cfg.allow_nack) check(nacks === 0, `proxies page shows ${nacks} NACK(s)`);
  log(`proxies page lists ${nodes.join(', ')}`);
  await screenshot('proxies');

  // --- one proxy and its diagnostics -----------------------------------------------------
  if (cfg.proxy) {
    await page.click(`tr[data-testid="proxy-row"][data-node="${cfg.proxy}"] td:first-child a`);
    await waitPage('proxy');
    check((await text('#proxy-node')) === cfg.proxy, 'proxy page: wrong node in the title');
    const types = await page.$$eval('#versions-table tbody tr', (rows) => rows.map((r) => [r.dataset.type, r.cells[3]?.textContent.trim()]));
    for (const t of ['cds', 'eds', 'lds', 'rds']) {
      const row = types.find(([k]) => k === t);
      check(row && row[1] === 'acked', `proxy page: ${t} is ${row ? row[1] : 'missing'}, not acked`);
    }
    const resources = await text('#resources');
    check(/CDS/.test(resources) && /LDS/.test(resources), `proxy page: resources by type missing: ${resources}`);

    await diagnostic('#btn-config-dump', 'config_dump');
    check((await text('#diag-output')).includes('"configs"'), 'config dump: the output has no "configs"');
    log('config dump shown');

    if (cfg.stats) {
      await page.fill('#stats-filter', cfg.stats.filter);
      await diagnostic('#btn-stats', 'stats');
      const out = await text('#diag-output');
      check(out.includes(cfg.stats.expect), `stats with filter ${cfg.stats.filter}: no ${cfg.stats.expect} in:\n${out.slice(0, 2000)}`);
      const lines = out.split('\n').filter((l) => l.trim());
      const re = new RegExp(cfg.stats.filter);
      check(lines.every((l) => re.test(l.split(':')[0])), `stats: lines not matching ${cfg.stats.filter}: ${lines.filter((l) => !re.test(l.split(':')[0])).slice(0, 5).join(' | ')}`);
      log(`stats: ${lines.length} lines match ${cfg.stats.filter}`);
      await screenshot('proxy-stats');
    }

    await diagnostic('#btn-clusters', 'clusters');
    if (cfg.clusters) check((await text('#diag-output')).includes(cfg.clusters), `clusters: no "${cfg.clusters}" in the output`);
    log('clusters shown');

    const level = cfg.log_level || 'debug';
    await page.selectOption('#log-level', level);
    await diagnostic('#btn-log-apply', 'logging');
    const applied = await text('#log-level-result');
    check(applied.includes(`set to ${level}`), `log level: result says "${applied}"`);
    log(`log level: ${applied}`);

    await diagnostic('#btn-diff', 'diff');
    const inSync = await page.getAttribute('#diff-in-sync', 'data-in-sync');
    const diffRows = await page.$$eval('#diff-table tbody tr', (rows) => rows.map((r) => r.dataset.type));
    if (inSync !== 'true') {
      const table = await page.$$eval('#diff-table tr', (rows) => rows.map((r) => [...r.cells].map((c) => c.textContent.trim()).join(' | ')));
      throw new Failed(`config diff: not in sync:\n    ${table.join('\n    ')}`);
    }
    for (const t of ['cds', 'eds', 'lds', 'rds']) check(diffRows.includes(t), `config diff: no row for ${t} (rows: ${diffRows.join(', ')})`);
    log(`config diff: in sync (${diffRows.join(', ')})`);
    await screenshot('proxy');
  }

  // --- sources, compare, changes ----------------------------------------------------------
  await clickNav('sources');
  const sources = await page.$$eval('tr[data-testid="source-row"]', (rows) => rows.map((r) => [r.dataset.name, r.cells[2].textContent.trim()]));
  check(sources.length > 0, 'sources page lists no source');
  for (const [name, synced] of sources) check(synced === 'synced', `source ${name} is "${synced}"`);
  log(`sources page: ${sources.map(([n]) => n).join(', ')}`);
  await screenshot('sources');

  await clickNav('compare');
  check((await text('#self-digest')).length > 0, 'compare page: no digest of this instance');
  const overall = await text('#compare-overall');
  check(overall.length > 0, 'compare page: no overall badge');
  if (cfg.compare) {
    const c = cfg.compare;
    if (c.overall) check(overall === c.overall, `compare page: overall badge says "${overall}", expected "${c.overall}"`);
    const peers = await page.$$eval('[data-testid="peer"]', (els) => els.map((e) => ({ peer: e.dataset.peer, agree: e.dataset.agree, text: e.textContent })));
    if (c.peers !== undefined) check(peers.length === c.peers, `compare page: ${peers.length} peers shown, expected ${c.peers}`);
    for (const p of peers) check(p.text.includes(p.agree === 'true' ? 'agree' : 'disagree'), `compare page: peer ${p.peer} has no agree/disagree badge`);
    for (const t of c.text || []) check(peers.some((p) => p.text.includes(t)), `compare page: no peer shows "${t}"`);
  }
  log(`compare page: ${overall}`);
  await screenshot('compare');

  await clickNav('changes');
  const changes = await page.locator('tr[data-testid="change-row"]').count();
  check(changes >= (cfg.changes_min || 0), `changes page: ${changes} rows, expected at least ${cfg.changes_min}`);
  log(`changes page: ${changes} rows`);
  await screenshot('changes');

  if (cfg.board) await boardPage();

  // --- an API error is shown, not swallowed ------------------------------------------------
  if (cfg.missing_service) {
    expectedFailures.push({ path: '/api/services/' + encodeURIComponent(cfg.missing_service), status: 404 });
    await page.goto(new URL('/#/service/' + encodeURIComponent(cfg.missing_service), base).href, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#main[data-page="service"][data-loaded="error"]', { timeout: STEP_TIMEOUT_MS });
    check(await page.isVisible('#error'), 'a missing service: the error box is not visible');
    const msg = await text('#error-text');
    check(msg.includes('404') && msg.includes(cfg.missing_service), `a missing service: the error box says "${msg}"`);
    log(`missing service: error box says "${msg}"`);
    await screenshot('error');
  }
}

/** The migration board: rows, the graph's nodes coloured by where they run, its edges, and an order. */
async function boardPage() {
  const b = cfg.board || {};
  await goto('#/board', 'board');
  const rowsOf = () => page.$$eval('tr[data-testid="board-row"]', (rs) => rs.map((r) => ({ name: r.dataset.name, runs: r.dataset.runsOn, text: r.textContent, step: r.querySelector('[data-testid="board-step"]')?.textContent || '' })));
  const rows = await rowsOf();
  const nodes = await page.$$eval('[data-testid="board-node"]', (ns) => ns.map((n) => ({ name: n.dataset.name, runs: n.dataset.runsOn, fill: getComputedStyle(n.querySelector('rect')).fill })));
  for (const [name, want] of Object.entries(b.services || {})) {
    const row = rows.find((r) => r.name === name);
    check(row, `board: no row for ${name} (rows: ${rows.map((r) => r.name).join(', ')})`);
    const node = nodes.find((n) => n.name === name);
    check(node, `board: no graph node for ${name}`);
    if (want.runs_on) {
      check(row.runs === want.runs_on, `board: ${name} runs on "${row.runs}", expected "${want.runs_on}"`);
      check(node.runs === want.runs_on, `board: ${name}'s node says "${node.runs}", expected "${want.runs_on}"`);
    }
    for (const t of want.text || []) check(row.text.includes(t), `board: ${name}'s row does not show "${t}": ${row.text}`);
  }
  // One colour per place a service runs, a different one for each place.
  const fills = {};
  for (const n of nodes) (fills[n.runs] = fills[n.runs] || new Set()).add(n.fill);
  for (const [runs, set] of Object.entries(fills)) check(set.size === 1, `board: nodes running on ${runs} have ${set.size} colours: ${[...set].join(', ')}`);
  const colours = Object.values(fills).map((set) => [...set][0]);
  check(new Set(colours).size === colours.length, `board: two places share a colour: ${JSON.stringify(Object.fromEntries(Object.entries(fills).map(([k, v]) => [k, [...v]])))}`);
  const edges = await page.$$eval('[data-testid="board-edge"]', (es) => es.map((e) => [e.dataset.from, e.dataset.to]));
  for (const [from, to] of b.edges || []) check(edges.some(([f, t]) => f === from && t === to), `board: no edge ${from} → ${to} (edges: ${edges.map((e) => e.join('→')).join(', ')})`);
  const summary = await text('#board-summary');
  for (const t of b.summary || []) check(summary.includes(t), `board: the summary does not show "${t}": ${summary}`);
  log(`board: ${rows.length} services, ${edges.length} edges, colours ${JSON.stringify(Object.fromEntries(Object.entries(fills).map(([k, v]) => [k, [...v][0]])))}`);
  await screenshot('board');

  if (b.order) {
    const o = b.order;
    page.once('dialog', (d) => d.accept());
    await page.click(`button[data-testid="board-order"][data-service="${o.service}"][data-order="${o.order}"]`);
    await page.waitForSelector('#board-order-status[data-state="done"], #board-order-status[data-state="error"]', { timeout: STEP_TIMEOUT_MS });
    check((await page.getAttribute('#board-order-status', 'data-state')) === 'done', `board: the order failed: ${await text('#board-order-status')}`);
    log(`board: ${await text('#board-order-status')}`);
    // The leader carries the order out: refresh until the row shows it.
    const deadline = Date.now() + 20000;
    let step = '';
    for (;;) {
      await page.click('#refresh');
      await waitPage('board');
      step = ((await rowsOf()).find((r) => r.name === o.service) || {}).step || '';
      if (step.includes(o.expect)) break;
      check(Date.now() < deadline, `board: after ${o.order}, ${o.service}'s row still says "${step}", not "${o.expect}"`);
      await new Promise((r) => setTimeout(r, 500));
    }
    log(`board: after ${o.order}, ${o.service} shows "${step}"`);
    await screenshot('board-order');
  }
}

run().then(() => finish(null), (e) => finish(e));

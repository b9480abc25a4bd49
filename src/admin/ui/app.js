// meshbridge admin UI: plain JavaScript, no build step, no network but this server's /api.
// Every piece of API data reaches the page as text nodes or attribute values (never HTML).
'use strict';

(() => {
  const TYPES = [
    ['cds', 'type.googleapis.com/envoy.config.cluster.v3.Cluster'],
    ['eds', 'type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment'],
    ['lds', 'type.googleapis.com/envoy.config.listener.v3.Listener'],
    ['rds', 'type.googleapis.com/envoy.config.route.v3.RouteConfiguration'],
  ];
  const LOG_LEVELS = ['trace', 'debug', 'info', 'warning', 'error', 'critical', 'off'];

  const $ = (sel) => document.querySelector(sel);
  const main = $('#main');

  // ---- DOM helpers -------------------------------------------------------------------------

  /** Creates an element; attributes are set as values, children appended as nodes or text. */
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'testid') el.dataset.testid = v;
      else if (k === 'data') Object.assign(el.dataset, v);
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    add(el, kids);
    return el;
  }

  function add(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      el.append(k instanceof Node ? k : String(k));
    }
    return el;
  }

  const link = (href, text, attrs) => h('a', { href, ...attrs }, text);
  const serviceHref = (name) => '#/service/' + encodeURIComponent(name);
  const proxyHref = (node) => '#/proxy/' + encodeURIComponent(node);
  const serviceLink = (name) => link(serviceHref(name), name);
  const badge = (text, kind, attrs) => h('span', { class: 'badge ' + (kind || ''), ...attrs }, text);
  const muted = (text) => h('span', { class: 'muted' }, text);
  const mono = (text, title) => h('code', { title: title || null }, text);

  /**
   * A table: `cols` are header labels (a label ending in '#' is a right-aligned number column),
   * `rows` arrays of cells (nodes or text) or ready <tr>s.
   */
  function table(attrs, cols, rows, empty) {
    const num = cols.map((c) => c.endsWith('#'));
    const body = h('tbody');
    for (const r of rows) body.append(r instanceof Node ? r : h('tr', null, r.map((c, i) => h('td', { class: num[i] ? 'num' : null }, c))));
    if (!rows.length && empty) body.append(h('tr', { class: 'empty' }, h('td', { colspan: cols.length }, empty)));
    const head = cols.map((c, i) => h('th', { class: num[i] ? 'num' : null }, num[i] ? c.slice(0, -1) : c));
    return h('table', attrs, h('thead', null, h('tr', null, head)), body);
  }

  function section(title, attrs, ...kids) {
    return h('section', { class: 'card', ...attrs }, h('h2', null, title), kids);
  }

  /** A comma-separated list of items (nodes or text), or a muted dash. */
  function list(items, none) {
    if (!items || !items.length) return muted(none || '—');
    const out = [];
    items.forEach((it, i) => {
      if (i) out.push(', ');
      out.push(it);
    });
    return h('span', null, out);
  }

  function chips(items, kind) {
    if (!items || !items.length) return muted('—');
    return h('span', { class: 'chips' }, items.map((t) => badge(t, kind || 'plain')));
  }

  function dl(pairs, attrs) {
    const el = h('dl', { class: 'facts', ...attrs });
    for (const [k, v] of pairs) el.append(h('dt', null, k), h('dd', null, v));
    return el;
  }

  // ---- formatting --------------------------------------------------------------------------

  function shortType(url) {
    const t = TYPES.find(([, u]) => u === url);
    if (t) return t[0];
    return String(url || '').split('.').pop() || String(url);
  }

  function duration(secs) {
    secs = Math.max(0, Math.round(secs));
    if (secs < 60) return secs + 's';
    if (secs < 3600) return Math.floor(secs / 60) + 'm ' + (secs % 60) + 's';
    if (secs < 86400) return Math.floor(secs / 3600) + 'h ' + Math.floor((secs % 3600) / 60) + 'm';
    return Math.floor(secs / 86400) + 'd ' + Math.floor((secs % 86400) / 3600) + 'h';
  }

  /** A unix time as "12s ago", with the full local time as the tooltip. */
  function ago(unix) {
    if (unix === null || unix === undefined) return muted('never');
    const d = new Date(unix * 1000);
    return h('time', { datetime: d.toISOString(), title: d.toLocaleString() }, duration(Date.now() / 1000 - unix) + ' ago');
  }

  function clock(unix) {
    const d = new Date(unix * 1000);
    return h('time', { datetime: d.toISOString(), title: d.toLocaleString() }, d.toLocaleTimeString());
  }

  /** A version string, shortened, full text in the tooltip. */
  function version(v, max) {
    if (v === null || v === undefined || v === '') return muted('—');
    const s = String(v);
    const n = max || 16;
    return mono(s.length > n ? s.slice(0, n - 1) + '…' : s, s);
  }

  function bytes(n) {
    if (n < 1024) return n + ' B';
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
    return (n / 1024 / 1024).toFixed(1) + ' MiB';
  }

  // ---- API ---------------------------------------------------------------------------------

  class ApiError extends Error {}

  // The admin API token (`run --admin-token-file`), kept for this tab only.
  const TOKEN_KEY = 'meshbridge-admin-token';

  /** Fetches an admin path; throws ApiError with the server's `{error}` text on failure. */
  async function api(path, opts) {
    const { method = 'GET', text = false } = opts || {};
    const headers = { accept: text ? 'text/plain, */*' : 'application/json' };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.authorization = `Bearer ${token}`;
    let res;
    try {
      res = await fetch(path, { method, headers, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(`${method} ${path}: ${e.message} (is meshbridge running?)`);
    }
    // The server wants a token: ask for one.
    if (res.status === 401) $('#login').hidden = false;
    const body = await res.text();
    if (!res.ok) {
      let msg = body.trim();
      try {
        const j = JSON.parse(body);
        if (j && typeof j.error === 'string') msg = j.error;
      } catch (_) { /* not JSON: keep the text */ }
      throw new ApiError(`${method} ${path}: ${res.status} ${res.statusText}${msg ? ' — ' + msg : ''}`);
    }
    if (text) return body;
    try {
      return JSON.parse(body);
    } catch (e) {
      throw new ApiError(`${method} ${path}: the response is not JSON (${e.message})`);
    }
  }

  // ---- error box ---------------------------------------------------------------------------

  function showError(err) {
    const msg = err instanceof Error ? err.message : String(err);
    const box = $('#error');
    $('#error-text').append(h('div', { class: 'error-line', testid: 'error-line' }, msg));
    box.hidden = false;
  }

  function clearErrors() {
    $('#error-text').replaceChildren();
    $('#error').hidden = true;
  }

  $('#error-close').addEventListener('click', clearErrors);
  window.addEventListener('unhandledrejection', (e) => showError(e.reason));
  window.addEventListener('error', (e) => showError(e.error || e.message));

  // ---- router ------------------------------------------------------------------------------

  let renderSeq = 0;

  const routes = [
    [/^services(?:\?(.*))?$/, 'services', (m) => pageServices(new URLSearchParams(m[1] || '').get('q') || '')],
    [/^service\/(.+)$/, 'service', (m) => pageService(decodeURIComponent(m[1]))],
    [/^proxies$/, 'proxies', () => pageProxies()],
    [/^proxy\/(.+)$/, 'proxy', (m) => pageProxy(decodeURIComponent(m[1]))],
    [/^sources$/, 'sources', () => pageSources()],
    [/^compare$/, 'compare', () => pageCompare()],
    [/^changes$/, 'changes', () => pageChanges()],
    [/^board$/, 'board', () => pageBoard()],
  ];

  async function route() {
    const hash = location.hash.replace(/^#\/?/, '');
    if (!hash) {
      location.replace('#/services');
      return;
    }
    const seq = ++renderSeq;
    clearErrors();
    let found = null;
    for (const [re, name, fn] of routes) {
      const m = hash.match(re);
      if (m) {
        found = [name, fn, m];
        break;
      }
    }
    const page = found ? found[0] : 'unknown';
    const navPage = { service: 'services', proxy: 'proxies' }[page] || page;
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.route === navPage);
    main.dataset.page = page;
    main.dataset.loaded = 'false';
    main.setAttribute('aria-busy', 'true');
    try {
      let content;
      if (!found) content = h('p', null, 'No such page: ', mono('#/' + hash), '. ', link('#/services', 'Services'));
      else {
        content = await found[1](found[2]);
      }
      if (seq !== renderSeq) return;
      main.replaceChildren(content);
      main.dataset.loaded = 'true';
      $('#updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    } catch (e) {
      if (seq !== renderSeq) return;
      main.replaceChildren(h('p', { class: 'muted' }, 'This page could not be loaded.'));
      main.dataset.loaded = 'error';
      showError(e);
    } finally {
      if (seq === renderSeq) main.removeAttribute('aria-busy');
    }
  }

  window.addEventListener('hashchange', route);
  $('#refresh').addEventListener('click', route);
  $('#login').addEventListener('submit', (e) => {
    e.preventDefault();
    const value = $('#token').value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    $('#token').value = '';
    $('#login').hidden = true;
    clearErrors();
    route();
  });
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (e.key === 'r' && !e.ctrlKey && !e.metaKey && !e.altKey && !(t instanceof HTMLInputElement || t instanceof HTMLSelectElement || t instanceof HTMLTextAreaElement)) route();
  });

  // ---- pages -------------------------------------------------------------------------------

  function originCounts(instances) {
    const counts = {};
    for (const i of instances || []) {
      const c = (counts[i.origin] = counts[i.origin] || { total: 0, healthy: 0 });
      c.total += 1;
      if (i.healthy) c.healthy += 1;
    }
    return counts;
  }

  function originChips(origins) {
    const names = Object.keys(origins || {}).sort();
    if (!names.length) return muted('—');
    return h('span', { class: 'chips' }, names.map((o) => {
      const c = origins[o];
      return badge(`${o} ${c.healthy}/${c.total}`, c.healthy < c.total ? 'warn' : 'plain', { title: `${c.healthy} of ${c.total} ${o} instances healthy` });
    }));
  }

  function healthCount(healthy, total) {
    const kind = total === 0 ? 'plain' : healthy === 0 ? 'bad' : healthy < total ? 'warn' : 'ok';
    return badge(`${healthy}/${total}`, kind, { title: `${healthy} healthy of ${total}` });
  }

  function mtlsBadge(m) {
    return badge(String(m), m === 'strict' ? 'ok' : m === 'permissive' ? 'info' : 'plain');
  }

  function dependencyLinks(deps) {
    return list((deps || []).map((d) => (/^[a-z]+:\/\//i.test(d) ? mono(d) : serviceLink(d))));
  }

  // #/services
  async function pageServices(initialQuery) {
    const services = await api('/api/services');
    services.sort((a, b) => a.name.localeCompare(b.name));
    const rows = services.map((s) => {
      const inst = s.instances || [];
      const healthy = inst.filter((i) => i.healthy).length;
      return h('tr', { testid: 'service-row', data: { name: s.name } },
        h('td', null, serviceLink(s.name), s.declared === false ? [' ', badge('not declared', 'warn', { title: 'Known only from instances, no MeshService' })] : null),
        h('td', null, healthCount(healthy, inst.length)),
        h('td', null, originChips(originCounts(inst))),
        h('td', null, mtlsBadge(s.mtls)),
        h('td', { class: 'num' }, String((s.dependencies || []).length)),
        h('td', { class: 'num' }, String((s.dependents || []).length)));
    });
    const noMatch = h('tr', { class: 'empty', hidden: true, id: 'services-no-match' }, h('td', { colspan: 6 }, 'No service matches the filter.'));
    const tbl = table({ id: 'services-table', testid: 'services-table', class: 'grid' },
      ['Name', 'Healthy / instances', 'Origins', 'mTLS', 'Dependencies#', 'Dependents#'], rows, 'No services yet.');
    tbl.tBodies[0].append(noMatch);
    const count = h('span', { id: 'services-count', class: 'muted', testid: 'services-count' });
    const search = h('input', {
      id: 'service-search', testid: 'service-search', type: 'search', placeholder: 'Filter by name…',
      autocomplete: 'off', spellcheck: 'false', 'aria-label': 'Filter services by name', value: initialQuery,
    });
    const apply = () => {
      const q = search.value.trim().toLowerCase();
      let shown = 0;
      for (const r of rows) {
        const hit = !q || r.dataset.name.toLowerCase().includes(q);
        r.hidden = !hit;
        if (hit) shown += 1;
      }
      noMatch.hidden = !(services.length && shown === 0);
      count.textContent = q ? `${shown} of ${services.length} shown` : `${services.length} services`;
      const want = '#/services' + (q ? '?q=' + encodeURIComponent(search.value.trim()) : '');
      if (location.hash !== want) history.replaceState(null, '', want);
    };
    search.addEventListener('input', apply);
    apply();
    setTimeout(() => search.focus(), 0);
    return h('div', null,
      h('div', { class: 'page-head' }, h('h1', null, 'Services'), search, count),
      tbl);
  }

  // #/service/NAME
  async function pageService(name) {
    const s = await api('/api/services/' + encodeURIComponent(name));
    const inst = s.instances || [];
    const healthy = inst.filter((i) => i.healthy).length;
    const instRows = inst.map((i) => h('tr', { testid: 'instance-row' },
      h('td', null, badge(i.origin, 'plain')),
      h('td', null, mono(`${i.address}:${i.port}`)),
      h('td', null, i.datacenter || muted('—')),
      h('td', null, chips(i.tags)),
      h('td', { class: 'num' }, String(i.weight)),
      h('td', null, i.healthy ? badge('healthy', 'ok') : badge('unhealthy', 'bad'))));
    const dep = s.dependents || { services: [], proxies: [] };
    const proxies = (dep.proxies || []).map((p) => [link(proxyHref(p.node), p.node), serviceLink(p.service), mono(p.group), p.mode]);

    return h('div', { testid: 'service-page', data: { name: s.name } },
      h('div', { class: 'page-head' }, h('h1', null, 'Service ', h('span', { id: 'service-name' }, s.name)),
        mtlsBadge(s.mtls), s.declared ? badge('declared', 'plain') : badge('not declared', 'warn')),
      section('Summary', null, dl([
        ['Instances', healthCount(healthy, inst.length)],
        ['Origins', originChips(s.origins || originCounts(inst))],
        ['mTLS', String(s.mtls)],
        ['Protocol', h('span', { id: 'service-protocol' }, [s.protocol || 'http', s.port ? `port ${s.port}` : '', s.preserve_header_case ? 'header case kept' : ''].filter(Boolean).join(', '))],
        ['Rate limit', h('span', { id: 'service-rate-limit' }, rateLimitText(s.rate_limit))],
        ['Further ports', h('span', { id: 'service-ports' }, (s.ports || []).map((p) => `${s.name}:${p.name} (${p.protocol}, port ${p.port})`).join(', ') || 'none')],
        ['Migration', h('span', { id: 'service-migration' }, migrationText(s.migration))],
        ['Load (last minute)', h('span', { id: 'service-load' }, loadText(s.load))],
        ['Dependencies', dependencyLinks(s.dependencies)],
      ])),
      section('Instances', null, table({ id: 'instances-table', testid: 'instances-table', class: 'grid' },
        ['Origin', 'Address', 'Datacenter', 'Tags', 'Weight#', 'Health'], instRows, 'No instances.')),
      section('Dependents', { id: 'dependents' },
        dl([['Services', h('span', { id: 'dependents-services', testid: 'dependents-services' }, list((dep.services || []).map(serviceLink), 'none'))]]),
        h('h3', null, 'Proxies that depend on it'),
        table({ id: 'dependents-proxies', testid: 'dependents-proxies', class: 'grid' }, ['Node', 'Service', 'Group', 'Mode'], proxies, 'No connected proxy depends on it.')),
      section('Access', { id: 'access', testid: 'access' }, accessView(s.access)),
      section('Ejections', { id: 'ejections', testid: 'ejections' }, ejectionsView(s.name)),
      section('Latency', { id: 'latency', testid: 'latency' }, latencyView(s.name)));
  }

  /** A service's local rate limits in words. */
  function migrationText(m) {
    if (!m) return 'none';
    const plan = m.steps && m.steps.length ? `, plan ${m.steps.join(' → ')}` : '';
    const mirror = m.mirror ? `, ${m.mirror}% mirrored` : '';
    return `${m.weight}% to ${m.to}${mirror}${plan}`;
  }

  function loadText(load) {
    const rows = (load && load.last_minute) || [];
    if (!rows.length) return 'no load reports';
    return rows.map((o) => {
      const where = o.datacenter ? `${o.origin} in ${o.datacenter}` : o.origin;
      const rate = o.error_rate == null ? '-' : `${(o.error_rate * 100).toFixed(2)}% errors`;
      const share = o.share == null ? '' : `, ${(o.share * 100).toFixed(1)}% of requests`;
      return `${where} (${o.traffic}): ${o.requests} requests, ${rate}${share}`;
    }).join('; ');
  }

  function rateLimitText(r) {
    if (!r) return 'none';
    const b = (x) => `${x.requests} per ${x.per} (burst ${x.burst})`;
    const parts = (r.paths || []).map((p) => `${p.prefix}: ${b(p.bucket)}`);
    if (r.service) parts.push(`otherwise ${b(r.service)}`);
    return parts.join('; ') + ' per proxy';
  }

  /**
   * A button that asks the service's callers' proxies something through the control plane:
   * `prefix` names its elements (`btn-PREFIX`, `PREFIX-status`, `PREFIX-result`), `path` is
   * the API call, and `show(answer)` gives the status line, its kind and the nodes below.
   */
  function askCallersView(prefix, intro, label, path, show) {
    const status = h('div', { id: prefix + '-status', testid: prefix + '-status', class: 'diag-status muted' }, intro);
    const output = h('div', { id: prefix + '-output' });
    const wrap = h('div', { id: prefix + '-result', testid: prefix + '-result', data: { state: 'idle' } }, status, output);
    const button = h('button', { id: 'btn-' + prefix, testid: 'btn-' + prefix, type: 'button' }, label);
    button.onclick = async () => {
      button.disabled = true;
      wrap.dataset.state = 'loading';
      status.className = 'diag-status muted';
      status.textContent = 'Asking…';
      output.replaceChildren();
      try {
        const e = await api(path);
        const errors = Object.entries(e.errors || {});
        const answered = (e.asked || []).length - errors.length;
        const [text, kind, kids] = show(e);
        status.className = 'diag-status ' + kind;
        status.textContent = `Asked ${(e.asked || []).length} of ${e.callers} proxies holding it (${answered} answered): ${text}`;
        if (errors.length) kids.push(h('h3', null, 'Not answered'), table({ class: 'grid' }, ['Proxy', 'Why'], errors.map(([n, why]) => [link(proxyHref(n), n), why]), ''));
        output.replaceChildren(...kids);
        wrap.dataset.state = 'done';
      } catch (err) {
        status.className = 'diag-status bad';
        status.textContent = 'Asking failed: ' + (err instanceof Error ? err.message : String(err));
        wrap.dataset.state = 'error';
        showError(err);
      } finally {
        button.disabled = false;
      }
    };
    return h('div', null, button, wrap);
  }

  /** Asks the callers' proxies which instances they have ejected. */
  function ejectionsView(name) {
    return askCallersView('ejections', 'Outlier detection in the callers\' proxies: ask them which instances they have ejected.',
      'Ask callers\' proxies', '/api/services/' + encodeURIComponent(name) + '/ejections', (e) => {
        const ejected = e.ejected || [];
        const rows = ejected.map((x) => h('tr', { testid: 'ejection-row' },
          h('td', null, mono(x.instance)),
          h('td', null, list((x.by || []).map((n) => link(proxyHref(n), n)), 'none')),
          h('td', null, chips(x.clusters || []))));
        return [ejected.length ? `${ejected.length} instance(s) ejected.` : 'no instance ejected.', ejected.length ? 'bad' : 'ok',
          [table({ id: 'ejections-table', class: 'grid' }, ['Instance', 'Ejected by', 'Clusters'], rows, 'No instance ejected.')]];
      });
  }

  /** Asks the callers' proxies how long the service's instances take to answer. */
  function latencyView(name) {
    const ms = (x) => (x === null || x === undefined ? muted('–') : Number(x).toFixed(x < 10 ? 2 : 0) + ' ms');
    return askCallersView('latency', 'Request times its callers\' Envoys measured (since each started), live and mirrored side by side.',
      'Ask callers\' proxies for latency', '/api/services/' + encodeURIComponent(name) + '/latency', (v) => {
        const rows = (v.traffic || []).map((t) => h('tr', { testid: 'latency-row', data: { traffic: t.traffic } },
          h('td', null, t.traffic === 'mirror' ? 'mirrored (new origin)' : 'live'),
          h('td', { class: 'num' }, String(t.requests)),
          h('td', { class: 'num' }, ms(t.p50_ms)), h('td', { class: 'num' }, ms(t.p90_ms)), h('td', { class: 'num' }, ms(t.p99_ms))));
        const measured = (v.traffic || []).reduce((n, t) => n + t.requests, 0);
        return [`${measured} requests measured.`, 'ok',
          [table({ id: 'latency-table', class: 'grid' }, ['Traffic', 'Requests#', 'p50#', 'p90#', 'p99#'], rows, 'No request measured yet.')]];
      });
  }

  function callerText(c) {
    if (c === 'any' || c === '*') return '*';
    if (c && typeof c === 'object') return Object.values(c).map(String).join(',');
    return String(c);
  }

  function pathText(p) {
    if (p && typeof p === 'object') return Object.entries(p).map(([k, v]) => `${k} ${v}`).join(', ');
    return String(p);
  }

  function accessView(a) {
    if (!a) return h('p', { class: 'muted', id: 'access-none' }, 'No AccessRule targets this service.');
    const rules = (a.rules || []).map((r) => [
      list((r.from || []).map((c) => mono(callerText(c)))),
      list((r.paths || []).map((p) => mono(pathText(p))), 'every path'),
      list((r.methods || []).map(String), 'every method'),
    ]);
    const unknown = a.unknown_callers || [];
    return h('div', null,
      dl([
        ['Action', badge(String(a.action), a.action === 'deny' ? 'bad' : 'info', { id: 'access-action', testid: 'access-action' })],
        ['Defined in', list((a.sources || []).map((x) => mono(x)))],
        ['Resolved callers', list((a.resolved_callers || []).map(serviceLink), 'none')],
        ['Unknown callers', unknown.length
          ? h('span', { id: 'unknown-callers', testid: 'unknown-callers', class: 'chips' }, unknown.map((u) => badge(u, 'warn', { title: 'matches no known service' })))
          : muted('none')],
      ]),
      h('h3', null, 'Allowed calls'),
      table({ id: 'access-rules', testid: 'access-rules', class: 'grid' }, ['Callers', 'Paths', 'Methods'], rules, 'No rules: nothing is allowed.'));
  }

  function typeCell(st) {
    if (!st) return muted('—');
    const nack = st.nack !== null && st.nack !== undefined;
    const pending = !nack && st.sent !== st.acked;
    return h('span', { class: 'versions' + (nack ? ' nack' : pending ? ' pending' : ''), title: nack ? 'NACK: ' + st.nack : pending ? 'waiting for ACK' : 'acknowledged' },
      version(st.sent, 9), ' / ', version(st.acked, 9), nack ? [' ', badge('NACK', 'bad', { testid: 'nack' })] : null);
  }

  // #/proxies
  async function pageProxies() {
    const proxies = await api('/api/proxies');
    const rows = proxies.map((p) => h('tr', { testid: 'proxy-row', data: { node: p.node }, class: Object.values(p.types || {}).some((t) => t.nack) ? 'row-nack' : null },
      h('td', { class: 'nowrap' }, link(proxyHref(p.node), p.node)),
      h('td', null, serviceLink(p.service)),
      h('td', { class: 'nowrap' }, mono(p.group.length > 24 ? p.group.slice(0, 23) + '…' : p.group, p.group)),
      h('td', null, badge(p.mode, 'plain')),
      h('td', null, ago(p.connected_at)),
      TYPES.map(([, url]) => h('td', null, typeCell((p.types || {})[url])))));
    const nacks = proxies.filter((p) => Object.values(p.types || {}).some((t) => t.nack)).length;
    return h('div', null,
      h('div', { class: 'page-head' }, h('h1', null, 'Proxies'), muted(`${proxies.length} connected`),
        nacks ? badge(`${nacks} with a NACK`, 'bad') : null),
      table({ id: 'proxies-table', testid: 'proxies-table', class: 'grid' },
        ['Node', 'Service', 'Group', 'Mode', 'Connected', ...TYPES.map(([t]) => t.toUpperCase() + ' sent / acked')], rows, 'No proxy is connected.'));
  }

  // #/proxy/NODE
  async function pageProxy(node) {
    const p = await api('/api/proxies/' + encodeURIComponent(node));
    const types = p.types || {};
    const resources = p.resources || {};
    const typeUrls = [...new Set([...TYPES.map(([, u]) => u), ...Object.keys(types), ...Object.keys(resources)])];
    const versionRows = typeUrls.filter((u) => types[u] || resources[u]).map((u) => {
      const st = types[u] || {};
      const nack = st.nack !== null && st.nack !== undefined;
      const state = nack ? badge('NACK', 'bad') : !st.sent ? badge('not sent', 'plain') : st.sent === st.acked ? badge('acked', 'ok') : badge('pending', 'warn');
      return h('tr', { data: { type: shortType(u) }, class: nack ? 'row-nack' : null },
        h('td', null, h('strong', null, shortType(u).toUpperCase())),
        h('td', null, version(st.sent)), h('td', null, version(st.acked)), h('td', null, state),
        h('td', { class: 'wrap' }, nack ? h('span', { class: 'nack-text' }, st.nack) : muted('—')));
    });
    const lastNack = typeUrls.filter((u) => types[u] && types[u].nack).map((u) => `${shortType(u).toUpperCase()}: ${types[u].nack}`);
    const warnings = p.warnings || [];

    const resSection = h('div', { id: 'resources', testid: 'resources' }, typeUrls.filter((u) => resources[u]).map((u) => {
      const r = resources[u];
      const names = r.names || [];
      return h('details', { class: 'res', data: { type: shortType(u) } },
        h('summary', null, h('strong', null, shortType(u).toUpperCase()), ' ', muted(`${names.length} resource${names.length === 1 ? '' : 's'}, version `), version(r.version)),
        names.length ? h('ul', { class: 'names' }, names.map((n) => h('li', null, mono(n)))) : muted('none'));
    }));

    const hasAdmin = p.admin !== null && p.admin !== undefined;
    return h('div', { testid: 'proxy-page', data: { node: p.node } },
      h('div', { class: 'page-head' }, h('h1', null, 'Proxy ', h('span', { id: 'proxy-node' }, p.node)),
        badge(p.mode, 'plain'), lastNack.length ? badge('NACK', 'bad') : badge('no NACK', 'ok')),
      h('div', { class: 'cols' },
        section('Status', { id: 'proxy-status' }, dl([
          ['Service', serviceLink(p.service)],
          ['Group', mono(p.group)],
          ['Mode', p.mode],
          ['Peer', p.peer ? mono(p.peer) : muted('unknown')],
          ['Connected', ago(p.connected_at)],
          ['Envoy admin', hasAdmin ? mono(p.admin) : muted('not announced')],
          ['Dependencies', h('span', { title: 'Named in the node metadata (bootstrap --dependency) or by its MeshService' }, dependencyLinks(p.dependencies))],
          ['Announced by the proxy', dependencyLinks(p.announced_dependencies)],
        ])),
        section('Versions', { id: 'proxy-versions' },
          table({ id: 'versions-table', testid: 'versions-table', class: 'grid' }, ['Type', 'Sent', 'Acked', 'State', 'Last NACK'], versionRows, 'Nothing sent yet.'),
          lastNack.length ? h('div', { id: 'last-nack', testid: 'last-nack', class: 'callout bad' }, h('strong', null, 'Last NACK'), lastNack.map((t) => h('div', { class: 'wrap' }, t))) : null)),
      section('Warnings', { id: 'proxy-warnings' }, warnings.length
        ? h('ul', { id: 'warnings', testid: 'warnings', class: 'warnings' }, warnings.map((w) => h('li', null, w)))
        : h('p', { id: 'warnings', testid: 'warnings', class: 'muted' }, 'No warnings.')),
      section('Resources it gets', null, resSection),
      section('Diagnostics', { id: 'diagnostics', testid: 'diagnostics' }, diagnostics(p.node, hasAdmin)));
  }

  function diagnostics(node, hasAdmin) {
    const base = '/api/proxies/' + encodeURIComponent(node);
    const status = h('div', { id: 'diag-status', testid: 'diag-status', class: 'diag-status muted' }, hasAdmin ? 'Pick a diagnostic above.' : 'This proxy announced no admin port: Envoy diagnostics are unavailable.');
    const output = h('div', { id: 'diag-output-wrap' });
    const result = h('div', { id: 'diag-result', testid: 'diag-result', data: { state: 'idle', kind: '' } }, status, output);
    const buttons = [];

    const btn = (id, label, attrs) => {
      const b = h('button', { id, testid: id, type: 'button', ...attrs }, label);
      buttons.push(b);
      return b;
    };

    /** Runs one diagnostic: busy state, timing, errors to the error box and the status line. */
    async function run(kind, label, fn) {
      for (const b of buttons) b.disabled = true;
      result.dataset.state = 'loading';
      result.dataset.kind = kind;
      status.className = 'diag-status muted';
      status.textContent = label + '…';
      output.replaceChildren();
      const t0 = performance.now();
      try {
        const [summary, node, ok] = await fn();
        status.className = 'diag-status ' + (ok === false ? 'bad' : 'ok');
        status.replaceChildren(summary, muted(` (${Math.round(performance.now() - t0)} ms)`));
        output.replaceChildren(node || '');
        result.dataset.state = 'done';
      } catch (e) {
        status.className = 'diag-status bad';
        status.textContent = label + ' failed: ' + (e instanceof Error ? e.message : String(e));
        result.dataset.state = 'error';
        showError(e);
      } finally {
        for (const b of buttons) b.disabled = !hasAdmin;
      }
    }

    const pre = (text) => h('pre', { id: 'diag-output', testid: 'diag-output', class: 'output' }, text);

    const includeEds = h('input', { type: 'checkbox', id: 'config-dump-eds', testid: 'config-dump-eds' });
    const dumpBtn = btn('btn-config-dump', 'Config dump', {
      onclick: () => run('config_dump', 'Config dump', async () => {
        const text = await api(base + '/config_dump' + (includeEds.checked ? '?include_eds' : ''), { text: true });
        let pretty = text;
        try { pretty = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* show as is */ }
        return [`Config dump: ${bytes(text.length)}`, pre(pretty)];
      }),
    });

    const filter = h('input', { id: 'stats-filter', testid: 'stats-filter', type: 'search', placeholder: 'regex, e.g. ^cluster\\.', autocomplete: 'off', spellcheck: 'false', 'aria-label': 'Stats filter (regex)' });
    const statsBtn = btn('btn-stats', 'Stats', {
      onclick: () => run('stats', 'Stats', async () => {
        const f = filter.value.trim();
        const text = await api(base + '/stats' + (f ? '?filter=' + encodeURIComponent(f) : ''), { text: true });
        const n = text.split('\n').filter((l) => l.trim()).length;
        return [`Stats: ${n} line${n === 1 ? '' : 's'}${f ? ' matching ' + f : ''}`, pre(text || '(no stat matches)')];
      }),
    });
    filter.addEventListener('keydown', (e) => { if (e.key === 'Enter') statsBtn.click(); });

    const clustersBtn = btn('btn-clusters', 'Clusters', {
      onclick: () => run('clusters', 'Clusters', async () => {
        const text = await api(base + '/clusters', { text: true });
        return [`Clusters: ${new Set(text.split('\n').map((l) => l.split('::')[0]).filter(Boolean)).size} clusters`, pre(text)];
      }),
    });

    const level = h('select', { id: 'log-level', testid: 'log-level', 'aria-label': 'Envoy log level' }, LOG_LEVELS.map((l) => h('option', { value: l, selected: l === 'info' }, l)));
    const applyBtn = btn('btn-log-apply', 'Apply', {
      title: 'Set every Envoy logger of this proxy to the selected level',
      onclick: () => run('logging', 'Log level', async () => {
        const r = await api(base + '/logging?level=' + encodeURIComponent(level.value), { method: 'POST' });
        return [h('span', { id: 'log-level-result', testid: 'log-level-result' }, `Log level set to ${r.level} on ${r.node}`, r.admin ? ` (Envoy admin ${r.admin})` : ''), pre(r.output || '')];
      }),
    });

    const diffBtn = btn('btn-diff', 'Config diff', {
      title: 'Compare what meshbridge sent with what Envoy holds',
      onclick: () => run('diff', 'Config diff', async () => {
        const d = await api(base + '/diff');
        return [h('span', null, 'Config diff: ', d.in_sync
          ? badge('in sync', 'ok', { id: 'diff-in-sync', testid: 'diff-in-sync', data: { inSync: 'true' } })
          : badge('out of sync', 'bad', { id: 'diff-in-sync', testid: 'diff-in-sync', data: { inSync: 'false' } })), diffTable(d), d.in_sync];
      }),
    });

    if (!hasAdmin) for (const b of buttons) b.disabled = true;
    return h('div', null,
      h('div', { class: 'toolbar' },
        h('span', { class: 'group' }, dumpBtn, h('label', { class: 'check' }, includeEds, ' include EDS')),
        h('span', { class: 'group' }, filter, statsBtn),
        h('span', { class: 'group' }, clustersBtn),
        h('span', { class: 'group' }, h('label', { for: 'log-level' }, 'Log level '), level, applyBtn),
        h('span', { class: 'group' }, diffBtn)),
      result);
  }

  function nameList(names, kind) {
    if (!names || !names.length) return muted('—');
    return h('ul', { class: 'names ' + (kind || '') }, names.map((n) => h('li', null, mono(n))));
  }

  function diffTable(d) {
    const rows = (d.types || []).map((t) => {
      const bad = (t.only_sent || []).length || (t.only_envoy || []).length || (t.warming || []).length || (t.errors || []).length || t.sent_version !== t.acked_version;
      return h('tr', { data: { type: t.type }, class: bad ? 'row-bad' : null },
        h('td', null, h('strong', null, String(t.type).toUpperCase())),
        h('td', null, version(t.sent_version)),
        h('td', null, version(t.acked_version)),
        h('td', { class: 'num' }, String(t.sent)),
        h('td', { class: 'num' }, String(t.envoy)),
        h('td', null, nameList(t.only_sent, 'bad')),
        h('td', null, nameList(t.only_envoy, 'bad')),
        h('td', null, nameList(t.warming, 'warn')),
        h('td', null, (t.errors || []).length
          ? h('ul', { class: 'names bad' }, t.errors.map((e) => h('li', null, mono(e.name), ': ', e.details)))
          : muted('—')));
    });
    return table({ id: 'diff-table', testid: 'diff-table', class: 'grid' },
      ['Type', 'Sent version', 'Acked version', 'Sent#', 'In Envoy#', 'Only sent', 'Only in Envoy', 'Warming', 'Errors'], rows, 'No types.');
  }

  // #/sources
  async function pageSources() {
    const sources = await api('/api/sources');
    const rows = sources.map((s) => h('tr', { testid: 'source-row', data: { name: s.name }, class: s.error ? 'row-bad' : null },
      h('td', null, mono(s.name)),
      h('td', null, badge(s.kind, 'plain')),
      h('td', null, s.synced ? badge('synced', 'ok') : badge('not synced', 'bad')),
      h('td', null, ago(s.last_sync)),
      h('td', { class: 'num' }, s.staleness_seconds === null || s.staleness_seconds === undefined ? muted('—') : duration(s.staleness_seconds)),
      h('td', { class: 'num' }, s.last_sync_duration_ms === null || s.last_sync_duration_ms === undefined ? muted('—') : Number(s.last_sync_duration_ms).toFixed(1) + ' ms'),
      h('td', { class: 'num' }, s.errors ? badge(String(s.errors), 'bad') : String(s.errors ?? 0)),
      h('td', { class: 'wrap' }, s.error ? h('span', { class: 'error-text' }, s.error) : muted('—'))));
    return h('div', null,
      h('div', { class: 'page-head' }, h('h1', null, 'Sources'), muted(`${sources.length} source${sources.length === 1 ? '' : 's'}`)),
      table({ id: 'sources-table', testid: 'sources-table', class: 'grid' },
        ['Name', 'Kind', 'Synced', 'Last sync', 'Staleness#', 'Sync took#', 'Errors#', 'Error'], rows, 'No sources.'));
  }

  // #/compare
  async function pageCompare() {
    const c = await api('/api/compare');
    const overall = c.agree === null || c.agree === undefined
      ? badge('no peers configured', 'plain', { id: 'compare-overall', testid: 'compare-overall' })
      : c.agree ? badge('all peers agree', 'ok', { id: 'compare-overall', testid: 'compare-overall' })
        : badge('peers disagree', 'bad', { id: 'compare-overall', testid: 'compare-overall' });
    const peers = (c.peers || []).map((p) => {
      const d = p.differences || {};
      const diffs = [];
      const names = (title, items) => { if (items && items.length) diffs.push(h('div', { class: 'diff-list' }, h('h4', null, title), nameList(items))); };
      names('Services only here', d.services_only_here);
      names('Services only there', d.services_only_there);
      if ((d.services_changed || []).length) {
        const total = d.services_changed_count || d.services_changed.length;
        const title = total > d.services_changed.length
          ? `Services changed (${total}; the first ${d.services_changed.length} in detail)`
          : 'Services changed';
        diffs.push(h('div', { class: 'diff-list wide' }, h('h4', null, title),
          table({ class: 'grid' }, ['Service', 'Instances only here', 'Instances only there', 'Fields'], d.services_changed.map((s) => [
            serviceLink(s.name), nameList(s.instances_only_here), nameList(s.instances_only_there), chips(s.fields),
          ]))));
      }
      names('AccessRules only here', d.access_only_here);
      names('AccessRules only there', d.access_only_there);
      names('AccessRules changed', d.access_changed);
      return h('section', { class: 'card peer', testid: 'peer', data: { peer: p.peer, agree: String(!!p.agree) } },
        h('h2', null, mono(p.peer), ' ', p.agree ? badge('agree', 'ok', { testid: 'peer-agree' }) : badge('disagree', 'bad', { testid: 'peer-agree' })),
        dl([['Digest', p.digest ? mono(p.digest) : muted('—')]]),
        p.error ? h('div', { class: 'callout bad wrap', testid: 'peer-error' }, p.error) : null,
        diffs.length ? h('div', { class: 'diffs' }, diffs) : (p.error ? null : muted(p.agree ? 'No differences.' : 'No differences listed.')));
    });
    return h('div', null,
      h('div', { class: 'page-head' }, h('h1', null, 'Compare'), overall),
      section('This instance', { id: 'compare-self' }, dl([['Digest', mono((c.self || {}).digest || '—')]], { id: 'self-digest', testid: 'self-digest' })),
      peers.length ? h('div', { id: 'peers', testid: 'peers' }, peers)
        : h('p', { class: 'muted', id: 'peers', testid: 'peers' }, 'No peers: start meshbridge with --peer URL or --peers-dns HOST:PORT to compare replicas.'));
  }

  // #/board: the migration board.
  const SVG_NS = 'http://www.w3.org/2000/svg';
  /** An SVG element; attributes are set as values (never markup), children appended. */
  function svg(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'testid') el.dataset.testid = v;
      else if (k === 'data') Object.assign(el.dataset, v);
      else el.setAttribute(k, String(v));
    }
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      el.append(k instanceof Node ? k : String(k));
    }
    return el;
  }

  const RUNS_ON = { hosts: 'Consul / VM hosts', pods: 'pods', both: 'hosts and pods', none: 'no instances' };
  const ORIGIN_SIDE = { consul: 'hosts', config: 'hosts', kubernetes: 'pods' };
  const pct = (x, digits) => (x === null || x === undefined ? '–' : (x * 100).toFixed(digits === undefined ? 1 : digits) + '%');
  /** Most services the graph draws; beyond, it draws migrating services and their neighbours. */
  const GRAPH_MAX = 150;

  /** Live traffic and error rate by side (hosts, pods) of a service over the window. */
  function sides(s) {
    const out = { hosts: { requests: 0, errors: 0, answered: 0, instances: 0, healthy: 0 }, pods: { requests: 0, errors: 0, answered: 0, instances: 0, healthy: 0 } };
    for (const [origin, o] of Object.entries(s.origins || {})) {
      const side = out[ORIGIN_SIDE[origin] || 'hosts'];
      side.requests += o.requests;
      side.errors += o.errors;
      side.answered += o.successes + o.errors;
      side.instances += o.instances;
      side.healthy += o.healthy;
    }
    const total = out.hosts.requests + out.pods.requests;
    for (const side of Object.values(out)) {
      side.share = total ? side.requests / total : null;
      side.rate = side.answered ? side.errors / side.answered : null;
    }
    return out;
  }

  /** A bar of the live share: hosts, then pods. */
  function shareBar(sd) {
    const w = 120;
    if (sd.hosts.share === null) return muted('no traffic');
    const hostsW = Math.round(w * sd.hosts.share);
    return h('span', { class: 'share', testid: 'board-share' },
      svg('svg', { width: w, height: 10, class: 'share-bar', role: 'img', 'aria-label': `hosts ${pct(sd.hosts.share)}, pods ${pct(sd.pods.share)}` },
        svg('rect', { x: 0, y: 0, width: hostsW, height: 10, class: 'fill-hosts' }),
        svg('rect', { x: hostsW, y: 0, width: w - hostsW, height: 10, class: 'fill-pods' })),
      ' ', `hosts ${pct(sd.hosts.share)} · pods ${pct(sd.pods.share)}`);
  }

  /** Where a plan stands, in words. */
  function planText(m) {
    if (!m) return '';
    let out = `${m.weight}% to ${m.to}`;
    if (m.mirror) out += `, ${m.mirror}% mirrored`;
    const p = m.plan;
    if (m.steps && m.steps.length) {
      out += ` · plan ${m.steps.join('→')}`;
      if (p) {
        out += ` · ${p.phase}`;
        if (p.step !== null && p.step !== undefined) out += ` at step ${p.step + 1} of ${m.steps.length}`;
        if (p.next_step_at) out += `, next ${new Date(p.next_step_at).toLocaleTimeString()}`;
      }
    }
    if (m.order) out += ` · order: ${m.order}`;
    return out;
  }

  /** The buttons that give orders on a service's plan. */
  function orderButtons(name, m, status) {
    if (!m || !m.steps || !m.steps.length) return muted('—');
    const give = async (order, button) => {
      if (!window.confirm(`${order} the migration of ${name}?`)) return;
      button.disabled = true;
      status.className = 'diag-status muted';
      status.textContent = `Giving the order ${order} to ${name}…`;
      try {
        const r = await api('/api/services/' + encodeURIComponent(name) + '/migration?order=' + encodeURIComponent(order), { method: 'POST' });
        status.className = 'diag-status ok';
        status.dataset.state = 'done';
        status.textContent = `${r.service}: ${r.order} written on MeshService ${r.object} (${r.annotation}); the leader carries it out.`;
      } catch (err) {
        status.className = 'diag-status bad';
        status.dataset.state = 'error';
        status.textContent = 'The order failed: ' + (err instanceof Error ? err.message : String(err));
        showError(err);
      } finally {
        button.disabled = false;
      }
    };
    return h('span', { class: 'orders' }, [['pause', 'Pause'], ['resume', 'Resume'], ['rollback', 'Roll back'], ['promote', 'Promote']].map(([order, label]) => {
      const b = h('button', { type: 'button', class: 'small', testid: 'board-order', data: { service: name, order } }, label);
      b.onclick = () => give(order, b);
      return b;
    }));
  }

  /** The dependency graph: callers left of what they call, each service coloured by where it runs. */
  function graph(board) {
    let services = board.services;
    let edges = board.edges;
    let note = null;
    if (services.length > GRAPH_MAX) {
      const keep = new Set(services.filter((s) => s.migration).map((s) => s.name));
      for (const e of edges) if (keep.has(e.from) || keep.has(e.to)) { keep.add(e.from); keep.add(e.to); }
      const around = services.filter((s) => keep.has(s.name));
      services = (around.length ? around : services).slice(0, GRAPH_MAX);
      const shown = new Set(services.map((s) => s.name));
      edges = edges.filter((e) => shown.has(e.from) && shown.has(e.to));
      note = around.length
        ? `${board.services.length} services: the graph shows ${services.length} of the migrating services and their callers and callees.`
        : `${board.services.length} services and none migrating: the graph shows the first ${services.length}.`;
    }
    if (!services.length) return h('p', { class: 'muted' }, 'No service.');
    const names = services.map((s) => s.name);
    const level = Object.fromEntries(names.map((n) => [n, 0]));
    // Longest path from the callers; a cycle stops growing after as many rounds as services.
    for (let round = 0; round < names.length; round++) {
      let moved = false;
      for (const e of edges) {
        if (level[e.to] < level[e.from] + 1 && level[e.from] + 1 < names.length) {
          level[e.to] = level[e.from] + 1;
          moved = true;
        }
      }
      if (!moved) break;
    }
    const columns = [];
    for (const s of services) (columns[level[s.name]] = columns[level[s.name]] || []).push(s);
    const W = 170, H = 46, GAPX = 90, GAPY = 18, PAD = 16;
    const pos = {};
    let rows = 0;
    columns.forEach((col, x) => {
      (col || []).forEach((s, y) => { pos[s.name] = { x: PAD + x * (W + GAPX), y: PAD + y * (H + GAPY) }; });
      rows = Math.max(rows, (col || []).length);
    });
    const width = PAD * 2 + columns.length * W + Math.max(0, columns.length - 1) * GAPX;
    const height = PAD * 2 + rows * H + Math.max(0, rows - 1) * GAPY;
    const defs = svg('defs', null, svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
      svg('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrow-head' })));
    const byName = Object.fromEntries(services.map((s) => [s.name, s]));
    const lines = edges.map((e) => {
      const a = pos[e.from], b = pos[e.to];
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
      const bend = Math.max(40, Math.abs(x2 - x1) / 2);
      const moving = byName[e.to] && byName[e.to].migration;
      return svg('path', { d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`, class: 'edge' + (moving ? ' moving' : ''), 'marker-end': 'url(#arrow)', testid: 'board-edge', data: { from: e.from, to: e.to } },
        svg('title', null, `${e.from} calls ${e.to}`));
    });
    const nodes = services.map((s) => {
      const p = pos[s.name];
      const m = s.migration;
      const label = s.name.length > 22 ? s.name.slice(0, 21) + '…' : s.name;
      const sd = sides(s);
      const count = (n, what) => `${n} ${what}${n === 1 ? '' : 's'}`;
      const sub = m ? `${m.weight}% → ${m.to === 'kubernetes' ? 'pods' : m.to}` : `${count(sd.hosts.instances, 'host')} · ${count(sd.pods.instances, 'pod')}`;
      const kids = [
        svg('title', null, `${s.name}: runs on ${RUNS_ON[s.runs_on] || s.runs_on}${m ? '; ' + planText(m) : ''}`),
        svg('rect', { x: 0, y: 0, width: W, height: H, rx: 8, class: 'node-box runs-' + s.runs_on }),
        svg('text', { x: 10, y: 19, class: 'node-name' }, label),
        svg('text', { x: 10, y: 36, class: 'node-sub' }, sub),
      ];
      if (m) {
        kids.push(svg('rect', { x: 0, y: H - 5, width: W, height: 5, rx: 2, class: 'node-track' }));
        kids.push(svg('rect', { x: 0, y: H - 5, width: Math.round((W * m.weight) / 100), height: 5, rx: 2, class: 'node-progress' }));
      }
      const a = svg('a', { href: serviceHref(s.name) }, kids);
      return svg('g', { transform: `translate(${p.x} ${p.y})`, class: 'node', testid: 'board-node', data: { name: s.name, runsOn: s.runs_on } }, a);
    });
    const legend = h('div', { class: 'legend' }, ['hosts', 'pods', 'both', 'none'].map((r) => h('span', { class: 'legend-item' },
      svg('svg', { width: 14, height: 14 }, svg('rect', { x: 1, y: 1, width: 12, height: 12, rx: 3, class: 'node-box runs-' + r })), ' ', RUNS_ON[r])),
    h('span', { class: 'legend-item' }, svg('svg', { width: 28, height: 14 }, svg('line', { x1: 1, y1: 7, x2: 27, y2: 7, class: 'edge moving' })), ' calls a migrating service'));
    return h('div', null, legend, note ? h('p', { class: 'muted' }, note) : null,
      h('div', { class: 'graph-wrap' }, svg('svg', { id: 'board-graph', testid: 'board-graph', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'dependency graph' }, defs, lines, nodes)),
      board.edges_left_out ? h('p', { class: 'muted' }, `${board.edges_left_out} more dependencies are not drawn.`) : null);
  }

  async function pageBoard() {
    const board = await api('/api/migration');
    const sum = board.summary;
    const status = h('div', { id: 'board-order-status', testid: 'board-order-status', class: 'diag-status muted', data: { state: 'idle' } },
      'Orders on a plan (pause, resume, roll back, promote) are written on the MeshService and carried out by the leader; each is audited.');
    const migrating = board.services.filter((s) => s.migration);
    const order = (s) => (s.migration ? 0 : s.runs_on === 'both' ? 1 : 2);
    const listed = [...board.services].sort((a, b) => order(a) - order(b) || a.name.localeCompare(b.name));
    const rows = listed.map((s) => {
      const sd = sides(s);
      const m = s.migration;
      const inst = Object.entries(s.origins).filter(([, o]) => o.instances > 0);
      const mtlsCount = Object.values(s.origins).reduce((n, o) => n + o.mtls, 0);
      const total = Object.values(s.origins).reduce((n, o) => n + o.instances, 0);
      const rate = (side) => (side.rate === null ? muted('–') : badge(pct(side.rate, 2), side.rate > 0.01 ? 'bad' : side.rate > 0 ? 'warn' : 'ok'));
      const mirror = s.mirror ? h('div', { class: 'muted' }, `mirror: ${s.mirror.requests} copies, ${pct(s.mirror.error_rate, 2)} errors`) : null;
      return h('tr', { testid: 'board-row', data: { name: s.name, runsOn: s.runs_on } },
        h('td', { class: 'nowrap' }, serviceLink(s.name)),
        h('td', null, badge(RUNS_ON[s.runs_on] || s.runs_on, 'runs-' + s.runs_on)),
        h('td', null, inst.length ? h('span', { class: 'chips' }, inst.map(([o, c]) => badge(`${o} ${c.healthy}/${c.instances}`, c.healthy < c.instances ? 'warn' : 'plain'))) : muted('—')),
        h('td', { class: 'nowrap' }, shareBar(sd), mirror),
        h('td', { class: 'nowrap' }, 'hosts ', rate(sd.hosts), ' · pods ', rate(sd.pods)),
        h('td', { class: 'nowrap', title: `${mtlsCount} of ${total} instances reached over mutual TLS (${s.mtls})` }, total ? `${mtlsCount}/${total}` : muted('—'), ' ', mtlsBadge(s.mtls)),
        h('td', { testid: 'board-step', class: 'board-step' }, m ? planText(m) : muted('—')),
        h('td', { class: 'nowrap' }, orderButtons(s.name, m, status)));
    });
    const coverage = sum.instances ? `${pct(sum.mtls_instances / sum.instances, 0)} (${sum.mtls_instances}/${sum.instances})` : '—';
    return h('div', { testid: 'board-page' },
      h('div', { class: 'page-head' }, h('h1', null, 'Migration board'),
        muted(`live traffic over the last ${board.window_seconds} s of load reports (proxies report every ${board.interval_seconds} s)`)),
      h('div', { class: 'tiles', id: 'board-summary', testid: 'board-summary' },
        [['Services', String(sum.services)], ['On hosts only', String(sum.hosts)], ['On pods only', String(sum.pods)], ['On both', String(sum.both)],
          ['Migrating', String(sum.migrating)], ['instances reached over mTLS', coverage]].map(([k, v]) => h('div', { class: 'tile' }, h('div', { class: 'tile-value' }, v), h('div', { class: 'muted' }, k)))),
      section('Services', null, status,
        table({ id: 'board-table', testid: 'board-table', class: 'grid' },
          ['Service', 'Runs on', 'Instances', 'Live share', 'Error rate', 'mTLS', 'Migration', 'Order'], rows, 'No service.'),
        migrating.length ? null : h('p', { class: 'muted' }, 'No service declares a migration (spec.migration).')),
      section('Dependencies', { id: 'board-deps' }, graph(board)));
  }

  // #/changes
  async function pageChanges() {
    const changes = await api('/api/changes');
    const rows = changes.map((c) => h('tr', { testid: 'change-row' },
      h('td', null, clock(c.at), ' ', muted('('), ago(c.at), muted(')')),
      h('td', { class: 'num' }, String(c.generation)),
      h('td', null, chips(c.services_added, 'ok')),
      h('td', null, chips(c.services_removed, 'bad')),
      h('td', null, chips(c.services_changed, 'info')),
      h('td', null, chips(c.access_changed, 'info')),
      h('td', { class: 'num' }, String(c.groups_rebuilt)),
      h('td', { class: 'num' }, h('span', { title: (c.groups_pushed || []).join('\n') || null }, String((c.groups_pushed || []).length))),
      h('td', { class: 'num' }, c.build_ms === null || c.build_ms === undefined ? muted('—') : Number(c.build_ms).toFixed(1))));
    return h('div', null,
      h('div', { class: 'page-head' }, h('h1', null, 'Changes'), muted(`${changes.length} most recent, newest first`)),
      table({ id: 'changes-table', testid: 'changes-table', class: 'grid' },
        ['At', 'Generation#', 'Services added', 'Removed', 'Changed', 'Access changed', 'Groups rebuilt#', 'Groups pushed#', 'Build ms#'], rows, 'No changes yet.'));
  }

  route();
})();

// Mycel's dashboard: reads mesh-cp's /status, /policies, /ui/graph and /explain (same origin,
// nothing else) and draws them. No framework and no build: this file is served as written.
'use strict';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
let graph = null;
let selected = null;
let explainAsked = false;

async function getJSON(path) {
  const r = await fetch(path, { cache: 'no-store' });
  const body = await r.text();
  if (!r.ok) throw new Error(`${path}: ${r.status} ${body.trim()}`);
  return JSON.parse(body);
}

function row(tbody, cells) {
  const tr = document.createElement('tr');
  for (const c of cells) {
    const td = document.createElement('td');
    if (c && typeof c === 'object') {
      td.textContent = c.text;
      if (c.fail) td.className = 'fail';
    } else {
      td.textContent = c;
    }
    tr.appendChild(td);
  }
  tbody.appendChild(tr);
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
}

// How long ago or from now an RFC 3339 time is: "3s ago", "in 23h59m".
function fromNow(t) {
  if (!t) return '-';
  const ms = Date.parse(t) - Date.now();
  if (Number.isNaN(ms)) return t;
  let s = Math.floor(Math.abs(ms) / 1000);
  const parts = [[86400, 'd'], [3600, 'h'], [60, 'm'], [1, 's']];
  let out = '';
  let units = 0;
  for (const [size, unit] of parts) {
    if (s >= size || (unit === 's' && units === 0)) {
      out += Math.floor(s / size) + unit;
      s %= size;
      units += 1;
      if (units === 2) break;
    } else if (units > 0) {
      break;
    }
  }
  return ms >= 0 ? `in ${out}` : `${out} ago`;
}

// A figure from the server as a finite number (anything else is 0): one odd value must not
// stop the page from drawing.
function num(v) {
  const n = Number(v);
  return Number.isFinite(n) ? n : 0;
}

function rate(v) {
  v = num(v);
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

function bytes(v) {
  v = num(v);
  if (v >= 1e6) return (v / 1e6).toFixed(1) + ' MB';
  if (v >= 1e3) return (v / 1e3).toFixed(1) + ' kB';
  return v.toFixed(0) + ' B';
}

function quantiles(p) {
  if (!(p.requests_per_second > 0)) return '-';
  const q = (v) => (v == null ? '-' : (num(v) * 1000).toFixed(1) + ' ms');
  return `${q(p.request_p50)} / ${q(p.request_p95)} / ${q(p.request_p99)}`;
}

function failureRate(p) {
  const all = num(p.connections_total) + num(p.failures_total);
  return all > 0 ? num(p.failures_total) / all : 0;
}

function showProblem(message) {
  const box = $('problem');
  box.hidden = !message;
  box.textContent = message || '';
}

function renderStatus(s) {
  const c = s.config;
  const state = $('config-state');
  state.textContent = c.error ? 'config rejected' : `config ${c.version} in force`;
  state.className = 'pill ' + (c.error ? 'bad' : 'ok');
  $('summary').textContent =
    `${s.workloads} workloads, ${s.services} services, ${s.policies} policies, trust domain ${s.trust_domain}`;
  const tbody = $('nodes').tBodies[0];
  clear(tbody);
  for (const [name, n] of Object.entries(s.nodes)) {
    const connected = n.streams > 0
      ? { text: `yes, since ${fromNow(n.connected_at)}` }
      : { text: n.connected_at ? `no, since ${fromNow(n.disconnected_at)}` : 'never', fail: true };
    // The version it holds all of: a later one with nothing for it leaves its last ack behind.
    let config;
    if (n.synced_version === c.version) config = { text: `current, acked ${fromNow(n.acked_at)}` };
    else if (n.streams === 0 && n.workloads === 0) config = { text: '-' };
    else config = { text: n.synced_version == null ? 'none yet' : `${n.synced_version} (behind)`, fail: n.streams > 0 };
    if (n.last_nack && (n.synced_version == null || n.synced_version < n.last_nack[0])) {
      config = { text: `rejected ${n.last_nack[0]}: ${n.last_nack[1]}`, fail: true };
    }
    const soon = n.certificates_expire && Date.parse(n.certificates_expire) - Date.now() < 3600e3;
    const certs = n.certificates_expire
      ? { text: `${n.certificates}/${n.workloads}, ${fromNow(n.certificates_expire)}`, fail: soon }
      : '-';
    row(tbody, [name, connected, config, String(n.workloads), certs]);
  }
  $('ca').textContent = s.ca_expires ? `CA root expires ${s.ca_expires} (${fromNow(s.ca_expires)}).` : '';
  const problems = [];
  if (c.error) problems.push(`The config files are rejected${c.error_file ? ' (' + c.error_file + ')' : ''}: ${c.error}. Version ${c.version}, the last good one, stays in force.`);
  showProblem(problems.join(' '));
}

function renderPolicies(p) {
  const tbody = $('policy-table').tBodies[0];
  clear(tbody);
  for (const pol of p.policies) {
    row(tbody, [pol.key, pol.action, pol.mode, String(pol.rules),
      pol.selects.length ? pol.selects.join(', ') : { text: 'nothing', fail: true }]);
  }
  if (!p.policies.length) row(tbody, ['none: the mesh default decides', '', '', '', '']);
}

// Applications on a circle, in name order: the same picture every time for the same mesh.
function layout(apps) {
  const pos = new Map();
  const cx = 450, cy = 300, r = apps.length > 1 ? Math.min(250, 150 + 20 * apps.length) : 0;
  apps.forEach((a, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(apps.length, 1);
    pos.set(a.id, { x: cx + r * Math.cos(angle), y: cy + r * Math.sin(angle) });
  });
  return pos;
}

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// A line from one application to another, stopping at their circles, moved aside by `shift`
// so that both directions of a pair (and a deny beside traffic) stay apart.
function edgeLine(svg, from, to, shift, attrs) {
  const dx = to.x - from.x, dy = to.y - from.y;
  const len = Math.hypot(dx, dy) || 1;
  const ux = dx / len, uy = dy / len;
  const nx = -uy * shift, ny = ux * shift;
  const r = 26;
  return el('line', Object.assign({
    x1: from.x + ux * r + nx, y1: from.y + uy * r + ny,
    x2: to.x - ux * (r + 4) + nx, y2: to.y - uy * (r + 4) + ny,
  }, attrs), svg);
}

function renderGraph(g) {
  graph = g;
  const svg = $('graph');
  clear(svg);
  const defs = el('defs', {}, svg);
  for (const [id, color] of [['ok', '#2e7d32'], ['warn', '#f9a825'], ['bad', '#c62828'], ['denied', '#d81b60']]) {
    const m = el('marker', { id: `arrow-${id}`, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' }, defs);
    el('path', { d: 'M 0 0 L 10 5 L 0 10 z', fill: color }, m);
  }
  const pos = layout(g.applications);
  const edges = el('g', { id: 'edges' }, svg);
  for (const e of g.edges) {
    const from = pos.get(e.source), to = pos.get(e.destination);
    if (!from || !to || e.source === e.destination) continue;
    const fr = failureRate(e);
    const state = fr >= 0.1 ? 'bad' : fr >= 0.01 ? 'warn' : 'ok';
    const color = { ok: '#2e7d32', warn: '#f9a825', bad: '#c62828' }[state];
    const width = Math.min(9, 2.5 + 2 * Math.log10(1 + num(e.connections_per_second)));
    const line = edgeLine(edges, from, to, 5, {
      class: `edge ${state}`, stroke: color, 'stroke-width': width.toFixed(2),
      'marker-end': `url(#arrow-${state})`,
      'data-source': e.source, 'data-destination': e.destination,
      'data-connections-total': e.connections_total, 'data-failure-rate': fr.toFixed(4),
    });
    el('title', {}, line).textContent =
      `${e.source} → ${e.destination}: ${rate(e.connections_per_second)} conn/s, ${bytes(e.bytes_per_second)}/s, ` +
      `${e.connections_total} connections and ${e.failures_total} failures since start`;
  }
  for (const d of g.denied) {
    const from = pos.get(d.source), to = pos.get(d.destination);
    if (!from || !to || d.source === d.destination) continue;
    const line = edgeLine(edges, from, to, -5, {
      class: 'edge denied', stroke: '#d81b60', 'stroke-width': 3, 'stroke-dasharray': '9 6',
      'marker-end': 'url(#arrow-denied)', 'data-source': d.source, 'data-destination': d.destination,
      'data-ports': d.ports.join(','),
    });
    el('title', {}, line).textContent = `${d.source} → ${d.destination}: denied by policy on ports ${d.ports.join(', ')}`;
    // Beside the line, on the side it was moved to.
    const len = Math.hypot(to.x - from.x, to.y - from.y) || 1;
    const side = { x: ((to.y - from.y) / len) * 16, y: (-(to.x - from.x) / len) * 16 };
    const label = el('text', { class: 'edge-label', x: (from.x + to.x) / 2 + side.x, y: (from.y + to.y) / 2 + side.y }, edges);
    label.textContent = `denied (${d.ports.join(', ')})`;
  }
  const nodes = el('g', { id: 'apps' }, svg);
  for (const a of g.applications) {
    const p = pos.get(a.id);
    const group = el('g', { class: 'app' + (a.id === selected ? ' selected' : ''), 'data-id': a.id, transform: `translate(${p.x.toFixed(1)},${p.y.toFixed(1)})` }, nodes);
    el('circle', { r: 22 }, group);
    el('text', { y: 38 }, group).textContent = a.id;
    el('title', {}, group).textContent = `${a.id}: ${a.workloads.length} workload(s) on ${[...a.nodes].join(', ')}`;
    group.addEventListener('click', () => { location.hash = `workload=${encodeURIComponent(a.id)}`; });
  }
  const notes = [`Traffic from ${g.traffic.from === 'prometheus' ? 'Prometheus (last minute)' : 'the nodes\' /metrics (since the last reading)'}, read ${g.traffic.read_at}.`];
  if (g.traffic.errors.length) notes.push(`Not read: ${g.traffic.errors.join('; ')}.`);
  if (g.left_out) notes.push(`${g.left_out} applications left out.`);
  if (g.denied_not_shown) notes.push(`Denied pairs not drawn: ${g.denied_not_shown}.`);
  $('graph-note').textContent = notes.join(' ');
  fillExplain(g);
  renderWorkload();
  document.body.dataset.graph = 'drawn';
}

function renderWorkload() {
  const tbody = $('workload-pairs').tBodies[0];
  clear(tbody);
  if (!graph || !selected) return;
  const app = graph.applications.find((a) => a.id === selected);
  $('workload-name').textContent = selected;
  $('workload-about').textContent = app
    ? `${app.workloads.length} workload(s): ${app.workloads.join(', ')}; on ${[...app.nodes].join(', ')}`
    : 'not in the config';
  for (const e of graph.edges) {
    const out = e.source === selected, into = e.destination === selected;
    if (!out && !into) continue;
    const reasons = Object.entries(e.failure_reasons).map(([r, n]) => `${r} ${n}`).join(', ');
    row(tbody, [out ? 'to' : 'from', out ? e.destination : e.source, rate(e.connections_per_second),
      bytes(e.bytes_per_second) + '/s', String(e.connections_total),
      { text: reasons || '0', fail: e.failures_total > 0 }, String(e.connections_open), quantiles(e)]);
  }
  for (const d of graph.denied) {
    if (d.source !== selected && d.destination !== selected) continue;
    row(tbody, [d.source === selected ? 'to' : 'from', d.source === selected ? d.destination : d.source,
      '', '', '', { text: `denied by policy on ${d.ports.join(', ')}`, fail: true }, '', '']);
  }
}

function fillExplain(g) {
  const keys = g.applications.flatMap((a) => a.workloads).sort();
  for (const id of ['explain-from', 'explain-to']) {
    const select = $(id);
    const was = select.value;
    if (select.options.length === keys.length && [...select.options].every((o, i) => o.value === keys[i])) continue;
    clear(select);
    for (const k of keys) {
      const o = document.createElement('option');
      o.value = k;
      o.textContent = k;
      select.appendChild(o);
    }
    if (keys.includes(was)) select.value = was;
  }
}

async function explain() {
  const from = $('explain-from').value, to = $('explain-to').value, port = $('explain-port').value;
  const answer = $('explain-answer');
  answer.className = '';
  answer.textContent = 'asking…';
  try {
    const q = new URLSearchParams({ from, to, port });
    const e = await getJSON(`/explain?${q}`);
    const lines = [];
    if (e.traffic) {
      lines.push(`TRAFFIC ${e.from} -> service ${e.traffic.service} port ${e.traffic.port}` + (e.traffic.route ? ` (route ${e.traffic.route})` : ''));
      for (const b of e.traffic.backends) lines.push(`  backend ${b.service}:${b.port} weight ${b.weight}, ${b.endpoints} endpoints${b.problem ? ': ' + b.problem : ''}`);
    }
    // One verdict per address family of the source; said once when they agree.
    const same = e.verdicts.every((v) => v.allowed === e.verdicts[0].allowed && v.reason === e.verdicts[0].reason);
    for (const v of same ? e.verdicts.slice(0, 1) : e.verdicts) {
      const from = !same && v.source_address ? ` (from ${v.source_address})` : '';
      lines.push(`${v.allowed ? 'ALLOW' : 'DENY'} ${e.from} -> ${e.to} port ${e.port}${from}`);
      lines.push(`  decided by: ${v.reason}`);
      lines.push(`  policy: ${v.policy}  rule: ${v.rule}`);
      for (const d of v.dry_run) lines.push(`  dry-run match (not enforced): ${d}`);
    }
    lines.push(`  source identity: ${e.source_identity}`);
    if (e.selecting.length) lines.push(`  policies selecting ${e.to}: ${e.selecting.join(', ')}`);
    const denied = e.verdicts.some((v) => !v.allowed);
    answer.className = denied ? 'deny' : 'allow';
    answer.dataset.verdict = e.verdicts.length ? (denied ? 'deny' : 'allow') : 'traffic';
    answer.textContent = lines.join('\n');
  } catch (err) {
    answer.dataset.verdict = 'error';
    answer.textContent = String(err.message || err);
  }
}

// `#workload=NS/APP` selects an application; `explain=FROM|TO|PORT` asks once the choices are
// there (a link to an explanation); both may be given, joined by `&`.
function fromHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  const next = h.get('workload');
  if (next && next !== selected) {
    selected = next;
    if (graph) renderGraph(graph);
  }
  const asked = h.get('explain');
  if (asked && graph && !explainAsked) {
    const [from, to, port] = asked.split('|');
    explainAsked = true;
    $('explain-from').value = from;
    $('explain-to').value = to;
    $('explain-port').value = port;
    explain();
  }
}

let refreshing = false;

async function refresh() {
  // One at a time: a slow answer must not pile requests up behind it.
  if (refreshing) return;
  refreshing = true;
  try {
    await refreshOnce();
  } finally {
    refreshing = false;
  }
}

async function refreshOnce() {
  const problems = [];
  const results = await Promise.allSettled([getJSON('/status'), getJSON('/ui/graph'), getJSON('/policies')]);
  const [status, g, policies] = results;
  if (status.status === 'fulfilled') renderStatus(status.value); else problems.push(status.reason.message);
  if (g.status === 'fulfilled') renderGraph(g.value); else problems.push(g.reason.message);
  if (policies.status === 'fulfilled') renderPolicies(policies.value); else problems.push(policies.reason.message);
  if (problems.length) showProblem(`Cannot read mesh-cp: ${problems.join('; ')}`);
  $('updated').textContent = `updated ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}`;
  fromHash();
}

window.addEventListener('hashchange', () => { explainAsked = false; fromHash(); });
$('explain-form').addEventListener('submit', (ev) => { ev.preventDefault(); explain(); });
refresh();
setInterval(refresh, 5000);

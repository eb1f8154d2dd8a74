#!/usr/bin/env node
// A real FHIR R4 server for the adapter's tests: medplum 4.5.2 (MemoryRepository + FhirRouter)
// behind node:http, plus the knobs tests need (fault injection, auth, request log) and an
// optional HAPI-behaviour mode (`_getpages` paging cache, 410 on expiry, no full-text search).
//
//   node tests/fhir_server/server.js --port 0 [--mode r4|hapi] [--max-count N]
//        [--fault drop-next-links|gone-paging|ignore-count|refuse-filter=Type:param ...] [--load PATH ...]
//
// A --fault breaks one behaviour for the whole run, so a client kit (`fhir-rerank interop`)
// can be shown to report exactly that: no next links, every later page 410 Gone, `_count`
// ignored (fixed pages of 20), one search parameter refused with 400 on one type.
//
// Prints exactly one stdout line `LISTENING http://127.0.0.1:<port>/fhir` once the data is
// loaded; everything else goes to stderr. Test-only: binds 127.0.0.1, no persistence.
'use strict';

const http = require('node:http');
const crypto = require('node:crypto');
const { FhirStore, HttpError, operationOutcome, searchsetBundle } = require('./store');

const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const PAGING_CACHE_LIMIT = 500;
const SEARCH_TYPES = ['DocumentReference', 'Observation', 'Condition', 'Patient', 'Binary'];
const FAULTS = ['drop-next-links', 'gone-paging', 'ignore-count'];

function parseArgs(argv) {
  const args = { port: 0, mode: 'r4', load: [], verbose: false, faults: new Set(), refused: [], maxCount: undefined };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--port') args.port = parseInt(argv[++i], 10);
    else if (a === '--mode') args.mode = argv[++i];
    else if (a === '--verbose') args.verbose = true;
    else if (a === '--max-count') args.maxCount = parseInt(argv[++i], 10);
    else if (a === '--fault') {
      const fault = argv[++i] ?? '';
      if (fault.startsWith('refuse-filter=')) {
        const [type, param] = fault.slice('refuse-filter='.length).split(':');
        if (!type || !param) throw new Error(`--fault refuse-filter=Type:param, not ${fault}`);
        args.refused.push({ type, param });
      } else if (FAULTS.includes(fault)) args.faults.add(fault);
      else throw new Error(`--fault must be one of ${FAULTS.join(', ')} or refuse-filter=Type:param, not ${fault}`);
    }
    else if (a === '--load') {
      while (i + 1 < argv.length && !argv[i + 1].startsWith('--')) args.load.push(argv[++i]);
    } else throw new Error(`Unknown argument ${a}`);
  }
  if (!['r4', 'hapi'].includes(args.mode)) throw new Error(`--mode must be r4 or hapi, not ${args.mode}`);
  return args;
}

function issueCode(status) {
  return { 400: 'invalid', 401: 'login', 403: 'forbidden', 404: 'not-found', 410: 'not-found', 429: 'throttled' }[status]
    ?? (status >= 500 ? 'transient' : 'processing');
}

/** Test-side state: injected faults, the auth rule, the request log and HAPI's paging cache. */
class Controls {
  constructor() {
    this.reset();
    this.pages = new Map();
  }

  reset() {
    this.faults = [];
    this.auth = { token: null, forbid: null, introspect: null };
    this.smart = null;  // a SMART discovery document served at /fhir/.well-known/smart-configuration
    this.binaryTokens = {};  // Binary id → the only Authorization that may read it
    this.log = [];
  }

  /** The first armed fault whose `path_contains` is in this request's path+query, consumed. */
  takeFault(pathAndQuery) {
    const decoded = safeDecode(pathAndQuery);
    const fault = this.faults.find((f) => f.times > 0
      && (pathAndQuery.includes(f.path_contains) || decoded.includes(f.path_contains)));
    if (fault) fault.times -= 1;
    this.faults = this.faults.filter((f) => f.times > 0);
    return fault;
  }

  rememberPages(entry) {
    const id = crypto.randomUUID();
    this.pages.set(id, entry);
    if (this.pages.size > PAGING_CACHE_LIMIT) this.pages.delete(this.pages.keys().next().value);
    return id;
  }
}

function safeDecode(s) {
  try {
    return decodeURIComponent(s.replace(/\+/g, ' '));
  } catch {
    return s;
  }
}

function send(res, status, body, headers = {}) {
  const isBuffer = Buffer.isBuffer(body);
  const payload = isBuffer || typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, ...headers, 'Content-Length': Buffer.byteLength(payload) });
  res.end(payload);
}

/** RFC 7662 introspection: is `authorization` ("Bearer <token>") an active token there? */
async function tokenActive(introspectUrl, authorization) {
  if (!authorization || !authorization.startsWith('Bearer ')) return false;
  try {
    const answer = await fetch(introspectUrl, {
      method: 'POST', headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ token: authorization.slice('Bearer '.length) }).toString(),
    });
    const body = await answer.json();
    return answer.ok && body.active === true && (body.exp === undefined || body.exp * 1000 > Date.now());
  } catch {
    return false;
  }
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function parseJson(text, what) {
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError(400, 'invalid', `${what} is not valid JSON`);
  }
}

function wantsFhirJson(req, url) {
  const accept = (req.headers.accept ?? '').toLowerCase();
  const format = (url.searchParams.get('_format') ?? '').toLowerCase();
  return /json/.test(format) || /application\/(fhir\+json|json\+fhir|json)/.test(accept);
}

function capabilityStatement(store, mode) {
  const core = require('@medplum/core');
  const types = SEARCH_TYPES.concat([...store.repo.resources.keys()].filter((t) => !SEARCH_TYPES.includes(t))).sort();
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: `medplum fhir-router 4.5.2 test server (${mode} mode)` },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [{
      mode: 'server',
      interaction: [{ code: 'transaction' }, { code: 'batch' }],
      resource: types.map((type) => ({
        type,
        interaction: ['read', 'search-type', 'create', 'update', 'delete'].map((code) => ({ code })),
        searchParam: Object.values(core.globalSchema.types[type]?.searchParams ?? {})
          .map((p) => ({ name: p.code, type: p.type }))
          .sort((a, b) => (a.name < b.name ? -1 : 1)),
      })),
    }],
  };
}

/** The whole HTTP side; `baseUrl()` is known once listening. */
function createServer(store, controls, mode, verbose, behaviour = { faults: new Set(), refused: [] }) {
  let baseUrl = '';
  const broken = (fault) => behaviour.faults.has(fault);

  function pageLinks(selfUrl, total, offset, count, pageUrl) {
    const links = [{ relation: 'self', url: selfUrl }];
    if (count > 0 && offset + count < total && !broken('drop-next-links')) links.push({ relation: 'next', url: pageUrl(offset + count) });
    if (count > 0 && offset > 0) links.push({ relation: 'previous', url: pageUrl(Math.max(0, offset - count)) });
    return links;
  }

  async function search(resourceType, url, logEntry) {
    let pairs = [...url.searchParams.entries()];
    const refused = behaviour.refused.find((r) => r.type === resourceType
      && pairs.some(([name]) => name.split(':')[0] === r.param));
    if (refused) {
      throw new HttpError(400, 'processing',
        `Unknown search parameter "${refused.param}" for resource type "${resourceType}"`);
    }
    if (broken('ignore-count')) pairs = pairs.filter(([name]) => name !== '_count');
    if (mode === 'hapi') {
      const fulltext = pairs.find(([name]) => ['_content', '_text'].includes(name.split(':')[0]));
      if (fulltext) {
        throw new HttpError(400, 'processing',
          `Fulltext search is not enabled on this service, can not process parameter: ${fulltext[0].split(':')[0]}`);
      }
    }
    const plan = store.planSearch(resourceType, pairs);
    if (broken('gone-paging') && plan.offset > 0) {
      throw new HttpError(410, 'not-found', 'Injected fault: later pages are gone');
    }
    logEntry.ignored = plan.ignored.map(([name]) => name);
    const resources = await store.matchAll(resourceType, plan);
    const used = new URLSearchParams(plan.used);
    const selfQuery = (offset) => {
      const q = new URLSearchParams(used);
      q.set('_count', String(plan.count));
      if (offset) q.set('_offset', String(offset));
      return `${baseUrl}/${resourceType}?${q}`;
    };
    let pageUrl = selfQuery;
    if (mode === 'hapi' && plan.offset + plan.count < resources.length && plan.count > 0) {
      const id = controls.rememberPages({ resources, selfUrl: selfQuery(plan.offset) });
      pageUrl = (offset) => getPagesUrl(id, offset, plan.count);
    }
    const links = pageLinks(selfQuery(plan.offset), resources.length, plan.offset, plan.count, pageUrl);
    return searchsetBundle(baseUrl, resources, plan.offset, plan.count, links);
  }

  function getPagesUrl(id, offset, count) {
    return `${baseUrl}?_getpages=${id}&_getpagesoffset=${offset}&_count=${count}&_pretty=true&_bundletype=searchset`;
  }

  function getPages(url) {
    const id = url.searchParams.get('_getpages');
    const cached = broken('gone-paging') ? undefined : controls.pages.get(id);
    if (!cached) throw new HttpError(410, 'not-found', `Search ID "${id}" does not exist and may have expired`);
    const offset = parseInt(url.searchParams.get('_getpagesoffset') ?? '0', 10) || 0;
    const count = Math.min(parseInt(url.searchParams.get('_count') ?? '20', 10) || 20, store.maxCount);
    const links = pageLinks(getPagesUrl(id, offset, count), cached.resources.length, offset, count,
      (o) => getPagesUrl(id, o, count));
    return searchsetBundle(baseUrl, cached.resources, offset, count, links);
  }

  async function handleFhir(req, res, url, rest) {
    const method = req.method;
    const segments = rest.split('/').filter(Boolean);
    const logEntry = {
      method, path: url.pathname, query: url.search.replace(/^\?/, ''),
      authorization: req.headers.authorization ?? null, accept: req.headers.accept ?? null,
    };
    controls.log.push(logEntry);

    if (controls.smart) {  // a SMART server: discovery and CORS for browser apps
      res.setHeader('Access-Control-Allow-Origin', '*');
      if (method === 'OPTIONS') {
        res.writeHead(204, { 'Access-Control-Allow-Methods': 'GET', 'Access-Control-Max-Age': '600',
          'Access-Control-Allow-Headers': 'Authorization, Accept, Content-Type' });
        return res.end();
      }
      if (method === 'GET' && rest === '/.well-known/smart-configuration') {
        return send(res, 200, controls.smart, { 'Content-Type': 'application/json' });
      }
    }

    const fault = controls.takeFault(url.pathname + url.search);
    if (fault) {
      if (fault.delay) await new Promise((r) => setTimeout(r, fault.delay * 1000));
      if (fault.malformed) return send(res, 200, '{"resourceType": "Bundle", "type": "searchset", "entr');
      if (fault.stall) {  // headers and the start of a body, then nothing for `stall` seconds
        res.writeHead(200, { 'Content-Type': 'application/fhir+json' });
        res.write('{"resourceType": "Bundle", "type": "searchset", ');
        await new Promise((r) => setTimeout(r, fault.stall * 1000));
        return res.end('"entry": []}');
      }
      if (fault.status) {
        const headers = fault.retry_after != null ? { 'Retry-After': String(fault.retry_after) } : {};
        const body = fault.body ?? operationOutcome('error', issueCode(fault.status), `Injected fault: HTTP ${fault.status}`);
        return send(res, fault.status, body, headers);
      }
    }

    const isMetadata = method === 'GET' && segments.length === 1 && segments[0] === 'metadata';
    const auth = req.headers.authorization;
    if (!isMetadata && controls.auth.forbid && auth === controls.auth.forbid) {
      throw new HttpError(403, 'forbidden', 'This token may not access this server');
    }
    if (!isMetadata && controls.auth.token && auth !== controls.auth.token) {
      throw new HttpError(401, 'login', 'Missing or invalid Authorization header');
    }
    if (!isMetadata && controls.auth.introspect && !(await tokenActive(controls.auth.introspect, auth))) {
      throw new HttpError(401, 'login', 'The access token is not active (introspection)');
    }

    const binaryToken = segments[0] === 'Binary' && segments.length === 2
      ? controls.binaryTokens[segments[1]] : undefined;
    if (binaryToken !== undefined && auth !== binaryToken) {
      throw new HttpError(403, 'forbidden', 'This token may not read this Binary');
    }

    if (isMetadata) return send(res, 200, capabilityStatement(store, mode));
    if (method === 'GET' && segments.length === 0 && url.searchParams.has('_getpages')) {
      if (mode !== 'hapi') throw new HttpError(400, 'not-supported', '_getpages is only served in hapi mode');
      return send(res, 200, getPages(url));
    }
    if (method === 'GET' && segments.length === 1) return send(res, 200, await search(segments[0], url, logEntry));
    if (method === 'GET' && segments.length === 2) {
      const resource = await store.read(segments[0], segments[1]);
      if (resource.resourceType === 'Binary' && !wantsFhirJson(req, url)) {
        return send(res, 200, Buffer.from(resource.data ?? '', 'base64'),
          { 'Content-Type': resource.contentType ?? 'application/octet-stream' });
      }
      return send(res, 200, resource, { ETag: `W/"${resource.meta?.versionId}"` });
    }
    const body = parseJson(await readBody(req), 'The request body');
    if (method === 'POST' && segments.length === 0) {
      const [status, result] = await store.transaction(body, req);
      return send(res, status, result);
    }
    const [status, result] = await store.route(method, rest.replace(/^\//, '') + url.search, body, req);
    const headers = {};
    if (status === 201 && result?.id) headers.Location = `${baseUrl}/${result.resourceType}/${result.id}/_history/${result.meta?.versionId}`;
    return send(res, status, result, headers);
  }

  async function handleAdmin(req, res, url) {
    const action = url.pathname.slice('/admin/'.length);
    if (req.method === 'GET' && action === 'requests') return send(res, 200, controls.log, { 'Content-Type': 'application/json' });
    if (req.method !== 'POST') throw new HttpError(405, 'not-supported', 'Admin actions are POST (except GET /admin/requests)');
    const body = parseJson(await readBody(req), 'The admin body') ?? {};
    if (action === 'faults') {
      controls.faults.push({
        status: body.status ?? null, times: body.times ?? 1, path_contains: body.path_contains ?? '',
        retry_after: body.retry_after ?? null, delay: body.delay ?? 0, malformed: Boolean(body.malformed),
        body: body.body ?? null, stall: body.stall ?? 0,
      });
    } else if (action === 'auth') {
      controls.auth = { token: body.token ?? null, forbid: body.forbid ?? null, introspect: body.introspect ?? null };
    } else if (action === 'smart') {
      controls.smart = body.configuration ?? null;
    } else if (action === 'binary-auth') {
      controls.binaryTokens[body.id] = body.token;
    } else if (action === 'expire-paging') {
      controls.pages.clear();
    } else if (action === 'reset') {
      controls.reset();
    } else {
      throw new HttpError(404, 'not-found', `Unknown admin action ${action}`);
    }
    return send(res, 200, { ok: true }, { 'Content-Type': 'application/json' });
  }

  const server = http.createServer(async (req, res) => {
    const started = Date.now();
    const url = new URL(req.url, 'http://127.0.0.1');
    try {
      if (url.pathname === '/fhir' || url.pathname.startsWith('/fhir/')) {
        await handleFhir(req, res, url, url.pathname.slice('/fhir'.length));
      } else if (url.pathname.startsWith('/admin/')) {
        await handleAdmin(req, res, url);
      } else {
        throw new HttpError(404, 'not-found', 'Not under /fhir');
      }
    } catch (err) {
      if (!(err instanceof HttpError)) process.stderr.write(`error: ${err.stack ?? err}\n`);
      const status = err instanceof HttpError ? err.status : 500;
      const outcome = err instanceof HttpError ? err.outcome : operationOutcome('error', 'exception', String(err.message ?? err));
      if (!res.headersSent) send(res, status, outcome);
    }
    if (verbose) process.stderr.write(`${req.method} ${url.pathname} ${res.statusCode} ${Date.now() - started}ms\n`);
  });
  server.setBaseUrl = (url) => { baseUrl = url; };
  return server;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const t0 = Date.now();
  const store = new FhirStore({ maxCount: args.maxCount });
  let loaded = 0;
  for (const target of args.load) loaded += await store.loadPath(target);
  const server = createServer(store, new Controls(), args.mode, args.verbose,
    { faults: args.faults, refused: args.refused });
  server.keepAliveTimeout = 60_000;
  server.listen(args.port, '127.0.0.1', () => {
    const base = `http://127.0.0.1:${server.address().port}/fhir`;
    server.setBaseUrl(base);
    const faults = [...args.faults, ...args.refused.map((r) => `refuse-filter=${r.type}:${r.param}`)];
    process.stderr.write(`loaded ${loaded} resources in ${Date.now() - t0} ms (${args.mode} mode`
      + `${faults.length ? `, faults: ${faults.join(', ')}` : ''})\n`);
    process.stdout.write(`LISTENING ${base}\n`);
  });
  const stop = () => { server.close(() => process.exit(0)); server.closeAllConnections(); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  process.stderr.write(`fatal: ${err.stack ?? err}\n`);
  process.exit(1);
});

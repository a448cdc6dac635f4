// flowhost's page: try every loaded endpoint (issue #27). Plain JavaScript, no framework, no
// build step; served from this origin under a CSP with no inline script.
//
// Rules this file keeps:
// - Everything a plugin or a caller supplies (routes, summaries, descriptions, error texts,
//   file names) reaches the document as text (textContent, attribute values), never as HTML.
// - The API key lives in sessionStorage only and travels in the Authorization header; it is
//   never put in a URL, never logged, never written to localStorage.
// - The server validates: the page sends what was typed and shows the server's answer where it
//   belongs (a 400's field errors beside their fields, a 422 on the image picker, a 503 with its
//   reason and Retry-After).
'use strict';

(() => {
  const KEY_STORE = 'flowhost.key';
  const REQUESTS_STORE = 'flowhost.requests';
  const ENDPOINT_REFRESH_MS = 3000;
  const HISTORY_REFRESH_MS = 10000;
  const HISTORY_PAGE = 20;
  const TERMINAL = new Set(['succeeded', 'failed', 'canceled', 'expired']);

  const $ = (id) => document.getElementById(id);

  /** A DOM element; `text` sets textContent, children are nodes or strings (text nodes). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (name === 'text') node.textContent = String(value);
      else if (name === 'class') node.className = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  const state = {
    endpoints: new Map(), // route -> {route, name, summary, schema, signature}
    current: null, // route
    keysOn: null, // null: not known yet
    access: 'unknown', // 'open' | 'ok' | 'missing' | 'refused' | 'error'
    running: null, // {jobId, controller}
    thumbs: new Map(), // output id -> object URL
    output: null, // object URL of the shown output
    firstRender: true,
    historySignature: '',
  };

  // ---------------------------------------------------------------- the key, and every request

  function key() {
    return sessionStorage.getItem(KEY_STORE) || '';
  }

  /** fetch() against this origin with the key as a header (never in the URL). */
  function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const k = key();
    if (k) headers.set('Authorization', `Bearer ${k}`);
    return fetch(path, { ...options, headers, credentials: 'omit', cache: 'no-store', referrerPolicy: 'no-referrer' });
  }

  /** The body of an error answer: problem+json, the v2 envelope, or whatever text came. */
  async function problemOf(response) {
    const text = await response.text().catch(() => '');
    let body = null;
    try {
      body = JSON.parse(text);
    } catch (_) {
      body = null;
    }
    const envelope = body && typeof body.error === 'object' && body.error ? body.error : null;
    return {
      status: response.status,
      title: (body && body.title) || (envelope && envelope.code) || response.statusText || 'Error',
      detail: (body && body.detail) || (envelope && envelope.message) || (body ? '' : text.slice(0, 500)),
      errors: Array.isArray(body && body.errors) ? body.errors : [],
      retryAfter: response.headers.get('Retry-After'),
      body,
    };
  }

  function setAccess(access, message) {
    state.access = access;
    const line = $('access');
    line.textContent = message || '';
    const locked = access === 'missing' || access === 'refused';
    line.classList.toggle('locked', locked);
    document.body.dataset.access = access;
    updateRunnable();
  }

  /** Whether keys are on and ours is accepted: one cheap v2 call. */
  async function checkAccess() {
    let response;
    try {
      response = await api(`/api/v2/jobs?limit=${HISTORY_PAGE}`);
    } catch (_) {
      setAccess('error', 'The service cannot be reached.');
      return null;
    }
    if (response.status === 401 || response.status === 403) {
      state.keysOn = true;
      const problem = await problemOf(response);
      if (!key()) {
        setAccess('missing', 'This server requires an API key: enter it above. The page works only with a key.');
      } else {
        setAccess('refused', `The API key was refused: ${problem.detail || problem.title}`);
      }
      renderHistory([]);
      return null;
    }
    if (!response.ok) {
      const problem = await problemOf(response);
      setAccess('error', `The job list is unavailable (${problem.status}): ${problem.detail}`);
      return null;
    }
    if (key()) {
      state.keysOn = true;
      setAccess('ok', 'Key accepted (kept in this tab only).');
    } else {
      state.keysOn = false;
      setAccess('open', '');
    }
    return response.json().catch(() => null);
  }

  function initKeyForm() {
    const input = $('key');
    $('key-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (value) sessionStorage.setItem(KEY_STORE, value);
      else sessionStorage.removeItem(KEY_STORE);
      input.value = '';
      input.placeholder = value ? 'a key is set for this tab' : 'only if the server has keys';
      refreshAccessAndHistory();
    });
    $('key-forget').addEventListener('click', () => {
      sessionStorage.removeItem(KEY_STORE);
      input.value = '';
      input.placeholder = 'only if the server has keys';
      refreshAccessAndHistory();
    });
    if (key()) input.placeholder = 'a key is set for this tab';
  }

  // ---------------------------------------------------------------- endpoints from /openapi.json

  function endpointsOf(doc) {
    const found = new Map();
    const paths = (doc && doc.paths) || {};
    for (const [route, item] of Object.entries(paths)) {
      if (route.startsWith('/api/') || !item || !item.post) continue;
      const content = item.post.requestBody && item.post.requestBody.content;
      const schema = content && content['application/json'] && content['application/json'].schema;
      if (!schema) continue;
      const endpoint = {
        route,
        name: String(item.post.operationId || route),
        summary: String(item.post.summary || ''),
        schema,
      };
      endpoint.signature = JSON.stringify([endpoint.name, endpoint.summary, schema]);
      found.set(route, endpoint);
    }
    return found;
  }

  async function loadEndpoints() {
    let doc;
    try {
      const response = await api('/openapi.json');
      if (!response.ok) throw new Error(`answered ${response.status}`);
      doc = await response.json();
    } catch (error) {
      $('endpoints-note').textContent = `The endpoint list could not be read (${error.message}); retrying.`;
      return;
    }
    const found = endpointsOf(doc);
    const before = state.endpoints;
    const changed = found.size !== before.size || [...found].some(([route, e]) => !before.has(route) || before.get(route).signature !== e.signature);
    state.endpoints = found;
    $('endpoints-note').textContent = found.size ? '' : 'No endpoint is loaded: put a plugin into the plugin folder.';
    if (changed || state.firstRender) {
      renderEndpointList();
      const current = state.current && found.get(state.current);
      const old = state.current && before.get(state.current);
      if (state.current && !current) {
        $('endpoint-gone').hidden = false;
        updateRunnable();
      } else if (current && (!old || old.signature !== current.signature)) {
        selectEndpoint(current.route, { keepValues: true });
      } else if (!state.current && found.size) {
        const preferred = found.has('/flux-dev') ? '/flux-dev' : [...found.keys()][0];
        selectEndpoint(preferred);
      }
    }
    if (state.firstRender) {
      state.firstRender = false;
      $('empty').hidden = found.size > 0;
      $('empty').textContent = 'No endpoint is loaded yet.';
      document.body.dataset.ready = 'true';
      if (performance.mark) performance.mark('flowhost-page-interactive');
    }
  }

  function renderEndpointList() {
    const list = $('endpoint-list');
    const items = [...state.endpoints.values()].sort((a, b) => a.route.localeCompare(b.route)).map((e) =>
      el('li', { 'data-route': e.route },
        el('button', { type: 'button', 'aria-current': String(e.route === state.current), onclick: () => selectEndpoint(e.route) },
          el('span', { class: 'route', text: e.route }),
          el('span', { class: 'sum', text: e.summary }))));
    list.replaceChildren(...items);
  }

  // ---------------------------------------------------------------- forms from JSON Schema

  /** Resolve a local `$ref` (`#/$defs/x`, `#/definitions/x`) against the request schema. */
  function resolve(schema, root, depth = 0) {
    if (!schema || typeof schema !== 'object' || depth > 8) return schema || {};
    if (typeof schema.$ref === 'string' && schema.$ref.startsWith('#/')) {
      let target = root;
      for (const part of schema.$ref.slice(2).split('/')) target = target && target[part.replace(/~1/g, '/').replace(/~0/g, '~')];
      return resolve({ ...target, ...schema, $ref: undefined }, root, depth + 1);
    }
    return schema;
  }

  function typeOf(schema) {
    const t = Array.isArray(schema.type) ? schema.type.find((x) => x !== 'null') : schema.type;
    if (t) return t;
    if (Array.isArray(schema.enum)) return 'enum';
    if (schema.properties) return 'object';
    return 'json';
  }

  /** An image input: a string whose schema speaks of image data URLs (or a media type). */
  function isImageField(name, schema) {
    if (typeOf(schema) !== 'string') return false;
    const media = String(schema.contentMediaType || '');
    const text = `${schema.description || ''} ${schema.format || ''}`;
    return media.startsWith('image/') || /data:image/i.test(text) || /(^|_)(image|photo|picture)$/i.test(name);
  }

  const field = (name) => document.querySelector(`#fields .field[data-field="${CSS.escape(name)}"]`);

  function buildField(name, raw, root, required) {
    const schema = resolve(raw, root);
    const t = typeOf(schema);
    const id = `f-${name.replace(/[^A-Za-z0-9_-]/g, '_')}`;
    const wrap = el('div', { class: 'field', 'data-field': name, 'data-kind': t });
    const label = el('label', { for: id }, name);
    if (required) label.append(' ', el('span', { class: 'req', title: 'required', text: '*' }));
    wrap.append(label);
    const hasDefault = Object.prototype.hasOwnProperty.call(schema, 'default');
    const initial = hasDefault ? schema.default : undefined;
    let control;
    if (Array.isArray(schema.enum)) {
      control = el('select', { id, 'data-enum': 'true' });
      if (!required && !hasDefault) control.append(el('option', { value: '', text: '(default)' }));
      schema.enum.forEach((option, index) => control.append(el('option', { value: String(index), text: typeof option === 'string' ? option : JSON.stringify(option) })));
      const at = hasDefault ? schema.enum.findIndex((o) => JSON.stringify(o) === JSON.stringify(initial)) : -1;
      if (at >= 0) control.value = String(at);
      wrap.append(control);
    } else if (t === 'boolean') {
      control = el('input', { id, type: 'checkbox' });
      control.checked = initial === true;
      wrap.append(control);
    } else if (t === 'integer' || t === 'number') {
      const min = typeof schema.minimum === 'number' ? schema.minimum : undefined;
      const max = typeof schema.maximum === 'number' ? schema.maximum : undefined;
      const step = typeof schema.multipleOf === 'number' ? schema.multipleOf : t === 'integer' ? 1 : 'any';
      // Beyond 2^53 a JavaScript number is not exact: such fields (seeds) are typed as text and
      // sent as the digits typed.
      const huge = (max !== undefined && max > Number.MAX_SAFE_INTEGER) || (min !== undefined && min < -Number.MAX_SAFE_INTEGER);
      control = el('input', { id, type: huge ? 'text' : 'number', inputmode: t === 'integer' ? 'numeric' : 'decimal', min: huge ? undefined : min, max: huge ? undefined : max, step: huge ? undefined : step });
      if (initial !== undefined) control.value = String(initial);
      if (!huge && min !== undefined && max !== undefined) {
        const slider = el('input', { type: 'range', min, max, step: step === 'any' ? (max - min) / 100 : step, 'aria-label': `${name} slider` });
        slider.value = control.value || String(min);
        slider.addEventListener('input', () => { control.value = slider.value; });
        control.addEventListener('input', () => { if (control.value !== '') slider.value = control.value; });
        wrap.append(el('div', { class: 'pair' }, slider, control));
      } else {
        wrap.append(control);
      }
      if (name === 'seed' && !required) control.placeholder = 'random (the page picks one and shows it)';
    } else if (t === 'string' && isImageField(name, schema)) {
      const picker = el('input', { id, type: 'file', accept: 'image/png,image/jpeg,image/webp', 'data-image': 'true' });
      const text = el('input', { type: 'text', 'aria-label': `${name} as a path or data URL`, placeholder: 'or a path in the inputs volume / a data: URL' });
      const chosen = el('p', { class: 'help chosen' });
      picker.addEventListener('change', () => {
        const file = picker.files && picker.files[0];
        chosen.textContent = file ? `chosen: ${file.name} (${file.size} bytes)` : '';
      });
      wrap.append(picker, text, chosen);
      control = picker;
    } else if (t === 'string') {
      const long = name.includes('prompt') || (schema.maxLength || 0) > 200;
      control = long ? el('textarea', { id, rows: 3 }) : el('input', { id, type: 'text' });
      if (initial !== undefined) control.value = String(initial);
      wrap.append(control);
    } else {
      control = el('textarea', { id, class: 'json', spellcheck: 'false', placeholder: 'JSON' });
      if (initial !== undefined) control.value = JSON.stringify(initial, null, 2);
      wrap.append(control);
    }
    if (schema.description) wrap.append(el('p', { class: 'help', text: schema.description }));
    wrap.append(el('p', { class: 'field-error', role: 'alert', hidden: 'hidden' }));
    wrap._schema = schema;
    wrap._required = required;
    return wrap;
  }

  function selectEndpoint(route, { keepValues = false } = {}) {
    const endpoint = state.endpoints.get(route);
    if (!endpoint) return;
    const kept = keepValues && state.current === route ? formValues() : null;
    state.current = route;
    $('empty').hidden = true;
    $('endpoint').hidden = false;
    $('endpoint-gone').hidden = true;
    $('endpoint-route').textContent = endpoint.route;
    $('endpoint-summary').textContent = endpoint.summary;
    const root = endpoint.schema;
    const schema = resolve(root, root);
    const required = new Set(Array.isArray(schema.required) ? schema.required : []);
    const names = Object.keys(schema.properties || {});
    names.sort((a, b) => Number(required.has(b)) - Number(required.has(a)));
    const fields = names.map((name) => buildField(name, schema.properties[name], root, required.has(name)));
    if (!names.length) {
      // No properties to go by: the whole body as JSON.
      fields.push(buildField('(body)', { description: 'The request body as JSON.' }, root, true));
    }
    $('fields').replaceChildren(...fields);
    if (kept) fillForm(kept);
    clearProblems();
    for (const li of document.querySelectorAll('#endpoint-list li')) {
      li.querySelector('button').setAttribute('aria-current', String(li.dataset.route === route));
    }
    updateRunnable();
  }

  /** What the form holds, as typed (strings and booleans): for "run again". */
  function formValues() {
    const values = {};
    for (const wrap of document.querySelectorAll('#fields .field')) {
      const name = wrap.dataset.field;
      const box = wrap.querySelector('input[type="checkbox"]');
      const select = wrap.querySelector('select');
      const text = wrap.querySelector('input[type="text"], input[type="number"], textarea');
      if (box) values[name] = box.checked;
      else if (select) values[name] = { enum: select.value };
      else if (text) values[name] = text.value;
    }
    return values;
  }

  function fillForm(values) {
    for (const [name, value] of Object.entries(values || {})) {
      const wrap = field(name);
      if (!wrap) continue;
      const box = wrap.querySelector('input[type="checkbox"]');
      const select = wrap.querySelector('select');
      const text = wrap.querySelector('input[type="text"], input[type="number"], textarea');
      const slider = wrap.querySelector('input[type="range"]');
      if (box) box.checked = value === true;
      else if (select && value && typeof value === 'object') select.value = value.enum;
      else if (text && typeof value === 'string') {
        text.value = value;
        if (slider && value !== '') slider.value = value;
      }
    }
  }

  // ---------------------------------------------------------------- the request body

  /** A JSON number written exactly as typed (integers beyond 2^53 stay exact). */
  class Raw {
    constructor(text) { this.text = text; }
  }
  const JSON_NUMBER = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$/;

  function toJson(value) {
    if (value instanceof Raw) return value.text;
    if (Array.isArray(value)) return `[${value.map(toJson).join(',')}]`;
    if (value && typeof value === 'object') return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}:${toJson(v)}`).join(',')}}`;
    return JSON.stringify(value);
  }

  function readAsDataUrl(file) {
    return new Promise((done, fail) => {
      const reader = new FileReader();
      reader.onload = () => done(String(reader.result));
      reader.onerror = () => fail(reader.error || new Error('the file could not be read'));
      reader.readAsDataURL(file);
    });
  }

  function randomSeed(schema) {
    const words = new Uint32Array(1);
    crypto.getRandomValues(words);
    const min = typeof schema.minimum === 'number' ? schema.minimum : 0;
    const max = typeof schema.maximum === 'number' ? Math.min(schema.maximum, 0xffffffff) : 0xffffffff;
    return String(min + (words[0] % (max - min + 1)));
  }

  /** The body to send, or null after marking the fields the page itself cannot encode. */
  async function collectBody() {
    const body = {};
    let seed = null;
    let ok = true;
    for (const wrap of document.querySelectorAll('#fields .field')) {
      const name = wrap.dataset.field;
      const schema = wrap._schema || {};
      const kind = wrap.dataset.kind;
      const select = wrap.querySelector('select');
      const box = wrap.querySelector('input[type="checkbox"]');
      const picker = wrap.querySelector('input[type="file"]');
      const text = wrap.querySelector('input[type="text"], input[type="number"], textarea');
      if (select) {
        if (select.value !== '') body[name] = schema.enum[Number(select.value)];
      } else if (box) {
        body[name] = box.checked;
      } else if (picker) {
        const file = picker.files && picker.files[0];
        if (file) {
          try {
            body[name] = await readAsDataUrl(file);
          } catch (error) {
            markField(name, `the file could not be read: ${error.message}`);
            ok = false;
          }
        } else if (text && text.value.trim() !== '') {
          body[name] = text.value.trim();
        }
      } else if (kind === 'integer' || kind === 'number') {
        const typed = text.value.trim();
        if (typed === '') {
          if (name === 'seed') {
            seed = randomSeed(schema);
            body[name] = new Raw(seed);
          }
          continue;
        }
        // What is not a JSON number goes as a string: the server names the field and the rule.
        body[name] = JSON_NUMBER.test(typed) ? new Raw(typed) : typed;
        if (name === 'seed') seed = typed;
      } else if (kind === 'string') {
        if (text.value !== '' || wrap._required) body[name] = text.value;
      } else if (name === '(body)' || text.value.trim() !== '') {
        try {
          const parsed = JSON.parse(text.value);
          if (name === '(body)') return { body: parsed, seed, text: text.value };
          body[name] = parsed;
        } catch (error) {
          markField(name, `not valid JSON: ${error.message}`);
          ok = false;
        }
      }
    }
    return ok ? { body, seed, text: toJson(body) } : null;
  }

  // ---------------------------------------------------------------- problems where they belong

  function clearProblems() {
    for (const wrap of document.querySelectorAll('#fields .field')) {
      wrap.removeAttribute('aria-invalid');
      const error = wrap.querySelector('.field-error');
      error.textContent = '';
      error.hidden = true;
    }
    showFormProblem('');
  }

  function markField(name, message) {
    const wrap = field(name);
    if (!wrap) return false;
    wrap.setAttribute('aria-invalid', 'true');
    const error = wrap.querySelector('.field-error');
    error.textContent = error.textContent ? `${error.textContent}; ${message}` : message;
    error.hidden = false;
    return true;
  }

  function showFormProblem(message, lines = []) {
    const box = $('form-problem');
    box.replaceChildren();
    if (message) box.append(el('p', { text: message }));
    if (lines.length) box.append(el('ul', {}, ...lines.map((line) => el('li', { text: line }))));
    box.hidden = !message && !lines.length;
  }

  /** The top-level field a problem's path names (`width`, `/loras/0/name` → `loras`). */
  function topField(path) {
    const text = String(path || '').replace(/^[/#.]+/, '');
    if (field(text)) return text;
    return text.split(/[/.[\]]/)[0];
  }

  function imageFieldName() {
    const picker = document.querySelector('#fields input[type="file"]');
    return picker ? picker.closest('.field').dataset.field : null;
  }

  function showProblem(problem) {
    const headline = `${problem.status} ${problem.title}${problem.detail ? `: ${problem.detail}` : ''}`;
    if (problem.status === 401 || problem.status === 403) {
      showFormProblem(headline);
      refreshAccessAndHistory();
      return;
    }
    if (problem.status === 503) {
      const wait = problem.retryAfter ? ` Retry after ${problem.retryAfter} s.` : '';
      showFormProblem(`Unavailable: ${problem.detail || problem.title}.${wait}`);
      $('form-problem').dataset.retryAfter = problem.retryAfter || '';
      return;
    }
    const unplaced = [];
    const image = imageFieldName();
    for (const entry of problem.errors) {
      const name = topField(entry && entry.field);
      const message = String((entry && entry.message) || '');
      const target = problem.status === 422 && image && !field(name) ? image : name;
      if (!markField(target, message)) unplaced.push(`${String((entry && entry.field) || '')}: ${message}`);
    }
    if (problem.status === 422 && image && !problem.errors.length) {
      markField(image, problem.detail || problem.title);
    }
    showFormProblem(problem.status === 400 && problem.errors.length && !unplaced.length ? 'Some fields need a change (see below each).' : headline, unplaced);
  }

  // ---------------------------------------------------------------- run → job → events

  function updateRunnable() {
    const locked = state.access === 'missing' || state.access === 'refused';
    const gone = state.current && !state.endpoints.has(state.current);
    $('run').disabled = locked || !!gone || !!state.running;
    $('dry-run').disabled = locked || !!gone;
    $('cancel').hidden = !state.running;
  }

  function requests() {
    try {
      return JSON.parse(localStorage.getItem(REQUESTS_STORE) || '{}') || {};
    } catch (_) {
      return {};
    }
  }

  /** Remember what the page sent for a job (the v2 job list does not carry requests). */
  function remember(jobId, entry) {
    const all = requests();
    all[jobId] = entry;
    const ids = Object.keys(all);
    for (const old of ids.slice(0, Math.max(0, ids.length - 50))) delete all[old];
    for (;;) {
      try {
        localStorage.setItem(REQUESTS_STORE, JSON.stringify(all));
        return;
      } catch (_) {
        // Over the storage quota (data URLs are large): drop the oldest and try again.
        const first = Object.keys(all)[0];
        if (!first) return;
        delete all[first];
      }
    }
  }

  async function run(event) {
    event.preventDefault();
    if (state.running) return;
    clearProblems();
    const route = state.current;
    const collected = await collectBody();
    if (!collected) return;
    resetResult();
    $('result').hidden = false;
    setStatus('submitting');
    let response;
    try {
      response = await api(route, { method: 'POST', headers: { 'Content-Type': 'application/json', Prefer: 'respond-async' }, body: collected.text });
    } catch (error) {
      setStatus('');
      showFormProblem(`The request did not reach the service: ${error.message}`);
      return;
    }
    if (response.status !== 202) {
      setStatus('refused');
      $('result').hidden = true;
      showProblem(await problemOf(response));
      return;
    }
    const job = await response.json();
    remember(job.id, { route, values: formValues(), body: collected.text.slice(0, 4000), seed: collected.seed });
    await follow(job, collected.seed);
  }

  function resetResult() {
    $('progress').value = 0;
    $('progress-text').textContent = '';
    const preview = $('preview');
    preview.hidden = true;
    preview.removeAttribute('src');
    preview.dataset.count = '0';
    $('preview-caption').hidden = true;
    const output = $('output');
    output.hidden = true;
    output.removeAttribute('src');
    $('download').hidden = true;
    $('facts').replaceChildren();
    $('job-problem').hidden = true;
    $('job-problem').textContent = '';
    if (state.output) URL.revokeObjectURL(state.output);
    state.output = null;
  }

  function setStatus(status) {
    const badge = $('job-status');
    badge.textContent = status;
    badge.className = `badge ${status}`;
    document.body.dataset.jobStatus = status;
  }

  function showProgress(progress) {
    if (!progress) return;
    const value = Number(progress.value);
    if (Number.isFinite(value)) $('progress').value = Math.min(1, Math.max(0, value));
    const parts = [];
    if (progress.step != null && progress.steps != null) parts.push(`step ${progress.step}/${progress.steps}`);
    if (progress.nodes_total) parts.push(`nodes ${progress.nodes_done}/${progress.nodes_total}`);
    if (progress.current_node_class) parts.push(String(progress.current_node_class));
    if (progress.message) parts.push(String(progress.message));
    $('progress-text').textContent = parts.join(' · ');
    document.body.dataset.progress = String(value);
  }

  function showPreview(preview) {
    const type = String(preview.content_type || '');
    if (!/^image\/(jpeg|png|webp|gif)$/.test(type) || typeof preview.data_base64 !== 'string' || !/^[A-Za-z0-9+/=]*$/.test(preview.data_base64)) return;
    const img = $('preview');
    img.src = `data:${type};base64,${preview.data_base64}`;
    img.hidden = false;
    img.dataset.count = String(Number(img.dataset.count || '0') + 1);
    $('preview-caption').hidden = false;
  }

  /** Server-sent events over fetch (EventSource cannot send the Authorization header). */
  async function streamEvents(url, controller, onEvent) {
    const response = await api(url, { headers: { Accept: 'text/event-stream' }, signal: controller.signal });
    if (!response.ok || !response.body) throw new Error(`events answered ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = 'message';
        const data = [];
        for (const line of frame.split('\n')) {
          if (line.startsWith('event:')) name = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (!data.length) continue;
        let payload;
        try {
          payload = JSON.parse(data.join('\n'));
        } catch (_) {
          continue;
        }
        if (onEvent(name, payload) === 'stop') {
          controller.abort();
          return;
        }
      }
    }
  }

  async function follow(job, seed) {
    const controller = new AbortController();
    state.running = { jobId: job.id, controller };
    updateRunnable();
    setStatus(job.status);
    document.body.dataset.jobId = job.id;
    const eventsUrl = (job.urls && job.urls.events) || `/api/v2/jobs/${encodeURIComponent(job.id)}/events`;
    try {
      await streamEvents(eventsUrl, controller, (name, data) => {
        if (name === 'status') {
          setStatus(String(data.status));
          if (data.queue_position != null) $('progress-text').textContent = `queued, position ${data.queue_position}`;
          if (TERMINAL.has(data.status)) return 'stop';
        } else if (name === 'progress') {
          showProgress(data);
        } else if (name === 'preview') {
          showPreview(data);
        }
        return null;
      });
    } catch (error) {
      if (error.name !== 'AbortError') $('progress-text').textContent = `live events lost (${error.message}); polling`;
    }
    // The final word comes from the job itself (its outputs, metrics and error).
    let final = null;
    for (let attempt = 0; attempt < 600; attempt += 1) {
      const response = await api(`/api/v2/jobs/${encodeURIComponent(job.id)}`).catch(() => null);
      if (response && response.ok) {
        final = await response.json();
        if (TERMINAL.has(final.status)) break;
        showProgress(final.progress);
        setStatus(final.status);
      }
      await new Promise((done) => setTimeout(done, 1000));
    }
    state.running = null;
    updateRunnable();
    if (final) await showFinal(final, seed);
    loadHistory();
  }

  async function cancel() {
    if (!state.running) return;
    await api(`/api/v2/jobs/${encodeURIComponent(state.running.jobId)}/cancel`, { method: 'POST' }).catch(() => null);
  }

  function fact(name, value) {
    $('facts').append(el('dt', { text: name }), el('dd', { 'data-fact': name, text: value }));
  }

  async function showFinal(job, seed) {
    setStatus(job.status);
    fact('job', job.id);
    if (seed != null) fact('seed', seed);
    for (const [name, ms] of Object.entries(job.metrics || {})) {
      if (typeof ms === 'number') fact(name.replace(/_ms$/, ''), `${ms} ms`);
    }
    const total = Date.parse(job.completed_at) - Date.parse(job.created_at);
    if (Number.isFinite(total)) fact('created → done', `${total} ms`);
    if (job.status !== 'succeeded') {
      $('progress-text').textContent = '';
      const error = job.error || {};
      const where = [error.node_id && `node ${error.node_id}`, error.class_type].filter(Boolean).join(' ');
      const box = $('job-problem');
      box.textContent = `${job.status}${error.code ? ` (${error.code})` : ''}: ${error.message || 'no reason given'}${where ? ` — ${where}` : ''}`;
      box.hidden = false;
      return;
    }
    $('progress').value = 1;
    $('progress-text').textContent = 'done';
    const output = (job.outputs || []).find((o) => o.type === 'image') || (job.outputs || [])[0];
    if (!output) return;
    const response = await api(output.url).catch(() => null);
    if (!response || !response.ok) {
      $('job-problem').textContent = `The output could not be fetched (${response ? response.status : 'network'}).`;
      $('job-problem').hidden = false;
      return;
    }
    const blob = await response.blob();
    state.output = URL.createObjectURL(blob);
    const img = $('output');
    img.src = state.output;
    img.hidden = false;
    const link = $('download');
    link.href = state.output;
    link.setAttribute('download', String(output.name || `${job.id}`).replace(/[\\/]/g, '_'));
    link.textContent = `Download ${output.name || ''} (${blob.size} bytes, ${blob.type})`;
    link.hidden = false;
    fact('size', `${blob.size} bytes`);
  }

  // ---------------------------------------------------------------- the built graph (dry run)

  async function dryRun() {
    clearProblems();
    const collected = await collectBody();
    if (!collected) return;
    const response = await api(`${state.current}?dry_run=true`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: collected.text }).catch(() => null);
    if (!response) {
      showFormProblem('The request did not reach the service.');
      return;
    }
    if (!response.ok) {
      showProblem(await problemOf(response));
      return;
    }
    const built = await response.json();
    showGraph(built.workflow, `built by ${state.current}`);
  }

  function showGraph(workflow, caption) {
    $('graph').textContent = JSON.stringify(workflow, null, 2);
    $('graph').dataset.caption = caption;
    $('graph-panel').hidden = false;
  }

  async function showJobGraph(jobId) {
    const response = await api(`/api/v2/jobs/${encodeURIComponent(jobId)}/workflow`).catch(() => null);
    if (response && response.ok) {
      const body = await response.json();
      showGraph(body.workflow, `job ${jobId}`);
    }
  }

  // ---------------------------------------------------------------- job history

  async function thumbnail(output, img) {
    if (state.thumbs.has(output.id)) {
      img.src = state.thumbs.get(output.id);
      return;
    }
    const response = await api(output.url).catch(() => null);
    if (!response || !response.ok) return;
    const url = URL.createObjectURL(await response.blob());
    state.thumbs.set(output.id, url);
    img.src = url;
  }

  function renderHistory(jobs) {
    const remembered = requests();
    // Unchanged list: leave it (and any open "request" details) alone.
    const signature = JSON.stringify([state.access, jobs.map((j) => [j.id, j.status, !!remembered[j.id]]), [...state.endpoints.keys()]]);
    if (signature === state.historySignature) return;
    state.historySignature = signature;
    const items = jobs.map((job) => {
      const request = remembered[job.id];
      const img = el('img', { class: 'thumb', alt: '' });
      const output = (job.outputs || []).find((o) => o.type === 'image');
      if (output) thumbnail(output, img);
      const buttons = el('span', { class: 'buttons' });
      if (request && state.endpoints.has(request.route)) {
        buttons.append(el('button', { type: 'button', class: 'small', 'data-action': 'again', text: 'run again', onclick: () => {
          selectEndpoint(request.route);
          fillForm(request.values);
          $('run-form').scrollIntoView({ block: 'start' });
        } }));
      }
      buttons.append(el('button', { type: 'button', class: 'small', text: 'graph', onclick: () => showJobGraph(job.id) }));
      const li = el('li', { 'data-job': job.id, 'data-status': job.status },
        img,
        el('div', { class: 'meta' },
          el('span', { class: `badge ${job.status}`, text: job.status }), ' ',
          el('span', { text: request ? request.route : 'not from this page' }),
          el('span', { class: 'when', text: new Date(job.created_at).toLocaleString() }),
          buttons));
      if (request) li.append(el('details', {}, el('summary', { text: 'request' }), el('pre', { text: request.body })));
      if (job.error && job.error.message) li.append(el('details', {}, el('summary', { text: 'error' }), el('pre', { text: String(job.error.message) })));
      return li;
    });
    $('job-list').replaceChildren(...items);
    $('history-note').textContent = jobs.length ? '' : state.access === 'missing' || state.access === 'refused' ? 'Enter a valid key to see the jobs.' : 'No jobs yet.';
  }

  async function loadHistory() {
    const listing = await checkAccess();
    if (listing && Array.isArray(listing.jobs)) renderHistory(listing.jobs);
  }

  function refreshAccessAndHistory() {
    loadHistory();
  }

  // ---------------------------------------------------------------- start

  async function mode() {
    const response = await fetch('/health', { cache: 'no-store' }).catch(() => null);
    if (!response) return;
    const health = await response.json().catch(() => null);
    if (health && health.simulated) {
      const badge = $('mode');
      badge.textContent = 'simulated ComfyUI: synthetic images';
      badge.className = 'badge simulated';
      badge.hidden = false;
    }
  }

  function start() {
    initKeyForm();
    $('run-form').addEventListener('submit', run);
    $('dry-run').addEventListener('click', dryRun);
    $('cancel').addEventListener('click', cancel);
    $('history-refresh').addEventListener('click', loadHistory);
    loadEndpoints();
    loadHistory();
    mode();
    // A plugin hot-loaded (or removed) while the page is open shows up without a reload.
    setInterval(() => { if (!document.hidden) loadEndpoints(); }, ENDPOINT_REFRESH_MS);
    setInterval(() => { if (!document.hidden && !state.running) loadHistory(); }, HISTORY_REFRESH_MS);
    window.addEventListener('focus', () => { loadEndpoints(); loadHistory(); });
    document.addEventListener('visibilitychange', () => { if (!document.hidden) loadEndpoints(); });
  }

  start();
})();

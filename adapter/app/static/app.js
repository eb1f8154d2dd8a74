// Chart search: the page the authorization server sends the user back to (`/app/`).
// fhirclient finishes the launch (state check, code exchange with the PKCE verifier); then the
// page searches the adapter's own $rerank with the user's access token as Authorization.
// The token lives in this closure only: never in a URL this page builds, never logged.
"use strict";
(function chartSearch() {
  const $ = (id) => document.getElementById(id);
  const TYPE_LABELS = { DocumentReference: "Documents", Observation: "Observations", Condition: "Conditions" };
  const TYPE_ORDER = ["DocumentReference", "Observation", "Condition"];
  const PASSAGE_TEXT_URL = "https://fhir-rerank.example.org/StructureDefinition/best-passage-text";
  const session = { token: null, patient: null, adapterBase: null, pageSize: 10 };
  const view = { offset: 0, bundle: null, asked: null, busy: false };

  function text(tag, className, content) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (content !== undefined && content !== null) el.textContent = String(content);
    return el;
  }

  function show(id, visible) { $(id).hidden = !visible; }

  // ------------------------------------------------------------------ OperationOutcome
  function outcomeSentence(status, outcome) {
    const issues = (outcome && Array.isArray(outcome.issue)) ? outcome.issue : [];
    const said = issues.map((i) => i.diagnostics || (i.details && i.details.text) || i.code)
      .filter(Boolean).join("; ");
    const code = issues.length ? issues[0].code : "";
    let lead;
    if (status === 401 || code === "login") {
      lead = "The FHIR server did not accept your sign-in (HTTP 401), so the chart could not be searched. Open the app again from the patient's chart.";
    } else if (status === 403 || code === "forbidden") {
      lead = "You are not allowed to see this part of the record (HTTP 403).";
    } else if (status === 400 || status === 422) {
      lead = "The search could not run as asked.";
    } else if (status === 429) {
      lead = "The search service is busy; try again in a moment.";
    } else if (status >= 500 || code === "transient" || code === "timeout") {
      lead = "The search service or the FHIR server had a problem (HTTP " + status + ").";
    } else {
      lead = "The search did not complete (HTTP " + status + ").";
    }
    return said ? lead + " Details: " + said : lead;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    show("error", true);
  }

  // ------------------------------------------------------------------ reading resources
  function codeText(cc) {
    if (!cc) return "";
    if (cc.text) return cc.text;
    const coding = (cc.coding || []).find((c) => c.display) || (cc.coding || [])[0];
    return coding ? (coding.display || coding.code || "") : "";
  }

  function clinicalDate(r) {
    const candidates = {
      DocumentReference: [r.date, r.context && r.context.period && r.context.period.start],
      Observation: [r.effectiveDateTime, r.effectivePeriod && r.effectivePeriod.start, r.effectiveInstant, r.issued],
      Condition: [r.onsetDateTime, r.onsetPeriod && r.onsetPeriod.start, r.recordedDate],
    }[r.resourceType] || [];
    const found = candidates.find(Boolean);
    return found ? String(found).slice(0, 10) : "";
  }

  function observationValue(r) {
    if (r.valueQuantity) {
      const q = r.valueQuantity;
      return [q.value, q.unit || q.code].filter((v) => v !== undefined && v !== null).join(" ");
    }
    if (r.valueCodeableConcept) return codeText(r.valueCodeableConcept);
    if (r.valueString) return r.valueString;
    if (r.valueBoolean !== undefined) return r.valueBoolean ? "yes" : "no";
    if (Array.isArray(r.component)) {
      return r.component.map((c) => codeText(c.code) + " " + (c.valueQuantity ? c.valueQuantity.value + " " + (c.valueQuantity.unit || "") : ""))
        .join(", ");
    }
    return "";
  }

  function displayText(r) {
    if (r.resourceType === "Observation") {
      const value = observationValue(r);
      return codeText(r.code) + (value ? ": " + value.trim() : "");
    }
    if (r.resourceType === "Condition") {
      const status = codeText(r.clinicalStatus);
      return codeText(r.code) + (status ? " (" + status + ")" : "");
    }
    if (r.resourceType === "DocumentReference") {
      return r.description || codeText(r.type) || "Document";
    }
    return r.resourceType;
  }

  function decodeBase64Text(data) {
    try {
      const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
      return new TextDecoder("utf-8").decode(bytes);
    } catch (e) {
      return "";
    }
  }

  function noteText(r) {
    if (r.resourceType !== "DocumentReference") return "";
    for (const content of r.content || []) {
      const a = content.attachment || {};
      if (a.data && /^text\//.test(a.contentType || "text/plain")) return decodeBase64Text(a.data);
    }
    return "";
  }

  // Words too common to show where a question matches (English; other languages keep theirs).
  const COMMON = new Set(["the", "and", "for", "with", "from", "that", "this", "was", "were",
    "are", "has", "had", "have", "any", "all", "not", "but", "about", "into", "what", "when",
    "which", "who", "why", "how", "does", "did", "patient"]);

  function terms(question) {
    return Array.from(new Set(question.toLowerCase().split(/[^\p{L}\p{N}]+/u)
      .filter((t) => t.length > 2 && !COMMON.has(t))));
  }

  function escaped(word) { return word.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }

  // A word of the question at the start of a word of the text ("breath" marks "breathing").
  function termPattern(question) {
    const words = terms(question).map(escaped);
    return words.length ? new RegExp("(?<![\\p{L}\\p{N}])(" + words.join("|") + ")", "giu") : null;
  }

  // The best passage: the span the adapter scored best (best-passage-text extension), else the
  // part of the note text around the first word of the question, else nothing.
  function bestPassage(entry, question) {
    const ext = ((entry.search || {}).extension || []).find((e) => e.url === PASSAGE_TEXT_URL);
    if (ext && ext.valueString) return { text: ext.valueString, source: "model" };
    const note = noteText(entry.resource || {});
    const pattern = termPattern(question);
    if (!note || !pattern) return null;
    const hits = Array.from(note.matchAll(pattern), (m) => ({ at: m.index, word: m[1].toLowerCase() }));
    if (!hits.length) return null;
    // the window (about 400 characters) holding the most different words of the question
    let at = hits[0].at;
    let best = 0;
    hits.forEach((h) => {
      const near = new Set(hits.filter((o) => o.at >= h.at && o.at < h.at + 300).map((o) => o.word));
      if (near.size > best) { best = near.size; at = h.at; }
    });
    const start = Math.max(0, at - 100);
    const end = Math.min(note.length, at + 280);
    const part = note.slice(start, end).replace(/\n\s*\n+/g, "\n").trim();
    return { text: (start > 0 ? "…" : "") + part + (end < note.length ? "…" : ""), source: "words" };
  }

  function withMarks(parent, content, question) {
    const pattern = termPattern(question);
    if (!pattern) { parent.append(document.createTextNode(content)); return; }
    content.split(pattern).forEach((piece, i) => {
      parent.append(i % 2 === 1 ? text("mark", "", piece) : document.createTextNode(piece));
    });
  }

  // ------------------------------------------------------------------ rendering
  function renderEntry(entry, question, maxScore) {
    const r = entry.resource || {};
    const item = text("li", "result");
    item.dataset.type = r.resourceType || "";
    item.dataset.date = clinicalDate(r);
    const head = text("div", "result-head");
    head.append(text("span", "result-date", clinicalDate(r) || "no date"));
    head.append(text("span", "result-type", TYPE_LABELS[r.resourceType] ? TYPE_LABELS[r.resourceType].replace(/s$/, "") : r.resourceType));
    const title = text("span", "result-text");
    withMarks(title, displayText(r), question);
    head.append(title);
    const score = Number((entry.search || {}).score || 0);
    const relative = maxScore > 1 ? score / maxScore : score;
    const scoreBox = text("span", "score");
    const meter = document.createElement("meter");
    meter.min = 0; meter.max = 1; meter.value = Math.max(0, Math.min(1, relative));
    const pct = Math.round(meter.value * 100);
    meter.setAttribute("aria-label", "relevance " + pct + "%");
    meter.title = "relevance " + pct + "% (score " + score.toFixed(3) + ")";
    scoreBox.append(text("span", "", "relevance"), meter);
    head.append(scoreBox);
    item.append(head);
    const passage = bestPassage(entry, question);
    if (passage) {
      const quote = text("blockquote", "passage");
      quote.dataset.source = passage.source;
      quote.append(text("span", "passage-label", passage.source === "model" ? "Best passage" : "Matching words"));
      const body = text("span", "passage-text");
      withMarks(body, passage.text, question);
      quote.append(body);
      item.append(quote);
    }
    return item;
  }

  function render() {
    const bundle = view.bundle;
    const question = view.asked.question;
    const matches = (bundle.entry || []).filter((e) => (e.search || {}).mode !== "outcome");
    const outcomes = (bundle.entry || []).filter((e) => (e.search || {}).mode === "outcome");
    const notes = $("notes");
    notes.replaceChildren();
    outcomes.forEach((e) => ((e.resource || {}).issue || []).forEach((issue) => {
      if (issue.diagnostics) notes.append(text("li", "", issue.diagnostics));
    }));
    show("notes", notes.children.length > 0);
    const total = typeof bundle.total === "number" ? bundle.total : matches.length;
    const first = total ? view.offset + 1 : 0;
    const last = view.offset + matches.length;
    $("results-heading").textContent = total
      ? "Results " + first + "–" + last + " of " + total
      : "No results for this question and these filters";
    const list = $("result-list");
    list.replaceChildren();
    const maxScore = Math.max(0, ...matches.map((e) => Number((e.search || {}).score || 0)));
    if ($("grouped").checked) {
      TYPE_ORDER.forEach((type) => {
        const group = matches.filter((e) => (e.resource || {}).resourceType === type);
        if (!group.length) return;
        const section = text("section", "group");
        section.dataset.type = type;
        section.append(text("h3", "", TYPE_LABELS[type] + " (" + group.length + ")"));
        const ul = text("ul", "result-list");
        group.forEach((e) => ul.append(renderEntry(e, question, maxScore)));
        section.append(ul);
        list.append(section);
      });
    } else {
      const ul = text("ul", "result-list");
      matches.forEach((e) => ul.append(renderEntry(e, question, maxScore)));
      list.append(ul);
    }
    $("prev").disabled = view.offset === 0;
    $("next").disabled = !(bundle.link || []).some((l) => l.relation === "next");
    show("results", true);
  }

  // ------------------------------------------------------------------ searching
  function parameters(asked, offset) {
    const p = [
      { name: "query", valueString: asked.question },
      { name: "_count", valueInteger: session.pageSize },
      { name: "_offset", valueInteger: offset },
      { name: "_sort", valueString: asked.sort },
    ];
    if (asked.types.length && asked.types.length < TYPE_ORDER.length) {
      p.push({ name: "_type", valueString: asked.types.join(",") });
    }
    // `date` filters documents and observations, `onset-date` conditions (the adapter sends
    // each filter only to the types that define it).
    if (asked.from) p.push({ name: "date", valueString: "ge" + asked.from }, { name: "onset-date", valueString: "ge" + asked.from });
    if (asked.to) p.push({ name: "date", valueString: "le" + asked.to }, { name: "onset-date", valueString: "le" + asked.to });
    return { resourceType: "Parameters", parameter: p };
  }

  function headers(extra) {
    return Object.assign({ Accept: "application/fhir+json", Authorization: "Bearer " + session.token }, extra || {});
  }

  function setProgress(label) {
    show("progress", true);
    $("progress-label").textContent = label;
    const bar = $("progress-bar");
    const m = /(\d+)\s*\/\s*(\d+)/.exec(label);
    if (m && Number(m[2]) > 0) bar.value = Number(m[1]) / Number(m[2]);
    else bar.removeAttribute("value");  // indeterminate
  }

  const PROGRESS_WORDS = {
    fetching: "Reading the chart from the FHIR server…", recall: "Finding candidates…",
    queued: "Waiting for the ranking model…", done: "Done",
  };

  async function readJson(response) {
    try { return await response.json(); } catch (e) { return null; }
  }

  async function runSearch(offset) {
    if (view.busy) return;
    view.busy = true;
    $("go").disabled = true;
    show("error", false);
    setProgress("Starting the search…");
    try {
      const url = session.adapterBase + "/Patient/" + encodeURIComponent(session.patient) + "/$rerank";
      let response = await fetch(url, {
        method: "POST", credentials: "omit", cache: "no-store",
        headers: headers({ "Content-Type": "application/fhir+json", Prefer: "respond-async" }),
        body: JSON.stringify(parameters(view.asked, offset)),
      });
      while (response.status === 202) {
        const progress = response.headers.get("X-Progress") || "fetching";
        const stage = progress.split(" ")[0];
        setProgress((PROGRESS_WORDS[stage] || "Ranking the chart…") + (stage === "reranking" ? " " + progress.slice(stage.length).trim() : ""));
        const poll = response.headers.get("Content-Location");
        if (!poll) throw new Error("the search service answered 202 without a place to poll");
        const wait = Math.min(1, Number(response.headers.get("Retry-After") || "1")) * 1000;
        await new Promise((resolve) => setTimeout(resolve, wait));
        response = await fetch(poll, { credentials: "omit", cache: "no-store", headers: headers() });
      }
      const body = await readJson(response);
      if (!response.ok || !body || body.resourceType !== "Bundle") {
        show("results", false);
        showError(outcomeSentence(response.status, body));
        return;
      }
      view.offset = offset;
      view.bundle = body;
      render();
      $("results-heading").focus();
    } catch (err) {
      showError("The search service could not be reached: " + (err && err.message ? err.message : err));
    } finally {
      show("progress", false);
      $("go").disabled = false;
      view.busy = false;
      // a counter tests (and assistive tooling) can wait on: one more search has finished
      document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
    }
  }

  function askedFromForm() {
    return {
      question: $("q").value.trim(),
      types: Array.from(document.querySelectorAll("input[name=type]:checked")).map((i) => i.value),
      from: $("from").value, to: $("to").value, sort: $("sort").value,
    };
  }

  function wireForm() {
    const form = $("search");
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const asked = askedFromForm();
      if (!asked.question) return;
      if (!asked.types.length) { showError("Choose at least one kind of record to search."); return; }
      view.asked = asked;
      runSearch(0);
    });
    // A filter or the order changed after a search: search again from the first page.
    form.querySelectorAll("input[name=type], #from, #to, #sort").forEach((el) => {
      el.addEventListener("change", () => { if (view.asked) form.requestSubmit(); });
    });
    $("grouped").addEventListener("change", () => { if (view.bundle) render(); });
    $("prev").addEventListener("click", () => runSearch(Math.max(0, view.offset - session.pageSize)));
    $("next").addEventListener("click", () => runSearch(view.offset + session.pageSize));
  }

  // ------------------------------------------------------------------ launch context
  async function applyStyle(url) {
    if (!url) return;
    try {
      const style = await (await fetch(url, { credentials: "omit" })).json();
      const root = document.documentElement.style;
      if (style.color_background) root.setProperty("--bg", style.color_background);
      if (style.color_text) root.setProperty("--text", style.color_text);
      if (style.color_error) root.setProperty("--error", style.color_error);
      if (style.font_family_body) root.setProperty("--font", style.font_family_body);
      if (style.dim_border_radius) root.setProperty("--radius", style.dim_border_radius);
    } catch (e) {
      // the EHR's style is a nicety; the page keeps its own look (CSP may not allow the URL)
    }
  }

  async function showBanner(client) {
    $("banner-name").textContent = session.patient;
    show("banner", true);
    try {
      const p = await client.patient.read();
      const name = (p.name || [])[0] || {};
      const full = [(name.given || []).join(" "), name.family].filter(Boolean).join(" ") || name.text;
      if (full) $("banner-name").textContent = full;
      $("banner-details").textContent = [p.gender, p.birthDate ? "born " + p.birthDate : ""].filter(Boolean).join(", ");
    } catch (e) {
      // the id stays shown: the banner never hides which chart this is
    }
    $("banner").dataset.loaded = "true";
  }

  async function start() {
    wireForm();
    let client;
    try {
      const cfg = await (await fetch("/app/config.json", { credentials: "same-origin" })).json();
      session.adapterBase = cfg.adapterBase;
      session.pageSize = cfg.pageSize || 10;
      client = await FHIR.oauth2.ready();
    } catch (err) {
      $("status").textContent = "Sign-in did not complete: " + (err && err.message ? err.message : err) + ". Open the app again from the patient's chart.";
      $("status").setAttribute("role", "alert");
      return;
    }
    const tokenResponse = client.state.tokenResponse || {};
    session.token = tokenResponse.access_token;
    session.patient = tokenResponse.patient || client.patient.id;  // one session, one patient
    if (!session.token || !session.patient) {
      $("status").textContent = "The sign-in gave no patient context; open the app from a patient's chart.";
      $("status").setAttribute("role", "alert");
      return;
    }
    if (tokenResponse.need_patient_banner) showBanner(client);
    await applyStyle(tokenResponse.smart_style_url);
    $("status").textContent = "Ask a question about this patient's chart.";
    show("search", true);
    $("q").focus();
  }

  start();
})();

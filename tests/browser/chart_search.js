#!/usr/bin/env node
// Drives Debian's headless Chromium through the chart-search app, as a person would, and prints
// one JSON line of what was on the screen at each step (tests/test_smart_app.py asserts on it).
//
//   node tests/browser/chart_search.js '<json plan>'
//
// plan: { launchUrl, question, standalonePatient?, dateFrom?, fhirAdminUrl?, screenshot?, timeoutMs?,
//         expectLaunchError?, iframe? }
// Steps: open the launch link (EHR launch → authorize → token → /app/), search with the
// keyboard, read the results grouped and as one list, narrow by date, then (fhirAdminUrl)
// make the FHIR server answer 401 and read the error. Waits on the page's own signals
// (`body[data-searches]`, visible elements), never on sleeps.
'use strict';

const { chromium } = require('playwright-core');

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage'];

async function readResults(page) {
  return page.evaluate(() => {
    const pick = (el, sel) => (el.querySelector(sel) ? el.querySelector(sel).textContent.trim() : null);
    return {
      heading: document.getElementById('results-heading').textContent.trim(),
      resultsVisible: !document.getElementById('results').hidden,
      groups: Array.from(document.querySelectorAll('#result-list section.group')).map((s) => ({
        type: s.dataset.type, title: s.querySelector('h3').textContent.trim(),
        count: s.querySelectorAll('li.result').length,
      })),
      entries: Array.from(document.querySelectorAll('#result-list li.result')).map((li) => ({
        type: li.dataset.type, date: li.dataset.date,
        shownDate: pick(li, '.result-date'), text: pick(li, '.result-text'),
        passage: pick(li, '.passage-text'),
        passageSource: li.querySelector('.passage') ? li.querySelector('.passage').dataset.source : null,
        marks: Array.from(li.querySelectorAll('.passage-text mark')).map((m) => m.textContent),
        meter: li.querySelector('meter') ? Number(li.querySelector('meter').value) : null,
      })),
      notes: Array.from(document.querySelectorAll('#notes li')).map((li) => li.textContent.trim()),
      error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent.trim(),
      nextEnabled: !document.getElementById('next').disabled,
    };
  });
}

async function searchesDone(page) {
  return page.evaluate(() => Number(document.body.dataset.searches || 0));
}

async function waitForSearch(page, before, timeout) {
  await page.waitForFunction((n) => Number(document.body.dataset.searches || 0) > n, before, { timeout });
}

// The EHR's page (`plan.iframe.parentUrl`, a loopback server of the test) embeds the launch
// link in an iframe; the app must launch and search inside it. A second EHR page, on an
// origin not in `frame-ancestors` (`refusedParentUrl`), must be refused by the browser.
async function iframeFlow(context, plan, out, timeout) {
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('console', (m) => out.console.push(m.text()));
  await page.goto(plan.iframe.parentUrl);
  const frame = await (await page.waitForSelector('#app')).contentFrame();
  try {
    await frame.locator('#search').waitFor({ state: 'visible' });
  } catch (err) {
    const status = await frame.locator('#status').textContent().catch(() => '(no status)');
    throw new Error(`the app did not start in the iframe (${frame.url()}): ${status}\n`
      + out.console.join('\n') + '\n' + err.message);
  }
  const n = await frame.evaluate(() => Number(document.body.dataset.searches || 0));
  await frame.locator('#q').fill(plan.question);
  await frame.locator('#q').press('Enter');
  await frame.waitForFunction((k) => Number(document.body.dataset.searches || 0) > k, n, { timeout });
  out.steps.iframe = {
    url: frame.url(),
    heading: (await frame.locator('#results-heading').textContent()).trim(),
    results: await frame.locator('li.result').count(),
  };
  if (plan.iframe.refusedParentUrl) {  // frame-ancestors: the browser says so on the console
    const refusedPage = await context.newPage();
    const refusal = refusedPage.waitForEvent('console', {
      predicate: (m) => /frame-ancestors/.test(m.text()), timeout });
    await refusedPage.goto(plan.iframe.refusedParentUrl);
    out.steps.iframeRefused = (await refusal).text();
  }
}

async function main() {
  const plan = JSON.parse(process.argv[2]);
  const timeout = plan.timeoutMs || 60000;
  const out = { steps: {}, requests: [], console: [], navigations: [] };
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true, timeout });
  try {
    const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
    if (plan.iframe) {
      await iframeFlow(context, plan, out, timeout);
      process.stdout.write(JSON.stringify(out) + '\n');
      return;
    }
    // Every text the progress label shows, as it changes (the page is fast; nothing is missed).
    await context.addInitScript(() => {
      window.__progress = [];
      document.addEventListener('DOMContentLoaded', () => {
        const label = document.getElementById('progress-label');
        if (!label) return;
        new MutationObserver(() => window.__progress.push(label.textContent))
          .observe(label, { childList: true, characterData: true, subtree: true });
      });
    });
    const page = await context.newPage();
    page.setDefaultTimeout(timeout);
    page.on('request', (r) => out.requests.push({ method: r.method(), url: r.url() }));
    page.on('console', (m) => out.console.push(m.text()));
    page.on('pageerror', (e) => out.console.push('pageerror: ' + e.message));
    page.on('framenavigated', (f) => { if (f === page.mainFrame()) out.navigations.push(f.url()); });

    // 1. The EHR opens the launch link; the app must arrive on /app/ signed in.
    await page.goto(plan.launchUrl);
    if (plan.expectLaunchError) {  // the app must stop on the launch page and say why
      await page.locator('#status[role=alert]').waitFor({ state: 'attached' });
      out.steps.launchError = { url: page.url(), status: (await page.locator('#status').textContent()).trim() };
      out.progress = [];
      process.stdout.write(JSON.stringify(out) + '\n');
      return;
    }
    if (plan.standalonePatient) {  // standalone launch: the authorization server asks who
      await page.locator('input#patient').waitFor({ state: 'visible' });
      out.steps.picker = { url: page.url() };
      await page.locator('input#patient').fill(plan.standalonePatient);
      await page.locator('input#patient').press('Enter');
    }
    await page.locator('#search').waitFor({ state: 'visible' });
    await page.locator('#banner[data-loaded]').waitFor({ state: 'attached' });
    out.steps.launched = {
      url: page.url(),
      status: (await page.locator('#status').textContent()).trim(),
      banner: (await page.locator('#banner').isVisible()) ? (await page.locator('#banner').textContent()).replace(/\s+/g, ' ').trim() : null,
      focused: await page.evaluate(() => document.activeElement && document.activeElement.id),
      token: await page.evaluate(() => {  // fhirclient's own session state (for the leak checks)
        for (let i = 0; i < sessionStorage.length; i++) {
          try {
            const v = JSON.parse(sessionStorage.getItem(sessionStorage.key(i)));
            if (v && v.tokenResponse && v.tokenResponse.access_token) return v.tokenResponse.access_token;
          } catch (e) { /* not JSON */ }
        }
        return null;
      }),
      // what smart_style_url set (only applyStyle writes these on the root element)
      styleBackground: await page.evaluate(() => document.documentElement.style.getPropertyValue('--bg')),
    };

    // 2. Keyboard only: the question box has focus; type and press Enter.
    let n = await searchesDone(page);
    await page.keyboard.type(plan.question);
    await page.keyboard.press('Enter');
    await waitForSearch(page, n, timeout);
    out.steps.grouped = await readResults(page);
    if (plan.screenshot) await page.screenshot({ path: plan.screenshot, fullPage: false });

    // 3. One list instead of groups (no new search).
    await page.locator('#grouped').uncheck();
    out.steps.flat = await readResults(page);
    await page.locator('#grouped').check();

    // 4. The next page, when there is one.
    if (out.steps.grouped.nextEnabled) {
      n = await searchesDone(page);
      await page.locator('#next').click();
      await waitForSearch(page, n, timeout);
      out.steps.page2 = await readResults(page);
    }

    // 5. Most recent first.
    n = await searchesDone(page);
    await page.locator('#sort').selectOption('-date');
    await waitForSearch(page, n, timeout);
    await page.locator('#grouped').uncheck();  // read the order as one list
    out.steps.recent = await readResults(page);
    await page.locator('#grouped').check();
    n = await searchesDone(page);
    await page.locator('#sort').selectOption('_score');
    await waitForSearch(page, n, timeout);

    // 6. Narrow by date: the From date starts a new search.
    if (plan.dateFrom) {
      n = await searchesDone(page);
      await page.locator('#from').fill(plan.dateFrom);
      await page.locator('#from').dispatchEvent('change');
      await waitForSearch(page, n, timeout);
      out.steps.dated = await readResults(page);
    }

    // 7. The FHIR server answers 401: the page says so in a sentence.
    if (plan.fhirAdminUrl) {
      const fault = await fetch(plan.fhirAdminUrl + '/faults', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ status: 401, times: 50, path_contains: '' }),
      });
      if (!fault.ok) throw new Error('could not arm the 401 fault: HTTP ' + fault.status);
      n = await searchesDone(page);
      await page.locator('#q').fill(plan.question + ' again');
      await page.locator('#q').press('Enter');
      await waitForSearch(page, n, timeout);
      out.steps.refused = await readResults(page);
    }
    out.progress = await page.evaluate(() => window.__progress);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`chart_search.js failed: ${err.stack || err}\n`);
  process.exit(1);
});

// SMART App Launch 2.x, EHR or standalone: checks `iss` against the adapter's allow-list,
// then hands over to the official client (fhirclient): discovery, PKCE S256 (required), state.
"use strict";
(async function launch() {
  const status = document.getElementById("status");
  try {
    const answer = await fetch("/app/config.json", { credentials: "same-origin" });
    if (!answer.ok) throw new Error("the app's settings could not be read (HTTP " + answer.status + ")");
    const cfg = await answer.json();
    const params = new URLSearchParams(window.location.search);
    const iss = (params.get("iss") || cfg.issuers[0] || "").replace(/\/+$/, "");
    if (!cfg.issuers.includes(iss)) {
      throw new Error("this FHIR server is not one the app is configured for");
    }
    const launchId = params.get("launch");
    let scope = cfg.scope;
    if (!launchId) {  // standalone: ask the authorization server to pick the patient
      scope = scope.split(/\s+/).map((s) => (s === "launch" ? "launch/patient" : s)).join(" ");
    }
    await FHIR.oauth2.authorize({
      clientId: cfg.clientId,
      scope: scope,
      redirectUri: cfg.redirectUri,
      iss: iss,
      launch: launchId || undefined,
      pkceMode: "required",
      completeInTarget: true,
    });
  } catch (err) {
    status.textContent = "The app could not start: " + (err && err.message ? err.message : err);
    status.setAttribute("role", "alert");
  }
})();

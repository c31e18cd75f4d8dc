// The web view's script: draws the Mermaid graph and sends the operator actions. Everything
// else works without it (the graph's source stays as text).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  if (window.mermaid) {
    window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict" });
    window.mermaid.run({ querySelector: "pre.mermaid" });
  }
  for (const button of document.querySelectorAll("button[data-action]")) {
    button.addEventListener("click", () => act(button));
  }
});

// One operator action: confirm, POST to the API (the session cookie authenticates it; the
// X-Saga-UI header is what a cross-site form cannot send), then show the saga again.
async function act(button) {
  const { action, saga, confirm: question } = button.dataset;
  const body = {};
  if (button.dataset.step) body.step = button.dataset.step;
  const reason = document.getElementById("abort-reason");
  if (action === "abort") body.reason = (reason && reason.value.trim()) || "aborted in the web view";
  const result = document.getElementById("action-result");
  const output = document.getElementById("mark-output");
  if (action === "mark-completed" && output && output.value.trim()) {
    try {
      body.output = JSON.parse(output.value);
    } catch (error) {
      result.className = "notice error";
      result.textContent = `the output is not JSON: ${error.message}`;
      return;
    }
  }
  if (!window.confirm(question)) return;
  button.disabled = true;
  try {
    const response = await fetch(`/sagas/${saga}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Saga-UI": "1" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      const params = new URLSearchParams({ done: action });
      if (answer.applied === false && answer.reason) params.set("unchanged", answer.reason);
      window.location.assign(`${window.location.pathname}?${params}`);
      return;
    }
    result.className = "notice error";
    result.textContent = `${action} refused (${response.status}): ${answer.error || response.statusText}`;
  } catch (error) {
    result.className = "notice error";
    result.textContent = `${action} failed: ${error}`;
  }
  button.disabled = false;
}

// The dashboard's only script: live refresh (re-fetch the page and swap in its <main>) and confirmed
// actions (a dialog, then a POST with the form's CSRF token, then a refresh). Without it every page
// still works: forms post to a confirmation page, and a reload shows new counts.
"use strict";
(function () {
  const dialog = document.getElementById("confirm");
  const flash = document.getElementById("flash");
  let chosen = null;

  function say(text, bad) {
    if (!flash) return;
    flash.textContent = text;
    flash.className = bad ? "notice error" : "notice";
    flash.hidden = false;
  }

  function busy() {
    const el = document.activeElement;
    return (dialog && dialog.open) || (el && el.closest("main") && el.matches("input, select, textarea"));
  }

  async function refresh(force) {
    const main = document.querySelector("main");
    if (!main || (!force && (main.dataset.live !== "on" || busy()))) return;
    try {
      const response = await fetch(location.href, { credentials: "same-origin", headers: { "X-Live": "1" } });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.querySelector("main");
      if (fresh) {
        document.querySelector("main").replaceWith(fresh);
        document.body.dataset.refreshed = String(Date.now());
      }
    } catch (_) {
      // The server is away for a moment: the next round tries again.
    }
  }

  async function post(form) {
    const body = new URLSearchParams(new FormData(form));
    body.set("confirmed", "1");
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body,
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const answer = await response.json().catch(() => ({}));
      if (response.ok) say(answer.message || "done");
      else say(answer.error || "the action failed (" + response.status + ")", true);
    } catch (e) {
      say("the dashboard did not answer: " + e, true);
    }
    await refresh(true);
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm || !dialog) return;
    event.preventDefault();
    chosen = form;
    dialog.querySelector(".message").textContent = form.dataset.confirm;
    dialog.showModal();
  });

  if (dialog) {
    dialog.addEventListener("close", () => {
      const form = chosen;
      chosen = null;
      if (form && dialog.returnValue === "ok") post(form);
    });
  }

  const main = document.querySelector("main");
  const every = Math.max(1000, Number((main && main.dataset.every) || 5000));
  setInterval(() => refresh(false), every);
})();

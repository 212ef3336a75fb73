// Sign-in page of the tidings console: posts {user, password} as JSON to /console/login
// (same origin: the broker checks the Origin header), then opens the console.
"use strict";
(function () {
  const form = document.getElementById("login");
  const error = document.getElementById("login-error");
  const submit = document.getElementById("login-submit");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.hidden = true;
    submit.disabled = true;
    try {
      const resp = await fetch("/console/login", {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({user: document.getElementById("user").value,
                              password: document.getElementById("password").value}),
      });
      if (resp.ok) {
        window.location.assign("/");
        return;
      }
      let message = "Sign-in failed.";
      try { message = (await resp.json()).message || message; } catch (e) { /* not JSON */ }
      error.textContent = message;
      error.hidden = false;
    } catch (e) {
      error.textContent = "The broker did not answer: " + e;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });
})();

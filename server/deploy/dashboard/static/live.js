// Keeps the page live: asks /panels every few seconds and swaps them in when they changed.
// Served by the dashboard itself (no CDN); the token of the page's URL goes with each request.
(function () {
  "use strict";
  var main = document.getElementById("panels");
  var state = document.getElementById("live-state");
  var every = parseInt(main.getAttribute("data-poll-ms"), 10) || 2000;
  var token = new URLSearchParams(window.location.search).get("token");
  var url = "panels" + (token ? "?token=" + encodeURIComponent(token) : "");
  function version() {
    var v = main.querySelector("[data-version]");
    return v ? v.getAttribute("data-version") : "";
  }
  function tick() {
    fetch(url, { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        var box = document.createElement("div");
        box.innerHTML = html;
        var fresh = box.querySelector("[data-version]");
        if (fresh && fresh.getAttribute("data-version") !== version()) {
          main.innerHTML = html;
        }
        state.textContent = "";
      })
      .catch(function (err) { state.textContent = "(not updating: " + err.message + ")"; })
      .then(function () { window.setTimeout(tick, every); });
  }
  window.setTimeout(tick, every);
})();

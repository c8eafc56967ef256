// invite-worker console: live figures without reloading. The page names its JSON in
// data-live-src; every element with data-live="KEY" shows that key's value. Pages work
// without this script; it only keeps their figures current.
(function () {
  "use strict";
  var root = document.querySelector("[data-live-src]");
  if (!root || !window.fetch) {
    return;
  }
  var src = root.getAttribute("data-live-src");
  var stamp = document.getElementById("live-stamp");
  var EVERY_MS = 2000;

  function apply(values) {
    var els = document.querySelectorAll("[data-live]");
    for (var i = 0; i < els.length; i++) {
      var key = els[i].getAttribute("data-live");
      if (Object.prototype.hasOwnProperty.call(values, key)) {
        var text = String(values[key]);
        if (els[i].textContent !== text) {
          els[i].textContent = text;
        }
      }
    }
  }

  function tick() {
    fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" }, redirect: "error" })
      .then(function (r) {
        if (!r.ok) {
          throw new Error("HTTP " + r.status);
        }
        return r.json();
      })
      .then(function (values) {
        apply(values);
        if (stamp) {
          stamp.textContent = "Live: updated " + new Date().toLocaleTimeString();
        }
        setTimeout(tick, EVERY_MS);
      })
      .catch(function () {
        if (stamp) {
          stamp.textContent = "Not live: reload the page (or sign in again).";
        }
        setTimeout(tick, 5 * EVERY_MS);
      });
  }

  setTimeout(tick, EVERY_MS);
})();

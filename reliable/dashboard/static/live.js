// Live refresh: pages marked data-live reload their <main> every few seconds, unless
// the operator is typing, has selected jobs, or the tab is hidden. Without script the
// dashboard works the same, it only does not refresh itself.
(function () {
  "use strict";
  var seconds = Number(document.body.dataset.live || 0);
  if (!seconds) { return; }
  function busy() {
    var active = document.activeElement;
    if (active && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName)) { return true; }
    return document.querySelector("main input[type=checkbox]:checked") !== null;
  }
  function refresh() {
    if (document.hidden || busy()) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (text) {
        if (text === null || busy()) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main) { main.replaceWith(fresh); }
      })
      .catch(function () { /* the next tick tries again */ });
  }
  window.setInterval(refresh, seconds * 1000);
})();

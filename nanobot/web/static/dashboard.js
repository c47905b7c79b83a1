// Progressive enhancement only: every page reads and works without this script.
// - remembers the browser's time zone in a cookie, so that pages show times in it;
// - keeps relative times ("3 min ago") current;
// - refreshes the overview's live part every few seconds without reloading the page.
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  try {
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (zone && document.cookie.indexOf("tz=" + encodeURIComponent(zone)) === -1) {
      document.cookie = "tz=" + encodeURIComponent(zone) + "; path=/; max-age=31536000; SameSite=Strict";
    }
  } catch (e) { /* no Intl: the pages stay in UTC */ }

  function relative(ms) {
    var s = Math.abs(ms) / 1000, text;
    if (s < 1) return "now";
    if (s < 90) text = Math.round(s) + " s";
    else if (s < 5400) text = Math.round(s / 60) + " min";
    else if (s < 129600) text = (s / 3600).toFixed(1) + " h";
    else text = (s / 86400).toFixed(1) + " d";
    return ms > 0 ? "in " + text : text + " ago";
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll("time[datetime] .rel").forEach(function (el) {
      var at = Date.parse(el.parentNode.getAttribute("datetime"));
      if (!isNaN(at)) el.textContent = relative(at - now);
    });
  }
  setInterval(tick, 5000);

  var live = document.querySelector("[data-refresh]");
  if (live && window.fetch) {
    var every = (parseFloat(live.getAttribute("data-every")) || 5) * 1000;
    var refresh = function () {
      if (document.hidden) return;
      fetch(live.getAttribute("data-refresh"), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
        .then(function (html) {
          live.innerHTML = html;
          live.removeAttribute("data-stale");
        })
        .catch(function () { live.setAttribute("data-stale", "true"); });
    };
    setInterval(refresh, every);
  }
})();

/*
 * Runlens front-end error beacon. Include it once, as early as possible:
 *
 *   <script src="https://runlens.example.com/static/runlens-beacon.js"
 *           data-key="PROJECT_PUBLIC_KEY" data-build="1.4.2" async></script>
 *
 * It reports uncaught errors (window "error") and unhandled promise rejections
 * to POST /api/frontend-log of the Runlens it was loaded from, with
 * navigator.sendBeacon (a text/plain body: no CORS preflight, survives page
 * unloads), or fetch(..., {keepalive: true}) where sendBeacon is missing.
 * Bursts are deduplicated: the same error is sent at most once per 10 s, and
 * no more than 10 reports leave a page per minute.
 *
 * Optional: window.runlens.report(error, context) sends a caught error;
 * window.runlens.setContext({user: "42"}) adds fields to every report.
 */
(function () {
  "use strict";
  if (window.runlens && window.runlens.report) return; // included twice

  var script = document.currentScript;
  var data = (script && script.dataset) || {};
  var base = data.endpoint || (script && script.src) || location.href;
  var endpoint = new URL("/api/frontend-log", base);
  if (data.key) endpoint.searchParams.set("key", data.key);

  var SAME_ERROR_MS = 10000;
  var PER_MINUTE = 10;
  var recent = {}; // error key -> time last sent
  var sentTimes = [];
  var extraContext = {};

  function text(value, limit) {
    var s;
    try {
      s = typeof value === "string" ? value : JSON.stringify(value);
    } catch (e) {
      s = undefined;
    }
    if (s === undefined) s = String(value);
    return s.length > limit ? s.slice(0, limit - 1) + "\u2026" : s;
  }

  function pageUrl() {
    // No fragment: single-page apps and OAuth flows keep tokens there.
    return location.origin + location.pathname + location.search;
  }

  function allowed(key) {
    var now = Date.now();
    if (recent[key] && now - recent[key] < SAME_ERROR_MS) return false;
    sentTimes = sentTimes.filter(function (t) { return now - t < 60000; });
    if (sentTimes.length >= PER_MINUTE) return false;
    recent[key] = now;
    sentTimes.push(now);
    return true;
  }

  function send(payload) {
    var body = JSON.stringify(payload);
    var url = endpoint.toString();
    try {
      if (navigator.sendBeacon && navigator.sendBeacon(url, body)) return;
    } catch (e) { /* fall through to fetch */ }
    if (window.fetch) {
      window.fetch(url, {
        method: "POST",
        body: body,
        keepalive: true,
        mode: "cors",
        credentials: "omit",
        headers: { "Content-Type": "text/plain" }
      }).catch(function () {});
    }
  }

  function report(kind, message, error, context) {
    try {
      var stack = error && error.stack ? text(error.stack, 16000) : "";
      var errorText = error instanceof Error ? text(String(error), 2000) : "";
      message = text(message || errorText || "(no message)", 4000);
      if (!allowed(message + "|" + stack.split("\n").slice(0, 2).join("|"))) return;
      var ctx = { url: pageUrl(), ua: navigator.userAgent, build: data.build || "", kind: kind };
      var k;
      for (k in extraContext) ctx[k] = extraContext[k];
      for (k in context || {}) ctx[k] = context[k];
      send({ level: "error", message: message, error: errorText, stack: stack, context: ctx });
    } catch (e) { /* never let the reporter throw */ }
  }

  window.addEventListener("error", function (event) {
    // "Script error." without details comes from cross-origin scripts loaded
    // without crossorigin="anonymous": nothing in it can be grouped or fixed.
    if (!event.error && event.message === "Script error.") return;
    var where = event.filename ? { file: event.filename, line: event.lineno, column: event.colno } : {};
    report("error", event.message, event.error, where);
  });

  window.addEventListener("unhandledrejection", function (event) {
    var reason = event.reason;
    if (reason instanceof Error) {
      report("unhandledrejection", "Uncaught (in promise) " + String(reason), reason);
    } else {
      report("unhandledrejection", "Unhandled promise rejection: " + text(reason, 2000), null);
    }
  });

  window.runlens = {
    report: function (error, context) {
      report("manual", error && error.message ? String(error) : text(error, 2000), error, context);
    },
    setContext: function (context) {
      for (var k in context) extraContext[k] = context[k];
    }
  };
})();

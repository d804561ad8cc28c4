// Run page behaviour that htmx attributes cannot express. No inline scripts: CSP is
// `script-src 'self'`, and this file never reads agent data into code.
(function () {
  "use strict";
  // Live follow: when the reader is at the bottom of the page, keep the newest event
  // in view as rows arrive; when they scrolled up to read, leave them where they are.
  let pinned = false;
  document.addEventListener("htmx:beforeSwap", function (event) {
    const source = event.detail.requestConfig && event.detail.requestConfig.elt;
    pinned = Boolean(source && source.classList && source.classList.contains("follow")) &&
      window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 48;
  });
  document.addEventListener("htmx:afterSettle", function () {
    if (pinned) {
      pinned = false;
      window.scrollTo(0, document.documentElement.scrollHeight);
    }
  });
})();

// /api/docs: Swagger UI (static/vendor/swagger-ui-5.35.0, from npm's swagger-ui-dist)
// on the schema of /api/openapi.json. A file rather than an inline script: our
// Content-Security-Policy allows scripts from 'self' only.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    deepLinking: true,
    // No "Try it out" against validator.swagger.io or any other origin.
    validatorUrl: null,
  });
});

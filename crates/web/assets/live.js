// Stipend's one script: while a person's page is open, redraw its agents section every two
// seconds, so that what an agent asks shows up without a reload. The page works without it.
// Nothing is redrawn while the person is typing in the section or the tab is hidden.
(function () {
  "use strict";
  var section = document.getElementById("agents");
  if (!section) { return; }
  function redraw() {
    if (document.hidden || section.contains(document.activeElement)) { return; }
    fetch("/fragments/agents", { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html !== null && !section.contains(document.activeElement) && section.innerHTML !== html) {
          section.innerHTML = html;
        }
      })
      .catch(function () { /* the next tick tries again */ });
  }
  setInterval(redraw, 2000);
})();

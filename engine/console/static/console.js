// saga-engine console: live updates of a saga page (server-sent events).
// The server renders every piece (escaped like the page); this only puts them in place.
"use strict";
(function () {
  const root = document.querySelector("[data-live]");
  if (!root || !window.EventSource) {
    return;
  }
  const source = new EventSource(root.getAttribute("data-live"));
  const put = function (id, html) {
    const element = document.getElementById(id);
    if (element !== null) {
      element.innerHTML = html;
    }
  };
  source.addEventListener("update", function (message) {
    const data = JSON.parse(message.data);
    const status = document.getElementById("status");
    status.textContent = data.status;
    status.className = "status status-" + data.status;
    put("timeline", data.timeline);
    put("steps", data.steps);
    put("history", data.history);
    if (data.finished) {
      source.close();
      root.removeAttribute("data-live");
      const live = document.getElementById("live");
      if (live !== null) {
        live.remove();
      }
    }
  });
  source.addEventListener("gone", function () {
    source.close();
  });
})();

// Keyboard shortcuts for the vote page: each button names its keys in data-keys
// ("1 ArrowLeft"); a key press clicks that button (a real form submit). Keys typed into a
// field are left alone, and one page submits once.
(function () {
  "use strict";
  var form = document.getElementById("vote-form");
  if (!form) { return; }
  var byKey = {};
  form.querySelectorAll("button[data-keys]").forEach(function (button) {
    button.getAttribute("data-keys").split(" ").forEach(function (key) { byKey[key] = button; });
  });
  var sent = false;
  form.addEventListener("submit", function () { sent = true; });
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing || sent) { return; }
    var t = event.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
              t.isContentEditable)) { return; }
    var button = byKey[event.key];
    if (!button) { return; }
    event.preventDefault();
    button.click();
  });
}());

"use strict";
// Start-up: wire the upload, drop and tab controls, read what the server holds, open a view.

// ---- start --------------------------------------------------------------------------------------------

$("#upload").addEventListener("change", event => {
  const file = event.target.files[0];
  event.target.value = "";  // the same file may be chosen again
  if (file) upload(file);
});
document.addEventListener("dragover", event => event.preventDefault());
document.addEventListener("drop", event => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) upload(file);
});
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => { location.hash = b.dataset.view; showView(b.dataset.view); });
}

async function init() {
  try {
    state.info = await api("/api/info");
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
    return;
  }
  const info = state.info;
  $("#models").textContent = info.models.map(m => m.label).join("   |   ");
  $("#models").title = info.models.map(m => m.name).join("\n");
  $('#tabs button[data-view="neighbours"]').disabled = !info.index;
  $('#tabs button[data-view="map"]').disabled = !info.index;
  $('#tabs button[data-view="run"]').disabled = !info.run;
  state.threshold = info.threshold;
  $("#threshold").value = info.threshold;
  if (info.index?.note) $("#neighbours-status").textContent = `note: ${info.index.note}`;
  if (info.data) {
    $("#data-spec").textContent = `${info.data.spec} (${info.data.count} images)`;
    loadGallery(0).catch(err => showError(err.message));
  } else {
    $("#data-hint").hidden = true;
  }
  if (info.run) setInterval(pollMetrics, 2000);
  showView(location.hash.slice(1) || "attention");
  document.body.dataset.ready = "1";
}
init();

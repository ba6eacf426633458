"use strict";
// dinokit explore's page: plain DOM and canvas, no library, nothing from outside this server.
// Every string that comes from the server goes in through textContent or a URL, never as HTML.
// core.js: helpers, the page's state, the server calls, tabs, opening images. views.js: the attention and
// neighbours views. charts.js: the map and the run's curves (canvas). app.js: start-up.

const $ = (selector, root = document) => root.querySelector(selector);
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
const UNKNOWN = "#9aa1ab";
const CURVE_ORDER = ["loss", "kl", "teacher_entropy", "batch_entropy", "lr", "wd", "momentum", "teacher_temp",
                     "center_norm", "images_per_s"];
const state = { info: null, looked: null, threshold: 0.6, view: "attention", panels: [], pending: 0,
                map: null, mapXY: [], thumbs: new Map(), rows: [], polling: false };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

const imageUrl = (ref, max) => `/api/data/image?ref=${encodeURIComponent(ref)}&max=${max}`;

async function api(path, options = {}) {
  document.body.dataset.pending = ++state.pending;  // tests wait for 0: nothing in flight
  try {
    const response = await fetch(path, options);
    const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  } finally {
    document.body.dataset.pending = --state.pending;
  }
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

function showView(name) {
  const button = $(`#tabs button[data-view="${name}"]`);
  if (!button || button.disabled) name = "attention";
  state.view = name;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === name);
  for (const s of document.querySelectorAll("main > .view")) s.hidden = s.id !== `view-${name}`;
  $("#picker").hidden = !(name === "attention" || name === "neighbours");
  document.body.dataset.view = name;
  if (name === "map") loadMap();
  if (name === "run") { drawCurves(); pollMetrics(); }
  if (name === "neighbours") loadNeighbours();
}

// ---- opening an image -------------------------------------------------------------------------------

async function openLooked(request) {
  const looked = await request;
  state.looked = looked;
  showError("");
  $("#current").textContent = looked.name;
  buildPanels();
  refreshAll();
  loadNeighbours();
}

async function upload(file) {
  const limit = state.info.max_upload;
  if (file.size > limit) {  // the server refuses it too; this saves sending it
    showError(`${file.name}: ${(file.size / 2 ** 20).toFixed(1)} MiB is over the ${limit / 2 ** 20} MiB upload limit`);
    return;
  }
  try {
    await openLooked(api(`/api/upload?name=${encodeURIComponent(file.name)}`,
      { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file }));
  } catch (err) {
    showError(`${file.name}: ${err.message}`);
  }
}

async function openRef(ref) {
  try {
    await openLooked(api(`/api/open?ref=${encodeURIComponent(ref)}`, { method: "POST" }));
  } catch (err) {
    showError(`${ref}: ${err.message}`);
  }
}

async function loadGallery(offset) {
  const page = await api(`/api/data?offset=${offset}&limit=48`);
  const gallery = $("#gallery");
  $(".more", gallery)?.remove();
  for (const item of page.items) {
    const button = el("button", { type: "button", title: item.class ? `${item.ref} (${item.class})` : item.ref },
      el("img", { src: imageUrl(item.ref, 96), alt: item.ref, loading: "lazy" }));
    button.dataset.ref = item.ref;
    button.onclick = () => openRef(item.ref);
    gallery.append(button);
  }
  const shown = offset + page.items.length;
  if (shown < page.total) {
    const more = el("button", { type: "button", className: "more", textContent: `${page.total - shown} more` });
    more.onclick = () => loadGallery(shown);
    gallery.append(more);
  }
}

"use strict";
// The map of the index and the run's curves, drawn on canvases.

// ---- map view -----------------------------------------------------------------------------------------

async function loadMap() {
  if (!state.info.index) return;
  if (!state.map) {
    $("#map-status").textContent = "projecting the index…";
    try {
      state.map = await api("/api/map");
    } catch (err) {
      showError(err.message);
      return;
    }
    $("#legend").replaceChildren(...state.map.classes.map((name, i) =>
      el("span", {}, Object.assign(el("i"), { style: `background:${PALETTE[i % PALETTE.length]}` }), name)));
  }
  drawMap();
}

const mapMode = () => document.querySelector('input[name="map-mode"]:checked').value;

function drawMap() {
  const canvas = $("#map"), map = state.map;
  if (!map || canvas.offsetParent === null) return;
  const box = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(box.width * dpr);
  canvas.height = Math.round(box.height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, box.width, box.height);
  const xs = map.points.map(p => p.x), ys = map.points.map(p => p.y), pad = 24;
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  state.mapXY = map.points.map(p => [pad + (p.x - x0) / (x1 - x0 || 1) * (box.width - 2 * pad),
                                     box.height - pad - (p.y - y0) / (y1 - y0 || 1) * (box.height - 2 * pad)]);
  const thumbs = mapMode() === "thumbnails";
  map.points.forEach((p, i) => {
    const [x, y] = state.mapXY[i];
    ctx.fillStyle = p.class >= 0 ? PALETTE[p.class % PALETTE.length] : UNKNOWN;
    ctx.globalAlpha = thumbs ? 0.35 : 0.85;
    ctx.beginPath();
    ctx.arc(x, y, map.points.length > 5000 ? 1.5 : 3.5, 0, 2 * Math.PI);
    ctx.fill();
  });
  ctx.globalAlpha = 1;
  let drawn = 0;
  if (thumbs) {  // at most 400 pictures, spread over the index
    const step = Math.max(1, Math.ceil(map.points.length / 400));
    for (let i = 0; i < map.points.length; i += step) {
      const ref = map.points[i].ref;
      if (!ref) continue;
      let image = state.thumbs.get(ref);
      if (!image) {
        image = new Image();
        image.onload = () => requestAnimationFrame(drawMap);
        image.src = imageUrl(ref, 64);
        state.thumbs.set(ref, image);
      }
      if (image.complete && image.naturalWidth) {
        const [x, y] = state.mapXY[i];
        ctx.drawImage(image, x - 14, y - 14, 28, 28);
        drawn++;
      }
    }
  }
  canvas.dataset.count = map.points.length;
  $("#map-status").textContent = `${map.count} points: ${map.method.toUpperCase()} of the index's embeddings` +
    (map.classes.length ? `, coloured by class folder (${map.classes.length})` : "") +
    (thumbs ? `, ${drawn} thumbnails` : "") + ". Hover to see an image, click to open it.";
}

function nearestPoint(event) {
  const box = $("#map").getBoundingClientRect(), mx = event.clientX - box.left, my = event.clientY - box.top;
  let best = -1, bestDistance = 64;  // within 8 pixels
  state.mapXY.forEach(([x, y], i) => {
    const d = (x - mx) ** 2 + (y - my) ** 2;
    if (d < bestDistance) { best = i; bestDistance = d; }
  });
  return { index: best, mx, my };
}

$("#map").addEventListener("mousemove", event => {
  const { index, mx, my } = nearestPoint(event), tip = $("#map-tip");
  if (index < 0) { tip.hidden = true; return; }
  const p = state.map.points[index], image = $("img", tip);
  image.hidden = !p.ref;
  if (p.ref) image.src = imageUrl(p.ref, 128);
  $("span", tip).textContent = p.path + (p.class >= 0 ? ` (${state.map.classes[p.class]})` : "");
  tip.style.left = `${mx + 14}px`;
  tip.style.top = `${my + 14}px`;
  tip.hidden = false;
});
$("#map").addEventListener("mouseleave", () => { $("#map-tip").hidden = true; });
$("#map").addEventListener("click", event => {
  const { index } = nearestPoint(event);
  if (index >= 0) openFromIndex(state.map.points[index].ref, state.map.points[index].path);
});
for (const radio of document.querySelectorAll('input[name="map-mode"]')) radio.addEventListener("change", drawMap);
window.addEventListener("resize", () => { if (state.view === "map") drawMap(); });

// ---- run view -----------------------------------------------------------------------------------------

async function pollMetrics() {
  if (!state.info.run || state.polling) return;
  state.polling = true;
  try {
    const r = await api(`/api/metrics?after=${state.rows.length}`);
    const changed = r.rows.length > 0 || r.from < state.rows.length;
    state.rows = state.rows.slice(0, r.from).concat(r.rows);  // from 0 again when the file was rewritten
    const last = state.rows[state.rows.length - 1] || {};
    $("#run-status").textContent = `${r.run}: ${state.rows.length} rows, last step ${last.step ?? "-"} ` +
      `(read ${new Date().toLocaleTimeString()}; updates every 2 s while the run trains)`;
    $("#curves").dataset.rows = state.rows.length;
    if (changed) drawCurves();
  } catch (err) {
    $("#run-status").textContent = err.message;
  } finally {
    state.polling = false;
  }
}

function drawCurves() {
  if (state.view !== "run") return;  // hidden canvases have no size: drawn when the tab opens
  const keys = new Set();
  for (const row of state.rows) {
    for (const [k, v] of Object.entries(row)) if (typeof v === "number" && k !== "step") keys.add(k);
  }
  const rank = k => (CURVE_ORDER.includes(k) ? CURVE_ORDER.indexOf(k) : CURVE_ORDER.length);
  const ordered = [...keys].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  const box = $("#curves");
  box.replaceChildren(...ordered.map(k => {
    const canvas = el("canvas");
    canvas.dataset.key = k;
    return canvas;
  }));
  for (const canvas of box.children) plotCurve(canvas, canvas.dataset.key);
}

const short = v => (v !== 0 && (Math.abs(v) < 1e-2 || Math.abs(v) >= 1e5) ? v.toExponential(2) : v.toPrecision(3));

function plotCurve(canvas, key) {
  const points = state.rows.map((r, i) => [r.step ?? i, r[key]]).filter(([, y]) => Number.isFinite(y));
  const box = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(box.width * dpr);
  canvas.height = Math.round(box.height * dpr);
  const ctx = canvas.getContext("2d"), w = box.width, h = box.height, left = 62, right = 10, top = 24, bottom = 22;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#1d2430";
  const last = points.length ? points[points.length - 1][1] : NaN;
  ctx.fillText(`${key}   ${Number.isFinite(last) ? short(last) : ""}`, left, 15);
  if (!points.length) return;
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = x => left + (x - x0) / (x1 - x0 || 1) * (w - left - right);
  const sy = y => h - bottom - (y - y0) / (y1 - y0 || 1) * (h - top - bottom);
  ctx.strokeStyle = "#d5dae1";
  ctx.strokeRect(left, top, w - left - right, h - top - bottom);
  ctx.fillStyle = "#667085";
  ctx.fillText(short(y1), 4, top + 10);
  ctx.fillText(short(y0), 4, h - bottom);
  ctx.fillText(`step ${x0}`, left, h - 6);
  const end = `${x1}`;
  ctx.fillText(end, w - right - ctx.measureText(end).width, h - 6);
  ctx.strokeStyle = "#3056d3";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
  ctx.stroke();
}

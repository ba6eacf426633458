"use strict";
// The attention view (a panel per model: input, mean, PCA, heads, masks) and the neighbours view.

// ---- attention view -----------------------------------------------------------------------------------

function buildPanels() {
  const root = $("#panels");
  root.replaceChildren();
  $("#attention-empty").hidden = true;
  const previous = state.panels, count = state.looked.models.length;
  const perPanel = (root.clientWidth - 16 * (count - 1)) / count - 26;  // models side by side, one card size
  const columns = Math.max(3, ...state.looked.models.map(m => m.heads));
  const card = Math.max(64, Math.min(200, Math.floor(perPanel / columns) - 10));
  state.panels = state.looked.models.map((m, i) => {
    const before = previous[i];
    const layerSelect = el("select", { className: "layer" });
    for (let l = 0; l < m.layers; l++) {
      layerSelect.append(el("option", { value: l, textContent: `${l + 1}${l === m.layers - 1 ? " (last)" : ""}` }));
    }
    layerSelect.value = before ? Math.min(before.layer, m.layers - 1) : m.layers - 1;
    const headSelect = el("select", { className: "head" }, el("option", { value: "all", textContent: "all" }));
    for (let h = 0; h < m.heads; h++) headSelect.append(el("option", { value: h, textContent: `${h}` }));
    headSelect.value = before && (before.head === "all" || +before.head < m.heads) ? before.head : "all";

    const stack = (...images) => {
      const box = el("div", { className: "stack" }, ...images);
      box.style.aspectRatio = `${m.size[1]} / ${m.size[0]}`;
      return box;
    };
    const base = () => el("img", { className: "base", src: m.image, alt: "" });
    const figure = (caption, ...images) => el("figure", {}, stack(...images), el("figcaption", { textContent: caption }));
    const meanImage = el("img", { className: "mean", alt: "mean attention" });
    meanImage.style.opacity = 0.6;
    const pcaImage = el("img", { className: "pca", alt: "PCA of patch features" });
    const heads = [];
    for (let h = 0; h < m.heads; h++) {
      const heat = el("img", { className: "overlay", alt: `head ${h} attention` });
      const mask = el("img", { className: "mask", alt: `head ${h} mask` });
      const heatFigure = figure(`head ${h}`, base(), heat), maskFigure = figure(`head ${h}`, base(), mask);
      heatFigure.dataset.head = maskFigure.dataset.head = h;
      heads.push({ figures: [heatFigure, maskFigure], heat, mask, caption: $("figcaption", maskFigure) });
    }
    const maskLabel = el("div", { className: "row-label" });
    const panel = el("div", { className: "panel" },
      el("h2", { textContent: m.label, title: m.name }),
      el("div", { className: "controls" }, "block ", layerSelect, " head ", headSelect,
        el("span", { className: "hint", textContent: `${m.layers} blocks, ${m.heads} heads` })),
      el("div", { className: "cards" },
        figure(`input ${m.size[1]}×${m.size[0]} px, ${m.grid[1]}×${m.grid[0]} patches`, base()),
        figure("mean of the heads", base(), meanImage),
        figure("patch features: PCA 1-3 as RGB", pcaImage)),
      el("div", { className: "row-label", textContent: "[CLS] attention of each head" }),
      el("div", { className: "cards" }, ...heads.map(x => x.figures[0])),
      maskLabel,
      el("div", { className: "cards" }, ...heads.map(x => x.figures[1])));
    panel.dataset.model = i;
    panel.style.setProperty("--card", `${card}px`);
    root.append(panel);
    const p = { index: i, panel, heads, meanImage, pcaImage, maskLabel, seq: 0, layer: +layerSelect.value,
                head: headSelect.value };
    layerSelect.onchange = () => { p.layer = +layerSelect.value; refresh(p); };
    headSelect.onchange = () => { p.head = headSelect.value; showHeads(p); };
    showHeads(p);
    return p;
  });
}

function showHeads(p) {
  p.heads.forEach((x, h) => {
    for (const f of x.figures) {
      f.hidden = p.head !== "all" && +p.head !== h;
      f.classList.toggle("big", p.head !== "all");
    }
  });
}

async function refresh(p) {
  const seq = ++p.seq, threshold = state.threshold, id = state.looked.id;
  try {
    const v = await api(`/api/view?id=${id}&model=${p.index}&layer=${p.layer}&threshold=${threshold}`);
    if (seq !== p.seq) return;  // a newer request (slider, selector) went out since
    v.heads.forEach((h, i) => {
      p.heads[i].heat.src = h.heat;
      p.heads[i].mask.src = h.mask;
      p.heads[i].caption.textContent = `head ${i}: ${(100 * h.fraction).toFixed(0)}% of the patches`;
    });
    p.maskLabel.textContent = `the patches holding ${Math.round(100 * threshold)}% of each head's attention`;
    p.meanImage.src = v.mean;
    p.pcaImage.src = v.pca;
    p.panel.dataset.threshold = threshold;
    p.panel.dataset.layer = v.layer;
  } catch (err) {
    if (seq === p.seq) showError(err.message);
  }
}

function refreshAll() {
  for (const p of state.panels) refresh(p);
}

let sliderTimer;
$("#threshold").addEventListener("input", event => {
  state.threshold = +event.target.value;
  $("#threshold-value").textContent = `${Math.round(state.threshold * 100)}%`;
  clearTimeout(sliderTimer);
  sliderTimer = setTimeout(() => state.looked && refreshAll(), 40);
});

// ---- neighbours view ----------------------------------------------------------------------------------

async function loadNeighbours() {
  if (!state.info.index || !state.looked) return;
  const looked = state.looked;
  const k = Math.max(1, Math.min(200, Math.round(+$("#k").value) || 10));
  try {
    const r = await api(`/api/neighbours?id=${looked.id}&k=${k}`);
    if (looked !== state.looked) return;
    $("#neighbours-query").replaceChildren(
      el("img", { src: looked.models[state.info.index.model].image, alt: "query" }),
      el("p", { textContent: `${r.query}: its ${r.results.length} nearest of the ${state.info.index.count} ` +
                              `indexed images (cosine similarity, ${r.model})` }));
    const items = r.results.map(m => {
      const picture = m.ref ? el("img", { src: imageUrl(m.ref, 128), alt: m.path })
                            : el("div", { className: "hint", textContent: "(not under --data)" });
      const item = el("li", { className: "neighbour", title: m.path }, picture,
        el("b", { textContent: `${m.rank}.  ${m.similarity.toFixed(4)}` }), el("div", { className: "path", textContent: m.ref || m.path }));
      item.dataset.path = m.path;
      item.dataset.similarity = m.similarity;
      item.onclick = () => openFromIndex(m.ref, m.path);
      return item;
    });
    $("#neighbour-list").replaceChildren(...items);
    $("#neighbour-list").dataset.query = looked.id;
  } catch (err) {
    showError(err.message);
  }
}
$("#k").addEventListener("change", loadNeighbours);

function openFromIndex(ref, path) {
  if (!ref) {
    showError(`${path} is not under --data: start dinokit explore with --data on its folder to open it`);
    return;
  }
  showView("attention");
  openRef(ref);
}

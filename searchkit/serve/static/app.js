// searchkit gallery: a plain client of the JSON API (/api/...). No framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const FILTERS = ["where_path", "after", "before", "min_size", "max_size"];
const state = { results: [], focus: -1, queryImage: null };

// -- API -----------------------------------------------------------------------------------
function token() { return sessionStorage.getItem("searchkit-token"); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers.Authorization = "Bearer " + token();
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) {
    await askToken();
    return api(path, options);
  }
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText;
    try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return resp;
}

const apiJSON = async (path, options) => (await api(path, options)).json();

let tokenPrompt = null;  // one prompt however many requests were refused at once

function askToken() {
  if (tokenPrompt) return tokenPrompt;
  tokenPrompt = new Promise((resolve, reject) => {
    const dlg = $("#token");
    $("#token-form").onsubmit = () => {
      sessionStorage.setItem("searchkit-token", $("#token-input").value.trim());
      tokenPrompt = null;
      resolve();
    };
    dlg.oncancel = () => { tokenPrompt = null; reject(new Error("this server needs a token")); };
    dlg.showModal();
  });
  return tokenPrompt;
}

// Images are fetched with the token (an <img src> cannot send one) when they scroll into view.
const blobs = new Map();
const lazy = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    lazy.unobserve(e.target);
    loadImage(e.target, e.target.dataset.src);
  }
}, { rootMargin: "300px" });

async function loadImage(img, url) {
  try {
    if (!blobs.has(url)) blobs.set(url, URL.createObjectURL(await (await api(url)).blob()));
    img.src = blobs.get(url);
  } catch (err) {
    img.alt = "image not available";
    img.title = err.message;
    img.classList.add("broken");
  }
}

// -- URL state: /?q=...&kind=...&index=...&similar=ID&<filters> ------------------------------
function currentParams() {
  const p = new URLSearchParams();
  const q = $("#q").value.trim();
  if (q) p.set("q", q);
  const kind = document.querySelector("input[name=kind]:checked").value;
  if (kind !== "image") p.set("kind", kind);
  if ($("#index").value && $("#index").selectedIndex > 0) p.set("index", $("#index").value);
  for (const f of FILTERS) if ($("#" + f).value.trim()) p.set(f, $("#" + f).value.trim());
  return p;
}

function applyParams(p) {
  $("#q").value = p.get("q") || "";
  const kind = p.get("kind") === "text" ? "text" : "image";
  document.querySelector(`input[name=kind][value=${kind}]`).checked = true;
  if (p.get("index")) $("#index").value = p.get("index");
  let anyFilter = false;
  for (const f of FILTERS) { $("#" + f).value = p.get(f) || ""; anyFilter = anyFilter || !!p.get(f); }
  if (anyFilter) showFilters(true);
}

function navigate(p) {
  const url = "/" + (p.toString() ? "?" + p.toString() : "");
  if (url !== location.pathname + location.search) history.pushState(null, "", url);
  run(p);
}

window.addEventListener("popstate", () => { const p = new URLSearchParams(location.search); applyParams(p); run(p); });

// -- searching -----------------------------------------------------------------------------
function filterQuery(p) {
  const out = new URLSearchParams();
  for (const f of FILTERS) if (p.get(f)) out.set(f, p.get(f));
  if (p.get("index")) out.set("index", p.get("index"));
  if (p.get("kind")) out.set("kind", p.get("kind"));
  return out;
}

async function run(p) {
  setQueryImage(null);
  if (p.get("similar")) {
    const q = filterQuery(p);
    q.set("k", "30");
    return show(() => apiJSON(`/api/items/${encodeURIComponent(p.get("similar"))}/similar?` + q), "more like this");
  }
  if (!p.get("q")) return reset();
  const q = filterQuery(p);
  q.set("q", p.get("q"));
  q.set("k", "30");
  return show(() => apiJSON("/api/search?" + q), `“${p.get("q")}”`);
}

async function searchByImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type) return showError(`${file.name} is not an image`);
  const p = currentParams();
  p.delete("q");
  history.pushState(null, "", "/" + (p.toString() ? "?" + p : ""));
  $("#q").value = "";
  const form = new FormData();
  form.append("image", file);
  form.append("k", "30");
  for (const [key, value] of filterQuery(p)) form.append(key, value);
  await show(() => apiJSON("/api/search", { method: "POST", body: form }), "photos like " + file.name);
  setQueryImage(file);
}

function setQueryImage(file) {
  const box = $("#query-image");
  if (state.queryImage) URL.revokeObjectURL(state.queryImage);
  state.queryImage = file ? URL.createObjectURL(file) : null;
  box.hidden = !file;
  if (file) { box.querySelector("img").src = state.queryImage; box.querySelector("span").textContent = "Searching by " + file.name; }
}

async function show(fetcher, what) {
  showError(null);
  $("#status").textContent = "Searching…";
  try {
    const data = await fetcher();
    render(data.results);
    const n = data.results.length;
    $("#status").textContent = n ? `${n} result${n > 1 ? "s" : ""} for ${what} in ${Math.round(data.took_ms)} ms` : "";
    if (!n) showEmpty(`Nothing found for ${what}.`, "Try other words, another index, or fewer filters.");
  } catch (err) {
    $("#status").textContent = "";
    render([]);
    showError(err.message);
  }
}

function reset() {
  render([]);
  $("#status").textContent = "";
  $("#empty").hidden = false;
  $("#empty").innerHTML = $("#empty").dataset.initial;
}

function showEmpty(title, hint) {
  const empty = $("#empty");
  empty.hidden = false;
  empty.replaceChildren(el("h1", {}, title), el("p", {}, hint));
}

function showError(msg) {
  $("#error").hidden = !msg;
  $("#error").textContent = msg || "";
}

// -- rendering -----------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

const basename = (path) => path.split(/[\\/]/).pop();

function render(results) {
  state.results = results;
  state.focus = -1;
  const grid = $("#results"), texts = $("#texts");
  grid.replaceChildren();
  texts.replaceChildren();
  if (results.length) $("#empty").hidden = true;
  for (const [i, r] of results.entries()) {
    if (r.kind === "image") {
      const img = el("img", { alt: basename(r.path), dataset: { src: r.thumbnail + "&size=384&format=webp" }, width: "384", height: "384" });
      lazy.observe(img);
      const card = el("figure", { class: "card", tabindex: "0", dataset: { i } },
        el("button", { class: "open", title: r.path, onclick: () => openViewer(i) }, img),
        el("figcaption", {},
          el("span", { class: "score", title: "cosine similarity" }, r.score.toFixed(3)),
          el("span", { class: "name", title: r.path }, basename(r.path)),
          el("button", { class: "more", onclick: () => moreLike(r.id), title: "Search for images like this one (m)" }, "more like this")));
      card.addEventListener("focus", () => { state.focus = i; });
      grid.append(card);
    } else {
      texts.append(el("article", { class: "text-result", tabindex: "0", dataset: { i } },
        el("span", { class: "score" }, r.score.toFixed(3)),
        el("p", {}, r.text),
        el("cite", {}, r.source)));
    }
  }
}

function moreLike(id) {
  const p = filterQuery(currentParams());
  p.delete("kind");
  p.set("similar", id);
  navigate(p);
}

async function openViewer(i) {
  const r = state.results[i];
  const dlg = $("#viewer");
  const img = dlg.querySelector("img");
  img.removeAttribute("src");
  img.alt = basename(r.path);
  dlg.querySelector(".caption").textContent = `${r.path} · score ${r.score.toFixed(3)}`;
  dlg.showModal();
  loadImage(img, r.file);
}

// -- keyboard ------------------------------------------------------------------------------
function columns() {
  const cards = [...document.querySelectorAll("#results .card")];
  if (cards.length < 2) return 1;
  const top = cards[0].offsetTop;
  const n = cards.findIndex((c) => c.offsetTop !== top);
  return n === -1 ? cards.length : n;
}

document.addEventListener("keydown", (e) => {
  if (document.querySelector("dialog[open]")) return;  // dialogs close themselves on Esc
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (e.key === "/" && !typing) { e.preventDefault(); $("#q").focus(); $("#q").select(); return; }
  if (typing) { if (e.key === "ArrowDown" && state.results.length) { e.preventDefault(); focusResult(0); } return; }
  const n = state.results.length;
  if (!n) return;
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() }[e.key];
  if (step) { e.preventDefault(); focusResult(Math.min(n - 1, Math.max(0, state.focus + step))); return; }
  const r = state.results[state.focus];
  if (!r) return;
  if (e.key === "Enter" && r.kind === "image") { e.preventDefault(); openViewer(state.focus); }
  if (e.key === "m") moreLike(r.id);
});

function focusResult(i) {
  const node = document.querySelector(`[data-i="${i}"]`);
  if (node) { node.focus(); node.scrollIntoView({ block: "nearest" }); state.focus = i; }
}

// -- drag and drop -------------------------------------------------------------------------
let dragDepth = 0;
document.addEventListener("dragenter", (e) => { if (e.dataTransfer.types.includes("Files")) { dragDepth++; $("#drop-overlay").hidden = false; } });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("#drop-overlay").hidden = true; } });
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("#drop-overlay").hidden = true;
  const file = e.dataTransfer.files[0];
  if ($("#classify").open) setClassifyImage(file);
  else searchByImage(file);
});

// -- info ----------------------------------------------------------------------------------
async function showInfo() {
  const dlg = $("#info"), body = dlg.querySelector(".body");
  body.replaceChildren(el("p", {}, "Loading…"));
  dlg.showModal();
  try {
    const q = new URLSearchParams();
    if ($("#index").value) q.set("index", $("#index").value);
    const info = await apiJSON("/api/info?" + q);
    const m = info.manifest || {};
    const rows = [["Folder", info.index], ["Model", (m.encoder || {}).spec], ["Images", info.counts.image],
      ["Text items", info.counts.text], ["Files", info.counts.files], ["Updated", m.updated_at]];
    for (const [kind, v] of Object.entries(m.vectors || {})) {
      if (!v.count) continue;
      const rec = v.recall || {};
      const recall = rec.exact ? "exact" : rec.recall != null ? `recall@${rec.k || 10} ${rec.recall.toFixed(3)}` : "recall not measured";
      rows.push([`${kind} vectors`, `${v.kind} (${v.faiss}) · ${v.count.toLocaleString()} · ${recall}`]);
    }
    const table = el("table", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v ?? "–")))));
    const failures = info.failures.length
      ? el("table", { class: "failures" }, el("tr", {}, el("th", {}, "File"), el("th", {}, "Reason")),
        ...info.failures.map((f) => el("tr", {}, el("td", {}, f.path), el("td", {}, f.reason))))
      : el("p", {}, "No failures recorded.");
    body.replaceChildren(table, el("h3", {}, `Failures (${info.failures.length})`), failures);
  } catch (err) {
    body.replaceChildren(el("p", { class: "error" }, err.message));
  }
}

// -- classify ------------------------------------------------------------------------------
let classifyFile = null;

function setClassifyImage(file) {
  if (!file) return;
  classifyFile = file;
  const img = $("#classify-preview");
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("#classify-result").replaceChildren();
}

async function classify(e) {
  e.preventDefault();
  const out = $("#classify-result");
  if (!classifyFile) return out.replaceChildren(el("p", { class: "error" }, "Pick or drop an image first."));
  const form = new FormData();
  form.append("image", classifyFile);
  form.append("labels", $("#labels").value);
  if ($("#index").value) form.append("index", $("#index").value);
  out.replaceChildren(el("p", {}, "Classifying…"));
  try {
    const r = await apiJSON("/api/classify", { method: "POST", body: form });
    const rows = Object.entries(r.scores).sort((a, b) => b[1] - a[1]).map(([label, p]) => {
      const bar = el("span", { class: "bar" });
      bar.style.width = (100 * p).toFixed(1) + "%";
      return el("div", { class: "prob" + (label === r.label ? " best" : "") },
        el("span", { class: "label" }, label), el("span", { class: "track" }, bar), el("span", { class: "pct" }, (100 * p).toFixed(1) + " %"));
    });
    out.replaceChildren(...rows);
  } catch (err) {
    out.replaceChildren(el("p", { class: "error" }, err.message));
  }
}

// -- start ---------------------------------------------------------------------------------
function showFilters(on) {
  $("#filters").hidden = !on;
  $("#filters-toggle").setAttribute("aria-expanded", String(on));
}

async function start() {
  $("#empty").dataset.initial = $("#empty").innerHTML;
  $("#search-form").addEventListener("submit", (e) => { e.preventDefault(); navigate(currentParams()); });
  $("#image-input").addEventListener("change", (e) => { searchByImage(e.target.files[0]); e.target.value = ""; });
  for (const r of document.querySelectorAll("input[name=kind]")) r.addEventListener("change", () => { if ($("#q").value.trim()) navigate(currentParams()); });
  $("#index").addEventListener("change", () => { if ($("#q").value.trim()) navigate(currentParams()); });
  $("#filters-toggle").addEventListener("click", () => showFilters($("#filters").hidden));
  $("#filters-clear").addEventListener("click", () => { for (const f of FILTERS) $("#" + f).value = ""; if ($("#q").value.trim()) navigate(currentParams()); });
  for (const f of FILTERS) $("#" + f).addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); navigate(currentParams()); } });
  $("#info-button").addEventListener("click", showInfo);
  $("#classify-button").addEventListener("click", () => $("#classify").showModal());
  $("#classify-image").addEventListener("change", (e) => setClassifyImage(e.target.files[0]));
  $("#classify-form").addEventListener("submit", classify);
  for (const d of document.querySelectorAll("dialog")) d.addEventListener("click", (e) => { if (e.target === d && d.id !== "token") d.close(); });
  try {
    const data = await apiJSON("/api/indexes");
    $("#index").replaceChildren(...data.indexes.map((i) =>
      el("option", { value: i.name }, `${i.name} · ${i.counts.image.toLocaleString()} images${i.counts.text ? `, ${i.counts.text.toLocaleString()} texts` : ""}`)));
  } catch (err) {
    showError(err.message);
  }
  const p = new URLSearchParams(location.search);
  applyParams(p);
  run(p);
  if (!p.get("q")) $("#q").focus();
}

start();

// clip-pipeline serve's page: text or image queries to /knn-service, a grid of thumbnails; no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { info: null, token: null };

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem("clipp-token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname + location.search); }
  return sessionStorage.getItem("clipp-token");
}

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const resp = await fetch(path, body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) });
  let doc = null;
  try { doc = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) throw new Error((doc && doc.error) || resp.status + " " + resp.statusText);
  return doc;
}

function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

function currentIndex() { return state.info.indices.find((ix) => ix.name === $("index").value) || state.info.indices[0]; }

function showIndex() {
  const ix = currentIndex();
  $("synthetic").hidden = !ix.synthetic_weights;
  status(`${ix.rows.toLocaleString()} images in ${ix.name} (${ix.search} search)` + (ix.notes.length ? " — " + ix.notes.join("; ") : ""));
}

async function search(query, label) {
  const ix = currentIndex();
  status("Searching " + label + "…");
  const t0 = performance.now();
  try {
    const results = await api("knn-service", { ...query, indice_name: ix.name, modality: "image", num_images: 60, num_result_ids: 60, deduplicate: false });
    render(results);
    status(`${results.length} results for ${label} in ${Math.round(performance.now() - t0)} ms`);
  } catch (e) { status(e.message, true); }
}

function render(results) {
  const grid = $("grid");
  grid.replaceChildren();
  for (const r of results) {
    const fig = document.createElement("figure");
    fig.dataset.id = r.id;
    fig.title = "More like this";
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = r.image_path || ""; img.src = r.url;
    const cap = document.createElement("figcaption");
    const sim = document.createElement("span"); sim.className = "sim"; sim.textContent = r.similarity == null ? "" : r.similarity.toFixed(4);
    cap.append(sim, " ", r.caption ? r.caption + " — " : "", r.image_path || "");
    fig.append(img, cap);
    fig.addEventListener("click", () => search({ id: r.id }, "more like " + (r.image_path || "#" + r.id)));
    grid.append(fig);
  }
}

function searchFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => search({ image: String(reader.result).split(",")[1] }, "image " + file.name);
  reader.onerror = () => status("cannot read " + file.name, true);
  reader.readAsDataURL(file);
}

async function init() {
  state.token = token();
  try { state.info = await api("info"); } catch (e) { status(e.message, true); return; }
  for (const ix of state.info.indices) $("index").append(new Option(`${ix.name} (${ix.rows.toLocaleString()})`, ix.name));
  $("index").hidden = state.info.indices.length < 2;
  $("index").addEventListener("change", showIndex);
  showIndex();
  $("search").addEventListener("submit", (ev) => { ev.preventDefault(); const t = $("text").value.trim(); if (t) search({ text: t }, `"${t}"`); });
  $("file").addEventListener("change", () => searchFile($("file").files[0]));
  let depth = 0;
  document.addEventListener("dragenter", (ev) => { ev.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (ev) => ev.preventDefault());
  document.addEventListener("drop", (ev) => { ev.preventDefault(); depth = 0; $("drop").hidden = true; searchFile(ev.dataTransfer.files[0]); });
}
init();

// The lookalike search page: plain DOM code, no framework, no build step. Every request
// goes to this page's own origin (the CSP allows nothing else); text from the server is
// set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "lookalike.apiKey";
const query = { file: null, url: null, width: 0, height: 0, box: null };
let matchUrl = null;
let matchOpener = null;

// -- requests --------------------------------------------------------------------------

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}`.trim();
}

async function call(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...authHeaders(), ...options.headers } });
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

function imageForm(file, extra = {}) {
  const form = new FormData();
  form.append("image", file, file.name || "query");
  for (const [name, value] of Object.entries(extra)) form.append(name, value);
  return form;
}

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// -- the collection line ---------------------------------------------------------------

async function loadInfo() {
  try {
    const info = await (await call("/info")).json();
    const count = (info.counts && info.counts.ok) || 0;
    const model = (info.model && info.model.name) || "unknown model";
    $("info").textContent = `${count} image${count === 1 ? "" : "s"} · ${model}`;
  } catch (error) {
    $("info").textContent = `collection info unavailable: ${error.message}`;
  }
}

// -- the query image -------------------------------------------------------------------

function setQuery(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("status", "that is not an image: choose a JPEG, PNG or WebP file", true);
    return;
  }
  if (query.url) URL.revokeObjectURL(query.url);
  query.file = file;
  query.width = query.height = 0; // until it loads: no box drawing
  query.url = URL.createObjectURL(file);
  const img = $("query-img");
  img.addEventListener("load", () => {
    query.width = img.naturalWidth;
    query.height = img.naturalHeight;
  }, { once: true });
  img.src = query.url;
  $("stage").hidden = false;
  setBox(null);
  setStatus("status", `query: ${file.name || "pasted image"}`);
}

function setBox(box) {
  query.box = box;
  const el = $("box");
  el.hidden = !box;
  $("clear-box").disabled = !box;
  $("box-text").textContent = box ? `Box: ${box.join(", ")} px.` : "";
  if (!box) return;
  const [x1, y1, x2, y2] = box;
  el.style.left = `${(100 * x1) / query.width}%`;
  el.style.top = `${(100 * y1) / query.height}%`;
  el.style.width = `${(100 * (x2 - x1)) / query.width}%`;
  el.style.height = `${(100 * (y2 - y1)) / query.height}%`;
}

function imagePoint(event) {
  // the pointer in original image pixels, clamped to the image
  const rect = $("query-img").getBoundingClientRect();
  const fx = Math.min(Math.max((event.clientX - rect.left) / rect.width, 0), 1);
  const fy = Math.min(Math.max((event.clientY - rect.top) / rect.height, 0), 1);
  return [Math.round(fx * query.width), Math.round(fy * query.height)];
}

function setupBoxDrawing() {
  const frame = $("frame");
  let start = null;
  const boxTo = (event) => {
    const [x, y] = imagePoint(event);
    const box = [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)];
    return box[2] - box[0] >= 4 && box[3] - box[1] >= 4 ? box : null;
  };
  frame.addEventListener("pointerdown", (event) => {
    if (!query.width || event.button !== 0) return;
    event.preventDefault();
    frame.setPointerCapture(event.pointerId);
    start = imagePoint(event);
  });
  frame.addEventListener("pointermove", (event) => { if (start) setBox(boxTo(event)); });
  const end = (event) => {
    if (!start) return;
    setBox(boxTo(event));
    start = null;
  };
  frame.addEventListener("pointerup", end);
  frame.addEventListener("pointercancel", () => { start = null; setBox(null); });
}

function setupQueryInput() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => setQuery(event.target.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    setQuery(event.dataTransfer.files[0]);
  });
  // a file dropped beside the zone must not replace the page (file inputs take their own)
  for (const type of ["dragover", "drop"]) {
    document.addEventListener(type, (event) => {
      const target = event.target;
      if (!(target instanceof HTMLInputElement && target.type === "file")) event.preventDefault();
    });
  }
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (!item) return; // text pasted into a field stays there
    event.preventDefault();
    setQuery(item.getAsFile());
  });
  $("clear-box").addEventListener("click", () => setBox(null));
}

// -- search and results ----------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  if (!query.file) {
    setStatus("status", "choose, drop or paste a query image first", true);
    $("file").focus();
    return;
  }
  const params = new URLSearchParams({ k: $("k").value || "10", rerank: $("rerank").value });
  if (query.box) params.set("box", query.box.join(","));
  const boxOnly = query.box ? `?box=${query.box.join(",")}` : "";
  setStatus("status", "searching…");
  $("search").disabled = true;
  const [found, recognized] = await Promise.allSettled([
    call(`/search?${params}`, { method: "POST", body: imageForm(query.file) }).then((r) => r.json()),
    call(`/recognize${boxOnly}`, { method: "POST", body: imageForm(query.file) }).then((r) => r.json()),
  ]);
  $("search").disabled = false;
  showRecognized(recognized);
  if (found.status === "rejected") {
    setStatus("status", found.reason.message, true);
    $("results").replaceChildren();
    return;
  }
  const { results, took_ms: took } = found.value;
  setStatus("status", `${results.length} result${results.length === 1 ? "" : "s"} in ${took} ms`);
  $("results").replaceChildren(...results.map(resultCell));
}

function showRecognized(outcome) {
  const el = $("recognized");
  if (outcome.status === "rejected") {
    el.textContent = `recognition failed: ${outcome.reason.message}`;
  } else if (outcome.value.abstained) {
    el.textContent = "no confident label";
  } else {
    const { label, confidence } = outcome.value;
    el.textContent = `Recognised: ${label} (confidence ${Number(confidence).toFixed(2)})`;
  }
}

function resultCell(result) {
  const item = document.createElement("li");
  const cell = document.createElement("button");
  cell.type = "button";
  cell.className = "result";
  cell.dataset.id = String(result.id);
  const name = result.label ? `${result.label}, image #${result.id}` : `image #${result.id}`;
  cell.setAttribute("aria-label", `rank ${result.rank}: ${name}, score ${result.score.toFixed(3)}`);
  const thumb = document.createElement("img");
  const thumbUrl = `/images/${encodeURIComponent(result.id)}/thumbnail`;
  if (authHeaders().Authorization) {  // with --auth all an <img src> could not send the key
    call(thumbUrl).then((r) => r.blob()).then((blob) => { thumb.src = URL.createObjectURL(blob); })
      .catch(() => thumb.classList.add("missing"));
  } else {
    thumb.src = thumbUrl;
  }
  thumb.alt = "";
  thumb.loading = "lazy";
  thumb.addEventListener("error", () => thumb.classList.add("missing"), { once: true });
  const lines = [`#${result.rank} · ${result.score.toFixed(3)}`];
  if (result.inliers !== undefined && result.inliers !== null) lines.push(`${result.inliers} inliers`);
  lines.push(result.label || `image #${result.id}`);
  const text = document.createElement("span");
  text.className = "caption";
  for (const line of lines) {
    const span = document.createElement("span");
    span.textContent = line;
    text.append(span);
  }
  cell.append(thumb, text);
  cell.addEventListener("click", () => openMatch(result.id, cell));
  item.append(cell);
  return item;
}

// -- the match overlay -----------------------------------------------------------------

async function openMatch(id, opener) {
  matchOpener = opener;
  const panel = $("match");
  const img = $("match-img");
  panel.hidden = false;
  $("match-title").textContent = `Query and image #${id}`;
  img.hidden = true;
  img.alt = `the query and image #${id}, their matching points drawn between them`;
  setStatus("match-status", "matching…");
  $("match-close").focus();
  try {
    const response = await call(`/match?b=${encodeURIComponent(id)}`, {
      method: "POST",
      body: imageForm(query.file),
    });
    const blob = await response.blob();
    if (panel.hidden) return; // closed while it was drawn
    if (matchUrl) URL.revokeObjectURL(matchUrl);
    matchUrl = URL.createObjectURL(blob);
    img.src = matchUrl;
    img.hidden = false;
    setStatus("match-status", "");
  } catch (error) {
    setStatus("match-status", error.message, true);
  }
}

function closeMatch() {
  const panel = $("match");
  if (panel.hidden) return;
  panel.hidden = true;
  $("match-img").removeAttribute("src");
  if (matchUrl) URL.revokeObjectURL(matchUrl);
  matchUrl = null;
  if (matchOpener && matchOpener.isConnected) matchOpener.focus();
}

// -- adding an image -------------------------------------------------------------------

function rememberKey() {
  const key = $("api-key").value.trim();
  if ($("remember").checked && key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

async function addImage(event) {
  event.preventDefault();
  const file = $("add-file").files[0];
  if (!file) return setStatus("add-status", "choose an image to add", true);
  const extra = {};
  const label = $("add-label").value.trim();
  const metadata = $("add-metadata").value.trim();
  if (label) extra.label = label;
  if (metadata) {
    let parsed;
    try {
      parsed = JSON.parse(metadata);
    } catch (_) {
      parsed = null;
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      return setStatus("add-status", 'metadata must be a JSON object, e.g. {"sku": "A-12"}', true);
    }
    extra.metadata = metadata;
  }
  rememberKey();
  setStatus("add-status", "adding…");
  try {
    const response = await call("/images", { method: "POST", body: imageForm(file, extra) });
    const { id } = await response.json();
    setStatus("add-status", response.status === 201 ? `added as #${id}` : `already in the collection as #${id}`);
    loadInfo();
  } catch (error) {
    setStatus("add-status", error.message, true);
  }
}

// -- start -----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const saved = sessionStorage.getItem(KEY_STORE);
  if (saved) {
    $("api-key").value = saved;
    $("remember").checked = true;
  }
  $("remember").addEventListener("change", rememberKey);
  setupQueryInput();
  setupBoxDrawing();
  $("search-form").addEventListener("submit", search);
  $("add-form").addEventListener("submit", addImage);
  $("match-close").addEventListener("click", closeMatch);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeMatch(); });
  loadInfo();
});

// The search page: pick or drop a photo, drag a box on it, search, show both rankings.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
let file = null;       // the photo to upload
let bitmap = null;     // its decoded pixels (orientation applied, like the server)
let box = null;        // [x1, y1, x2, y2] in image pixels
let dragFrom = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function draw() {
  ctx.drawImage(bitmap, 0, 0);
  if (box) {
    ctx.lineWidth = Math.max(2, bitmap.width / 200);
    ctx.strokeStyle = "#ff2d55";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
  $("box-text").textContent = box ? "box " + box.map(Math.round).join(",") : "no box";
}

async function load(f) {
  if (!f) return;
  file = f;
  box = null;
  try {
    bitmap = await createImageBitmap(f, { imageOrientation: "from-image" });
  } catch (err) {
    bitmap = null;
    canvas.hidden = true;
    $("drop-hint").hidden = false;
    $("go").disabled = false; // let the server name the problem
    setStatus("the browser cannot preview this file; the server will check it");
    return;
  }
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.hidden = false;
  $("drop-hint").hidden = true;
  $("go").disabled = false;
  draw();
  setStatus("");
}

function toImage(event) {
  const r = canvas.getBoundingClientRect();
  const x = ((event.clientX - r.left) / r.width) * canvas.width;
  const y = ((event.clientY - r.top) / r.height) * canvas.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
}

canvas.addEventListener("mousedown", (e) => { dragFrom = toImage(e); });
canvas.addEventListener("mousemove", (e) => {
  if (!dragFrom) return;
  const [x, y] = toImage(e);
  box = [Math.min(dragFrom[0], x), Math.min(dragFrom[1], y), Math.max(dragFrom[0], x), Math.max(dragFrom[1], y)];
  draw();
});
window.addEventListener("mouseup", () => {
  if (dragFrom && box && (box[2] - box[0] < 8 || box[3] - box[1] < 8)) box = null;
  if (dragFrom) draw();
  dragFrom = null;
});

$("file").addEventListener("change", (e) => load(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  load(e.dataTransfer.files[0]);
});

function change(rankBefore, rank) {
  const d = rankBefore - rank;
  if (d > 0) return `<span class="up">&#9650;${d}</span>`;
  if (d < 0) return `<span class="down">&#9660;${-d}</span>`;
  return `<span class="same">=</span>`;
}

function card(item, extra) {
  const li = document.createElement("li");
  li.dataset.id = item.id;
  li.innerHTML =
    `<a href="/image/${item.id}" target="_blank" rel="noopener">` +
    `<img loading="lazy" alt="" src="/image/${item.id}/thumb">` +
    `<div class="name"></div><div>${extra}</div></a>`;
  li.querySelector(".name").textContent = `${item.rank}. ${item.name}`;
  li.title = item.name;
  return li;
}

function show(reply) {
  const reranked = reply.chain !== "none";
  $("after").replaceChildren(...reply.results.map((r) => card(r,
    reranked
      ? `score ${r.score.toFixed(3)} &middot; global ${r.global_score.toFixed(3)} ${change(r.rank_before, r.rank)}`
      : `global ${r.global_score.toFixed(3)}`)));
  $("before").replaceChildren(...reply.before.map((r) => card(r, `global ${r.global_score.toFixed(3)}`)));
  $("after-title").textContent = reranked ? `After re-ranking (${reply.chain})` : "Global search";
  $("before-column").hidden = !reranked;
  $("results").hidden = false;
  const t = reply.timings_ms;
  setStatus(`${reply.results.length} of ${reply.index_size} images in ${t.total.toFixed(0)} ms ` +
    `(extract ${t.extract.toFixed(0)}, search ${t.search.toFixed(1)}, re-rank ${t.rerank.toFixed(0)})`);
}

$("controls").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  if (box) form.append("box", box.map((v) => v.toFixed(1)).join(","));
  form.append("top_k", $("topk").value);
  if (!$("rerank").checked) form.append("chain", "none");
  $("go").disabled = true;
  setStatus("searching...");
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const reply = await response.json();
    if (!response.ok) setStatus(reply.error || `error ${response.status}`, true);
    else show(reply);
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  } finally {
    $("go").disabled = false;
  }
});

fetch("/stats").then((r) => r.json()).then((s) => {
  $("stats").textContent = `${s.index_size} images · ${s.extractor.name} · ${s.device} · chain ${s.default_chain}`;
  if (!("default" in s.chains)) { $("rerank").checked = false; $("rerank").disabled = true; }
}).catch(() => {});

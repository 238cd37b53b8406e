// difflora web page: plain JS, no build step. Talks to the JSON API; sends X-API-Key when one is entered.
"use strict";
const $ = (id) => document.getElementById(id);
let identityId = null;

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : await r.blob();
  if (!r.ok) {
    const err = body && body.error ? body.error : { code: String(r.status), message: r.statusText };
    throw Object.assign(new Error(err.message), { code: err.code, status: r.status, details: err.details });
  }
  return body;
}

function showError(el, e) {
  el.className = "info error";
  el.textContent = `${e.status || ""} ${e.code || "error"}: ${e.message}`;
}

function figure(src, caption, rejected) {
  const f = document.createElement("figure");
  if (rejected) f.className = "rejected";
  let pic;
  if (src) { pic = document.createElement("img"); pic.src = src; pic.alt = caption; }
  else { pic = document.createElement("div"); pic.className = "none"; pic.textContent = "no face"; }
  const c = document.createElement("figcaption");
  c.textContent = caption;
  f.append(pic, c);
  return f;
}

async function imageUrl(path) {  // fetch with the key header, show as a blob URL
  return URL.createObjectURL(await api(path));
}

async function refreshStatus() {
  try {
    const r = await fetch("/readyz");
    const b = await r.json();
    $("status").textContent = r.ok ? "ready" : (b.error ? b.error.message : "not ready");
    $("status").className = "pill " + (r.ok ? "ready" : "bad");
    const d = b.details || {};
    if (r.ok && d.predictor === "untrained") $("status").textContent = "ready (untrained hypernet)";
    if (r.ok && d.predictor === "none") {  // no hypernet for this base: identities are made by fine-tuning
      $("status").textContent = "ready (no hypernet: fine-tuning)";
      $("status").title = d.predictor_message || "";
      $("finetune").checked = true; $("finetune").disabled = true;
    }
    if (!r.ok) setTimeout(refreshStatus, 1000);
  } catch (e) { $("status").textContent = "offline"; $("status").className = "pill bad"; }
}

$("create").addEventListener("click", async () => {
  const files = $("photos").files;
  const info = $("identity-info");
  info.className = "info"; info.textContent = "embedding faces and predicting the adapter…";
  $("faces").replaceChildren();
  const form = new FormData();
  for (const f of files) form.append("photos", f, f.name);
  if ($("name").value) form.append("name", $("name").value);
  try {
    const idt = $("finetune").checked ? await finetune(form, info) : await api("/v1/identities", { method: "POST", body: form });
    showIdentity(idt);
    for (const p of idt.photos) {
      const src = p.face_url ? await imageUrl(p.face_url) : null;
      const why = p.accepted ? "accepted" : `${p.code}: ${p.reason || ""}`;
      $("faces").append(figure(src, `${p.filename || "photo " + p.index} — ${why}`, !p.accepted));
    }
  } catch (e) {
    showError(info, e);
    for (const p of e.details || []) {
      if (p.index !== undefined) $("faces").append(figure(null, `${p.filename}: ${p.code} ${p.reason || ""}`, true));
    }
  }
});

async function finetune(form, info) {  // POST /v1/finetunes, then poll the job until it made the identity
  if ($("finetune-steps").value) form.append("steps", $("finetune-steps").value);
  const bar = $("finetune-progress");
  bar.hidden = false; bar.value = 0;
  let job = await api("/v1/finetunes", { method: "POST", body: form });
  while (job.status === "queued" || job.status === "running") {
    bar.value = job.progress;
    info.textContent = `fine-tuning (${job.start}): ${job.status}, step ${job.step}/${job.steps}` +
      (job.loss != null ? `, loss ${job.loss.toFixed(4)}` : "");
    await new Promise((res) => setTimeout(res, 300));
    job = await api(`/v1/finetunes/${job.id}`);
  }
  bar.value = job.progress;
  if (job.status !== "succeeded") throw Object.assign(new Error(job.error || job.status), { code: job.status });
  return api(job.identity_url);
}

function showIdentity(idt) {
  identityId = idt.id;
  $("identity-info").textContent = `identity ${idt.id} (${idt.made_by}): ${idt.photos_used} photo(s) used, ` +
    `${idt.photos_rejected} rejected, consistency ${idt.consistency.toFixed(3)}, ${idt.seconds.total.toFixed(2)} s` +
    (idt.trigger ? ` — prompt with "${idt.trigger}"` : "") + (idt.message ? ` (${idt.message})` : "");
  if (idt.prompt) { $("prompt").value = idt.prompt; $("compare-prompt").value = idt.prompt; }
  $("downloads").hidden = false;
}

// adapter downloads: fetched with the key header, saved through a blob URL
for (const b of document.querySelectorAll("button.download")) {
  b.addEventListener("click", async () => {
    const info = $("download-info");
    info.className = "info";
    if (!identityId) { info.textContent = "create an identity first"; return; }
    try {
      const blob = await api(`/v1/identities/${identityId}/adapter?format=${b.dataset.format}`);
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `${identityId}-${b.dataset.format}.${b.dataset.format === "peft" ? "zip" : "safetensors"}`;
      document.body.append(a); a.click(); a.remove();
      info.textContent = `${b.dataset.format}: ${(blob.size / 1024).toFixed(1)} KiB`;
    } catch (e) { showError(info, e); }
  });
}

$("compare-scale").addEventListener("input", () => {
  $("compare-scale-value").textContent = Number($("compare-scale").value).toFixed(1);
});

function cell(child) { const td = document.createElement("td"); td.append(child); return td; }
function pic(png, alt) { const i = document.createElement("img"); i.src = `data:image/png;base64,${png}`; i.alt = alt; return i; }

$("compare").addEventListener("click", async () => {
  const info = $("compare-info");
  info.className = "info";
  if (!identityId) { info.textContent = "create an identity first"; return; }
  const n = Math.min(4, Math.max(1, num("compare-seeds") || 1));
  const scale = Number($("compare-scale").value);
  const base = { prompt: $("compare-prompt").value, seed: num("compare-seed") ?? 0, num_images: n };
  const json = { "Content-Type": "application/json", Accept: "application/json" };
  info.textContent = `generating ${n} seed(s) with the base model and at scale ${scale.toFixed(1)}…`;
  try {
    const [b, p] = await Promise.all([
      api("/v1/generations", { method: "POST", body: JSON.stringify(base), headers: json }),
      api("/v1/generations", { method: "POST", headers: json,
        body: JSON.stringify({ ...base, identity_id: identityId, adapter_scale: scale }) }),
    ]);
    $("compare-head").textContent = `personalized (scale ${scale.toFixed(1)})`;
    $("compare-rows").replaceChildren(...b.images.map((im, i) => {
      const tr = document.createElement("tr");
      tr.append(cell(document.createTextNode(String(im.seed))), cell(pic(im.png_base64, `base, seed ${im.seed}`)),
        cell(pic(p.images[i].png_base64, `personalized, seed ${im.seed}`)));
      return tr;
    }));
    $("compare-table").hidden = false;
    info.textContent = `seeds ${b.images.map((im) => im.seed).join(", ")}: base ${b.seconds.total.toFixed(2)} s, ` +
      `personalized ${p.seconds.total.toFixed(2)} s`;
  } catch (e) { showError(info, e); }
});

function num(id) { const v = $(id).value; return v === "" ? undefined : Number(v); }

$("generate").addEventListener("click", async () => {
  const info = $("gen-info");
  info.className = "info"; info.textContent = "generating…";
  const req = { prompt: $("prompt").value, identity_id: identityId || undefined, seed: num("seed"),
    steps: num("steps"), num_images: num("num-images") || 1, adapter_scale: num("adapter-scale") ?? 1.0 };
  try {
    const r = await api("/v1/generations", { method: "POST", body: JSON.stringify(req),
      headers: { "Content-Type": "application/json", Accept: "application/json" } });
    $("images").replaceChildren(...r.images.map((im) => figure(`data:image/png;base64,${im.png_base64}`, `seed ${im.seed}`)));
    info.textContent = `seed ${r.seed}, ${r.info.steps} steps, ${r.info.width}×${r.info.height}, ${r.seconds.total.toFixed(2)} s`;
  } catch (e) { showError(info, e); }
});

// job progress: Server-Sent Events from /v1/jobs/{id}/events; polling when EventSource is missing or fails, or
// when an API key is set (EventSource cannot send the X-API-Key header)
const active = (j) => j.status === "queued" || j.status === "running";
async function pollJob(job, show) {
  while (active(job)) {
    show(job);
    await new Promise((res) => setTimeout(res, 500));
    job = await api(`/v1/jobs/${job.id}`);
  }
  return job;
}
function watchJob(job, show) {
  if (!active(job)) return Promise.resolve(job);
  if (!window.EventSource || $("api-key").value.trim()) return pollJob(job, show);
  return new Promise((resolve, reject) => {
    const es = new EventSource(`/v1/jobs/${job.id}/events`);
    es.addEventListener("progress", (e) => show(JSON.parse(e.data)));
    es.addEventListener("end", (e) => { es.close(); resolve(JSON.parse(e.data)); });
    es.addEventListener("gone", (e) => { es.close(); const err = JSON.parse(e.data).error;
      reject(Object.assign(new Error(err.message), { code: err.code, status: 404 })); });
    es.onerror = () => { es.close(); pollJob(job, show).then(resolve, reject); };
  });
}

$("run-job").addEventListener("click", async () => {
  const info = $("job-info");
  info.className = "info";
  if (!identityId) { info.textContent = "create an identity first"; return; }
  const prompts = $("job-prompts").value.split("\n").map((s) => s.trim()).filter(Boolean);
  $("job-results").replaceChildren();
  try {
    let job = await api("/v1/jobs", { method: "POST", body: JSON.stringify({ identity_ids: [identityId], prompts }),
      headers: { "Content-Type": "application/json" } });
    job = await watchJob(job, (j) => {
      $("job-progress").value = j.progress;
      info.textContent = `${j.status}: ${j.done}/${j.total}` + (j.eta_seconds != null ? `, ETA ${j.eta_seconds.toFixed(1)} s` : "");
    });
    $("job-progress").value = job.progress;
    info.textContent = `${job.status}: ${job.done}/${job.total}`;
    for (let url = `${job.results_url}?limit=100`; url;) {  // results come in pages: follow next_cursor
      const res = await api(url);
      for (const it of res.results) {
        for (const im of it.images) $("job-results").append(figure(await imageUrl(im.url), `${it.prompt} (seed ${im.seed})`));
      }
      url = res.next_cursor ? `${job.results_url}?limit=100&cursor=${encodeURIComponent(res.next_cursor)}` : null;
    }
  } catch (e) { showError(info, e); }
});

$("api-key").value = sessionStorage.getItem("difflora-key") || "";
$("api-key").addEventListener("change", () => sessionStorage.setItem("difflora-key", $("api-key").value));
refreshStatus();

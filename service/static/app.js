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
    if (r.ok && b.details && !b.details.predictor_trained) $("status").textContent = "ready (untrained hypernet)";
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
    const idt = await api("/v1/identities", { method: "POST", body: form });
    identityId = idt.id;
    info.textContent = `identity ${idt.id}: ${idt.photos_used} photo(s) used, ${idt.photos_rejected} rejected, ` +
      `consistency ${idt.consistency.toFixed(3)}, ${idt.seconds.total.toFixed(2)} s`;
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

// The page of `python -m lowvram_kontext serve`: upload, instruct, edit, follow progress, continue from any result.
// Plain JavaScript against the server's JSON API and its event stream (see server/http.py).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  config: null,
  loras: [], // the server's LoRAs: name, file, strength (its default), rank, layers
  maxStrength: 4,
  images: new Map(), // gallery number -> entry
  input: null, // the entry edits start from
  result: null, // the entry shown as the result
  focus: null, // the job this tab follows
  mine: new Set(), // jobs asked for from this tab
};

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

function gib(bytes) {
  return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// --- configuration and defaults -----------------------------------------------------------------

function showDefaults() {
  const d = state.config.defaults;
  $("seed").value = d.seed;
  $("steps").value = d.steps;
  $("guidance").value = d.guidance;
  $("width").value = d.width ?? "";
  $("height").value = d.height ?? "";
  const size = d.width || d.height ? `${d.width ?? "auto"}x${d.height ?? "auto"}` : "auto (the trained size nearest the input's shape)";
  $("defaults").textContent =
    `Defaults: seed ${d.seed}, ${d.steps} steps, guidance ${d.guidance}, size ${size}; ` +
    `at most ${state.config.max_pixels} pixels, sides rounded down to multiples of ${state.config.grid}.`;
  showLoras();
}

// One row per LoRA: an on/off toggle, a strength slider and the same strength as a number, its default shown.
function showLoras() {
  const rows = state.loras.map((lora) => {
    const row = document.createElement("div");
    row.className = "lora";
    row.dataset.name = lora.name;
    const toggle = Object.assign(document.createElement("input"), { type: "checkbox", checked: true });
    const name = document.createElement("label");
    name.append(toggle, ` ${lora.name}`);
    name.title = `${lora.file}: rank ${lora.rank}, ${Object.entries(lora.layers).map(([c, n]) => `${n} ${c}`).join(", ")} layers`;
    const range = { min: -state.maxStrength, max: state.maxStrength, value: lora.strength };
    const slider = Object.assign(document.createElement("input"), { type: "range", step: 0.05, ...range });
    const number = Object.assign(document.createElement("input"), { type: "number", step: "any", ...range });
    slider.setAttribute("aria-label", `${lora.name} strength`);
    number.setAttribute("aria-label", `${lora.name} strength`);
    const fallback = Object.assign(document.createElement("span"), { className: "muted", textContent: `default ${lora.strength}` });
    slider.addEventListener("input", () => (number.value = slider.value));
    number.addEventListener("input", () => (slider.value = number.value));
    toggle.addEventListener("change", () => {
      slider.disabled = number.disabled = !toggle.checked;
      row.classList.toggle("off", !toggle.checked);
    });
    row.append(name, slider, number, fallback);
    return row;
  });
  $("lora-list").replaceChildren(...rows);
  $("loras").hidden = rows.length === 0;
  $("lora-hint").textContent =
    `Strength from ${-state.maxStrength} to ${state.maxStrength}, sent with each edit; off: not applied. ` +
    "The defaults are serve's --lora strengths.";
}

// The strength of every LoRA for the next edit (0 for those switched off), or an error to show.
function loraStrengths() {
  const strengths = {};
  for (const row of $("lora-list").children) {
    const [toggle, , number] = row.querySelectorAll("input");
    const value = Number(number.value);
    if (toggle.checked && (number.value.trim() === "" || !Number.isFinite(value))) {
      throw new Error(`LoRA ${row.dataset.name}: the strength must be a number`);
    }
    strengths[row.dataset.name] = toggle.checked ? value : 0;
  }
  return strengths;
}

async function loadConfig() {
  state.config = await api("/api/config");
  const loras = await api("/api/loras");
  state.loras = loras.loras;
  state.maxStrength = loras.max_strength;
  const c = state.config;
  $("model-info").textContent = `${c.model} · ${c.device} · ${c.dtype} · v${c.version}`;
  $("notice").textContent = c.notice + (c.filter ? ` (this server runs --filter ${c.filter})` : "");
  $("out-dir").textContent = `Results are written to ${c.out_dir}`;
  if (c.demo_notice) {
    $("demo-notice").textContent = c.demo_notice;
    $("demo-notice").hidden = false;
  }
  showDefaults();
}

// --- images: upload, input, result, history -----------------------------------------------------

function describe(entry) {
  if (entry.kind === "upload") return `#${entry.id} upload ${entry.source}`;
  return `#${entry.id} from #${entry.parent}: ${entry.prompt}`;
}

// One of the two panels ("input" or "result") shows ``entry``: its image, in place of the hint, and its label.
function showIn(panel, hint, entry) {
  $(`${panel}-image`).src = entry.url;
  $(`${panel}-image`).hidden = false;
  $(hint).hidden = true;
  $(`${panel}-label`).textContent = `#${entry.id} · ${entry.width}x${entry.height}`;
}

function setInput(entry) {
  state.input = entry;
  showIn("input", "drop-hint", entry);
  renderHistory();
}

function showResult(entry) {
  state.result = entry;
  showIn("result", "result-hint", entry);
  const loras = Object.entries(entry.settings.loras ?? {}).map(([name, strength]) => `${name} ${strength}`);
  $("result-prompt").textContent = entry.prompts.join("  →  ") + (loras.length ? ` · LoRAs: ${loras.join(", ")}` : "");
  $("download").href = `${entry.url}?download=1`;
  $("download").setAttribute("download", entry.name);
  $("download").hidden = false;
  $("continue").hidden = false;
}

async function upload(file) {
  if (!file) return;
  if (file.size > state.config.max_upload_bytes) {
    setStatus(`${file.name}: ${file.size} bytes is more than the limit of ${state.config.max_upload_bytes}`, true);
    return;
  }
  setStatus(`Uploading ${file.name || "the pasted image"}…`);
  try {
    const entry = await api("/api/images", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name || "pasted") },
      body: file,
    });
    state.images.set(entry.id, entry);
    setInput(entry);
    setStatus("Ready.");
  } catch (error) {
    setStatus(`Upload refused: ${error.message}`, true);
  }
}

function renderHistory() {
  const strip = $("history");
  strip.replaceChildren();
  for (const entry of [...state.images.values()].sort((a, b) => a.id - b.id)) {
    const figure = document.createElement("figure");
    figure.className = "thumb";
    figure.dataset.id = entry.id;
    figure.title = `${describe(entry)} (click to continue from it)`;
    if (state.input && state.input.id === entry.id) figure.classList.add("current");
    const img = document.createElement("img");
    img.src = entry.url;
    img.alt = describe(entry);
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    caption.textContent = describe(entry);
    const link = document.createElement("a");
    link.className = "button";
    link.href = `${entry.url}?download=1`;
    link.setAttribute("download", entry.name);
    link.textContent = "⬇";
    link.title = `download ${entry.name}`;
    link.addEventListener("click", (event) => event.stopPropagation());
    figure.append(img, caption, link);
    figure.addEventListener("click", () => {
      setInput(entry);
      if (entry.kind === "result") showResult(entry);
    });
    strip.append(figure);
  }
}

async function loadHistory() {
  const { images } = await api("/api/history");
  for (const entry of images) state.images.set(entry.id, entry);
  renderHistory();
}

// --- edits and their progress -------------------------------------------------------------------

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

async function submitEdit(event) {
  event.preventDefault();
  if (!state.input) return setStatus("First drop, paste or choose an image.", true);
  const prompt = $("prompt").value.trim();
  if (!prompt) return setStatus("Type an instruction first.", true);
  // An empty width or height means "auto"; an empty seed, steps or guidance the server's default.
  const request = { image: state.input.id, prompt, width: numberOrNull("width"), height: numberOrNull("height") };
  for (const name of ["seed", "steps", "guidance"]) {
    const value = numberOrNull(name);
    if (value !== null) request[name] = value;
  }
  if (request.seed !== undefined && !Number.isSafeInteger(request.seed)) {
    return setStatus(`Seed: a whole number from 0 to ${Number.MAX_SAFE_INTEGER} on this page.`, true);
  }
  try {
    request.loras = loraStrengths();
  } catch (error) {
    return setStatus(error.message, true);
  }
  try {
    const job = await api("/api/edits", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    state.mine.add(job.id);
    state.focus = job.id;
    showJob(job);
  } catch (error) {
    setStatus(`Not queued: ${error.message}`, true);
  }
}

function showJob(job) {
  const bar = $("bar");
  $("cancel").disabled = job.status !== "queued" && job.status !== "running";
  if (job.status === "queued") {
    setStatus(job.ahead ? `Waiting: ${job.ahead} edit(s) ahead in the queue.` : "Queued.");
    bar.removeAttribute("value");
    $("detail").textContent = "";
  } else if (job.status === "running") {
    const stepping = job.step > 0;
    setStatus(stepping ? `Sampling: step ${job.step} of ${job.steps}` : `Running: ${job.stage ?? "starting"}`);
    bar.max = job.steps;
    bar.value = job.step;
    const parts = [];
    if (job.seconds_per_step !== null) parts.push(`${job.seconds_per_step.toFixed(2)} s/step`);
    if (job.vram_bytes !== null) parts.push(`VRAM ${gib(job.vram_bytes)}`);
    if (job.message) parts.push(job.message);
    $("detail").textContent = parts.join(" · ");
  } else if (job.status === "done") {
    bar.max = 1;
    bar.value = 1;
    const seconds = job.timings.edit + job.timings.write;
    setStatus(`Done in ${seconds.toFixed(1)} s.`);
    $("detail").textContent = job.message ?? "";
  } else {
    bar.max = 1;
    bar.value = 0;
    setStatus(job.status === "cancelled" ? "Cancelled." : `Failed: ${job.error}`, job.status === "failed");
    $("detail").textContent = job.status === "cancelled" ? job.message ?? "" : "";
  }
}

async function onJob(job) {
  if (job.status === "done") {
    await loadHistory();
    if (state.mine.has(job.id) && job.id === state.focus) showResult(state.images.get(job.result));
  }
  if (job.id === state.focus) showJob(job);
}

function listen() {
  const source = new EventSource("/api/events");
  source.addEventListener("job", (event) => onJob(JSON.parse(event.data)));
  source.addEventListener("open", () => loadHistory().catch(() => {}));
}

async function cancelFocus() {
  if (state.focus === null) return;
  try {
    showJob(await api(`/api/jobs/${state.focus}/cancel`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" }));
  } catch (error) {
    setStatus(`Cancel failed: ${error.message}`, true);
  }
}

async function showPlan() {
  try {
    const plan = await api("/api/plan");
    const kept = plan.on_device.length ? plan.on_device.join(", ") : "nothing";
    $("plan-text").textContent = `${plan.text}\n\nOn the device now: ${kept}`;
  } catch (error) {
    $("plan-text").textContent = error.message;
  }
  $("plan-dialog").showModal();
}

// --- wiring ---------------------------------------------------------------------------------------

function wire() {
  const drop = $("drop");
  $("pick").addEventListener("click", () => $("file").click());
  drop.addEventListener("click", (event) => {
    if (event.target === drop || event.target.id === "input-image") $("file").click();
  });
  $("file").addEventListener("change", () => upload($("file").files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) upload(item.getAsFile());
  });
  $("edit-form").addEventListener("submit", submitEdit);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) submitEdit(event);
  });
  $("cancel").addEventListener("click", cancelFocus);
  $("continue").addEventListener("click", () => state.result && setInput(state.result));
  $("random-seed").addEventListener("click", () => ($("seed").value = Math.floor(Math.random() * 2 ** 32)));
  $("reset").addEventListener("click", showDefaults);
  $("show-plan").addEventListener("click", showPlan);
  $("close-plan").addEventListener("click", () => $("plan-dialog").close());
}

async function main() {
  wire();
  try {
    await loadConfig();
    await loadHistory();
    listen();
  } catch (error) {
    setStatus(`Cannot reach the server: ${error.message}`, true);
  }
}

main();

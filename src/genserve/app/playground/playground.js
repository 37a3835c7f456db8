// genserve playground: one tab per modality, each a plain client of this server's /v1 API.
// No framework and no build step: the browser runs this file as served. Every request the page makes
// is shown under "View code" as curl and as OpenAI Python SDK code that repeat it exactly.
"use strict";

const API = new URL("v1/", document.baseURI).href;  // relative, so a root_path or proxy prefix still works
const KEY_STORE = "genserve-api-key";
const VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
  "marin", "cedar"];
const TONICS = ["C", "C#", "Db", "D", "Eb", "E", "F", "F#", "Gb", "G", "Ab", "A", "Bb", "B"];
const state = { models: [], key: sessionStorage.getItem(KEY_STORE) || "", chat: [], molecules: [] };
const $ = (id) => document.getElementById(id);
const FILE_FIELDS = { image: true, mask: true };  // the multipart fields that are files

// ---------------------------------------------------------------------------------------------
// Talking to the API

class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

// The API's own error message (OpenAI's {"error": {...}} body); the status line when there is none.
async function errorOf(resp) {
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { /* not JSON: a proxy's page, say */ }
  const err = body && body.error;
  const message = err && err.message ? err.message : `HTTP ${resp.status} ${resp.statusText}: ${text.slice(0, 300)}`;
  return new ApiError(message, resp.status, err || null);
}

async function call(path, { json, form, signal } = {}) {
  const init = { method: json || form ? "POST" : "GET", headers: authHeaders(), signal };
  if (json) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  const resp = await fetch(API + path, init);
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401) askForKey(err.message);
    throw err;
  }
  return resp;
}

// Server-sent events of a fetch response: each event's data, as the server sent it.
// Once ``signal`` aborts, nothing more is yielded, not even events already received (an AbortError
// is thrown instead), and the connection is let go.
async function* events(resp, signal) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const stopped = () => {
    if (signal && signal.aborted) throw new DOMException("Stopped by the user.", "AbortError");
  };
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      stopped();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
        if (data.length) {
          yield data.join("\n");
          stopped();
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function showError(slot, err) {
  const box = $(slot);
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  const where = err.body && err.body.param ? ` (parameter: ${err.body.param})` : "";
  const code = err.body && err.body.code ? ` [${err.body.code}]` : "";
  box.textContent = (err.name === "AbortError" ? "Stopped." : err.message) + where + code;
  box.hidden = false;
}

// Runs ``work`` with ``button`` disabled and any error shown in ``slot`` (and ``status`` emptied).
async function guarded(button, slot, work, status) {
  showError(slot, null);
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try { await work(); } catch (err) {
    showError(slot, err);
    if (status) $(status).textContent = "";
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------------------------------------
// API key and the model lists

function askForKey(why) {
  $("key-why").textContent = why ? `${why} The key is kept in this tab's session storage only.`
    : "The key is kept in this tab's session storage only.";
  $("key-input").value = state.key;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

async function loadModels() {
  showError("global-error", null);
  try {
    const resp = await call("models");
    state.models = (await resp.json()).data;
  } catch (err) {
    showError("global-error", err);
    return;
  }
  const has = (m, modality, task) => m.modality === modality && (!task || m.tasks.includes(task));
  fillModels("chat-model", (m) => has(m, "text"));
  fillModels("images-model", (m) => has(m, "image", "generation"));
  fillModels("inpaint-model", (m) => has(m, "image", "edit"));
  fillModels("interp-model", (m) => has(m, "image", "interpolation"));
  fillModels("speech-model", (m) => has(m, "audio", "speech"));
  fillModels("music-model", (m) => has(m, "audio", "music"));
  fillModels("mol-model", (m) => has(m, "molecule", "generation"));
  fillModels("molint-model", (m) => has(m, "molecule", "interpolation"));
  fillModels("emb-model", (m) => has(m, "embedding"));
  imageModelChanged();
  interpModelChanged();
}

function fillModels(id, keep) {
  const select = $(id);
  const before = select.value;
  select.replaceChildren();
  const models = state.models.filter(keep);
  for (const m of models) select.append(new Option(m.ready ? m.id : `${m.id} (not ready)`, m.id));
  if (!models.length) select.append(new Option("no model of this kind is served", ""));
  if (models.some((m) => m.id === before)) select.value = before;
  select.disabled = !models.length;
  for (const button of RUN_BUTTONS[id] || []) $(button).disabled = !models.length;
}

const card = (id) => state.models.find((m) => m.id === id) || {};
// The buttons that need a model of each list.
const RUN_BUTTONS = { "chat-model": ["chat-send"], "images-model": ["images-generate"], "inpaint-model": ["inpaint-run"],
  "interp-model": ["interp-run"], "speech-model": ["speech-run"], "music-model": ["music-run"], "mol-model": ["mol-run"],
  "molint-model": ["molint-run"], "emb-model": ["emb-run"] };

// ---------------------------------------------------------------------------------------------
// "View code": the request as curl and as OpenAI Python SDK code

const shellQuote = (s) => `'${s.replace(/'/g, "'\\''")}'`;

function py(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    if (value.every((v) => typeof v !== "object" || v === null)) return `[${value.map((v) => py(v)).join(", ")}]`;
    return `[\n${value.map((v) => inner + py(v, inner)).join(",\n")},\n${indent}]`;
  }
  const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${py(v, inner)}`);
  return items.length ? `{\n${items.join(",\n")},\n${indent}}` : "{}";
}

// ``fn(k=v, ..., extra_body={...})``: the SDK's own parameters by name, genserve's in extra_body.
function pyCall(fn, body, sdkParams, extraArgs = []) {
  const args = [...extraArgs];
  const extra = {};
  for (const [k, v] of Object.entries(body)) {
    if (sdkParams.includes(k)) args.push(`    ${k}=${py(v, "    ")},`);
    else extra[k] = v;
  }
  if (Object.keys(extra).length) args.push(`    extra_body=${py(extra, "    ")},`);
  return `${fn}(\n${args.join("\n")}\n)`;
}

function pyClient(imports = []) {
  const lines = [...new Set(["import os", ...imports])].sort();
  const key = state.key ? 'os.environ["GENSERVE_API_KEY"]' : '"none"';
  return `${lines.join("\n")}\n\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=${JSON.stringify(API.replace(/\/$/, ""))}, api_key=${key})\n`;
}

function curl(path, { json, form, stream, output } = {}) {
  const lines = [`curl -sS${stream ? "N" : ""} ${API}${path}`];
  if (state.key) lines.push('  -H "Authorization: Bearer $GENSERVE_API_KEY"');
  if (json) lines.push('  -H "Content-Type: application/json"', `  -d ${shellQuote(JSON.stringify(json))}`);
  // Text fields with --form-string: in -F, a value starting with @ or < names a file.
  for (const [k, v] of form || []) {
    const file = typeof v === "string" && v.startsWith("@") && k in FILE_FIELDS;
    lines.push(`  ${file ? "-F" : "--form-string"} ${shellQuote(`${k}=${v}`)}`);
  }
  if (output) lines.push(`  -o ${output}`);
  return lines.join(" \\\n");
}

function showCode(slot, curlText, pythonText, note) {
  const box = $(slot);
  box.replaceChildren();
  const details = el("details", { className: "code" });
  details.append(el("summary", { textContent: "View code" }));
  if (note) details.append(el("p", { className: "hint", textContent: note }));
  for (const [lang, text] of [["curl", curlText], ["python", pythonText]]) {
    const pre = el("pre", {});
    pre.append(el("code", { textContent: text, className: `lang-${lang}` }));
    pre.dataset.lang = lang;
    const copy = el("button", { type: "button", className: "secondary", textContent: `Copy ${lang}` });
    copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(text));
    const row = el("div", { className: "row" });
    row.append(el("strong", { textContent: lang === "curl" ? "curl" : "Python (OpenAI SDK)" }), copy);
    details.append(row, pre);
  }
  if (state.key) details.append(el("p", { className: "hint", textContent: "Set GENSERVE_API_KEY to your key first." }));
  box.append(details);
}

// ---------------------------------------------------------------------------------------------
// Small DOM helpers

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));

// The seed field's value, or a fresh one the page draws when it is blank, so that every result can be
// made again (and "View code" repeats it exactly). The page keeps seeds below 2^53, where JavaScript's
// numbers are exact; the API takes 64-bit seeds from other clients.
function seedOf(id) {
  const text = $(id).value.trim();
  if (text === "") return Math.floor(Math.random() * 2 ** 31);
  const seed = Number(text);
  if (!Number.isSafeInteger(seed) || seed < 0) {
    throw new ApiError(`The page takes whole-number seeds from 0 to ${Number.MAX_SAFE_INTEGER}; got ${text}.`, 0,
      { param: "seed" });
  }
  return seed;
}
const b64ToBlob = (b64, type) => new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type });
const svgUrl = (svg) => `data:image/svg+xml;charset=utf-8,${encodeURIComponent(svg)}`;

// Drops undefined, empty-string and NaN fields so the request holds only what the user set.
function compact(obj) {
  return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined && v !== "" &&
    !(typeof v === "number" && !Number.isFinite(v))));
}

function download(href, name, text) {
  return el("a", { href, download: name, textContent: text || `Download ${name}` });
}

// ---------------------------------------------------------------------------------------------
// Tabs

function selectTab(tab, focus) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.id.slice(4)}`);
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab, false));
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length], true);
    });
  }
  const start = $(`tab-${location.hash.slice(1)}`);
  if (start) selectTab(start, false);
}

// ---------------------------------------------------------------------------------------------
// Chat and completions

let chatAbort = null;

function chatBody(mode) {
  const stop = $("chat-stop").value.split("\n").filter((s) => s !== "");
  const common = compact({
    model: $("chat-model").value, temperature: num("chat-temperature"), top_p: num("chat-top-p"),
    max_tokens: num("chat-max-tokens"), min_tokens: num("chat-min-tokens"), seed: seedOf("chat-seed"), stop: stop.length ? stop : undefined,
  });
  const system = $("chat-system").value;
  const text = $("chat-input").value;
  if (mode === "completions") {
    return { model: common.model, prompt: (system ? `${system}\n` : "") + text, ...common, stream: true,
      stream_options: { include_usage: true } };
  }
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.chat,
    { role: "user", content: text }];
  return { model: common.model, messages, ...common, stream: true, stream_options: { include_usage: true } };
}

function chatCode(mode, body) {
  const path = mode === "chat" ? "chat/completions" : "completions";
  const sdk = ["model", "messages", "prompt", "temperature", "top_p", "max_tokens", "seed", "stop", "stream",
    "stream_options", "n"];
  const fn = mode === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const piece = mode === "chat" ? "chunk.choices[0].delta.content" : "chunk.choices[0].text";
  const python = `${pyClient()}\nstream = ${pyCall(fn, body, sdk)}\nfor chunk in stream:\n` +
    `    if chunk.choices and ${piece}:\n        print(${piece}, end="", flush=True)\nprint()\n`;
  showCode("chat-code", curl(path, { json: body, stream: true }), python);
}

function addMessage(role, text) {
  const node = el("div", { className: `msg ${role}` }, [el("span", { className: "who", textContent: role })]);
  const body = el("span", { className: "text", textContent: text });
  node.append(body);
  $("chat-log").append(node);
  return body;
}

async function sendChat() {
  const text = $("chat-input").value;
  if (!text.trim()) { showError("chat-error", new Error("Write a message first.")); return; }
  const mode = document.querySelector('input[name="mode"]:checked').value;
  let body;
  try { body = chatBody(mode); } catch (err) { showError("chat-error", err); return; }
  chatCode(mode, body);
  showError("chat-error", null);
  addMessage("user", text);
  const out = addMessage("assistant", "");
  $("chat-log").setAttribute("aria-busy", "true");  // screen readers read the answer once, when it ends
  $("chat-send").disabled = true;
  $("chat-stop-button").disabled = false;
  $("chat-stats").textContent = "waiting for the first token…";
  chatAbort = new AbortController();
  const started = performance.now();
  let firstAt = null; let usage = null; let finish = null; let chunks = 0;
  try {
    const resp = await call(mode === "chat" ? "chat/completions" : "completions", { json: body, signal: chatAbort.signal });
    for await (const data of events(resp, chatAbort.signal)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.message, 200, event.error);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = mode === "chat" ? choice.delta && choice.delta.content : choice.text;
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          out.textContent += piece;
          chunks += 1;
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    if (mode === "chat") state.chat.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    $("chat-input").value = "";
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped by you";
    else showError("chat-error", err);
  } finally {
    $("chat-log").removeAttribute("aria-busy");
    chatAbort = null;
    $("chat-send").disabled = false;
    $("chat-stop-button").disabled = true;
  }
  const seconds = (performance.now() - started) / 1000;
  const parts = [];
  if (firstAt !== null) parts.push(`TTFT ${Math.round(firstAt - started)} ms`);
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`,
    `${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
  else if (chunks) parts.push(`${chunks} chunks`);
  parts.push(`${seconds.toFixed(2)} s`, `seed ${body.seed}`);
  if (finish) parts.push(`finish: ${finish}`);
  $("chat-stats").textContent = parts.join(" · ");
  out.parentElement.dataset.finish = finish || "";
  if (finish === "content_filter") {
    out.parentElement.append(el("p", { className: "notice",
      textContent: "Moderation stopped this answer: the rest was withheld (finish_reason content_filter)." }));
  }
}

function setUpChat() {
  $("chat-send").addEventListener("click", sendChat);
  $("chat-stop-button").addEventListener("click", () => chatAbort && chatAbort.abort());
  $("chat-clear").addEventListener("click", () => { state.chat = []; $("chat-log").replaceChildren(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); if (!chatAbort) sendChat(); }
  });
  $("chat-form").addEventListener("submit", (e) => e.preventDefault());
}

// ---------------------------------------------------------------------------------------------
// Images: generation with live progress, reusable seeds, inpainting and interpolation

function imageModelChanged() {
  const m = card($("images-model").value);
  const latent = m.image_kind === "latent";
  for (const node of document.querySelectorAll(".diffusion-only")) node.hidden = latent;
  for (const node of document.querySelectorAll(".latent-only")) node.hidden = !latent;
  $("images-prompt").hidden = latent;
  $("images-prompt-label").hidden = latent;
  fillClasses("images-class", m);
  const size = $("images-size");
  size.replaceChildren(new Option(m.native_size ? `auto (${m.native_size})` : "auto", ""));
  for (const s of m.sizes || []) size.append(new Option(s, s));
}

function fillClasses(id, m) {
  const select = $(id);
  select.replaceChildren(new Option("random", "random"));
  for (const name of m.class_names || []) select.append(new Option(name, name));
}

function interpModelChanged() {
  fillClasses("interp-class", card($("interp-model").value));
}

function imagesBody() {
  const m = card($("images-model").value);
  const latent = m.image_kind === "latent";
  return compact({
    model: $("images-model").value, prompt: latent ? $("images-class").value : $("images-prompt").value,
    n: num("images-n"), size: $("images-size").value, seed: seedOf("images-seed"), response_format: "b64_json",
    ...(latent ? {} : { negative_prompt: $("images-negative").value, num_inference_steps: num("images-steps"),
      guidance_scale: num("images-guidance"), scheduler: $("images-scheduler").value }),
  });
}

const IMAGE_SDK = ["model", "prompt", "n", "size", "response_format", "quality", "style", "user"];
const PROGRESS = { stream: true, stream_progress: true };  // genserve's progress events, then OpenAI's completed ones

function imagesCode(body, streamed) {
  const python = `${pyClient(["import base64"])}\nresult = ${pyCall("client.images.generate", body, IMAGE_SDK)}\n` +
    "for i, image in enumerate(result.data):\n" +
    '    with open(f"image-{i}.png", "wb") as f:\n        f.write(base64.b64decode(image.b64_json))\n' +
    '    print(f"image-{i}.png", "seed", getattr(image, "seed", None))\n';
  const note = streamed ? "The page asks for \"stream\": true and genserve's \"stream_progress\": true to show the " +
    "denoising progress; the Python code asks for the same images in one response." : "";
  showCode("images-code", curl("images/generations", { json: streamed ? { ...body, ...PROGRESS } : body, stream: streamed }),
    python, note);
}

async function generateImages() {
  const body = imagesBody();
  const streamed = card(body.model).image_kind === "diffusion";
  imagesCode(body, streamed);
  const progress = $("images-progress");
  const status = $("images-status");
  status.textContent = "working…";
  progress.hidden = false;
  progress.removeAttribute("value");  // indeterminate until the first step arrives
  const started = performance.now();
  let data;
  try {
    const resp = await call("images/generations", { json: streamed ? { ...body, ...PROGRESS } : body });
    if (!streamed) {
      data = (await resp.json()).data;
    } else {
      data = [];
      for await (const raw of events(resp)) {
        if (raw === "[DONE]") break;
        const event = JSON.parse(raw);
        if (event.error) throw new ApiError(event.error.message, 200, event.error);
        if (event.type === "image_generation.progress") {
          progress.max = event.total_steps;
          progress.value = event.step;
          const tenth = Math.max(1, Math.round(event.total_steps / 10));  // announced every 10%, not every step
          if (event.step % tenth === 0 || event.step === event.total_steps) {
            status.textContent = `denoising step ${event.step} of ${event.total_steps}`;
          }
        } else if (event.type === "image_generation.completed") {  // one event per image, as OpenAI's
          data.push({ b64_json: event.b64_json, seed: event.seed });
        }
      }
      if (!data.length) throw new Error("The stream ended before the images came.");
    }
  } catch (err) {
    status.textContent = "";
    throw err;
  } finally {
    progress.hidden = true;
  }
  status.textContent = `${data.length} image${data.length === 1 ? "" : "s"} in ${((performance.now() - started) / 1000).toFixed(2)} s`;
  showImages(data, body.model);
}

function showImages(data, model) {
  const grid = $("images-grid");
  grid.replaceChildren();
  data.forEach((item, i) => {
    const src = `data:image/png;base64,${item.b64_json}`;
    const img = el("img", { src, alt: `Image ${i + 1}, seed ${item.seed}` });
    const thumb = el("button", { type: "button", className: "thumb", title: "Reuse this seed" }, [img]);
    thumb.setAttribute("aria-label", `Reuse seed ${item.seed}`);
    thumb.addEventListener("click", () => { $("images-seed").value = item.seed; $("images-seed").focus(); });
    const caption = el("figcaption", { textContent: `seed ${item.seed} ` });
    const reuse = el("button", { type: "button", className: "secondary", textContent: "Use seed" });
    reuse.addEventListener("click", () => { $("images-seed").value = item.seed; });
    caption.append(reuse);
    if (state.models.some((m) => m.tasks.includes("edit"))) {
      const edit = el("button", { type: "button", className: "secondary", textContent: "Edit" });
      edit.addEventListener("click", () => {
        if (card(model).tasks.includes("edit")) $("inpaint-model").value = model;
        $("inpaint").open = true;
        loadInpaintImage(src);
        $("inpaint").scrollIntoView();
      });
      caption.append(edit);
    }
    caption.append(download(src, `image-${item.seed}.png`, "Download"));
    const fig = el("figure", {}, [thumb, caption]);
    fig.dataset.seed = item.seed;
    grid.append(fig);
  });
}

// Inpainting. The mask is kept as one bit per pixel of the picture (no antialiasing, so "kept" means
// exactly the pixels not painted) and shown as a magenta overlay.
const inpaint = { w: 0, h: 0, bits: null, painting: false, loaded: false, last: null };

function loadInpaintImage(src) {
  const img = new Image();
  img.onload = () => {
    const [w, h] = [img.naturalWidth, img.naturalHeight];
    for (const c of [$("inpaint-image"), $("inpaint-mask")]) { c.width = w; c.height = h; }
    $("inpaint-image").getContext("2d").drawImage(img, 0, 0);
    Object.assign(inpaint, { w, h, bits: new Uint8Array(w * h), loaded: true, cursor: [w / 2, h / 2], last: null });
    $("inpaint-brush").max = Math.max(4, Math.round(Math.max(w, h) / 3));
    $("inpaint-brush").value = Math.max(1, Math.round(Math.max(w, h) / 10));
    drawMask();
  };
  img.src = src;
}

function drawMask() {
  const ctx = $("inpaint-mask").getContext("2d");
  const image = ctx.createImageData(inpaint.w, inpaint.h);
  inpaint.bits.forEach((on, i) => { if (on) image.data.set([255, 0, 200, 170], i * 4); });
  ctx.putImageData(image, 0, 0);
}

function dab(x, y, r) {
  for (let py = Math.max(0, Math.floor(y - r)); py <= Math.min(inpaint.h - 1, Math.ceil(y + r)); py += 1) {
    for (let px = Math.max(0, Math.floor(x - r)); px <= Math.min(inpaint.w - 1, Math.ceil(x + r)); px += 1) {
      if ((px + 0.5 - x) ** 2 + (py + 0.5 - y) ** 2 <= r * r) inpaint.bits[py * inpaint.w + px] = 1;
    }
  }
}

// Paints the brush along the straight line from the previous position to (x, y), in picture pixels
// (pointer events come far apart when the hand moves fast), so a stroke has no gaps.
function strokeTo(x, y, start) {
  const r = Math.max(0.5, Number($("inpaint-brush").value) / 2);
  const [x0, y0] = start || !inpaint.last ? [x, y] : inpaint.last;
  const steps = Math.max(1, Math.ceil(Math.hypot(x - x0, y - y0) / (r / 2)));
  for (let i = 0; i <= steps; i += 1) dab(x0 + ((x - x0) * i) / steps, y0 + ((y - y0) * i) / steps, r);
  inpaint.last = [x, y];
  drawMask();
}

function paintAt(event, start) {
  const rect = $("inpaint-mask").getBoundingClientRect();
  strokeTo(((event.clientX - rect.left) * inpaint.w) / rect.width, ((event.clientY - rect.top) * inpaint.h) / rect.height,
    start);
}

// From the keyboard: the arrow keys move a brush cursor, Space or Enter paints under it, Shift with an
// arrow paints along the move.
function keyPaint(event) {
  if (!inpaint.loaded) return;
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  const [x, y] = inpaint.cursor;
  if (event.key in moves) {
    event.preventDefault();
    const step = Math.max(1, Math.round(Number($("inpaint-brush").value) / 2));
    const [dx, dy] = moves[event.key];
    inpaint.cursor = [Math.min(inpaint.w - 0.5, Math.max(0.5, x + dx * step)),
      Math.min(inpaint.h - 0.5, Math.max(0.5, y + dy * step))];
    if (event.shiftKey) {
      strokeTo(x, y, true);
      strokeTo(...inpaint.cursor, false);
    }
  } else if (event.key === " " || event.key === "Enter") {
    event.preventDefault();
    strokeTo(x, y, true);
  } else {
    return;
  }
  showCursor();
}

function showCursor() {
  const box = $("inpaint-cursor");
  const size = Number($("inpaint-brush").value);
  box.hidden = false;
  Object.assign(box.style, { left: `${((inpaint.cursor[0] - size / 2) / inpaint.w) * 100}%`,
    top: `${((inpaint.cursor[1] - size / 2) / inpaint.h) * 100}%`, width: `${(size / inpaint.w) * 100}%`,
    height: `${(size / inpaint.h) * 100}%` });
}

// The picture and the mask as PNG files: the mask is opaque where the picture is kept and transparent
// where it was painted, as OpenAI's edits endpoint reads it.
async function inpaintFiles() {
  const mask = el("canvas", { width: inpaint.w, height: inpaint.h });
  const ctx = mask.getContext("2d");
  const image = ctx.createImageData(inpaint.w, inpaint.h);
  inpaint.bits.forEach((on, i) => image.data.set(on ? [0, 0, 0, 0] : [0, 0, 0, 255], i * 4));
  ctx.putImageData(image, 0, 0);
  const png = (canvas) => new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  return [await png($("inpaint-image")), await png(mask)];
}

async function runInpaint() {
  if (!inpaint.loaded) throw new Error("Choose a picture first: upload one or press Edit under a generated image.");
  if (!inpaint.bits.some((b) => b)) throw new Error("Paint over the part of the picture to redo first.");
  const [image, mask] = await inpaintFiles();
  const fields = compact({ model: $("inpaint-model").value, prompt: $("inpaint-prompt").value, n: 1,
    seed: seedOf("inpaint-seed"), response_format: "b64_json" });
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
  form.append("image", image, "image.png");
  form.append("mask", mask, "mask.png");
  const imageUrl = URL.createObjectURL(image);
  const maskUrl = URL.createObjectURL(mask);
  const python = `${pyClient(["import base64"])}\nresult = ${pyCall("client.images.edit", fields,
    ["model", "prompt", "n", "size", "response_format", "user"],
    ['    image=open("image.png", "rb"),', '    mask=open("mask.png", "rb"),'])}\n` +
    'with open("edited.png", "wb") as f:\n    f.write(base64.b64decode(result.data[0].b64_json))\n';
  const formFields = [...Object.entries(fields), ["image", "@image.png"], ["mask", "@mask.png"]];
  showCode("inpaint-code", curl("images/edits", { form: formFields }), python,
    "Save the picture and the mask first (links below the result).");
  const resp = await call("images/edits", { form });
  const item = (await resp.json()).data[0];
  const src = `data:image/png;base64,${item.b64_json}`;
  const out = $("inpaint-result");
  out.replaceChildren(el("figure", {}, [el("img", { src, alt: `Edited picture, seed ${item.seed}` }),
    el("figcaption", {}, [`seed ${item.seed} `, download(src, "edited.png", "edited.png"), " ",
      download(imageUrl, "image.png", "image.png"), " ", download(maskUrl, "mask.png", "mask.png")])]));
  out.firstChild.dataset.seed = item.seed;
}

function setUpInpaint() {
  const canvas = $("inpaint-mask");
  canvas.addEventListener("pointerdown", (e) => {
    if (!inpaint.loaded) return;
    inpaint.painting = true;
    canvas.setPointerCapture(e.pointerId);
    paintAt(e, true);
  });
  canvas.addEventListener("pointermove", (e) => { if (inpaint.painting) paintAt(e); });
  canvas.addEventListener("keydown", keyPaint);
  canvas.addEventListener("blur", () => { $("inpaint-cursor").hidden = true; });
  for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { inpaint.painting = false; });
  $("inpaint-clear").addEventListener("click", () => { if (inpaint.loaded) { inpaint.bits.fill(0); drawMask(); } });
  $("inpaint-file").addEventListener("change", () => {
    const file = $("inpaint-file").files[0];
    if (file) loadInpaintImage(URL.createObjectURL(file));
  });
  $("inpaint-run").addEventListener("click", () => guarded($("inpaint-run"), "inpaint-error", runInpaint));
}

async function runInterpolation() {
  const base = compact({ model: $("interp-model").value, seed_start: seedOf("interp-start"), seed_end: seedOf("interp-end"),
    frames: num("interp-frames"), method: $("interp-method").value, class: $("interp-class").value });
  if (base.class === "random") delete base.class;
  const frames = { ...base, format: "png" };
  const python = `${pyClient(["import base64"])}\nresult = client.post("/images/interpolations", cast_to=object, body=${py(frames)})\n` +
    'for i, frame in enumerate(result["data"]):\n    with open(f"frame-{i}.png", "wb") as f:\n' +
    '        f.write(base64.b64decode(frame["b64_json"]))\nprint(len(result["data"]), "frames")\n';
  showCode("interp-code", curl("images/interpolations", { json: frames }), python,
    "The animated GIF is the same request with \"format\": \"gif\".");
  const [pngs, gif] = await Promise.all([call("images/interpolations", { json: frames }),
    call("images/interpolations", { json: { ...base, format: "gif" } })]);
  const strip = $("interp-frames-out");
  strip.replaceChildren(...(await pngs.json()).data.map((f, i) => el("figure", {}, [
    el("img", { src: `data:image/png;base64,${f.b64_json}`, alt: `Frame ${i + 1}` }),
    el("figcaption", { textContent: `frame ${i + 1}` })])));
  const gifSrc = `data:image/gif;base64,${(await gif.json()).data[0].b64_json}`;
  $("interp-gif").replaceChildren(el("figure", {}, [el("img", { src: gifSrc, alt: "Interpolation as an animated GIF" }),
    el("figcaption", {}, [download(gifSrc, "interpolation.gif")])]));
}

function setUpImages() {
  $("images-model").addEventListener("change", imageModelChanged);
  $("interp-model").addEventListener("change", interpModelChanged);
  $("images-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded($("images-generate"), "images-error", generateImages);
  });
  $("interp-run").addEventListener("click", () => guarded($("interp-run"), "interp-error", runInterpolation));
  setUpInpaint();
}

// ---------------------------------------------------------------------------------------------
// Audio: speech and music (a player, the MIDI and its piano roll)

async function runSpeech() {
  const format = $("speech-format").value;
  const body = compact({ model: $("speech-model").value, input: $("speech-input").value, voice: $("speech-voice").value,
    response_format: format, speed: num("speech-speed") });
  const file = `speech.${format}`;
  const python = `${pyClient()}\nresponse = ${pyCall("client.audio.speech.create", body,
    ["model", "input", "voice", "response_format", "speed", "instructions"])}\nresponse.write_to_file(${JSON.stringify(file)})\n`;
  showCode("speech-code", curl("audio/speech", { json: body, output: file }), python);
  $("speech-status").textContent = "synthesising…";
  const started = performance.now();
  const blob = await (await call("audio/speech", { json: body })).blob();
  const url = URL.createObjectURL(blob);
  const audio = el("audio", { controls: true, src: url });
  audio.setAttribute("aria-label", "Synthesised speech");
  $("speech-out").replaceChildren(audio, download(url, file));
  $("speech-status").textContent = `${(blob.size / 1024).toFixed(1)} KiB in ${((performance.now() - started) / 1000).toFixed(2)} s`;
}

async function runMusic() {
  const body = compact({ model: $("music-model").value, seconds: num("music-seconds"), tempo: num("music-tempo"),
    key: $("music-key").value, temperature: num("music-temperature"), seed: seedOf("music-seed") });
  $("music-status").textContent = "composing…";
  // The same fields and seed give the same piece: once as audio, once as MIDI for the piano roll.
  const [wavResp, midResp] = await Promise.all([call("audio/music", { json: { ...body, response_format: "wav" } }),
    call("audio/music", { json: { ...body, response_format: "mid" } })]);
  const [wav, mid] = [await wavResp.blob(), await midResp.blob()];
  const wavUrl = URL.createObjectURL(wav);
  const midUrl = URL.createObjectURL(mid);
  const audio = el("audio", { controls: true, src: wavUrl });
  audio.setAttribute("aria-label", "Generated music");
  $("music-out").replaceChildren(audio, download(wavUrl, "music.wav"), " ", download(midUrl, "music.mid"));
  $("music-status").textContent = `seed ${body.seed}`;
  drawPianoRoll(parseMidi(new Uint8Array(await mid.arrayBuffer())));
  const python = `${pyClient(["import httpx"])}\nfor fmt in ("wav", "mid"):\n` +
    `    body = ${py(body, "    ")}\n    body["response_format"] = fmt\n` +
    '    response = client.post("/audio/music", cast_to=httpx.Response, body=body)\n' +
    '    with open(f"music.{fmt}", "wb") as f:\n        f.write(response.content)\n';
  showCode("music-code", curl("audio/music", { json: { ...body, response_format: "wav" }, output: "music.wav" }), python,
    "The MIDI is the same request with \"response_format\": \"mid\".");
}

// Note events of a standard MIDI file, in seconds: [{pitch, start, end, channel}].
function parseMidi(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const text = (at, n) => String.fromCharCode(...bytes.slice(at, at + n));
  if (text(0, 4) !== "MThd") throw new Error("not a MIDI file");
  const tracks = view.getUint16(10);
  const division = view.getUint16(12);
  let pos = 8 + view.getUint32(4);
  const raw = [];  // [tick, kind, pitch or tempo, channel]
  for (let t = 0; t < tracks && pos < bytes.length; t += 1) {
    const end = pos + 8 + view.getUint32(pos + 4);
    let at = pos + 8; let tick = 0; let status = 0;
    const varLen = () => { let v = 0; let b; do { b = bytes[at++]; v = (v << 7) | (b & 0x7f); } while (b & 0x80); return v; };
    while (at < end) {
      tick += varLen();
      if (bytes[at] & 0x80) status = bytes[at++];
      const type = status & 0xf0;
      if (status === 0xff) {
        const meta = bytes[at++]; const len = varLen();
        if (meta === 0x51) raw.push([tick, "tempo", (bytes[at] << 16) | (bytes[at + 1] << 8) | bytes[at + 2], 0]);
        at += len;
      } else if (status === 0xf0 || status === 0xf7) {
        at += varLen();
      } else if (type === 0x90 || type === 0x80) {
        const pitch = bytes[at]; const velocity = bytes[at + 1]; at += 2;
        raw.push([tick, type === 0x90 && velocity > 0 ? "on" : "off", pitch, status & 0x0f]);
      } else {
        at += type === 0xc0 || type === 0xd0 ? 1 : 2;
      }
    }
    pos = end;
  }
  raw.sort((a, b) => a[0] - b[0]);
  let tempo = 500000; let lastTick = 0; let seconds = 0;
  const open = new Map(); const notes = [];
  for (const [tick, kind, value, channel] of raw) {
    seconds += ((tick - lastTick) * tempo) / division / 1e6;
    lastTick = tick;
    if (kind === "tempo") tempo = value;
    else if (kind === "on") open.set(`${channel}:${value}`, seconds);
    else if (open.has(`${channel}:${value}`)) {
      notes.push({ pitch: value, start: open.get(`${channel}:${value}`), end: seconds, channel });
      open.delete(`${channel}:${value}`);
    }
  }
  return notes;
}

function drawPianoRoll(notes) {
  const canvas = $("music-roll");
  canvas.hidden = false;
  canvas.width = canvas.clientWidth * devicePixelRatio;
  canvas.height = canvas.clientHeight * devicePixelRatio;
  canvas.dataset.notes = String(notes.length);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!notes.length) return;
  const lo = Math.min(...notes.map((n) => n.pitch)) - 1;
  const hi = Math.max(...notes.map((n) => n.pitch)) + 1;
  const length = Math.max(...notes.map((n) => n.end));
  const rowH = canvas.height / (hi - lo + 1);
  const colors = ["#6aa9ff", "#ffb86b", "#7ee2a8", "#f28fad"];
  for (const n of notes) {
    ctx.fillStyle = colors[n.channel % colors.length];
    ctx.fillRect((n.start / length) * canvas.width, canvas.height - (n.pitch - lo + 1) * rowH,
      Math.max(1, ((n.end - n.start) / length) * canvas.width - 1), Math.max(1, rowH - 1));
  }
  canvas.setAttribute("aria-label", `Piano roll: ${notes.length} notes over ${length.toFixed(1)} s`);
}

function setUpAudio() {
  for (const v of VOICES) $("speech-voice").append(new Option(v, v));
  for (const mode of ["major", "minor"]) for (const t of TONICS) $("music-key").append(new Option(`${t} ${mode}`));
  $("speech-form").addEventListener("submit", (e) => { e.preventDefault(); guarded($("speech-run"), "speech-error", runSpeech, "speech-status"); });
  $("music-form").addEventListener("submit", (e) => { e.preventDefault(); guarded($("music-run"), "music-error", runMusic, "music-status"); });
}

// ---------------------------------------------------------------------------------------------
// Molecules: generation with constraints, properties of pasted SMILES, VAE interpolation

const PROPERTY_ROWS = [["qed", "QED", 3], ["logp", "logP", 2], ["mw", "MW", 1], ["tpsa", "TPSA", 1],
  ["sa_score", "SA score", 2], ["hbd", "H donors", 0], ["hba", "H acceptors", 0], ["lipinski_violations", "Lipinski violations", 0]];

function moleculeFigure(item, caption) {
  const fig = el("figure", {});
  if (item.svg) fig.append(el("img", { src: svgUrl(item.svg), alt: `Structure of ${item.smiles}` }));
  const cap = el("figcaption", {}, [el("code", { textContent: item.smiles || "no molecule" })]);
  if (caption) cap.append(" ", caption);
  if (item.novel === true) cap.append(el("span", { className: "badge", textContent: "novel" }));
  if (item.novel === false) cap.append(el("span", { className: "badge warn", textContent: "in training set" }));
  if (item.similarity !== undefined && item.similarity !== null) cap.append(` · similarity ${item.similarity.toFixed(2)}`);
  fig.append(cap);
  if (item.properties) {
    const table = el("table", { className: "props" });
    for (const [k, label, digits] of PROPERTY_ROWS) {
      table.append(el("tr", {}, [el("td", { textContent: label }), el("td", { textContent: item.properties[k].toFixed(digits) })]));
    }
    fig.append(table);
  }
  fig.dataset.smiles = item.smiles || "";
  return fig;
}

function renderMolecules() {
  const key = $("mol-sort").value;
  const sign = $("mol-order").value === "asc" ? 1 : -1;
  const value = (m) => (key === "similarity" ? m.similarity : m.properties && m.properties[key]);
  const items = key ? [...state.molecules].sort((a, b) => sign * ((value(a) ?? -Infinity) - (value(b) ?? -Infinity)))
    : state.molecules;
  $("mol-grid").replaceChildren(...items.map((m) => moleculeFigure(m)));
}

async function runMolecules() {
  const constraints = {};
  for (const input of document.querySelectorAll("#mol-form [data-c]")) {
    if (input.value !== "") constraints[input.dataset.c] = input.dataset.text ? input.value : Number(input.value);
  }
  const body = compact({ model: $("mol-model").value, n: num("mol-n"), temperature: num("mol-temperature"),
    top_k: num("mol-top-k"), seed: seedOf("mol-seed"), unique: $("mol-unique").checked,
    constraints: Object.keys(constraints).length ? constraints : undefined, include: ["properties", "svg"] });
  const python = `${pyClient()}\nresult = client.post("/molecules/generations", cast_to=object, body=${py(body)})\n` +
    'for molecule in result["data"]:\n    print(molecule["smiles"], molecule["properties"]["qed"])\nprint(result["stats"])\n';
  showCode("mol-code", curl("molecules/generations", { json: body }), python);
  const result = await (await call("molecules/generations", { json: body })).json();
  state.molecules = result.data;
  $("mol-sort-row").hidden = false;
  renderMolecules();
  const stats = $("mol-stats");
  stats.replaceChildren(...Object.entries({ seed: body.seed, ...result.stats }).map(([k, v]) => el("tr", {}, [
    el("th", { textContent: k.replace(/_/g, " ") }), el("td", { textContent: String(v) })])));
  stats.hidden = false;
}

async function runProperties() {
  const smiles = $("props-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const body = { smiles, include: ["properties", "alerts", "svg"] };
  const python = `${pyClient()}\nresult = client.post("/molecules/properties", cast_to=object, body=${py(body)})\n` +
    'for item in result["data"]:\n    print(item["input"], item["valid"], item.get("properties"), item.get("error"))\n';
  showCode("props-code", curl("molecules/properties", { json: body }), python);
  const result = await (await call("molecules/properties", { json: body })).json();
  $("props-out").replaceChildren(...result.data.map((item) => {
    if (!item.valid) {
      return el("figure", {}, [el("figcaption", {}, [el("code", { textContent: item.input }), el("p", { className: "error", textContent: item.error })])]);
    }
    const fig = moleculeFigure(item);
    for (const alert of item.alerts || []) fig.append(el("p", { className: "notice", textContent: `${alert.catalog}: ${alert.description}` }));
    return fig;
  }));
}

async function runMolInterpolation() {
  const body = compact({ model: $("molint-model").value, start: $("molint-start").value, end: $("molint-end").value,
    steps: num("molint-steps"), method: $("molint-method").value, include: ["properties", "svg"] });
  const python = `${pyClient()}\nresult = client.post("/molecules/interpolations", cast_to=object, body=${py(body)})\n` +
    'for point in result["data"]:\n    print(round(point["t"], 3), point["smiles"])\n';
  showCode("molint-code", curl("molecules/interpolations", { json: body }), python);
  const result = await (await call("molecules/interpolations", { json: body })).json();
  $("molint-out").replaceChildren(...result.data.map((p) => moleculeFigure(p,
    p.withheld_by_moderation ? "withheld by moderation" : `t = ${p.t.toFixed(2)}`)));
}

function setUpMolecules() {
  $("mol-form").addEventListener("submit", (e) => { e.preventDefault(); guarded($("mol-run"), "mol-error", runMolecules); });
  $("mol-sort").addEventListener("change", renderMolecules);
  $("mol-order").addEventListener("change", renderMolecules);
  $("props-run").addEventListener("click", () => guarded($("props-run"), "props-error", runProperties));
  $("molint-run").addEventListener("click", () => guarded($("molint-run"), "molint-error", runMolInterpolation));
}

// ---------------------------------------------------------------------------------------------
// Embeddings: the cosine similarity of every pair of sentences, as a heatmap

function cosine(a, b) {
  let dot = 0; let na = 0; let nb = 0;
  for (let i = 0; i < a.length; i += 1) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.sqrt(na * nb);
}

async function runEmbeddings() {
  const input = $("emb-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (input.length < 2) throw new Error("Write at least two sentences, one per line.");
  const body = { model: $("emb-model").value, input };
  const python = `${pyClient(["import math"])}\nresult = ${pyCall("client.embeddings.create", body,
    ["model", "input", "encoding_format", "dimensions", "user"])}\nvectors = [d.embedding for d in result.data]\n\n\n` +
    "def cosine(a, b):\n    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))\n\n\n" +
    'for a in vectors:\n    print(" ".join(f"{cosine(a, b):.2f}" for b in vectors))\n';
  showCode("emb-code", curl("embeddings", { json: body }), python);
  const vectors = (await (await call("embeddings", { json: body })).json()).data.map((d) => d.embedding);
  const table = $("emb-matrix");
  const head = el("tr", {}, [el("th", {})]);
  input.forEach((s, i) => head.append(el("th", { textContent: `${i + 1}`, title: s, scope: "col" })));
  table.replaceChildren(head);
  vectors.forEach((a, i) => {
    const row = el("tr", {}, [el("th", { textContent: `${i + 1}. ${input[i]}`, scope: "row" })]);
    for (const b of vectors) {
      const v = cosine(a, b);
      const cell = el("td", { textContent: v.toFixed(2) });
      cell.style.background = `rgba(36, 87, 197, ${Math.max(0, v).toFixed(3)})`;
      cell.style.color = v > 0.75 ? "#fff" : "#1b1c1f";  // 4.5:1 contrast either side
      row.append(cell);
    }
    table.append(row);
  });
  table.hidden = false;
}

function setUpEmbeddings() {
  $("emb-form").addEventListener("submit", (e) => { e.preventDefault(); guarded($("emb-run"), "emb-error", runEmbeddings); });
}

// ---------------------------------------------------------------------------------------------

function setUpKey() {
  $("key-button").addEventListener("click", () => askForKey(""));
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("key-form").addEventListener("submit", () => {
    state.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    loadModels();
  });
}

setUpTabs();
setUpKey();
setUpChat();
setUpImages();
setUpAudio();
setUpMolecules();
setUpEmbeddings();
loadModels();

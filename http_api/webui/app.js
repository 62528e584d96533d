// The page's logic: chat over /v1/chat/completions and raw completion over /completion, streamed.
import { llama, streamJSON } from "./completion.js";

const $ = (id) => document.getElementById(id);
// The API lives where the page does (also behind a reverse proxy that adds a path prefix).
const API = new URL(".", location.href).href.replace(/\/$/, "");
const SAVED = ["temperature", "n_predict", "api-key", "system"];

const ui = {
  mode: "chat",
  messages: [], // the conversation sent with each chat request: [{role, content}]
  controller: null, // the running request's AbortController
};

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function settings() {
  const temperature = Number.parseFloat($("temperature").value);
  const nPredict = Number.parseInt($("n_predict").value, 10);
  return {
    temperature: Number.isFinite(temperature) ? temperature : 0.8,
    n_predict: Number.isFinite(nPredict) ? nPredict : -1,
    apiKey: $("api-key").value.trim(),
  };
}

function showMode(mode) {
  ui.mode = mode;
  for (const m of ["chat", "completion"]) {
    $(`mode-${m}`).setAttribute("aria-selected", String(m === mode));
    $(`${m}-view`).hidden = m !== mode;
  }
  $("prompt").placeholder = mode === "chat"
    ? "Say something (Enter sends, Shift+Enter starts a new line)"
    : "A prompt to continue (Ctrl+Enter sends)";
  localStorage.setItem("gguf-serve:mode", mode);
}

function addMessage(role, content) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const text = document.createElement("span");
  text.className = "content";
  text.textContent = content;
  div.append(label, text);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return text;
}

function speed(timings) {
  if (!timings || !timings.predicted_n) return "";
  const rate = timings.predicted_per_second;
  return `${timings.predicted_n} tokens` + (rate ? `, ${rate.toFixed(1)} tokens/s` : "");
}

async function runChat(text, s, signal) {
  ui.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const system = $("system").value.trim();
  const body = {
    messages: system ? [{ role: "system", content: system }, ...ui.messages] : ui.messages,
    stream: true,
    temperature: s.temperature,
    n_predict: s.n_predict,
  };
  let reply = "";
  let timings = null;
  try {
    for await (const chunk of streamJSON(`${API}/v1/chat/completions`, body, {
      signal,
      apiKey: s.apiKey,
    })) {
      const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta : null;
      if (delta && delta.content) {
        reply += delta.content;
        out.textContent = reply;
      }
      if (chunk.timings) timings = chunk.timings;
    }
  } finally {
    // What arrived stays in the conversation, also when stopped or failed.
    if (reply) ui.messages.push({ role: "assistant", content: reply });
    else out.parentElement.remove();
  }
  return timings;
}

async function runCompletion(text, s, controller) {
  const out = $("output");
  out.textContent = "";
  const params = { temperature: s.temperature, n_predict: s.n_predict, stop: [] };
  let timings = null;
  for await (const { data } of llama(text, params, { controller, api_url: API, api_key: s.apiKey })) {
    if (data.content) out.textContent += data.content;
    if (data.timings) timings = data.timings;
  }
  return timings;
}

async function send() {
  const text = $("prompt").value;
  if (ui.controller || (ui.mode === "chat" && !text.trim())) return;
  const s = settings();
  const controller = new AbortController();
  ui.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  try {
    let timings;
    if (ui.mode === "chat") {
      $("prompt").value = "";
      timings = await runChat(text, s, controller.signal);
    } else {
      timings = await runCompletion(text, s, controller);
    }
    setStatus(`done${timings ? ": " + speed(timings) : ""}`);
  } catch (err) {
    if (err.name === "AbortError") setStatus("stopped");
    else if (err.code === 401) setStatus("401: this server needs an API key (see the settings)", true);
    else setStatus(`error: ${err.message}`, true);
  } finally {
    ui.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function clear() {
  if (ui.controller) ui.controller.abort();
  ui.messages = [];
  $("messages").replaceChildren();
  $("output").textContent = "";
  setStatus("");
}

async function showModel() {
  try {
    const r = await fetch(`${API}/v1/models`); // public, as in llama.cpp: no key needed
    const models = await r.json();
    const id = models.data && models.data[0] ? models.data[0].id : "";
    $("model").textContent = id.split(/[\\/]/).pop(); // a path's file name; all of it on hover
    $("model").title = id;
  } catch (_) {
    $("model").textContent = "";
  }
}

function restore() {
  for (const id of SAVED) {
    const v = localStorage.getItem(`gguf-serve:${id}`);
    if (v !== null) $(id).value = v;
    $(id).addEventListener("change", () => localStorage.setItem(`gguf-serve:${id}`, $(id).value));
  }
  showMode(localStorage.getItem("gguf-serve:mode") === "completion" ? "completion" : "chat");
}

$("mode-chat").addEventListener("click", () => showMode("chat"));
$("mode-completion").addEventListener("click", () => showMode("completion"));
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (e) => {
  const chatEnter = ui.mode === "chat" && e.key === "Enter" && !e.shiftKey && !e.isComposing;
  const ctrlEnter = e.key === "Enter" && (e.ctrlKey || e.metaKey);
  if (chatEnter || ctrlEnter) {
    e.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => ui.controller && ui.controller.abort());
$("clear").addEventListener("click", clear);
restore();
showModel();
document.body.dataset.ready = "true"; // tests wait for this

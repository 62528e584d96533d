// The client helpers of llama.cpp's server README, for pages served by gguf-serve.
//
//   import { llama } from '/completion.js'
//   for await (const chunk of llama("Tell me a joke", { n_predict: 64 })) {
//     document.write(chunk.data.content)
//   }
//
// params are /completion's request fields, merged over the defaults below (api_key, if
// given, goes into the Authorization header, not the body). config: { controller, api_url,
// api_key }; controller is an AbortController whose abort() stops the request.

export const paramDefaults = {
  stream: true,
  n_predict: 500,
  temperature: 0.2,
  stop: ["</s>"],
};

let generationSettings = null;

function headersFor(apiKey, accept) {
  const headers = { "Content-Type": "application/json", Accept: accept };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  return headers;
}

// An Error carrying the server's {"error": {code, message, type}} fields.
export function serverError(body, status) {
  const e = body && typeof body === "object" && body.error ? body.error : null;
  const message = e ? e.message || JSON.stringify(e) : `HTTP ${status}`;
  const err = new Error(message);
  err.code = e && e.code !== undefined ? e.code : status;
  err.type = e ? e.type : undefined;
  return err;
}

// Throws the server's error when the response is not a 2xx.
export async function checkResponse(response) {
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  throw serverError(body, response.status);
}

// The events of a text/event-stream body: yields {event, data, id} per blank-line-ended event,
// data being the event's data lines joined by "\n" (the raw text, not parsed).
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: undefined };
  const take = () => {
    const out = { event: event.event, data: event.data.join("\n"), id: event.id };
    event = { event: "message", data: [], id: undefined };
    return out;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") {
          if (event.data.length) yield take();
          continue;
        }
        if (line.startsWith(":")) continue; // a comment (keep-alive)
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "data") event.data.push(text);
        else if (field === "event") event.event = text;
        else if (field === "id") event.id = text;
      }
    }
    if (event.data.length) yield take(); // a last event without its blank line
  } finally {
    reader.releaseLock();
  }
}

// POSTs `body` as JSON to `url` and yields each streamed event's parsed JSON
// ("[DONE]" ends the stream; a {"error": ...} event is thrown as an Error).
export async function* streamJSON(url, body, { signal, apiKey } = {}) {
  const response = await fetch(url, {
    method: "POST",
    body: JSON.stringify(body),
    headers: headersFor(apiKey, "text/event-stream"),
    signal,
  });
  await checkResponse(response);
  for await (const ev of sseEvents(response)) {
    if (ev.data === "[DONE]") return;
    const data = JSON.parse(ev.data);
    if (data && data.error) throw serverError(data, 500);
    yield data;
  }
}

// Completes the prompt as an async generator of {data} chunks (llama.cpp's chunk fields:
// content, stop, and on the last one generation_settings, timings, ...); returns the text.
export async function* llama(prompt, params = {}, config = {}) {
  const controller = config.controller || new AbortController();
  const apiUrl = config.api_url || "";
  const { api_key: paramKey, ...fields } = params;
  const body = { ...paramDefaults, ...fields, prompt };
  const apiKey = config.api_key || paramKey;
  let content = "";
  if (!body.stream) {
    const response = await fetch(`${apiUrl}/completion`, {
      method: "POST",
      body: JSON.stringify(body),
      headers: headersFor(apiKey, "application/json"),
      signal: controller.signal,
    });
    const data = await (await checkResponse(response)).json();
    for (const one of Array.isArray(data) ? data : [data]) {
      content += one.content || "";
      yield { data: one };
    }
    return content;
  }
  for await (const data of streamJSON(`${apiUrl}/completion`, body, {
    signal: controller.signal,
    apiKey,
  })) {
    content += data.content || "";
    if (data.stop && data.generation_settings) generationSettings = data.generation_settings;
    yield { data };
  }
  return content;
}

// Resolves to the whole completed text.
export const llamaPromise = async (prompt, params = {}, config = {}) => {
  let content = "";
  for await (const chunk of llama(prompt, params, config)) content += chunk.data.content || "";
  return content;
};

// An EventTarget sending "message" (detail: each chunk's data), "generation_settings",
// "timings", then "done" (detail: {content}) or "error" (detail: the Error).
export const llamaEventTarget = (prompt, params = {}, config = {}) => {
  const target = new EventTarget();
  const send = (type, detail) => target.dispatchEvent(new CustomEvent(type, { detail }));
  (async () => {
    let content = "";
    try {
      for await (const { data } of llama(prompt, params, config)) {
        content += data.content || "";
        send("message", data);
        if (data.generation_settings) send("generation_settings", data.generation_settings);
        if (data.timings) send("timings", data.timings);
      }
      send("done", { content });
    } catch (error) {
      send("error", error);
    }
  })();
  return target;
};

// The older callback form: callback(chunk) for each chunk of params.prompt's completion.
export const llamaComplete = async (params, controller, callback) => {
  for await (const chunk of llama(params.prompt, params, { controller })) callback(chunk);
};

// The server's default generation settings (GET /props), fetched once and remembered.
export const llamaModelInfo = async (config = {}) => {
  if (!generationSettings) {
    const response = await fetch(`${config.api_url || ""}/props`, {
      headers: headersFor(config.api_key, "application/json"),
    });
    const props = await (await checkResponse(response)).json();
    generationSettings = props.default_generation_settings;
  }
  return generationSettings;
};

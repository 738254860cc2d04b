// s4serve demo page: pick a model, stream text or audio over WS /v1/stream, play audio as it arrives.
// No build step, no dependencies. window.s4demo exposes counters the browser tests read.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const demo = (window.s4demo = {
    sessionId: null, // the session the socket is bound to
    lastDone: null, // the last generation's done frame
    turns: [], // text turns: {prompt, text, ids, done}
    samplesReceived: 0, // audio samples received over the socket
    samplesScheduled: 0, // ... handed to AudioBufferSourceNodes started in the AudioContext
    samplesPlayed: 0, // ... whose source node has ended (played out)
    audioContextState: () => (audio.ctx ? audio.ctx.state : "none"),
    sourcesQueued: () => audio.sources.size, // AudioBufferSourceNodes scheduled and not yet ended
  });

  const apiKey = () => $("api-key").value; // in this page's memory only: never stored
  const MAX_SEED = 2n ** 63n - 1n; // the server's largest seed
  let models = [];
  let model = null; // the selected entry of GET /v1/models
  let conn = null; // {ws, opened, bound}
  let turn = null; // the running generation
  let contextTokens = 0;
  let cancelSent = false; // a cancel that crosses the generation's done frame gets a 409: not an error
  let starting = false; // a turn is waiting for its socket to open

  // --- small helpers ---------------------------------------------------------------------------

  function status(text, isError = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", isError);
  }

  function bytes(n) {
    return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(2)} MiB`;
  }

  // The key's UTF-8 bytes, one char per byte: what a header value may hold, and what btoa encodes.
  function keyBytes() {
    let bin = "";
    for (const b of new TextEncoder().encode(apiKey())) bin += String.fromCharCode(b);
    return bin;
  }

  function authHeaders() {
    return apiKey() ? { Authorization: `Bearer ${keyBytes()}` } : {};
  }

  // Browsers cannot set headers on a WebSocket: the key travels as a subprotocol, base64url without '='
  // (the server selects "s4" and never echoes the key).
  function wsProtocols() {
    if (!apiKey()) return ["s4"];
    const b64url = btoa(keyBytes()).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    return ["s4", `s4.key.${b64url}`];
  }

  async function api(path) {
    const r = await fetch(path, { headers: authHeaders() });
    if (r.status === 401) throw new Error("the server refused the request (401): check the API key");
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw new Error(body?.error?.message || `${path}: HTTP ${r.status}`);
    }
    return r.json();
  }

  // --- sampling settings: checked here, sent only when every field is valid ----------------------

  function fieldName(el) {
    return el.closest("label").firstChild.textContent.trim();
  }

  function fieldError(el, why) {
    el.setAttribute("aria-invalid", why ? "true" : "false");
    el.nextElementSibling.textContent = why;
  }

  // The fields' values ({key: number}, absent when empty: the server's default) and the seed's digits
  // (a JS number would round a seed above 2^53: messageJSON writes the digits as they are). null, with
  // each bad field marked, the first one focused and named in the status line, when any is invalid:
  // unparseable ("1e": the browser's value is then "", so it was silently dropped), or outside the
  // field's min/max/step.
  function readSettings(fields, seedId) {
    const values = {};
    const bad = [];
    for (const [key, id] of Object.entries(fields)) {
      const el = $(id);
      const why = el.checkValidity() ? "" : el.validity.badInput ? "not a number" : el.validationMessage;
      fieldError(el, why);
      if (why) bad.push(el);
      else if (el.value.trim() !== "") values[key] = Number(el.value);
    }
    const el = $(seedId);
    const seed = el.value.trim();
    let why = "";
    if (seed && !/^[0-9]+$/.test(seed)) why = "a whole number, 0 or more";
    else if (seed && BigInt(seed) > MAX_SEED) why = `at most ${MAX_SEED} (2^63 - 1)`;
    fieldError(el, why);
    if (why) bad.push(el);
    if (bad.length) {
      status(`Not sent: ${fieldName(bad[0])}: ${bad[0].nextElementSibling.textContent}`, true);
      bad[0].focus();
      return null;
    }
    return { values, seed: seed ? BigInt(seed).toString() : undefined }; // no leading zeros: JSON has none
  }

  function messageJSON(msg, seed) {
    const json = JSON.stringify(msg);
    return seed === undefined ? json : `${json.slice(0, -1)},"seed":${seed}}`;
  }

  // --- models ----------------------------------------------------------------------------------

  async function loadModels() {
    const select = $("model");
    try {
      models = (await api("v1/models")).data;
    } catch (err) {
      status(`Could not load the models: ${err.message}`, true);
      return;
    }
    const previous = model?.id;
    select.replaceChildren(
      ...models.map((m) => new Option(`${m.id} (${m.kind})`, m.id, false, m.id === previous)),
    );
    select.disabled = models.length === 0;
    if (models.length === 0) status("The server serves no model.", true);
    else status(`${models.length} model${models.length > 1 ? "s" : ""} served.`);
    selectModel();
  }

  function selectModel() {
    model = models.find((m) => m.id === $("model").value) || null;
    resetSession();
    $("text-panel").hidden = model?.kind !== "text";
    $("audio-panel").hidden = model?.kind !== "audio";
    if (!model) return;
    const rate = model.sample_rate ? `, ${model.sample_rate} Hz` : "";
    const layers = model.arch === "sashimi" ? `SaShiMi, ${model.n_layers} per level` : `${model.n_layers} layers`;
    $("model-info").textContent =
      `${model.kind}${rate} · ${layers} · d_model ${model.d_model} · ` +
      `d_state ${model.d_state} · ${model.kernel} · ${bytes(model.state_bytes_per_session)} of state per session`;
    showStats();
  }

  // --- the socket: one session per socket ------------------------------------------------------

  function connect() {
    if (conn) return conn.ready;
    const url = new URL("v1/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url, wsProtocols());
    ws.binaryType = "arraybuffer";
    const c = { ws, opened: false, bound: false };
    c.ready = new Promise((resolve, reject) => {
      ws.onopen = () => {
        c.opened = true;
        resolve(c);
      };
      ws.onclose = (ev) => {
        if (!c.opened) {
          if (conn === c) conn = null;
          reject(new Error("could not open the WebSocket"));
          return;
        }
        if (conn !== c) return; // closed by New session
        // the server closed it: the socket's session is gone, the next turn starts a new one
        conn = null;
        demo.sessionId = null;
        contextTokens = 0;
        const why = `The connection closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""}); ` +
          "the next turn starts a new session.";
        if (turn && turn.conn === c) endTurn(why, true);
        else status(why, true);
      };
    });
    ws.onmessage = (ev) => onFrame(c, ev.data);
    conn = c;
    return c.ready;
  }

  function resetSession() {
    if (turn) endTurn("", false);
    if (conn) conn.ws.close(1000, "new session"); // the server deletes the socket's session
    conn = null;
    demo.sessionId = null;
    demo.turns = [];
    contextTokens = 0;
    $("output").replaceChildren();
    scrolledTo = 0; // an empty output is followed again
    clearPrompt();
    resetAudio();
    $("rate").textContent = "–";
    $("generated").textContent = "0";
    showStats();
  }

  function showStats() {
    $("context").textContent = `${contextTokens} token${contextTokens === 1 ? "" : "s"}`;
    $("state-size").textContent = model
      ? `${bytes(model.state_bytes_per_session)}, whatever the context length`
      : "–";
    $("session-id").textContent = demo.sessionId || "none";
  }

  function onFrame(c, data) {
    if (data instanceof ArrayBuffer) {
      if (turn && turn.kind === "audio") onSamples(new Int16Array(data));
      return;
    }
    const f = JSON.parse(data);
    if (f.type === "session") {
      c.bound = true;
      demo.sessionId = f.session_id;
      showStats();
    } else if (f.type === "error") {
      if (f.code === 404 && f.param === "session_id" && c.bound) {
        // the socket's session expired or was deleted: the server unbound the socket
        c.bound = false;
        demo.sessionId = null;
        contextTokens = 0;
        f.message += ". Send again for a new session (it starts empty: the text above is not in it).";
      }
      if (!turn && cancelSent && f.code === 409) cancelSent = false;
      else if (turn) endTurn(`Error ${f.code}: ${f.message}`, true);
      else status(`Error ${f.code}: ${f.message}`, true);
    } else if (!turn) {
      // frames of a generation we stopped waiting for
    } else if (f.type === "token") {
      turn.textNode.appendData(f.text);
      followOutput();
      turn.record.text += f.text;
      turn.record.ids += f.ids.length;
      progress(f.ids.length);
    } else if (f.type === "audio_header") {
      startPlayback(f.sample_rate);
    } else if (f.type === "done") {
      demo.lastDone = f;
      if (turn.record) turn.record.done = f;
      const u = f.usage;
      contextTokens = turn.contextBefore + u.prompt_tokens + u.completion_tokens;
      endTurn(`Done: ${f.finish_reason}, ${u.completion_tokens} ${turn.unit} generated.`, false);
      refreshContext(f.session_id);
    }
  }

  // Follow the text as it streams, unless the reader scrolled up (above where the page last put
  // it), scrolling at most once per animation frame: reading the layout on every token frame (a
  // fast model sends thousands a second) laid out the growing text each time and starved the page.
  let scrollQueued = false;
  let scrolledTo = 0;
  function followOutput() {
    if (scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      const out = $("output");
      if (out.scrollTop + 2 < scrolledTo) return; // the reader scrolled up: leave the view alone
      out.scrollTop = out.scrollHeight;
      scrolledTo = out.scrollTop;
    });
  }

  // The session's own token count (the page's running count until this answers).
  async function refreshContext(sessionId) {
    try {
      const info = await api(`v1/sessions/${encodeURIComponent(sessionId)}`);
      if (sessionId === demo.sessionId && !turn) contextTokens = info.tokens;
    } catch {
      // keep the running count
    }
    showStats();
  }

  function progress(n) {
    turn.generated += n;
    const seconds = (performance.now() - turn.start) / 1000;
    $("generated").textContent = String(turn.generated);
    $("rate").textContent = seconds > 0 ? (turn.generated / seconds).toFixed(1) : "–";
    contextTokens = turn.contextBefore + turn.promptTokens + turn.generated;
    showStats();
  }

  function beginTurn(kind, promptTokens) {
    cancelSent = false;
    turn = {
      kind, conn, promptTokens, generated: 0, start: performance.now(),
      contextBefore: contextTokens, unit: kind === "text" ? "tokens" : "samples",
    };
    $("send").disabled = $("audio-generate").disabled = true;
    $("cancel").disabled = $("audio-cancel").disabled = false;
    status("Generating…");
  }

  function endTurn(message, isError) {
    if (turn?.kind === "audio") finishAudio();
    if (turn?.kind === "text" && isError && !turn.record.ids) {
      // refused before it started: its prompt is not part of the session, so not in the transcript;
      // it goes back in the box (unless something else was typed meanwhile), to fix and send again
      turn.spans.forEach((el) => el.remove());
      demo.turns.pop();
      if (!$("prompt").value) $("prompt").value = turn.record.prompt;
    }
    turn = null;
    $("send").disabled = $("audio-generate").disabled = false;
    $("cancel").disabled = $("audio-cancel").disabled = true;
    if (message) status(message, isError);
    showStats();
  }

  function cancel() {
    if (!turn || !conn) return;
    if (turn.kind === "audio") {
      turn.muted = true; // what still arrives before the done frame is kept for the WAV, not played
      stopPlayback();
    }
    conn.ws.send(JSON.stringify({ type: "cancel" }));
    cancelSent = true;
  }

  // --- text ------------------------------------------------------------------------------------

  async function sendText() {
    if (!model || turn || starting) return;
    const settings = readSettings(
      { max_new_tokens: "max-new-tokens", temperature: "temperature", top_k: "top-k", top_p: "top-p" },
      "seed",
    );
    if (!settings) return;
    const prompt = $("prompt").value;
    const msg = { type: "generate", prompt, ...settings.values };
    const c = await opened();
    if (!c) return;
    if (!c.bound) msg.model = model.id;
    const out = $("output");
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = prompt;
    const g = document.createElement("span");
    g.className = "gen";
    g.dataset.turn = String(demo.turns.length);
    g.append(document.createTextNode(""));
    out.append(p, g);
    const record = { prompt, text: "", ids: 0, done: null };
    demo.turns.push(record);
    beginTurn("text", new TextEncoder().encode(prompt).length);
    turn.textNode = g.firstChild;
    turn.spans = [p, g];
    turn.record = record;
    c.ws.send(messageJSON(msg, settings.seed));
    $("prompt").value = ""; // it is in the transcript; an empty prompt just continues the text
  }

  // The socket, once open (null, with the reason shown, when it cannot be opened). A browser does not
  // say why a handshake failed: a server that answers /healthz refused it (a missing or wrong key).
  async function opened() {
    starting = true;
    try {
      return await connect();
    } catch (err) {
      const up = await fetch("healthz", { cache: "no-store" }).then(() => true, () => false);
      status(`${err.message}: ${up ? "check the API key" : "the server does not answer (is it up?)"}`, true);
      return null;
    } finally {
      starting = false;
    }
  }

  // --- audio: prompt in, samples out (played as they stream, drawn as they grow) ---------------

  const audio = {
    ctx: null, rate: 8000, nextTime: 0, pending: [], pendingLength: 0, flushTimer: null, sources: new Set(),
    samples: new Int16Array(0), length: 0, expected: 0, prompt: null, recorder: null, dirty: false,
  };

  // Silence what is queued or playing (Cancel, New session, a new generation's reset): a stopped source
  // counts as not played.
  function stopPlayback() {
    for (const src of audio.sources) {
      src.onended = null;
      src.stop();
    }
    audio.sources.clear();
  }

  function resetAudio() {
    stopPlayback();
    audio.samples = new Int16Array(0);
    audio.length = 0;
    audio.pending = [];
    audio.pendingLength = 0;
    demo.samplesReceived = demo.samplesScheduled = demo.samplesPlayed = 0;
    $("download").hidden = true;
    showAudioInfo();
    drawWaveform();
  }

  function showAudioInfo() {
    $("audio-info").textContent =
      `${demo.samplesReceived} samples received, ${demo.samplesScheduled} scheduled for playback, ` +
      `${demo.samplesPlayed} played`;
  }

  function audioContext() {
    // Created (or resumed) inside the click handler: browsers start audio only after a user gesture.
    audio.ctx ??= new AudioContext();
    if (audio.ctx.state === "suspended") audio.ctx.resume();
    return audio.ctx;
  }

  async function loadPrompt(blob) {
    // Decoded and resampled to the model's rate by an OfflineAudioContext, mixed down to mono.
    const rate = model.sample_rate;
    const buf = await new OfflineAudioContext(1, 1, rate).decodeAudioData(await blob.arrayBuffer());
    const mono = new Float32Array(buf.length);
    for (let ch = 0; ch < buf.numberOfChannels; ch++) {
      const x = buf.getChannelData(ch);
      for (let i = 0; i < x.length; i++) mono[i] += x[i] / buf.numberOfChannels;
    }
    const pcm = new Int16Array(mono.length);
    for (let i = 0; i < mono.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(mono[i] * 32768)));
    audio.prompt = pcm;
    $("prompt-info").textContent = `prompt: ${pcm.length} samples (${(pcm.length / rate).toFixed(2)} s at ${rate} Hz)`;
  }

  async function onPromptFile() {
    const file = $("audio-file").files[0];
    if (!file || !model) return;
    try {
      await loadPrompt(file);
      status(`Prompt loaded from ${file.name}.`);
    } catch (err) {
      status(`Could not decode ${file.name}: ${err.message}`, true);
    }
  }

  async function toggleRecord() {
    if (audio.recorder) {
      audio.recorder.stop();
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      status(`No microphone: ${err.message}`, true);
      return;
    }
    const chunks = [];
    const rec = new MediaRecorder(stream);
    rec.ondataavailable = (ev) => chunks.push(ev.data);
    rec.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      audio.recorder = null;
      $("record").textContent = "Record";
      try {
        await loadPrompt(new Blob(chunks, { type: rec.mimeType }));
        status("Recorded prompt loaded.");
      } catch (err) {
        status(`Could not decode the recording: ${err.message}`, true);
      }
    };
    audio.recorder = rec;
    rec.start();
    $("record").textContent = "Stop recording";
    status("Recording… press Stop recording when done.");
  }

  function clearPrompt() {
    audio.prompt = null;
    $("audio-file").value = "";
    $("prompt-info").textContent = conn
      ? "no new prompt: the next generation continues the session"
      : "no prompt: starts from the model's silence";
  }

  async function generateAudio() {
    if (!model || turn || starting) return;
    const settings = readSettings({ max_new_tokens: "audio-samples", temperature: "audio-temperature" }, "audio-seed");
    if (!settings) return;
    audioContext();
    const c = await opened();
    if (!c) return;
    if (!c.bound) c.ws.send(JSON.stringify({ type: "session", model: model.id, audio_encoding: "pcm16" }));
    // without a prompt a new session starts from the model's silence (the server's one-token prompt)
    const prompt = audio.prompt;
    if (prompt) {
      // binary frames of s16le prompt samples, in chunks well under the server's frame limit
      for (let i = 0; i < prompt.length; i += 8192) c.ws.send(prompt.slice(i, i + 8192).buffer);
      clearPrompt(); // it is part of the session now
    }
    resetAudio();
    audio.expected = settings.values.max_new_tokens || 0;
    beginTurn("audio", prompt ? prompt.length : 0);
    c.ws.send(messageJSON({ type: "generate", audio_encoding: "pcm16", ...settings.values }, settings.seed));
  }

  function startPlayback(rate) {
    const ctx = audioContext();
    audio.rate = rate;
    audio.nextTime = ctx.currentTime + 0.25; // a quarter second of jitter buffer
    clearInterval(audio.flushTimer);
    audio.flushTimer = setInterval(flush, 50);
  }

  function onSamples(pcm) {
    if (audio.length + pcm.length > audio.samples.length) {
      const grown = new Int16Array(Math.max(2 * audio.samples.length, audio.length + pcm.length, 4096));
      grown.set(audio.samples.subarray(0, audio.length));
      audio.samples = grown;
    }
    audio.samples.set(pcm, audio.length);
    audio.length += pcm.length;
    audio.pending.push(pcm);
    audio.pendingLength += pcm.length;
    demo.samplesReceived += pcm.length;
    progress(pcm.length);
    if (audio.pendingLength >= audio.rate / 10) flush();
    if (!audio.dirty) {
      audio.dirty = true;
      requestAnimationFrame(() => {
        audio.dirty = false;
        drawWaveform();
        showAudioInfo();
      });
    }
  }

  // Pending samples → one AudioBufferSourceNode, queued right after the previous one.
  function flush() {
    if (turn?.muted) {
      audio.pending = [];
      audio.pendingLength = 0;
    }
    if (!audio.pendingLength || !audio.ctx) return;
    const ctx = audio.ctx;
    const n = audio.pendingLength;
    const buffer = ctx.createBuffer(1, n, audio.rate);
    const x = buffer.getChannelData(0);
    let at = 0;
    for (const chunk of audio.pending) {
      for (let i = 0; i < chunk.length; i++) x[at + i] = chunk[i] / 32768;
      at += chunk.length;
    }
    audio.pending = [];
    audio.pendingLength = 0;
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(ctx.destination);
    src.onended = () => {
      audio.sources.delete(src);
      demo.samplesPlayed += n;
      showAudioInfo();
    };
    audio.sources.add(src);
    audio.nextTime = Math.max(audio.nextTime, ctx.currentTime + 0.05);
    src.start(audio.nextTime);
    audio.nextTime += n / audio.rate;
    demo.samplesScheduled += n;
  }

  function finishAudio() {
    flush();
    clearInterval(audio.flushTimer);
    audio.flushTimer = null;
    if (audio.length) {
      const link = $("download");
      if (link.href) URL.revokeObjectURL(link.href);
      link.href = URL.createObjectURL(wavBlob(audio.samples.subarray(0, audio.length), audio.rate));
      link.hidden = false;
    }
    drawWaveform();
    showAudioInfo();
  }

  function wavBlob(pcm, rate) {
    const head = new DataView(new ArrayBuffer(44));
    const text = (at, s) => [...s].forEach((ch, i) => head.setUint8(at + i, ch.charCodeAt(0)));
    text(0, "RIFF");
    head.setUint32(4, 36 + 2 * pcm.length, true);
    text(8, "WAVEfmt ");
    head.setUint32(16, 16, true); // fmt chunk size
    head.setUint16(20, 1, true); // PCM
    head.setUint16(22, 1, true); // mono
    head.setUint32(24, rate, true);
    head.setUint32(28, 2 * rate, true); // bytes per second
    head.setUint16(32, 2, true); // block align
    head.setUint16(34, 16, true); // bits per sample
    text(36, "data");
    head.setUint32(40, 2 * pcm.length, true);
    const body = new Int16Array(pcm); // little-endian on every platform browsers run on
    return new Blob([head.buffer, body.buffer], { type: "audio/wav" });
  }

  function drawWaveform() {
    const canvas = $("waveform");
    const g = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    g.clearRect(0, 0, w, h);
    g.fillStyle = "#9aa7b8";
    g.fillRect(0, h / 2, w, 1);
    const total = Math.max(audio.expected, audio.length, 1);
    const perColumn = total / w;
    g.fillStyle = "#2b6cb0";
    for (let x = 0; x < w; x++) {
      const from = Math.floor(x * perColumn);
      const to = Math.min(audio.length, Math.max(from + 1, Math.floor((x + 1) * perColumn)));
      if (from >= audio.length) break;
      let lo = 1;
      let hi = -1;
      for (let i = from; i < to; i++) {
        const v = audio.samples[i] / 32768;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      g.fillRect(x, ((1 - hi) * h) / 2, 1, Math.max(1, ((hi - lo) * h) / 2));
    }
  }

  // --- wiring ----------------------------------------------------------------------------------

  // Each sampling field gets a line for its error, which it describes; typing clears it.
  for (const el of document.querySelectorAll(".settings input")) {
    const note = document.createElement("span");
    note.className = "field-error";
    note.id = `${el.id}-error`;
    el.after(note);
    el.setAttribute("aria-describedby", note.id);
    el.addEventListener("input", () => fieldError(el, ""));
  }

  $("server-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    loadModels();
  });
  $("model").addEventListener("change", () => {
    selectModel();
    if (model) status(`${model.id} selected: a new session.`);
  });
  $("send").addEventListener("click", sendText);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) sendText();
  });
  $("cancel").addEventListener("click", cancel);
  $("audio-generate").addEventListener("click", generateAudio);
  $("audio-cancel").addEventListener("click", cancel);
  $("reset").addEventListener("click", () => {
    resetSession();
    status("New session: the next turn starts from an empty state.");
  });
  $("audio-file").addEventListener("change", onPromptFile);
  $("record").addEventListener("click", toggleRecord);
  $("clear-prompt").addEventListener("click", clearPrompt);
  loadModels();
})();

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
    underruns: 0, // times this generation's playback ran out of samples, or nearly (each a gap in the sound)
    audioContextState: () => (audio.ctx ? audio.ctx.state : "none"),
    audioContextRate: () => (audio.ctx ? audio.ctx.sampleRate : null),
    sourcesQueued: () => audio.sources.size, // AudioBufferSourceNodes scheduled and not yet ended
    recording: () => audio.recorder !== null,
  });

  // In this page's memory only (never stored); trimmed, as HTTP trims a header value: a key pasted with
  // a space around it works on the WebSocket too.
  const apiKey = () => $("api-key").value.trim();
  const MAX_SEED = 2n ** 63n - 1n; // the server's largest seed
  let models = [];
  let model = null; // the selected entry of GET /v1/models
  let conn = null; // {ws, opened, bound, dropped}
  let turn = null; // the running generation
  let contextTokens = 0;
  let refreshing = null; // the AbortController of refreshContext's request
  let starting = false; // a turn is waiting for its socket to open
  let epoch = 0; // bumped by every new session: work begun for an older one (a decode, a mic) is dropped

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

  // A 401's words: with no key typed, that this server needs one and where it goes; else to check it.
  function refusedKey() {
    return apiKey()
      ? "the server refused the API key (401): check the API key"
      : "this server needs an API key (401): type it in the API key field, then Load models";
  }

  async function api(path, signal) {
    const r = await fetch(path, { headers: authHeaders(), signal });
    if (r.status === 401) throw new Error(refusedKey());
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw Object.assign(new Error(body?.error?.message || `${path}: HTTP ${r.status}`), { status: r.status });
    }
    return r.json();
  }

  // --- sampling settings: checked here, sent only when every field is valid ----------------------

  function fieldName(el) {
    return $(`${el.id}-name`).textContent.trim();
  }

  function fieldError(el, why) {
    el.setAttribute("aria-invalid", why ? "true" : "false");
    el.nextElementSibling.textContent = why;
  }

  // The fields' values ({key: number}, absent when empty: the server's default) and, as digits, those of
  // the whole-number fields (step 1) and the seed (`whole`: messageJSON writes them as they are: a JS number
  // would round a seed above 2^53, and JSON.stringify writes 1e21 and more with an exponent, "1e+21", which
  // the server's integer fields refuse). null, with each bad field marked, the first one focused and named
  // in the status line, when any is invalid: unparseable ("1e": the browser's value is then "", so it was
  // silently dropped), or outside the field's min/max/step.
  function readSettings(fields, seedId) {
    const values = {};
    const whole = {};
    const bad = [];
    for (const [key, id] of Object.entries(fields)) {
      const el = $(id);
      let why = el.checkValidity() ? "" : el.validity.badInput ? "not a number" : el.validationMessage;
      // an exclusive lower bound (top-p > 0), which min= cannot say
      if (!why && el.dataset.gt !== undefined && el.value.trim() !== "" && !(Number(el.value) > Number(el.dataset.gt))) {
        why = `Value must be greater than ${el.dataset.gt}.`;
      }
      fieldError(el, why);
      if (why) bad.push(el);
      else if (el.value.trim() !== "") {
        const x = Number(el.value);
        if (el.step === "1" && Number.isInteger(x)) whole[key] = BigInt(x).toString();
        else values[key] = x;
      }
    }
    const el = $(seedId);
    let seed = el.value.trim();
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
    if (seed) whole.seed = BigInt(seed).toString(); // no leading zeros: JSON has none
    return { values, whole };
  }

  // msg as JSON with the `whole` fields ({key: digits}) written digit for digit, after msg's own.
  function messageJSON(msg, whole) {
    const json = JSON.stringify(msg);
    const more = Object.entries(whole).map(([key, digits]) => `,"${key}":${digits}`).join("");
    return `${json.slice(0, -1)}${more}}`;
  }

  // --- models ----------------------------------------------------------------------------------

  // While the server loads its models (GET /v1/models answers 503 and /readyz says "loading") the list is
  // asked for again, 0.5 s after the first try and 1.5 times longer each time (10 s at most). Each model
  // serves as soon as it is loaded: while /readyz still lists some as loading, the list (with the ones
  // served) is asked for again the same way, between turns, until every model is served.
  let modelsRetry = null;
  let modelsSaid = null; // the status line the last list gave (said again only when it changes)

  function askAgain(attempt) {
    const delay = Math.min(10000, 500 * 1.5 ** attempt);
    const again = () => {
      if (turn || starting) modelsRetry = setTimeout(again, delay); // a new list waits for the turn's end
      else loadModels(attempt + 1);
    };
    modelsRetry = setTimeout(again, delay);
  }

  async function loadModels(attempt = 0) {
    clearTimeout(modelsRetry);
    modelsRetry = null;
    const select = $("model");
    const readyz = () => fetch("readyz", { cache: "no-store" }).then((r) => r.json(), () => null);
    let list;
    try {
      list = (await api("v1/models")).data;
    } catch (err) {
      if (err.status === 503 && (await readyz())?.reason === "loading") {
        select.replaceChildren(new Option("(models are loading…)", ""));
        select.disabled = true;
        // said once: the status line is a live region, and a new countdown at each try ("asking again in
        // 0.8 s", "in 1.1 s", …) was read out each time, every few seconds for as long as the models loaded
        if (attempt === 0) status("The server's models are loading… (asking again until they are served)");
        askAgain(attempt);
        return;
      }
      status(`Could not load the models: ${err.message}`, true);
      return;
    }
    const ready = await readyz();
    const loading = ready?.reason === "loading" && Array.isArray(ready.loading) ? ready.loading : [];
    const previous = model?.id;
    const nothing = list.length === 0 && ready?.reason ? `: ${ready.reason}` : ".";
    models = list;
    select.replaceChildren(
      ...models.map((m) => new Option(`${m.id} (${m.kind})`, m.id, false, m.id === previous)),
    );
    select.disabled = models.length === 0;
    if (models.length === 0) status(`The server serves no model${nothing}`, true);
    else {
      let said = `${models.length} model${models.length > 1 ? "s" : ""} served.`;
      if (loading.length) said += ` Still loading: ${loading.join(", ")} (added when served).`;
      if (said !== modelsSaid || attempt === 0) status(said);
      modelsSaid = said;
    }
    if (loading.length) askAgain(attempt);
    if (previous && select.value === previous) {
      model = models.find((m) => m.id === previous); // the same model: its session goes on
      showModel();
    } else selectModel();
  }

  function selectModel() {
    model = models.find((m) => m.id === $("model").value) || null;
    resetSession();
    showDefaults(model);
    showModel();
  }

  // A model once chosen: the sampling fields show its checkpoint's defaults (generation_config), where it
  // sets them; the others hold what the user typed in them, or else the page's own defaults (another
  // model's defaults had stayed: the same model and seed then sent different settings by click history).
  // (A refreshed list keeps what the user typed.)
  function showDefaults(m) {
    const given = m?.generation_config || {};
    const fields = m?.kind === "audio"
      ? { temperature: "audio-temperature", max_new_tokens: "audio-samples" }
      : { temperature: "temperature", top_k: "top-k", top_p: "top-p", max_new_tokens: "max-new-tokens" };
    for (const [key, id] of Object.entries(fields)) {
      const el = $(id);
      if (given[key] !== null && given[key] !== undefined) {
        el.value = String(given[key]);
        delete el.dataset.edited; // (the model's value now, not the user's)
      } else if (!el.dataset.edited) el.value = el.defaultValue;
    }
  }

  // What the model is, in words (GET /v1/models has no description or model card to link to).
  function describeModel(m) {
    const what =
      m.kind === "audio"
        ? `audio: ${m.sample_rate} Hz ${m.audio_codec === "linear" ? "linearly quantized" : "mu-law"} samples ` +
          `(${m.vocab_size} levels)`
        : m.tokens === "words"
          ? `text: words (a vocabulary of ${m.vocab_size}; a newline is <eos>)`
          : m.tokens === "vocab_bytes"
            ? `text: enwik8's UTF-8 bytes (a vocabulary of ${m.vocab_size}` +
              `${m.dropped_characters?.includes("\n") ? "; newlines dropped" : ""})`
            : m.tokens === "characters"
              ? `text: text8's characters (a vocabulary of ${m.vocab_size}; lower case, any whitespace a space)`
              : m.vocab_size === 256
            ? "text: UTF-8 bytes (a vocabulary of 256)"
            : `text: a vocabulary of ${m.vocab_size} tokens`;
    const net =
      m.arch === "sashimi"
        ? `SaShiMi: a U-Net of S4 blocks over several time resolutions (${m.n_layers} at each)`
        : `${m.n_layers} S4 layers`;
    return `${what} · ${net}, d_model ${m.d_model}, d_state ${m.d_state}, ${m.kernel} kernel · ` +
      `${bytes(m.state_bytes_per_session)} of state per session`;
  }

  function showModel() {
    // the server's limit on a generation's length, checked beside the field before anything is sent
    $("max-new-tokens").max = model?.kind === "text" && model.max_new_tokens ? String(model.max_new_tokens) : "";
    $("audio-samples").max = model?.kind === "audio" && model.max_new_tokens ? String(model.max_new_tokens) : "";
    $("text-panel").hidden = model?.kind !== "text";
    $("audio-panel").hidden = model?.kind !== "audio";
    $("rate-label").textContent = model?.kind === "audio" ? "samples/s" : "tokens/s";
    $("model-info").textContent = model ? describeModel(model) : "";
    showStats();
  }

  // --- the socket: one session per socket ------------------------------------------------------

  function connect() {
    if (conn) return conn.ready;
    const url = new URL("v1/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url, wsProtocols());
    ws.binaryType = "arraybuffer";
    const c = { ws, opened: false, bound: false, dropped: false };
    c.ready = new Promise((resolve, reject) => {
      c.reject = reject;
      ws.onopen = () => {
        if (c.dropped) {
          ws.close(1000, "new session"); // dropped while it opened: it has no session yet
          return;
        }
        c.opened = true;
        resolve(c);
      };
      ws.onclose = (ev) => {
        if (c.dropped) return; // closed by New session or another model
        if (!c.opened) {
          if (conn === c) conn = null;
          reject(Object.assign(new Error("Could not open the WebSocket"), { conn: c }));
          return;
        }
        if (conn !== c) return;
        // the server closed it: the socket's session is gone, the next turn starts a new one
        refreshing?.abort(); // (its read would find it deleted: see refreshContext)
        conn = null;
        demo.sessionId = null;
        contextTokens = 0;
        const why = `The connection closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""}); ` +
          "the next turn starts a new session.";
        c.binding?.reject(Object.assign(new Error(why), { closed: true }));
        c.binding = null;
        showPromptInfo(); // (no session now)
        if (turn && turn.conn === c) endTurn(why, true);
        else {
          status(why, true);
          showStats(); // (the panel had kept showing the dead session)
        }
      };
    });
    ws.onmessage = (ev) => onFrame(c, ev.data);
    conn = c;
    return c.ready;
  }

  // Let go of the socket (the server deletes its session); one still opening is closed once it opens,
  // and the turn waiting for it is dropped without an error.
  function dropConnection() {
    if (!conn) return;
    const c = conn;
    conn = null;
    c.dropped = true;
    c.binding?.reject(Object.assign(new Error("dropped"), { closed: true })); // (bindAudio: not an error)
    c.binding = null;
    if (c.opened) c.ws.close(1000, "new session");
    else c.reject(Object.assign(new Error("dropped"), { conn: c }));
  }

  function resetSession() {
    epoch++;
    refreshing?.abort(); // (before dropConnection: see refreshContext)
    dropAnnouncement(); // (before endTurn, which would read out the rest of the turn)
    if (turn) endTurn("", false);
    stopRecording();
    dropConnection();
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
      if (turn && turn.kind === "audio" && !turn.refused) onSamples(new Int16Array(data));
      return;
    }
    const f = JSON.parse(data);
    if (f.type === "session") {
      c.bound = true;
      demo.sessionId = f.session_id;
      showStats();
      showPromptInfo(); // (a generation now continues this session)
      c.binding?.resolve();
      c.binding = null;
    } else if (turn?.refused) {
      onRefusedTurnFrame(f);
    } else if (f.type === "error") {
      let said = `Error ${f.code}: ${f.message}`;
      if (Number.isFinite(f.retry_after)) said += ` (the server asks to try again in ${f.retry_after} s)`;
      if (f.code === 404 && f.param === "session_id" && c.bound) {
        // the socket's session expired or was deleted: the server unbound the socket
        refreshing?.abort(); // (a read of it still under way would find it gone: see refreshContext)
        c.bound = false;
        demo.sessionId = null;
        contextTokens = 0;
        showPromptInfo(); // (the next generation starts a new session)
        said = "This session expired (it sat idle longer than the server keeps sessions) or was deleted. " +
          "Send again to start a new, empty session " +
          `(the ${turn?.kind === "audio" ? "audio generated before" : "text above"} is not part of it).`;
      }
      if (c.binding) {
        c.binding.reject(Object.assign(new Error(said), { frame: f })); // the session message's refusal
        c.binding = null;
      } else if (f.code === 413 && turn?.kind === "audio" && turn.promptSent && !turn.generated) {
        refuseTurn(f);
      } else if (turn) endTurn(said, true);
      else status(said, true);
    } else if (!turn) {
      // frames of a generation we stopped waiting for
    } else if (f.type === "token") {
      turn.textNode.appendData(f.text);
      followOutput();
      announce(f.text);
      turn.record.text += f.text;
      turn.record.ids += f.ids.length;
      if (f.ids.length) progress(f.ids.length);
    } else if (f.type === "audio_header") {
      startPlayback(f.sample_rate);
    } else if (f.type === "done") {
      finishTurn(f, `Done: ${f.finish_reason}, ${f.usage.completion_tokens} ${turn.unit} generated.`, false);
    }
  }

  function finishTurn(f, message, isError) {
    demo.lastDone = f;
    if (turn.record) turn.record.done = f;
    const u = f.usage;
    contextTokens = turn.contextBefore + u.prompt_tokens + u.completion_tokens;
    // A cancel (or the server's drain) while the prompt was still being ingested takes the prompt back: the
    // done frame says no prompt token was used, and the session is as it was before the turn. The prompt
    // goes back as a refused turn's does (it had stayed in the transcript, the box emptied, as if the
    // session held it; an audio prompt was dropped, and the next generation said to continue the session).
    const takenBack = f.finish_reason === "cancelled" && turn.promptTokens > 0 && u.prompt_tokens === 0;
    if (takenBack) {
      message = "Done: cancelled before the prompt was taken in: the session is as it was before this turn.";
    }
    endTurn(message, isError, isError || takenBack);
    refreshContext(f.session_id);
  }

  // An audio prompt over the server's limit (max_audio_s) is refused (413) as its binary frames arrive,
  // and the page has sent its generate message already. The server discards the frames after it and
  // refuses that generate too: the turn ends on that answer (a done frame, from an older server that ran
  // it, is not played or kept).
  function refuseTurn(f) {
    turn.refused = `Error ${f.code}: ${f.message}. The prompt was not used: choose a shorter one.`;
    turn.muted = true;
    stopPlayback();
    status(`${turn.refused} Ending the turn…`, true);
  }

  function onRefusedTurnFrame(f) {
    if (f.type === "done") finishTurn(f, turn.refused, true);
    else if (f.type === "error") endTurn(turn.refused, true);
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

  // Screen readers hear the streamed text through a polite live region of its own (#announce, not shown),
  // in pieces: what arrived in the last ANNOUNCE_MS, and the rest as the turn ends (before its "Done"). The
  // output was no live region at all (the text was never read out unless the reader went looking for it),
  // and making it one would announce every token frame, thousands a second, on its own.
  const ANNOUNCE_MS = 2000;
  const announcing = { pending: "", timer: null };

  function announce(text) {
    announcing.pending += text;
    announcing.timer ??= setTimeout(flushAnnouncement, ANNOUNCE_MS);
  }

  function flushAnnouncement() {
    clearTimeout(announcing.timer);
    announcing.timer = null;
    if (announcing.pending) $("announce").textContent = announcing.pending;
    announcing.pending = "";
  }

  // New session, another model: what was not yet read out is dropped with the text it belonged to.
  function dropAnnouncement() {
    announcing.pending = "";
    flushAnnouncement();
    $("announce").textContent = "";
  }

  // The session's own token count (the page's running count until this answers). A new session (another
  // model, a reset) aborts the request: its socket's close deletes the session, and a request the server
  // read after that was a 404 in the console. So does the session's end the page learns of from the server
  // (it closed the socket, or answered a turn that the session is gone).
  async function refreshContext(sessionId) {
    refreshing?.abort();
    const mine = (refreshing = new AbortController());
    try {
      const info = await api(`v1/sessions/${encodeURIComponent(sessionId)}`, mine.signal);
      if (sessionId === demo.sessionId && !turn) contextTokens = info.tokens;
    } catch {
      // keep the running count
    } finally {
      if (refreshing === mine) refreshing = null;
    }
    if (!mine.signal.aborted) showStats();
  }

  // The decode rate: output after the first frame over the time since it arrived (connecting and
  // ingesting the prompt come before the first frame, so they are not in it). Audio: samples/s, and how
  // many times real time that is (below 1× playback cannot keep up).
  function progress(n) {
    const now = performance.now();
    if (turn.firstAt === null) {
      turn.firstAt = now;
      turn.firstCount = n;
      if (!turn.cancelling) status("Generating…"); // the prompt is in
    }
    turn.generated += n;
    $("generated").textContent = String(turn.generated);
    const seconds = (now - turn.firstAt) / 1000;
    if (seconds > 0) {
      const rate = (turn.generated - turn.firstCount) / seconds;
      $("rate").textContent = turn.kind === "audio"
        ? `${rate.toFixed(0)} (${(rate / audio.rate).toFixed(1)}× real time)`
        : rate.toFixed(1);
    }
    contextTokens = turn.contextBefore + turn.promptTokens + turn.generated;
    showStats();
  }

  function buttons(kind) {
    return kind === "audio"
      ? { go: $("audio-generate"), stop: $("audio-cancel") }
      : { go: $("send"), stop: $("cancel") };
  }

  // promptLabel: what the server ingests before the first output ("2.5 s of audio"), or "" for none.
  function beginTurn(kind, promptTokens, promptLabel) {
    stopPlaybackButton(false);
    turn = {
      kind, conn, promptTokens, generated: 0, firstAt: null, firstCount: 0,
      contextBefore: contextTokens, unit: kind === "text" ? "tokens" : "samples",
    };
    const { go, stop } = buttons(kind);
    const focusOnGo = document.activeElement === go;
    $("send").disabled = $("audio-generate").disabled = true;
    $("cancel").disabled = $("audio-cancel").disabled = false;
    $("load-models").disabled = true; // a new model list would end the session: not during a turn
    if (focusOnGo) stop.focus(); // not lost to <body> with the disabled button
    status(promptLabel ? `Generating: ingesting the prompt (${promptLabel})…` : "Generating…");
  }

  // unused: the turn's prompt is not in the session (the turn was refused, or the prompt taken back)
  function endTurn(message, isError, unused = isError) {
    if (turn?.kind === "audio") finishAudio();
    if (turn?.kind === "audio" && unused && turn.prompt && !turn.generated && !turn.refused && !audio.prompt) {
      // refused before any sample (the session gone, busy, a bad setting, the socket closed) or taken back:
      // the server discarded the prompt with it, so it is loaded again for the next Generate (unless
      // another was)
      showPrompt(turn.prompt);
    }
    if (turn?.kind === "text" && unused && !turn.record.ids) {
      // refused before it started, or its prompt taken back: its prompt is not part of the session, so not
      // in the transcript; it goes back in the box (unless something else was typed meanwhile), to fix and
      // send again
      turn.spans.forEach((el) => el.remove());
      demo.turns.pop();
      if (!$("prompt").value) $("prompt").value = turn.record.prompt;
    }
    if (turn?.kind === "text") flushAnnouncement(); // the turn's last words, read before its status
    const { go, stop } = buttons(turn?.kind);
    const focusOnStop = document.activeElement === stop || document.activeElement === document.body;
    turn = null;
    $("send").disabled = $("audio-generate").disabled = false;
    $("cancel").disabled = $("audio-cancel").disabled = true;
    $("load-models").disabled = false;
    stopPlaybackButton(audio.sources.size > 0); // audio still queued (a model faster than real time)
    if (focusOnStop && !go.closest("[hidden]")) go.focus();
    if (message) status(message, isError);
    showStats();
  }

  function cancel() {
    if (!turn && audio.sources.size) {
      // after the turn: the audio button stops what is still queued for playback
      stopPlayback(); // (and the button is Cancel again)
      status("Playback stopped.");
      return;
    }
    if (!turn || !conn) return;
    if (turn.refused) {
      endTurn(turn.refused, true); // the server's answer never came: do not wait for it
      return;
    }
    if (turn.kind === "audio") {
      turn.muted = true; // what still arrives before the done frame is kept for the WAV, not played
      stopPlayback();
    }
    conn.ws.send(JSON.stringify({ type: "cancel" }));
    turn.cancelling = true;
    status(turn.firstAt === null && turn.promptTokens
      ? "Cancelling… (the server may finish ingesting the prompt first)"
      : "Cancelling…");
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
    // the prompt's tokens as the server counts them: its UTF-8 bytes (less the newlines an enwik8 model
    // drops: dropped_characters), a word model's words and newlines, or a text8 model's characters
    const words = model.tokens === "words";
    const chars = model.tokens === "characters";
    const promptTokens = words
      ? prompt.split("\n").reduce((n, line) => n + 1 + line.split(/\s+/).filter(Boolean).length, -1)
      : chars
        ? [...prompt].length
        : new TextEncoder().encode(model.dropped_characters?.includes("\n") ? prompt.replaceAll("\n", "") : prompt)
          .length;
    const unit = words ? "words" : chars ? "characters" : "bytes";
    const limit = model.max_prompt_tokens;
    if (limit && promptTokens > limit) {
      // not sent: the server would refuse it (413), or close the socket on a message over its frame limit
      // (1009), which ended the session and lost its context; the prompt stays in the box
      status(`Not sent: the prompt is ${promptTokens} ${unit}, more than this server takes in one turn ` +
        `(${limit}): shorten it, or send it in parts.`, true);
      return;
    }
    if (!promptTokens && (!conn?.bound || contextTokens === 0)) {
      // a new session (the first turn, after New session, another model or a closed connection) has nothing
      // to continue from: the page had sent the empty prompt, on a new socket, for the server's 422 "prompt
      // is empty and there is no session input to continue from"; nor has a bound one with no text yet (its
      // first turn's prompt taken back by a cancel while it was ingested)
      status("Not sent: a new session starts from a prompt: type one in the box " +
        "(an empty prompt continues a session's text).", true);
      $("prompt").focus();
      return;
    }
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
    beginTurn("text", promptTokens, promptTokens ? `${promptTokens} ${unit}` : "");
    turn.textNode = g.firstChild;
    turn.spans = [p, g];
    turn.record = record;
    c.ws.send(messageJSON(msg, settings.whole));
    // it is in the transcript (an empty prompt just continues the text); what was typed after it while the
    // socket opened stays, for the next turn (the whole box had been emptied)
    const box = $("prompt");
    box.value = box.value.startsWith(prompt) ? box.value.slice(prompt.length) : box.value;
  }

  // The socket, once open; null when it cannot be opened (the reason shown) or was dropped meanwhile
  // (New session, another model: nothing to show).
  async function opened() {
    starting = true;
    try {
      return await connect();
    } catch (err) {
      if (err.conn.dropped) return null;
      const why = await socketRefusal();
      if (!err.conn.dropped) status(`${err.message}: ${why}`, true);
      return null;
    } finally {
      starting = false;
    }
  }

  // A browser does not say why a handshake failed. The same request over HTTP, with the same key, does:
  // a 401 means the key; no answer means the server is down; a 429 says why in its body (this address
  // holds as many connections as S4_MAX_CONNECTIONS_PER_CLIENT allows); anything else is not the key's fault.
  async function socketRefusal() {
    let r;
    try {
      r = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
    } catch {
      return "the server does not answer (is it up?)";
    }
    if (r.status === 401) return refusedKey();
    if (r.status === 429) {
      const said = await r.json().then((b) => b.error.message, () => "too many requests");
      return `the server refused it (429): ${said}`;
    }
    return `the connection failed, though the server answers (HTTP ${r.status}): try again`;
  }

  // --- audio: prompt in, samples out (played as they stream, drawn as they grow) ---------------

  const audio = {
    ctx: null, ctxRate: null, rate: 8000, nextFrame: 0, started: false, pending: [], pendingLength: 0,
    flushTimer: null, sources: new Set(), samples: new Int16Array(0), length: 0, expected: 0, prompt: null,
    recorder: null, dirty: false, out: null,
  };

  // Silence what is queued or playing (Cancel, New session, a new generation's reset): a stopped source
  // counts as not played. The sound fades to 0 over FADE_S first (a cut mid-wave clicks); audio queued
  // after this plays through a new gain node, which the fade does not touch.
  const FADE_S = 0.02;

  function stopPlayback() {
    const out = audio.out;
    audio.out = null;
    let end = 0; // (now)
    if (out && audio.sources.size && out.context.state === "running") {
      end = out.context.currentTime + FADE_S;
      out.gain.setValueAtTime(out.gain.value, out.context.currentTime);
      out.gain.linearRampToValueAtTime(0, end);
    }
    for (const src of audio.sources) {
      src.onended = null;
      src.stop(end);
    }
    audio.sources.clear();
    if (out) setTimeout(() => out.disconnect(), 1000 * FADE_S + 100);
    if (!turn) stopPlaybackButton(false);
  }

  // The gain node this turn's audio plays through (one per context, until stopPlayback fades it out).
  function output(ctx) {
    if (!audio.out || audio.out.context !== ctx) {
      audio.out = ctx.createGain();
      audio.out.connect(ctx.destination);
    }
    return audio.out;
  }

  // Between turns the audio panel's Cancel button reads "Stop playback" while generated audio is still
  // queued (a model several times faster than real time leaves most of it to play after its done frame).
  // Disabling it moves the keyboard focus it holds to Generate and play, as the end of a turn does from
  // Cancel (pressed from the keyboard, or focused as the audio played out, it had left the focus on <body>).
  function stopPlaybackButton(on) {
    const b = $("audio-cancel");
    b.textContent = on ? "Stop playback" : "Cancel";
    if (turn) return;
    const focused = document.activeElement === b;
    b.disabled = !on;
    if (focused && !on) $("audio-generate").focus();
  }

  function resetAudio() {
    stopPlayback();
    audio.samples = new Int16Array(0);
    audio.length = 0;
    audio.pending = [];
    audio.pendingLength = 0;
    audio.started = false;
    demo.samplesReceived = demo.samplesScheduled = demo.samplesPlayed = demo.underruns = 0;
    $("download").hidden = true;
    showAudioInfo();
    drawWaveform();
    describeWaveform();
  }

  function showAudioInfo() {
    $("audio-info").textContent =
      `${demo.samplesReceived} samples received, ${demo.samplesScheduled} scheduled for playback, ` +
      `${demo.samplesPlayed} played; playback fell behind ${demo.underruns} time${demo.underruns === 1 ? "" : "s"}`;
  }

  // An AudioContext that runs at the model's rate: each queued buffer then plays sample for sample, and the
  // browser resamples the context's one continuous output for the speakers. (A context at the device's rate,
  // 44.1 or 48 kHz, resampled each ~0.1 s buffer on its own: every seam between two buffers came out up to
  // 0.06 off the signal, a tick ten times a second.) A browser that refuses the rate gets its own.
  function audioContext(rate) {
    // Created (or resumed) inside the click handler: browsers start audio only after a user gesture.
    if (audio.ctx && audio.ctxRate !== rate) {
      audio.ctx.close();
      audio.ctx = null;
    }
    if (!audio.ctx) {
      try {
        audio.ctx = new AudioContext({ sampleRate: rate });
      } catch {
        audio.ctx = new AudioContext();
      }
      audio.ctxRate = rate;
    }
    if (audio.ctx.state === "suspended") audio.ctx.resume();
    return audio.ctx;
  }

  // Decoded and resampled to the model's rate by an OfflineAudioContext, mixed down to mono.
  async function decodePrompt(blob, rate) {
    const buf = await new OfflineAudioContext(1, 1, rate).decodeAudioData(await blob.arrayBuffer());
    const mono = new Float32Array(buf.length);
    for (let ch = 0; ch < buf.numberOfChannels; ch++) {
      const x = buf.getChannelData(ch);
      for (let i = 0; i < x.length; i++) mono[i] += x[i] / buf.numberOfChannels;
    }
    const pcm = new Int16Array(mono.length);
    for (let i = 0; i < mono.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(mono[i] * 32768)));
    return pcm;
  }

  // The prompt for the next turn, or with a failed decode none (not the one loaded before).
  async function loadPrompt(blob, what, loaded) {
    const started = epoch;
    const rate = model.sample_rate;
    let pcm;
    try {
      pcm = await decodePrompt(blob, rate);
    } catch (err) {
      if (started !== epoch) return;
      clearPrompt();
      status(`Could not decode ${what}: ${err.message}. No prompt is loaded.`, true);
      return;
    }
    if (started !== epoch) return; // another model or a new session meanwhile
    showPrompt(pcm);
    status(loaded);
  }

  function showPrompt(pcm) {
    audio.prompt = pcm;
    showPromptInfo();
  }

  // What the next audio turn starts from: the loaded prompt, else the socket's session, else the model's
  // silence. (It said "continues the session" for any open socket: one whose session the server said was
  // gone, or whose first session was refused, has none, and its next turn starts from the silence.)
  function showPromptInfo() {
    const pcm = audio.prompt;
    const rate = model?.sample_rate;
    $("prompt-info").textContent = pcm
      ? `prompt: ${pcm.length} samples (${(pcm.length / rate).toFixed(2)} s at ${rate} Hz)`
      : conn?.bound
        ? "no new prompt: the next generation continues the session"
        : "no prompt: starts from the model's silence";
  }

  async function onPromptFile() {
    const file = $("audio-file").files[0];
    if (!file || !model) return;
    await loadPrompt(file, file.name, `Prompt loaded from ${file.name}.`);
  }

  async function toggleRecord() {
    if (audio.recorder) {
      audio.recorder.stop();
      return;
    }
    const started = epoch;
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      status(`No microphone: ${err.message}`, true);
      return;
    }
    if (started !== epoch || audio.recorder) {
      stream.getTracks().forEach((t) => t.stop()); // another model or a new session meanwhile
      return;
    }
    const chunks = [];
    const rec = new MediaRecorder(stream);
    rec.ondataavailable = (ev) => chunks.push(ev.data);
    rec.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      if (audio.recorder !== rec) return; // dropped by stopRecording
      audio.recorder = null;
      showRecording(false);
      loadPrompt(new Blob(chunks, { type: rec.mimeType }), "the recording", "Recorded prompt loaded.");
    };
    audio.recorder = rec;
    rec.start();
    showRecording(true);
    status("Recording… press Stop recording when done.");
  }

  function showRecording(on) {
    // the label says what a press does; no aria-pressed beside it (WAI-ARIA APG: a toggle's label
    // stays the same, or it changes and the button is a plain one, never both)
    $("record").textContent = on ? "Stop recording" : "Record";
  }

  // Another model or a new session: the recording is dropped and the microphone released.
  function stopRecording() {
    const rec = audio.recorder;
    if (!rec) return;
    audio.recorder = null;
    rec.stop();
    rec.stream.getTracks().forEach((t) => t.stop());
    showRecording(false);
  }

  function clearPrompt() {
    audio.prompt = null;
    $("audio-file").value = "";
    showPromptInfo();
  }

  // An audio prompt's binary frames: 512 samples, 1 KiB, the lowest frame limit a server may set
  // (S4_WS_MAX_FRAME_BYTES ≥ 1024). They were 8,192 samples (16 KiB): a server whose limit was below that
  // closed the socket (1009) on the first frame, so no prompt over a few hundred samples could be sent there.
  const PROMPT_FRAME_SAMPLES = 512;

  async function generateAudio() {
    if (!model || turn || starting) return;
    const settings = readSettings({ max_new_tokens: "audio-samples", temperature: "audio-temperature" }, "audio-seed");
    if (!settings) return;
    // a prompt over this server's limit (max_prompt_tokens: S4_MAX_AUDIO_S at the model's rate) is not sent;
    // a server that does not list its limit refuses it with a 413 as the frames arrive (onFrame)
    const limit = model.max_prompt_tokens;
    if (audio.prompt && limit && audio.prompt.length > limit) {
      const s = (n) => (n / model.sample_rate).toFixed(2);
      status(`Not sent: the prompt is ${s(audio.prompt.length)} s, longer than this server takes ` +
        `(${s(limit)} s, ${limit} samples): choose a shorter one.`, true);
      return;
    }
    stopPlayback(); // the last turn's audio still queued (and "Stop playback" with it): a new one starts
    audioContext(model.sample_rate);
    const c = await opened();
    if (!c) return;
    if (!c.bound && !(await bindAudio(c))) return;
    // without a prompt a new session starts from the model's silence (the server's one-token prompt)
    const prompt = audio.prompt;
    if (prompt) {
      // binary frames of s16le prompt samples, each within any server's frame limit
      for (let i = 0; i < prompt.length; i += PROMPT_FRAME_SAMPLES) {
        c.ws.send(prompt.slice(i, i + PROMPT_FRAME_SAMPLES).buffer);
      }
      clearPrompt(); // it is part of the session now (loaded again if the turn is refused: endTurn)
    }
    resetAudio();
    audio.expected = Number(settings.whole.max_new_tokens ?? 0);
    const seconds = prompt ? `${(prompt.length / model.sample_rate).toFixed(1)} s of audio` : "";
    beginTurn("audio", prompt ? prompt.length : 0, seconds);
    turn.promptSent = !!prompt;
    turn.prompt = prompt;
    c.ws.send(messageJSON({ type: "generate", audio_encoding: "pcm16", ...settings.values }, settings.whole));
  }

  // A new socket's session, bound before any prompt frame is sent: binary frames need a bound socket,
  // and a refused session message (all session slots in use, the model gone, still loading) is the
  // error to show; sent together, the frames' and the generate's own refusals (422 "bind an audio model
  // first", "must name a model") had come after it and replaced it in the status line.
  async function bindAudio(c) {
    const started = epoch;
    starting = true;
    try {
      await new Promise((resolve, reject) => {
        c.binding = { resolve, reject };
        c.ws.send(JSON.stringify({ type: "session", model: model.id, audio_encoding: "pcm16" }));
      });
      return started === epoch && conn === c;
    } catch (err) {
      if (started === epoch && !err.closed) status(err.message, true);
      return false;
    } finally {
      starting = false;
    }
  }

  function startPlayback(rate) {
    audioContext(rate);
    audio.rate = rate;
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

  // Pending samples → one AudioBufferSourceNode, queued right after the previous one. The first starts
  // a quarter second after the first samples arrive (a jitter buffer); a later one whose slot has passed
  // or is too near to keep means playback ran out of samples (fell behind real time): counted in
  // demo.underruns, one for each gap in the sound.
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
    src.connect(output(ctx));
    src.onended = () => {
      audio.sources.delete(src);
      demo.samplesPlayed += n;
      showAudioInfo();
      if (!turn && !audio.sources.size) stopPlaybackButton(false); // played out
    };
    audio.sources.add(src);
    // in whole samples at the model's rate: one buffer starts on the sample after the last one's end, unless
    // that slot is under 50 ms away (or past): it then starts 50 ms on, a gap, counted (one under 50 ms away
    // had been moved the same and not counted)
    const now = Math.ceil(ctx.currentTime * audio.rate);
    const margin = Math.round(audio.rate / 20);
    if (!audio.started) audio.nextFrame = now + Math.round(audio.rate / 4);
    else if (audio.nextFrame < now + margin) {
      demo.underruns++;
      audio.nextFrame = now + margin;
    }
    audio.started = true;
    src.start(audio.nextFrame / audio.rate);
    audio.nextFrame += n;
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
    describeWaveform();
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

  // The waveform's text alternative: what the picture shows, in words (it had said "Waveform of the
  // generated audio" whether it held nothing or a minute of sound). Set when the audio is reset or
  // complete, not as it grows.
  function describeWaveform() {
    const n = audio.length;
    let peak = 0;
    for (let i = 0; i < n; i++) peak = Math.max(peak, Math.abs(audio.samples[i]));
    $("waveform").setAttribute(
      "aria-label",
      n
        ? `Waveform of the generated audio: ${n} samples (${(n / audio.rate).toFixed(2)} s at ` +
            `${audio.rate} Hz), peak ${Math.round((100 * peak) / 32768)} % of full scale`
        : "Waveform of the generated audio: none yet",
    );
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

  // Each sampling field gets a line for its error, which it describes; typing clears it. Its name is its
  // label's words alone (aria-labelledby): named by the whole label, a field said its error twice, in its
  // name and in its description, and a screen reader heard a field called "temperature Value must be…".
  for (const el of document.querySelectorAll(".settings input")) {
    const label = el.closest("label");
    const name = document.createElement("span");
    name.id = `${el.id}-name`;
    name.append(label.firstChild); // the label's words, before the field
    label.prepend(name);
    el.setAttribute("aria-labelledby", name.id);
    const note = document.createElement("span");
    note.className = "field-error";
    note.id = `${el.id}-error`;
    el.after(note);
    el.setAttribute("aria-describedby", note.id);
    el.addEventListener("input", () => {
      fieldError(el, "");
      el.dataset.edited = "1"; // typed by the user: another model's choice keeps it (showDefaults)
    });
  }
  $("server-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (turn || starting) return; // Load models is disabled meanwhile (a new list ends the session)
    loadModels();
  });
  $("model").addEventListener("change", () => {
    selectModel();
    if (model) status(`${model.id} selected: a new session.`);
  });
  $("send").addEventListener("click", sendText);
  // Ctrl+Enter (⌘+Enter) generates, once per press: a key held down repeats its keydown some 30 times a
  // second, and each repeat after a quick turn had ended started another turn.
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !ev.repeat) sendText();
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
  // (the prompt line beside it is no live region: without a status the click was silent to a screen reader)
  $("clear-prompt").addEventListener("click", () => {
    clearPrompt();
    const next = conn?.bound ? "continues the session" : "starts from the model's silence";
    status(`Prompt cleared: the next generation ${next}.`);
  });
  loadModels();
})();

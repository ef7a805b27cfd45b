// The player page of one stream: LL-HLS with hls.js, a latency readout, and the stream's chat.
// Every URL is relative to the page (/APP/NAME), so it works directly and through an edge.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const name = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
  const base = encodeURIComponent(name);
  const video = $("video");
  const verge = (window.verge = { name: name, hls: null, chat: null });

  document.title = name + " · Verge live";
  $("title").textContent = name;

  // ----- video ---------------------------------------------------------------------------
  function notice(text) {
    $("notice").hidden = !text;
    $("notice").textContent = text || "";
  }

  function setState(text, live) {
    $("state").textContent = text;
    $("state").classList.toggle("live", !!live);
  }

  function play() {
    const promise = video.play();
    if (promise) promise.catch(() => notice("Press play to start (the browser blocked autoplay)."));
  }

  function startHls() {
    const hls = new window.Hls({ lowLatencyMode: true, backBufferLength: 30 });
    verge.hls = hls;
    hls.on(window.Hls.Events.MANIFEST_PARSED, () => {
      notice("");
      play();
    });
    hls.on(window.Hls.Events.ERROR, (_event, data) => {
      if (!data.fatal) return;
      if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR) {
        hls.recoverMediaError();
        return;
      }
      // the stream is not live (yet), or the network failed: start over in a moment
      setState("offline");
      notice("Waiting for the stream… (" + data.details + ")");
      hls.destroy();
      setTimeout(startHls, 2000);
    });
    hls.loadSource(base + ".m3u8");
    hls.attachMedia(video);
  }

  function startVideo() {
    if (window.Hls && window.Hls.isSupported()) {
      startHls();
    } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
      video.src = base + ".m3u8"; // Safari: native (LL-)HLS
      play();
    } else {
      setState("no player");
      notice("hls.js is missing: run scripts/vendor-web.sh (make install) on the server.");
    }
  }

  function seconds(value) {
    return Number.isFinite(value) ? value.toFixed(1) + " s" : "–";
  }

  function bufferAhead() {
    const ranges = video.buffered;
    for (let i = 0; i < ranges.length; i++) {
      if (ranges.start(i) <= video.currentTime && video.currentTime <= ranges.end(i)) {
        return ranges.end(i) - video.currentTime;
      }
    }
    return NaN;
  }

  // latency as hls.js sees it (live edge minus playhead), and against the wall clock via the
  // playlist's EXT-X-PROGRAM-DATE-TIME (glass-to-glass minus the encoder's own delay)
  function updateStats() {
    const hls = verge.hls;
    if (!hls) return;
    const target = hls.targetLatency;
    $("latency").textContent = seconds(hls.latency) +
      (Number.isFinite(target) ? " (target " + target.toFixed(1) + " s)" : "");
    const date = hls.playingDate;
    $("clock").textContent = date ? seconds((Date.now() - date.getTime()) / 1000) : "–";
    $("buffer").textContent = seconds(bufferAhead());
    const level = hls.levels && hls.levels[hls.currentLevel];
    $("level").textContent = level ? (level.height ? level.height + "p" : "audio") +
      (level.bitrate ? " · " + Math.round(level.bitrate / 1000) + " kb/s" : "") : "–";
    if (!video.paused && video.readyState >= 3) setState("live", true);
  }

  // ----- chat ----------------------------------------------------------------------------
  const messages = $("messages");
  const form = $("chat-form");
  const nameInput = $("chat-name");
  const textInput = $("chat-text");
  let retry = 1000;

  nameInput.value = localStorage.getItem("verge.chat.name") || "";

  // The server sends name and text HTML-escaped; decode to plain text and show it as text
  // (never as markup), so "<b>hi</b>" reads as typed.
  function plain(escaped) {
    return new DOMParser().parseFromString(String(escaped), "text/html").documentElement.textContent;
  }

  function append(li) {
    const atBottom = messages.scrollTop + messages.clientHeight >= messages.scrollHeight - 8;
    messages.append(li);
    while (messages.children.length > 200) messages.firstElementChild.remove();
    if (atBottom) messages.scrollTop = messages.scrollHeight;
  }

  function showMessage(msg) {
    const li = document.createElement("li");
    li.className = "message";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = new Date(msg.ts).toLocaleTimeString();
    const who = document.createElement("span");
    who.className = "name";
    who.textContent = plain(msg.name);
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = plain(msg.text);
    li.append(time, who, text);
    append(li);
  }

  function showSystem(text) {
    const li = document.createElement("li");
    li.className = "system";
    li.textContent = text;
    append(li);
  }

  function chatState(text) {
    $("chat-state").textContent = text;
  }

  function connectChat() {
    const url = new URL(base + "/chat", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    verge.chat = ws;
    form.querySelector("button").disabled = true;
    ws.onopen = () => {
      retry = 1000;
      chatState("connected");
      form.querySelector("button").disabled = false;
    };
    ws.onmessage = (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      if (msg.type === "message") {
        showMessage(msg);
      } else if (msg.type === "hello") {
        $("viewers").textContent = msg.viewers + 1 + " here";
        (msg.history || []).forEach(showMessage);
      } else if (msg.type === "error") {
        showSystem(msg.error);
      }
    };
    ws.onclose = (event) => {
      form.querySelector("button").disabled = true;
      const wait = event.code === 1008 ? 10000 : retry;
      retry = Math.min(retry * 2, 30000);
      chatState("disconnected" + (event.reason ? " (" + event.reason + ")" : "") +
        "; reconnecting in " + Math.round(wait / 1000) + " s");
      setTimeout(connectChat, wait);
    };
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const ws = verge.chat;
    const text = textInput.value.trim();
    if (!ws || ws.readyState !== WebSocket.OPEN || !text) return;
    const who = nameInput.value.trim();
    localStorage.setItem("verge.chat.name", who);
    ws.send(JSON.stringify({ name: who, text: text }));
    textInput.value = "";
    textInput.focus();
  });

  startVideo();
  setInterval(updateStats, 500);
  connectChat();
})();

// The player page of one stream: LL-HLS with hls.js or real-time WebRTC (WHEP), a latency
// readout for both, and the stream's chat. Every URL is relative to the page (/APP/NAME), so
// it works directly and through an edge. ?mode=webrtc starts in WebRTC.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const name = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
  const base = encodeURIComponent(name);
  const video = $("video");
  const verge = (window.verge = { name: name, hls: null, chat: null, rtc: null, mode: "hls" });

  document.title = name + " · Verge live";
  $("title").textContent = name;
  // /vod/NAME: the same page for an on-demand entry (no chat, no WebRTC)
  const vod = location.pathname.split("/")[1] === "vod";
  if (vod) {
    document.body.classList.add("vod");
    document.title = name + " · Verge";
  }

  // ----- video ---------------------------------------------------------------------------
  function notice(text) {
    $("notice").hidden = !text;
    $("notice").textContent = text || "";
  }

  function flash(text) {
    notice(text);
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => $("notice").textContent === text && notice(""), 4000);
  }

  function setState(text, live) {
    $("state").textContent = vod && live ? "on demand" : text;
    $("state").classList.toggle("live", !!live && !vod);
  }

  function play() {
    const promise = video.play();
    if (promise) promise.catch(() => notice("Press play to start (the browser blocked autoplay)."));
  }

  // Low latency: hls.js holds back the playlist's PART-HOLD-BACK (two part targets by default:
  // stream.part_hold_back) behind the live edge; after a stall it adds a fifth of a second, not
  // hls.js' whole second per stall, and plays up to 1.25x until it is back at its target (hls.js
  // does that only with more than a second buffered; catchUp() below handles falling far behind).
  const HLS_CONFIG = {
    lowLatencyMode: true,
    backBufferLength: 30,
    liveSyncOnStallIncrease: 0.2,
    maxLiveSyncPlaybackRate: 1.25,
  };
  const CATCH_UP_AFTER = 0.5; // seconds later than the target: skip ahead to it
  // hls.js keeps what a stall added to its target for the rest of the session, so a stall while
  // starting (or under a passing load) cost every later second 0.2 s of latency (measured: a
  // target of 0.9 s instead of 0.5 after two stalls at start-up). After SETTLE_AFTER seconds
  // without a stall the target comes down one step, to the playlist's PART-HOLD-BACK at least;
  // a player that keeps stalling keeps its raised target.
  const SETTLE_AFTER = 10;
  const settling = { quietSince: performance.now() };
  video.addEventListener("waiting", () => (settling.quietSince = performance.now()));

  /** Lower a raised target latency by one stall's step once ``state.quietSince`` is
   * SETTLE_AFTER seconds ago (``now``: performance.now()); the step restarts the wait. */
  function settleLatency(hls, state, now) {
    const level = hls.levels && hls.levels[hls.currentLevel];
    const floor = level && level.details ? level.details.partHoldBack : NaN;
    const target = hls.targetLatency;
    if (!(floor > 0) || !Number.isFinite(target) || target <= floor + 0.01) return;
    if (now - state.quietSince < SETTLE_AFTER * 1000) return;
    hls.targetLatency = Math.max(floor, target - HLS_CONFIG.liveSyncOnStallIncrease);
    state.quietSince = now;
  }
  verge.settleLatency = settleLatency; // (tests)
  let rewound = false; // went back to a scene on purpose: no catching up until back at live

  // Playback starts at a keyframe, up to a GOP before hls.js' target, and a stall leaves it
  // later still; hls.js speeds up only with over a second buffered. Skip ahead within what is
  // buffered (no download, the decoder has the GOP) when it is half a second late.
  function catchUp(hls) {
    const late = hls.latency - hls.targetLatency;
    const to = hls.liveSyncPosition;
    if (rewound) {
      rewound = !(late <= CATCH_UP_AFTER);
      return;
    }
    if (!(late > CATCH_UP_AFTER) || video.paused || !Number.isFinite(to)) return;
    if (to > video.currentTime && to < video.currentTime + bufferAhead() - 0.1) {
      video.currentTime = to;
    }
  }

  function startHls() {
    const hls = new window.Hls(HLS_CONFIG);
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
      verge.hls = null;
      setTimeout(() => verge.mode === "hls" && !verge.hls && startHls(), 2000);
    });
    hls.loadSource(base + ".m3u8");
    hls.attachMedia(video);
  }

  function startLlHls() {
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

  function stopHls() {
    if (verge.hls) verge.hls.destroy();
    verge.hls = null;
    video.removeAttribute("src");
  }

  // ----- real-time: WebRTC over WHEP (POST the offer, DELETE the session when done) ----------
  function iceGathered(pc, timeoutMs) {
    // the server takes no trickled candidates: the offer must carry ours
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => pc.iceGatheringState === "complete" && resolve();
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, timeoutMs);
    });
  }

  async function startWebRtc() {
    const pc = new RTCPeerConnection();
    const session = { pc: pc, location: null, retry: null };
    verge.rtc = session;
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const stream = new MediaStream();
    pc.ontrack = (event) => {
      // real time: play each frame as soon as it is decodable (Chromium's playout-delay hint;
      // the jitter buffer still grows if the network makes it)
      if ("playoutDelayHint" in event.receiver) event.receiver.playoutDelayHint = 0;
      stream.addTrack(event.track);
      video.srcObject = stream;
      play();
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed" && verge.rtc === session) restartWebRtc("connection failed");
    };
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await iceGathered(pc, 2000);
      const response = await fetch(base + "/whep", {
        method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp,
      });
      const text = await response.text();
      if (response.status !== 201) throw new Error(text.trim() || "HTTP " + response.status);
      session.location = new URL(response.headers.get("Location"), location.href).href;
      await pc.setRemoteDescription({ type: "answer", sdp: text });
      notice("");
    } catch (error) {
      if (verge.rtc === session) restartWebRtc(error.message);
    }
  }

  function restartWebRtc(reason) {
    setState("offline");
    notice("Waiting for the stream… (" + reason + ")");
    stopWebRtc();
    verge.rtc = { retry: setTimeout(startWebRtc, 3000) };
  }

  function stopWebRtc() {
    const session = verge.rtc;
    verge.rtc = null;
    if (!session) return;
    clearTimeout(session.retry);
    if (session.location) fetch(session.location, { method: "DELETE", keepalive: true }).catch(() => {});
    if (session.pc) session.pc.close();
    video.srcObject = null;
  }

  function startVideo(mode) {
    stopWebRtc();
    stopHls();
    verge.mode = mode;
    rewound = false;
    $("mode").value = mode;
    ["latency", "clock", "buffer", "level"].forEach((id) => ($(id).textContent = "–"));
    setState("connecting");
    if (mode === "webrtc") startWebRtc();
    else startLlHls();
  }

  function seconds(value) {
    return Number.isFinite(value) ? value.toFixed(1) + " s" : "–";
  }

  function millis(value) {
    return Number.isFinite(value) ? Math.round(value * 1000) + " ms" : "–";
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
  // playlist's EXT-X-PROGRAM-DATE-TIME, which the server anchors at each frame's arrival at the
  // ingest (glass-to-glass minus the publisher's own encoding and upload)
  function updateStats() {
    if (verge.mode === "webrtc") {
      updateRtcStats();
      return;
    }
    const hls = verge.hls;
    if (!hls) return;
    settleLatency(hls, settling, performance.now());
    const target = hls.targetLatency;
    catchUp(hls);
    $("latency").textContent = seconds(hls.latency) +
      (Number.isFinite(target) ? " (target " + target.toFixed(1) + " s)" : "");
    const date = hls.playingDate;
    $("clock").textContent = date ? seconds((Date.now() - date.getTime()) / 1000) : "–";
    $("buffer").textContent = seconds(bufferAhead());
    const level = hls.levels && hls.levels[hls.currentLevel];
    $("level").textContent = level ? (level.height ? level.height + "p" : "audio") +
      (level.bitrate ? " · " + Math.round(level.bitrate / 1000) + " kb/s" : "") : "–";
    if (!video.paused && video.readyState >= 3) setState("live", true);
    if (!vod && analysis.result) placeMarks();
  }

  // WebRTC: the receiver's playout delay (jitter buffer) plus half the round trip; and the
  // played frame's send time (the server's RTCP sender reports map RTP time to its clock)
  // against this clock, which is the server's own on one machine or with NTP.
  const NTP_EPOCH_MS = 2208988800000;
  async function updateRtcStats() {
    const pc = verge.rtc && verge.rtc.pc;
    if (!pc) return;
    let inbound = null;
    let rtt = NaN;
    (await pc.getStats()).forEach((stat) => {
      if (stat.type === "inbound-rtp" && stat.kind === "video") inbound = stat;
      if (stat.type === "candidate-pair" && stat.nominated && stat.currentRoundTripTime !== undefined) {
        rtt = stat.currentRoundTripTime;
      }
    });
    if (!inbound) return;
    const playout = inbound.jitterBufferEmittedCount
      ? inbound.jitterBufferDelay / inbound.jitterBufferEmittedCount : NaN;
    const latency = playout + (Number.isFinite(rtt) ? rtt / 2 : 0);
    $("latency").textContent = millis(latency) + " (jitter buffer" +
      (Number.isFinite(rtt) ? " + RTT/2" : "") + ")";
    const sent = inbound.estimatedPlayoutTimestamp;
    $("clock").textContent = sent ? millis((Date.now() - (sent - NTP_EPOCH_MS)) / 1000) : "–";
    $("buffer").textContent = "–";
    $("level").textContent = video.videoWidth
      ? video.videoHeight + "p · H.264 pass-through" : "–";
    if (!video.paused && video.readyState >= 3) setState("live", true);
  }

  // ----- analysis: scene chapters (WebVTT track + list) and thumbnails while scrubbing -------
  // NAME/analysis (verge.stream.analysis): scenes [{time, thumbnail}], thumbnails [{time, url}],
  // chapters (a WebVTT URL). Times are seconds from the start: of the video, or of a live
  // stream's analysis run, whose start on the wall clock is started_at (Unix seconds).
  const analysis = (verge.analysis = { result: null, track: null, previews: [] });

  function clock(t) {
    const s = Math.max(0, Math.floor(t));
    const hms = [Math.floor(s / 3600), Math.floor(s / 60) % 60, s % 60];
    return (hms[0] ? hms[0] + ":" : "") + hms.slice(1).map((n, i) =>
      i || hms[0] ? String(n).padStart(2, "0") : String(n)).join(":");
  }

  // VOD: a scene's time is the video's own. Live: it counts from the start of the analysis
  // run, which the result's started_at puts on the wall clock (Unix seconds, anchored like the
  // playlists' PROGRAM-DATE-TIME), and the PROGRAM-DATE-TIMEs of hls.js' fragments put the wall
  // clock on the video's timeline. WebRTC plays only the present: nothing to seek in.
  function seek(time) {
    if (!Number.isFinite(time)) return;
    if (vod) {
      video.currentTime = time;
      return;
    }
    if (verge.mode !== "hls") return;
    const to = liveTime(time);
    const range = liveWindow();
    if (!Number.isFinite(to) || !range) {
      flash("The scenes of this stream cannot be found in the video (yet).");
    } else if (to < range.start - 0.25) {
      flash("That scene is no longer in the live window.");
    } else {
      rewound = true;
      video.currentTime = Math.min(Math.max(to, range.start), range.end); // newer: the live edge
    }
  }

  function levelDetails() {
    const hls = verge.hls;
    for (const index of hls && hls.levels ? [hls.currentLevel, hls.loadLevel] : []) {
      const details = hls.levels[index] && hls.levels[index].details;
      if (details && details.fragments.length) return details;
    }
    return null;
  }

  // A live scene's time on the media element: from the last fragment dated at or before it
  // (the first one if none is: then it is before the window).
  function liveTime(time) {
    const startedAt = analysis.result && analysis.result.started_at;
    if (!Number.isFinite(startedAt)) return NaN;
    const wall = (startedAt + time) * 1000; // milliseconds, as hls.js keeps programDateTime
    const details = levelDetails();
    if (!details) { // Safari's own HLS: getStartDate() is the PROGRAM-DATE-TIME of time 0
      const zero = !verge.hls && video.getStartDate ? video.getStartDate().getTime() : NaN;
      return (wall - zero) / 1000;
    }
    const dated = details.fragments.filter((f) => Number.isFinite(f.programDateTime));
    let anchor = dated[0];
    for (const frag of dated) if (frag.programDateTime <= wall) anchor = frag;
    return anchor ? anchor.start + (wall - anchor.programDateTime) / 1000 : NaN;
  }

  // The other way: a live time on the media element -> scene time (NaN if it cannot be told).
  function sceneTime(at) {
    const startedAt = analysis.result && analysis.result.started_at;
    const details = levelDetails();
    if (!Number.isFinite(startedAt) || !details) return NaN;
    const dated = details.fragments.filter((f) => Number.isFinite(f.programDateTime));
    let anchor = dated[0];
    for (const frag of dated) if (frag.start <= at) anchor = frag;
    return anchor ? (anchor.programDateTime + (at - anchor.start) * 1000) / 1000 - startedAt : NaN;
  }

  // What can be seeked to: the element's seekable range, from the first fragment the playlist
  // still lists (hls.js' live seekable range starts at 0 unless liveDurationInfinity).
  function liveWindow() {
    const ranges = video.seekable;
    if (!ranges.length) return null;
    const last = ranges.length - 1;
    const details = levelDetails();
    const start = Math.max(ranges.start(last), details ? details.fragments[0].start : -Infinity);
    return ranges.end(last) > start ? { start: start, end: ranges.end(last) } : null;
  }

  function showChapters(result) {
    if (result.chapters && (!analysis.track || analysis.track.src !== new URL(result.chapters, location.href).href)) {
      if (analysis.track) analysis.track.remove();
      const track = document.createElement("track");
      track.kind = "chapters";
      track.label = "Scenes";
      track.srclang = "en";
      track.src = result.chapters;
      video.append(track);
      track.track.mode = "hidden"; // loaded (cues available) without being rendered
      analysis.track = track;
    }
    const starts = [{ time: 0, thumbnail: (result.thumbnails[0] || {}).url }].concat(
      result.scenes.filter((scene) => scene.time > 0));
    const list = $("chapters");
    list.replaceChildren(...starts.map((scene, i) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.time = scene.time;
      if (scene.thumbnail) {
        const img = document.createElement("img");
        img.src = scene.thumbnail;
        img.alt = "";
        button.append(img);
      }
      const label = document.createElement("span");
      label.textContent = "Scene " + (i + 1) + " · " + clock(scene.time);
      button.append(label);
      button.addEventListener("click", () => seek(scene.time));
      li.append(button);
      return li;
    }));
    $("chapters-box").hidden = starts.length < 2;
  }

  function showScrub(result) {
    analysis.previews = result.thumbnails.map((t) => ({ time: t.time, url: t.url }))
      .concat(result.scenes.filter((s) => s.thumbnail).map((s) => ({ time: s.time, url: s.thumbnail })))
      .sort((a, b) => a.time - b.time);
    $("scrub-marks").replaceChildren(...result.scenes.map((scene) => {
      const mark = document.createElement("span");
      mark.dataset.time = scene.time;
      return mark;
    }));
    placeMarks();
    $("scrub").hidden = analysis.previews.length === 0;
  }

  // The scene times the scrub bar spans: the whole video, or for live HLS the window that can be
  // seeked to (mapped to scene time; it slides, so updateStats places the marks again).
  function scrubSpan() {
    const range = !vod && verge.mode === "hls" ? liveWindow() : null;
    const from = range ? sceneTime(range.start) : NaN;
    const to = range ? sceneTime(range.end) : NaN;
    return to > from ? { from: from, length: to - from } : { from: 0, length: timelineLength() };
  }

  function placeMarks() {
    const span = scrubSpan();
    for (const mark of $("scrub-marks").children) {
      const at = (mark.dataset.time - span.from) / span.length;
      mark.hidden = !(at >= 0 && at <= 1);
      mark.style.left = 100 * at + "%";
    }
  }

  function timelineLength() {
    const duration = vod && Number.isFinite(video.duration) ? video.duration : 0;
    return Math.max(duration, (analysis.result && analysis.result.duration) || 0, 1);
  }

  function previewAt(time) {
    let best = null;
    for (const preview of analysis.previews) if (preview.time <= time + 0.05) best = preview;
    return best || analysis.previews[0] || null;
  }

  function scrubTime(event) {
    const box = $("scrub").getBoundingClientRect();
    const fraction = Math.min(1, Math.max(0, (event.clientX - box.left) / box.width));
    const span = scrubSpan();
    return { x: fraction * box.width, time: span.from + fraction * span.length };
  }

  $("scrub").addEventListener("mousemove", (event) => {
    const at = scrubTime(event);
    const preview = previewAt(at.time);
    if (!preview) return;
    $("scrub-thumb").src = preview.url;
    $("scrub-time").textContent = clock(at.time);
    $("scrub-preview").style.left = at.x + "px";
    $("scrub-preview").hidden = false;
  });
  $("scrub").addEventListener("mouseleave", () => ($("scrub-preview").hidden = true));
  $("scrub").addEventListener("click", (event) => seek(scrubTime(event).time));

  function loadAnalysis() {
    fetch(base + "/analysis")
      .then((response) => (response.ok ? response.json() : null))
      .then((result) => {
        if (!result) return;
        analysis.result = result;
        showChapters(result);
        showScrub(result);
      })
      .catch(() => {})
      .finally(() => {
        const done = vod && analysis.result && analysis.result.state === "done";
        if (!done) setTimeout(loadAnalysis, vod ? 5000 : 10000);
      });
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

  $("mode").addEventListener("change", () => {
    const url = new URL(location.href);
    if ($("mode").value === "webrtc") url.searchParams.set("mode", "webrtc");
    else url.searchParams.delete("mode");
    history.replaceState(null, "", url);
    startVideo($("mode").value);
  });
  window.addEventListener("pagehide", stopWebRtc);

  startVideo(new URLSearchParams(location.search).get("mode") === "webrtc" ? "webrtc" : "hls");
  setInterval(updateStats, 500);
  if (!vod) connectChat();
  loadAnalysis();
})();

/*
 * Verge dashboard: plain JS talking to the control plane's JSON API (/api/v1) with the token
 * the operator logged in with (kept in sessionStorage, i.e. this tab only).
 *
 * Views (hash routes): #fleet (auto-refresh every 2 s), #services, #purge (seq, then the
 * acknowledgement progress from GET /purge/{seq}), #stats (uPlot charts over GET /stats; with
 * a service chosen, its protection counters per rule over GET /services/NAME/protection/stats).
 * Every value from the API is put into the page as text, never as HTML.
 */
(() => {
  "use strict";

  const API = "/api/v1";
  const TOKEN_KEY = "verge.token";
  const FLEET_REFRESH_MS = 2000;
  const STATS_REFRESH_MS = 5000;
  const PURGE_POLL_MS = 1000;
  const PAGE_SIZE = 200;
  const HAVE_UPLOT = typeof window.uPlot === "function";

  // ---- small helpers -------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  /** Build an element: h("td", {class: "num"}, "text", childElement, ...). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function showError(el, error) {
    if (!error) {
      el.hidden = true;
      el.textContent = "";
      return;
    }
    el.textContent = error instanceof ApiError ? error.describe() : String(error.message || error);
    el.hidden = false;
  }

  const clock = (date) => date.toLocaleTimeString([], { hour12: false });
  const pad2 = (n) => String(n).padStart(2, "0");
  const hhmm = (seconds) => {
    const d = new Date(seconds * 1000);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  };

  /** Seconds since the epoch from a number (s or ms) or an ISO date string; null if unknown. */
  function epochSeconds(value) {
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return value > 1e11 ? value / 1000 : value;
    const parsed = Date.parse(value);
    return Number.isNaN(parsed) ? null : parsed / 1000;
  }

  function ago(seconds) {
    if (seconds === null) return "never";
    const delta = Math.max(0, Date.now() / 1000 - seconds);
    if (delta < 60) return `${delta.toFixed(delta < 10 ? 1 : 0)} s ago`;
    if (delta < 3600) return `${Math.floor(delta / 60)} min ago`;
    if (delta < 86400) return `${Math.floor(delta / 3600)} h ago`;
    return `${Math.floor(delta / 86400)} d ago`;
  }

  const splitLines = (text) => text.split(/\r?\n/).map((s) => s.trim()).filter(Boolean);

  function scaled(value, units, base) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    let i = 0;
    let v = value;
    while (Math.abs(v) >= base && i < units.length - 1) {
      v /= base;
      i += 1;
    }
    const digits = v === 0 || Math.abs(v) >= 100 || (i === 0 && Number.isInteger(v)) ? 0 : Math.abs(v) >= 10 ? 1 : 2;
    return `${v.toFixed(digits)} ${units[i]}`.trim();
  }

  const fmt = {
    rate: (v) => scaled(v, ["/s", "k/s", "M/s", "G/s"], 1000),
    count: (v) => scaled(v, ["", "k", "M", "G", "T"], 1000),
    bits: (v) => scaled(v, ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"], 1000),
    bytes: (v) => scaled(v, ["B", "KB", "MB", "GB", "TB", "PB"], 1000),
    percent: (v) => (v === null || v === undefined ? "–" : `${v.toFixed(Number.isInteger(v) || v >= 99.95 ? 0 : 1)} %`),
    ms: (v) => (v === null || v === undefined ? "–" : `${v.toFixed(v >= 100 ? 0 : 1)} ms`),
  };

  // ---- API -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, field) {
      super(message);
      this.status = status;
      this.field = field || null;
    }
    describe() {
      const where = this.field ? ` (${this.field})` : "";
      return this.status ? `${this.status}: ${this.message}${where}` : this.message;
    }
  }

  /** One API call with an explicit token; throws ApiError with the API's own message. */
  async function request(token, method, path, body) {
    const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch (err) {
      throw new ApiError(0, `control plane unreachable (${err.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      let message = (data && (data.error || data.detail)) || text || response.statusText;
      if (typeof message !== "string") message = JSON.stringify(message);
      throw new ApiError(response.status, message, data && data.field);
    }
    return data;
  }

  /** A call with the session's token; a 401 (token revoked or wrong) ends the session. */
  async function api(method, path, body) {
    try {
      return await request(session.token, method, path, body);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) session.end(err);
      throw err;
    }
  }

  /** Every item of a paginated list endpoint. */
  async function listAll(path) {
    const items = [];
    for (let offset = 0; ; offset += PAGE_SIZE) {
      const sep = path.includes("?") ? "&" : "?";
      const page = await api("GET", `${path}${sep}limit=${PAGE_SIZE}&offset=${offset}`);
      items.push(...(page.items || []));
      if (!page.items || page.items.length === 0 || items.length >= (page.total ?? 0)) return items;
    }
  }

  // ---- session (login / logout) --------------------------------------------------------

  const session = {
    token: sessionStorage.getItem(TOKEN_KEY),

    start(token) {
      this.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("login").hidden = true;
      $("nav").hidden = false;
      $("logout").hidden = false;
      router.show();
    },

    end(error) {
      this.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      router.stop();
      for (const el of document.querySelectorAll(".view")) el.hidden = true;
      $("nav").hidden = true;
      $("logout").hidden = true;
      $("login").hidden = false;
      showError($("login-error"), error || null);
      $("token").value = "";
      $("token").focus();
    },
  };

  async function onLogin(event) {
    event.preventDefault();
    const token = $("token").value.trim();
    const button = event.target.querySelector("button");
    button.disabled = true;
    try {
      // Any role that may use the dashboard can list services; join and node tokens cannot.
      await request(token, "GET", "/services?limit=1");
      showError($("login-error"), null);
      session.start(token);
    } catch (err) {
      showError($("login-error"), err);
    } finally {
      button.disabled = false;
    }
  }

  // ---- shared lookups (for the select boxes) ---------------------------------------------

  function fillSelect(select, names) {
    const keep = select.value;
    const first = select.options[0];
    select.replaceChildren(first, ...names.map((name) => h("option", { value: name }, name)));
    if (names.includes(keep)) select.value = keep;
  }

  async function refreshServiceNames(...selects) {
    const services = await listAll("/services");
    const names = services.map((s) => s.name).sort();
    for (const select of selects) fillSelect(select, names);
    return services;
  }

  // ---- a view that refreshes itself while it is shown ----------------------------------

  /**
   * Calls `tick` now and then `interval` ms after each tick ends, until stopped. Never runs two
   * ticks at once: `now()` during a tick runs another one right after it. Skips ticks while the
   * browser tab is hidden.
   */
  function poller(tick, interval) {
    let timer = null;
    let running = false;
    let busy = false;
    let again = false;
    const loop = async () => {
      clearTimeout(timer);
      timer = null;
      if (!running) return;
      if (busy) {
        again = true;
        return;
      }
      busy = true;
      try {
        if (!document.hidden) await tick();
      } catch (err) {
        console.warn(err);
      } finally {
        busy = false;
      }
      if (!running) return;
      if (again) {
        again = false;
        loop();
      } else {
        timer = setTimeout(loop, interval);
      }
    };
    return {
      start() {
        if (running) return;
        running = true;
        loop();
      },
      stop() {
        running = false;
        clearTimeout(timer);
        timer = null;
      },
      now() {
        if (running) loop();
      },
    };
  }

  // ---- fleet -----------------------------------------------------------------------------

  function loadCell(load) {
    if (!load || typeof load !== "object") return "";
    return Object.entries(load)
      .map(([key, value]) => `${key}=${typeof value === "number" ? +value.toFixed(2) : JSON.stringify(value)}`)
      .join(" ");
  }

  // The health monitor's verdict (what the routers act on): up/down since when, and why.
  function healthCell(monitor) {
    const state = (monitor && monitor.state) || "unchecked";
    const since = monitor && monitor.since ? `since ${clock(new Date(monitor.since * 1000))}` : "";
    const why = monitor && monitor.error ? ` (${monitor.error})` : "";
    return h("td", { title: `${since}${why}`, dataset: { health: state } },
      h("span", { class: `status ${state === "unchecked" ? "revoked" : state}` }, state));
  }

  function nodeRow(node) {
    const heartbeat = epochSeconds(node.last_heartbeat);
    const status = node.status || "down";
    return h(
      "tr",
      { dataset: { node: node.name, status } },
      h("td", {}, h("b", {}, node.name)),
      h("td", {}, h("span", { class: `status ${status}` }, status)),
      healthCell(node.monitor),
      h("td", {}, node.region || "–"),
      h("td", {}, h("code", {}, node.url || "")),
      h("td", { title: heartbeat ? new Date(heartbeat * 1000).toISOString() : "" }, ago(heartbeat)),
      h("td", { class: "num" }, node.config_version ?? "–"),
      h("td", { class: "num" }, node.purge_seq ?? "–"),
      h("td", {}, h("code", {}, loadCell(node.load))),
    );
  }

  const fleet = {
    poll: poller(async () => {
      try {
        const nodes = await listAll("/nodes");
        nodes.sort((a, b) => a.name.localeCompare(b.name));
        $("fleet-table").tBodies[0].replaceChildren(...nodes.map(nodeRow));
        $("fleet-empty").hidden = nodes.length > 0;
        const count = (s) => nodes.filter((n) => n.status === s).length;
        $("fleet-summary").textContent =
          `${nodes.length} node${nodes.length === 1 ? "" : "s"}: ` +
          `${count("up")} up, ${count("down")} down, ${count("revoked")} revoked`;
        $("fleet-updated").textContent = `updated ${clock(new Date())}`;
        showError($("fleet-error"), null);
      } catch (err) {
        showError($("fleet-error"), err);
      }
    }, FLEET_REFRESH_MS),
    start() {
      this.poll.start();
    },
    stop() {
      this.poll.stop();
    },
  };

  // ---- services ----------------------------------------------------------------------------

  function serviceRow(service) {
    const origins = (service.origins || []).map((o) =>
      h("span", { class: "origin" }, o.url, o.weight && o.weight !== 1 ? ` ×${o.weight}` : ""),
    );
    return h(
      "tr",
      { dataset: { service: service.name } },
      h("td", {}, h("b", {}, service.name), service.default ? h("span", { class: "muted" }, " (default)") : null),
      h("td", {}, service.tenant || "–"),
      h("td", {}, (service.hosts || []).map((host) => h("span", { class: "chip" }, host))),
      h("td", {}, origins),
      h("td", { class: "num" }, (service.rules || []).length),
    );
  }

  const services = {
    async load() {
      try {
        const items = await listAll("/services");
        items.sort((a, b) => a.name.localeCompare(b.name));
        $("services-table").tBodies[0].replaceChildren(...items.map(serviceRow));
        $("services-empty").hidden = items.length > 0;
        const hosts = items.reduce((n, s) => n + (s.hosts || []).length, 0);
        $("services-summary").textContent = `${items.length} services, ${hosts} hostnames`;
        showError($("services-error"), null);
      } catch (err) {
        showError($("services-error"), err);
      }
    },
    start() {
      this.load();
    },
    stop() {},
  };

  // ---- purge -------------------------------------------------------------------------------

  const purge = {
    jobs: new Map(), // seq -> {card, done}

    poll: poller(async () => {
      for (const [seq, job] of purge.jobs) {
        if (job.done) continue;
        try {
          purge.render(seq, await api("GET", `/purge/${seq}`));
        } catch (err) {
          showError(job.card.querySelector(".error"), err);
        }
      }
    }, PURGE_POLL_MS),

    start() {
      refreshServiceNames($("purge-service")).catch((err) => showError($("purge-error"), err));
      this.poll.start();
    },
    stop() {
      this.poll.stop();
    },

    async submit(event) {
      event.preventDefault();
      const body = {
        urls: splitLines($("purge-urls").value),
        tags: splitLines($("purge-tags").value),
        prefixes: splitLines($("purge-prefixes").value),
        soft: $("purge-soft").checked,
      };
      const service = $("purge-service").value;
      if (service) body.service = service;
      if (!body.urls.length && !body.tags.length && !body.prefixes.length) {
        showError($("purge-error"), new Error("Enter at least one URL, tag or prefix."));
        return;
      }
      const button = $("purge-submit");
      button.disabled = true;
      try {
        const accepted = await api("POST", "/purge", body);
        showError($("purge-error"), null);
        this.addJob(accepted, body);
        $("purge-form").reset();
        if (service) $("purge-service").value = service;
        this.poll.now();
      } catch (err) {
        showError($("purge-error"), err);
      } finally {
        button.disabled = false;
      }
    },

    addJob(accepted, body) {
      const targets = [
        ...body.urls.map((u) => `url ${u}`),
        ...body.prefixes.map((p) => `prefix ${p}`),
        ...body.tags.map((t) => `tag ${t}`),
      ];
      const card = h(
        "div",
        { class: "card job", dataset: { seq: accepted.seq } },
        h("h2", {}, "Purge ", h("span", { class: "seq" }, `#${accepted.seq}`),
          h("span", { class: "muted" }, `  ${body.soft ? "soft" : "hard"}${body.service ? ` · ${body.service}` : ""}`)),
        h("div", { class: "targets" }, targets.map((t) => h("span", { class: "chip" }, t))),
        h("div", { class: "state" }, "waiting for acknowledgements…"),
        h("div", { class: "progress" }, h("div")),
        h("div", { class: "names muted" }),
        h("p", { class: "error", hidden: true }),
      );
      $("purge-jobs").prepend(card);
      this.jobs.set(accepted.seq, { card, done: false });
      this.render(accepted.seq, { acked: [], pending: accepted.nodes || [] });
    },

    render(seq, status) {
      const job = this.jobs.get(seq);
      const acked = status.acked || [];
      const pending = status.pending || [];
      const total = acked.length + pending.length;
      // done: nobody pending, or the purge timed out (the pending nodes catch up later)
      job.done = status.done !== undefined ? status.done : pending.length === 0;
      const card = job.card;
      card.classList.toggle("done", job.done);
      const late = job.done && pending.length ? " — timed out; the rest catch up when they return" : "";
      card.querySelector(".state").textContent =
        total === 0
          ? "no nodes to acknowledge (none joined)"
          : `${acked.length}/${total} nodes acknowledged${job.done && !late ? " — complete" : late}`;
      card.querySelector(".progress > div").style.width = `${total ? (100 * acked.length) / total : 100}%`;
      card.querySelector(".names").textContent = [
        acked.length ? `acked: ${acked.join(", ")}` : "",
        pending.length ? `pending: ${pending.join(", ")}` : "",
      ].filter(Boolean).join("   ");
      showError(card.querySelector(".error"), null);
    },
  };

  // ---- stats -------------------------------------------------------------------------------

  const COLORS = { blue: "#2563eb", green: "#15803d", purple: "#7c3aed", red: "#dc2626", amber: "#d97706" };

  /** The five plots: how each value is derived from one bucket of GET /stats. */
  const PLOTS = [
    { key: "requests", title: "Requests/s", color: COLORS.blue, format: fmt.rate,
      value: (b, step) => b.requests / step },
    { key: "hit_ratio", title: "Hit ratio", color: COLORS.green, format: fmt.percent, fixed: [0, 100],
      value: (b) => (b.requests > 0 ? (100 * b.hits) / b.requests : null) },
    { key: "bandwidth", title: "Bandwidth", color: COLORS.purple, format: fmt.bits,
      value: (b, step) => (8 * b.bytes) / step },
    { key: "errors", title: "5xx/s", color: COLORS.red, format: fmt.rate,
      value: (b, step) => b.status_5xx / step },
    { key: "origin_ms", title: "Origin latency (avg)", color: COLORS.amber, format: fmt.ms,
      value: (b) => originMs(b) },
  ];

  /** Average origin latency of a bucket; none (a gap) when nothing went to an origin. */
  const originMs = (b) => (typeof b.origin_ms_avg === "number" && b.origin_ms_avg > 0 ? b.origin_ms_avg : null);

  const COUNTERS = ["requests", "hits", "bytes", "status_2xx", "status_3xx", "status_4xx", "status_5xx"];

  /** A step that keeps a range to at most ~180 points. */
  const stepFor = (range) => (range <= 900 ? 10 : range <= 3600 ? 30 : range <= 21600 ? 120 : 600);

  /**
   * Complete buckets on a regular grid from `since` to now, whatever the server's bucket
   * alignment: the grid is anchored on the first bucket the server returned, and buckets it did
   * not return (no traffic) count as zero. The bucket still in progress is left out: edges push
   * their samples every few seconds, so it would always show a misleading dip.
   */
  function regularBuckets(series, since, now, step, counters = COUNTERS) {
    const points = series
      .map((b) => ({ ...b, t: epochSeconds(b.t) }))
      .filter((b) => b.t !== null)
      .sort((a, b) => a.t - b.t);
    const anchor = points.length ? points[0].t : Math.floor(now / step) * step;
    const first = anchor - Math.floor((anchor - since) / step) * step;
    const byIndex = new Map();
    for (const p of points) byIndex.set(Math.round((p.t - first) / step), p);
    const last = Math.floor((now - first) / step) - 1;
    const grid = [];
    for (let i = 0; i <= last; i += 1) {
      const empty = { t: first + i * step, origin_ms_avg: null };
      for (const c of counters) empty[c] = 0;
      grid.push(byIndex.has(i) ? { ...empty, ...byIndex.get(i), t: first + i * step } : empty);
    }
    return grid;
  }

  function lastValue(values) {
    for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null) return values[i];
    return null;
  }

  function chartOptions(plot, width) {
    const axisValues = (u, ticks) => ticks.map((v) => plot.format(v));
    return {
      width,
      height: 180,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true },
        y: { range: plot.fixed ? () => plot.fixed : (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
      },
      axes: [
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, values: (u, ticks) => ticks.map(hhmm) },
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, size: 80, values: axisValues },
      ],
      series: [
        {},
        { label: plot.title, stroke: plot.color, width: 1.5, fill: `${plot.color}1f`,
          spanGaps: false, value: (u, v) => plot.format(v) },
      ],
    };
  }

  const stats = {
    charts: new Map(), // key -> {plot, card, chart (uPlot or null)}

    poll: poller(() => stats.load(), STATS_REFRESH_MS),

    build() {
      if (this.charts.size) return;
      for (const plot of PLOTS) {
        const card = h(
          "section",
          { class: "plot", dataset: { plot: plot.key } },
          h("header", {}, h("h2", {}, plot.title), h("span", { class: "now" }, "–")),
          h("div", { class: "chart" },
            HAVE_UPLOT ? null : h("p", { class: "muted" }, "No plot: uPlot is missing (run make install).")),
        );
        $("plots").append(card);
        this.charts.set(plot.key, { plot, card, chart: null });
      }
      new ResizeObserver(() => this.resize()).observe($("plots"));
    },

    resize() {
      for (const entry of [...this.charts.values(), ...protection.charts.values()]) {
        const width = entry.card.querySelector(".chart").clientWidth;
        if (entry.chart && width > 0 && Math.abs(entry.chart.width - width) > 1) {
          entry.chart.setSize({ width, height: entry.chart.height });
        }
      }
    },

    draw(entry, times, values) {
      const data = [times, values];
      if (!HAVE_UPLOT) return;
      if (entry.chart) {
        entry.chart.setData(data);
        return;
      }
      const target = entry.card.querySelector(".chart");
      const width = Math.max(target.clientWidth, 200);
      entry.chart = new window.uPlot(chartOptions(entry.plot, width), data, target);
    },

    showTotals(buckets, range) {
      const sum = (key) => buckets.reduce((n, b) => n + (b[key] || 0), 0);
      const requests = sum("requests");
      // weighted by requests: the API gives no per-bucket origin fetch count
      const latencies = buckets.filter((b) => originMs(b) !== null && b.requests > 0);
      const latency = latencies.length
        ? latencies.reduce((n, b) => n + originMs(b) * b.requests, 0) /
          latencies.reduce((n, b) => n + b.requests, 0)
        : null;
      const tiles = [
        ["requests", fmt.count(requests)],
        ["hit ratio", fmt.percent(requests ? (100 * sum("hits")) / requests : null)],
        ["delivered", fmt.bytes(sum("bytes"))],
        ["5xx", fmt.count(sum("status_5xx"))],
        ["4xx", fmt.count(sum("status_4xx"))],
        ["origin latency", fmt.ms(latency)],
      ];
      const label = range >= 3600 ? `${range / 3600} h` : `${range / 60} min`;
      $("stats-totals").replaceChildren(
        ...tiles.map(([name, value]) => h("div", { dataset: { total: name } }, h("b", {}, value), h("span", {}, `${name}, last ${label}`))),
      );
    },

    async load() {
      const range = Number($("stats-range").value);
      const step = stepFor(range);
      const now = Date.now() / 1000;
      const since = Math.floor(now - range);
      const params = new URLSearchParams({ since: String(since), step: String(step) });
      if ($("stats-service").value) params.set("service", $("stats-service").value);
      if ($("stats-node").value) params.set("node", $("stats-node").value);
      try {
        const result = await api("GET", `/stats?${params}`);
        const buckets = regularBuckets(result.series || [], since, now, step);
        const times = buckets.map((b) => b.t);
        for (const entry of this.charts.values()) {
          const values = buckets.map((b) => entry.plot.value(b, step));
          entry.card.querySelector(".now").textContent = `now ${entry.plot.format(lastValue(values))}`;
          this.draw(entry, times, values);
        }
        this.showTotals(buckets, range);
        $("stats-updated").textContent = `updated ${clock(new Date())} · step ${step} s`;
        showError($("stats-error"), null);
      } catch (err) {
        showError($("stats-error"), err);
      }
      await protection.load($("stats-service").value, since, now, step);
    },

    start() {
      this.build();
      refreshServiceNames($("stats-service")).catch(() => {});
      listAll("/nodes")
        .then((nodes) => fillSelect($("stats-node"), nodes.map((n) => n.name).sort()))
        .catch(() => {});
      this.poll.start();
    },
    stop() {
      this.poll.stop();
    },
  };

  // ---- protection: one service's counters per rule -------------------------------------------

  /** The three outcomes of a rule, as GET /services/NAME/protection/stats counts them. */
  const OUTCOMES = [
    { key: "allowed", color: COLORS.green },
    { key: "limited", color: COLORS.amber },
    { key: "blocked", color: COLORS.red },
  ];
  const OUTCOME_KEYS = OUTCOMES.map((o) => o.key);

  /** What a (kind, rule) pair is called on the page. */
  function ruleTitle(kind, rule) {
    if (kind === "rate-limit") return `rate limit ${rule}`;
    return kind === "deny" ? "deny lists" : kind === "waf" ? "WAF" : `${kind} ${rule}`;
  }

  function protectionChartOptions(width) {
    return {
      width,
      height: 160,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, values: (u, ticks) => ticks.map(hhmm) },
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, size: 80, values: (u, ticks) => ticks.map(fmt.rate) },
      ],
      series: [
        {},
        ...OUTCOMES.map((o) => ({ label: o.key, stroke: o.color, width: 1.5, value: (u, v) => fmt.rate(v) })),
      ],
    };
  }

  const protection = {
    charts: new Map(), // "kind/rule" -> {card, chart (uPlot or null)}
    service: null,
    resizes: new ResizeObserver(() => stats.resize()),

    reset(service) {
      this.resizes.disconnect();
      for (const entry of this.charts.values()) if (entry.chart) entry.chart.destroy();
      this.charts.clear();
      $("protection-plots").replaceChildren();
      $("protection-table").tBodies[0].replaceChildren();
      this.service = service;
    },

    /** The chosen service's counters over the stats view's range (none chosen: a hint). */
    async load(service, since, now, step) {
      if (service !== this.service) this.reset(service);
      $("protection-hint").hidden = Boolean(service);
      $("protection-service").textContent = service ? `· ${service}` : "";
      if (!service) {
        $("protection-empty").hidden = true;
        $("protection-table").hidden = true;
        showError($("protection-error"), null);
        return;
      }
      const params = new URLSearchParams({ since: String(since), step: String(step) });
      try {
        const result = await api("GET", `/services/${encodeURIComponent(service)}/protection/stats?${params}`);
        if (service !== this.service) return; // the choice changed meanwhile
        this.render(result, since, now, step);
        showError($("protection-error"), null);
      } catch (err) {
        showError($("protection-error"), err);
      }
    },

    render(result, since, now, step) {
      const rules = result.rules || [];
      $("protection-empty").hidden = rules.length > 0;
      $("protection-table").hidden = rules.length === 0;
      $("protection-table").tBodies[0].replaceChildren(
        ...rules.map((r) =>
          h("tr", { dataset: { rule: `${r.kind}/${r.rule}` } },
            h("td", {}, ruleTitle(r.kind, r.rule)),
            ...OUTCOME_KEYS.map((key) => h("td", { class: "num", dataset: { outcome: key } }, fmt.count(r[key])))),
        ),
      );
      const keys = rules.map((r) => `${r.kind}/${r.rule}`);
      for (const [key, entry] of this.charts) {
        if (keys.includes(key)) continue;
        if (entry.chart) entry.chart.destroy();
        this.resizes.unobserve(entry.card);
        entry.card.remove();
        this.charts.delete(key);
      }
      // every card first, then the charts: each takes its width from the laid-out grid
      rules.forEach((r, i) => this.card(keys[i], ruleTitle(r.kind, r.rule)));
      rules.forEach((r, i) => {
        const points = (result.series || []).filter((p) => p.kind === r.kind && p.rule === r.rule);
        const buckets = regularBuckets(points, since, now, step, OUTCOME_KEYS);
        this.draw(keys[i], [buckets.map((b) => b.t), ...OUTCOME_KEYS.map((o) => buckets.map((b) => b[o] / step))]);
      });
    },

    card(key, title) {
      if (this.charts.has(key)) return;
      const card = h(
        "section",
        { class: "plot", dataset: { protection: key } },
        h("header", {}, h("h2", {}, title), h("span", { class: "now" }, "requests/s")),
        h("div", { class: "chart" },
          HAVE_UPLOT ? null : h("p", { class: "muted" }, "No plot: uPlot is missing (run make install).")),
      );
      $("protection-plots").append(card);
      this.resizes.observe(card); // a card added later narrows the others
      this.charts.set(key, { card, chart: null });
    },

    draw(key, data) {
      const entry = this.charts.get(key);
      if (!HAVE_UPLOT) return;
      if (entry.chart) {
        entry.chart.setData(data);
        return;
      }
      const target = entry.card.querySelector(".chart");
      entry.chart = new window.uPlot(protectionChartOptions(Math.max(target.clientWidth, 200)), data, target);
    },
  };

  // ---- routing between views -----------------------------------------------------------

  const VIEWS = { fleet, services, purge, stats };

  const router = {
    current: null,

    show() {
      if (!session.token) return;
      const name = location.hash.slice(1) in VIEWS ? location.hash.slice(1) : "fleet";
      if (this.current && this.current !== name) VIEWS[this.current].stop();
      for (const key of Object.keys(VIEWS)) $(`view-${key}`).hidden = key !== name;
      for (const link of document.querySelectorAll("#nav a")) {
        link.classList.toggle("active", link.dataset.view === name);
      }
      document.title = `Verge · ${name}`;
      this.current = name;
      VIEWS[name].start();
    },

    stop() {
      if (this.current) VIEWS[this.current].stop();
      this.current = null;
    },
  };

  // ---- wiring ------------------------------------------------------------------------------

  function init() {
    $("vendor-missing").hidden = HAVE_UPLOT;
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", () => session.end(null));
    $("services-refresh").addEventListener("click", () => services.load());
    $("purge-form").addEventListener("submit", (event) => purge.submit(event));
    for (const id of ["stats-service", "stats-node", "stats-range"]) {
      $(id).addEventListener("change", () => stats.poll.now());
    }
    window.addEventListener("hashchange", () => router.show());
    document.addEventListener("visibilitychange", () => {
      const view = router.current && VIEWS[router.current];
      if (!document.hidden && view && view.poll) view.poll.now();
    });
    if (session.token) session.start(session.token);
    else session.end(null);
  }

  init();
})();

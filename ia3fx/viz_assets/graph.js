// ia3fx's interactive graph page: pan, zoom, search by module path, click a fold to expand it,
// hover a scale node for its vector. Plain DOM code, no library, nothing fetched.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("ia3fx-data").textContent);
  const EXPANDED = JSON.parse(document.getElementById("ia3fx-expanded").textContent);
  const viewport = document.getElementById("viewport");
  const stage = document.getElementById("stage");
  const tip = document.getElementById("tip");
  const status = document.getElementById("status");
  const search = document.getElementById("search");
  const SVGS = Object.assign({ "": stage.innerHTML }, EXPANDED);
  let current = "";
  let pos = { x: 0, y: 0, k: 1 };
  let moved = 0;

  function say(text) { status.textContent = text; }
  function apply() { stage.style.transform = "translate(" + pos.x + "px," + pos.y + "px) scale(" + pos.k + ")"; }
  function fit() {
    const w = stage.offsetWidth, h = stage.offsetHeight;
    const vw = viewport.clientWidth, vh = viewport.clientHeight;
    if (!w || !h) return;
    pos.k = Math.min(vw / w, vh / h, 1.5) * 0.96;
    pos.x = (vw - w * pos.k) / 2;
    pos.y = Math.max(4, (vh - h * pos.k) / 2);
    apply();
  }
  function zoomAt(factor, cx, cy) {
    const k = Math.max(0.02, Math.min(40, pos.k * factor));
    pos.x = cx - (cx - pos.x) * (k / pos.k);
    pos.y = cy - (cy - pos.y) * (k / pos.k);
    pos.k = k;
    apply();
  }
  function titleOf(g) {
    const t = g.querySelector(":scope > title");
    return t ? t.textContent : "";
  }
  function fmt(v) { return typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4)) : "?"; }
  function statsRow(s) {
    if (!s) return "<tr><td colspan=2>no values (traced on the meta device)</td></tr>";
    return "<tr><td>mean</td><td>" + fmt(s.mean) + "</td></tr><tr><td>min / max</td><td>" + fmt(s.min) + " / " +
      fmt(s.max) + "</td></tr><tr><td>|v&minus;1| mean / max</td><td>" + fmt(s.mean_abs_dev) + " / " +
      fmt(s.max_abs_dev) + "</td></tr>";
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; }); }
  function tipHtml(item) {
    let head;
    if (item.role === "scale") {
      head = "&times; ia3 scale: " + (item.scale === "output" ? "attention-type, output scaled" : "feedforward, input scaled");
    } else if (item.role === "vector") {
      head = "ia3_l vector (" + esc(item.scale) + ")";
    } else if (item.role === "call_site") {
      head = "call site " + esc(item.kind) + " " + item.features[0] + "&rarr;" + item.features[1] +
        (item.scales.length ? ", scaled: " + item.scales.join(", ") : ", not adapted");
    } else {
      return "<b>" + esc(item.path || "(root)") + "</b>";
    }
    let out = "<b>" + head + "</b><table><tr><td>layer</td><td>" + esc(item.layer) + "</td></tr>";
    if (item.role !== "call_site") {
      out += "<tr><td>placement</td><td>" + esc(item.scale) + "</td></tr><tr><td>vector size</td><td>" +
        item.size + "</td></tr>" + statsRow(item.stats);
    }
    out += "</table>";
    if (item.folded) {
      const layers = Object.keys(item.folded);
      const devs = layers.map(function (l) { return item.folded[l] ? item.folded[l].mean_abs_dev : NaN; });
      const known = devs.filter(function (d) { return !isNaN(d); });
      out += "<div>folded &times; " + layers.length + ": mean |v&minus;1| per layer " +
        (known.length ? "from " + fmt(Math.min.apply(null, known)) + " to " + fmt(Math.max.apply(null, known)) :
          "not known (meta)") + "</div>";
    }
    return out;
  }
  function showTip(ev, item) {
    tip.innerHTML = tipHtml(item);
    tip.hidden = false;
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const y = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function wire() {
    const items = (DATA.views[current] || { items: {} }).items;
    stage.querySelectorAll("a").forEach(function (a) { a.removeAttribute("xlink:title"); a.removeAttribute("title"); });
    stage.querySelectorAll("g.node").forEach(function (g) {
      const id = titleOf(g);
      g.dataset.id = id;
      const item = items[id];
      if (item) g.dataset.module = item.module;
      if (item && item.role) g.dataset.role = item.role;
      g.addEventListener("mousemove", function (ev) { if (item) showTip(ev, item); });
      g.addEventListener("mouseleave", function () { tip.hidden = true; });
    });
    stage.querySelectorAll("g.cluster").forEach(function (g) {
      const path = titleOf(g).replace(/^cluster_/, "");
      g.dataset.path = path;
      if (path === current && current !== "") {
        g.classList.add("expanded");
        g.addEventListener("click", function (ev) { if (moved < 5) { ev.stopPropagation(); show(""); } });
      } else if (runs().some(function (r) { return r.path === path; })) {
        g.classList.add("fold");
        g.addEventListener("click", function (ev) {
          if (moved >= 5) return;
          ev.stopPropagation();
          if (SVGS[path] !== undefined) show(path);
          else if (current) say("fold all first, then click " + path + " to expand it");
          else say("no expanded drawing for " + path + " (the page holds the first " + DATA.maxExpanded + ")");
        });
      }
    });
    stage.querySelectorAll("title").forEach(function (t) { t.remove(); });
  }
  function show(key) {
    current = key;
    stage.innerHTML = SVGS[key];
    document.body.dataset.view = key;
    wire();
    fit();
    say(key ? "expanded " + key + ": click its frame or 'fold all' to fold it again" : DATA.title);
  }
  function runs() { return (DATA.views[current] || { runs: [] }).runs; }
  function normalise(q) {
    // a path inside a folded block is found in the block drawn for it: model.layers.5 -> model.layers.0
    for (const r of runs()) {
      if (q.startsWith(r.parent + ".")) {
        const rest = q.slice(r.parent.length + 1);
        const m = /^(\d+)(.*)$/.exec(rest);
        if (m && +m[1] >= r.lo && +m[1] <= r.hi) return r.path + m[2];
      }
    }
    return q;
  }
  function find(q) {
    stage.querySelectorAll(".hit").forEach(function (g) { g.classList.remove("hit"); });
    q = q.trim();
    if (!q) { say(current ? "expanded " + current : DATA.title); return []; }
    const p = normalise(q);
    const low = q.toLowerCase();
    const hits = [];
    stage.querySelectorAll("g.node").forEach(function (g) {
      const m = g.dataset.module || "";
      if ((m && (m === p || m.startsWith(p + "."))) || g.textContent.toLowerCase().includes(low)) hits.push(g);
    });
    stage.querySelectorAll("g.cluster").forEach(function (g) { if (g.dataset.path === p) hits.push(g); });
    hits.forEach(function (g) { g.classList.add("hit"); });
    if (!hits.length) { say("no module matches " + JSON.stringify(q)); return hits; }
    say(hits.length + " match" + (hits.length > 1 ? "es" : "") + " for " + JSON.stringify(q) + (p !== q ? " (drawn as " + p + ")" : ""));
    const b = hits[0].getBoundingClientRect(), v = viewport.getBoundingClientRect();
    pos.x += v.left + v.width / 2 - (b.left + b.width / 2);
    pos.y += v.top + v.height / 2 - (b.top + b.height / 2);
    apply();
    return hits;
  }

  viewport.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    const v = viewport.getBoundingClientRect();
    zoomAt(Math.exp(-ev.deltaY * 0.0015), ev.clientX - v.left, ev.clientY - v.top);
  }, { passive: false });
  viewport.addEventListener("mousedown", function (ev) {
    const start = { x: ev.clientX, y: ev.clientY, px: pos.x, py: pos.y };
    moved = 0;
    viewport.classList.add("dragging");
    function move(e) {
      moved = Math.max(moved, Math.abs(e.clientX - start.x) + Math.abs(e.clientY - start.y));
      pos.x = start.px + e.clientX - start.x;
      pos.y = start.py + e.clientY - start.y;
      apply();
    }
    function up() {
      viewport.classList.remove("dragging");
      window.removeEventListener("mousemove", move);
      window.removeEventListener("mouseup", up);
    }
    window.addEventListener("mousemove", move);
    window.addEventListener("mouseup", up);
  });
  document.getElementById("zoom-in").onclick = function () { zoomAt(1.25, viewport.clientWidth / 2, viewport.clientHeight / 2); };
  document.getElementById("zoom-out").onclick = function () { zoomAt(0.8, viewport.clientWidth / 2, viewport.clientHeight / 2); };
  document.getElementById("fit").onclick = fit;
  document.getElementById("fold-all").onclick = function () { show(""); };
  search.addEventListener("keydown", function (ev) { if (ev.key === "Enter") find(search.value); });
  search.addEventListener("input", function () { if (!search.value) find(""); });
  window.addEventListener("resize", fit);

  // scripted use (tests, links): #click=<fold path> clicks that fold, #search=<path> searches
  function fromHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const click = params.get("click");
    if (click !== null) {
      const g = Array.from(stage.querySelectorAll("g.fold, g.expanded")).find(function (c) { return c.dataset.path === click; });
      if (g) { moved = 0; g.dispatchEvent(new MouseEvent("click", { bubbles: true })); }
      else say("no folded block " + JSON.stringify(click) + " in this drawing");
    }
    const q = params.get("search");
    if (q !== null) { search.value = q; find(q); }
  }
  window.ia3fxPage = { show: show, find: find, fit: fit, state: function () { return { view: current, pos: pos }; } };
  wire();
  fit();
  say(DATA.title);
  fromHash();
  window.addEventListener("hashchange", fromHash);
  document.body.dataset.ready = "yes";  // the page's script has run (what tests wait for)
  requestAnimationFrame(function () {  // the first frame after the drawing: its time, for benchmarks
    requestAnimationFrame(function () { document.body.dataset.firstFrameMs = performance.now().toFixed(1); });
  });
})();

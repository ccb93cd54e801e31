/* firstparty live view: events grouped by canonical id, fed by /live/events (SSE).
   No framework, no CDN: served by the ops listener under a strict CSP. */
(function () {
  "use strict";
  var MAX_GROUPS = 300, MAX_EVENTS = 200, SHOWN_GROUPS = 60, SHOWN_EVENTS = 40;
  var groups = new Map();   // canonical id (or "") -> group
  var byEventId = new Map(); // event id ($insert_id / messageId) -> event row
  var paused = false, dirty = false, held = [];
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function hue(text) {  /* a stable colour per domain */
    var h = 0;
    for (var i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) % 360;
    return "hsl(" + h + ", 60%, 62%)";
  }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }

  function groupFor(record) {
    var key = record.canonical || "";
    var g = groups.get(key);
    if (!g) {
      g = { id: key, source: record.source, domains: new Map(), links: new Map(), events: [], first: record.time, last: record.time };
      groups.set(key, g);
      if (groups.size > MAX_GROUPS) {  /* forget the group seen longest ago */
        var oldest = null;
        groups.forEach(function (x) { if (!oldest || x.last < oldest.last) oldest = x; });
        groups.delete(oldest.id);
        oldest.events.forEach(function (e) { if (e.id) byEventId.delete(e.id); });
      }
    }
    return g;
  }

  function apply(record) {
    if (record.kind === "request") {
      var g = groupFor(record);
      g.last = Math.max(g.last, record.time);
      g.domains.set(record.host, (g.domains.get(record.host) || 0) + record.count);
      (record.links || []).forEach(function (link) { if (!g.links.has(link[0])) g.links.set(link[0], link[1]); });
      if (!g.links.size && record.source) g.source = g.source || record.source;
      record.events.forEach(function (e) {
        var row = { id: e.id, name: e.name, time: record.time, host: record.host, protocol: record.protocol,
                    route: record.route, outcome: record.outcome, reason: record.reason || "", group: g };
        g.events.push(row);
        if (row.id) byEventId.set(row.id, row);
      });
      while (g.events.length > MAX_EVENTS) {
        var gone = g.events.shift();
        if (gone.id) byEventId.delete(gone.id);
      }
    } else if (record.kind === "delivery") {
      record.ids.forEach(function (id) {
        var row = byEventId.get(id);
        if (row) { row.outcome = record.outcome; row.reason = record.reason || (record.status ? "HTTP " + record.status : ""); }
      });
    }
    dirty = true;
  }

  function filters() {
    return { id: $("f-id").value.trim(), name: $("f-name").value.trim().toLowerCase(),
             domain: $("f-domain").value.trim().toLowerCase(), outcome: $("f-outcome").value };
  }
  function eventShown(e, f) {
    return (!f.name || e.name.toLowerCase().indexOf(f.name) >= 0) && (!f.outcome || e.outcome === f.outcome) &&
           (!f.domain || e.host.toLowerCase().indexOf(f.domain) >= 0);
  }
  function groupShown(g, f) {
    if (f.id && g.id.indexOf(f.id) < 0) {
      var linked = false;
      g.links.forEach(function (_s, original) { if (original.indexOf(f.id) >= 0) linked = true; });
      if (!linked) return false;
    }
    return g.events.some(function (e) { return eventShown(e, f); });
  }

  function strip(g) {  /* the journey: one mark per event, coloured by domain, over the group's time */
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "strip");
    svg.setAttribute("viewBox", "0 0 1000 22");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    var span = Math.max(1, g.last - g.first);
    var title = document.createElementNS(ns, "title");
    title.textContent = "journey: " + Array.from(g.domains.keys()).join(" → ");
    svg.appendChild(title);
    var line = document.createElementNS(ns, "rect");
    line.setAttribute("x", "0"); line.setAttribute("y", "10"); line.setAttribute("width", "1000"); line.setAttribute("height", "2");
    line.setAttribute("fill", "#263140");
    svg.appendChild(line);
    g.events.forEach(function (e) {
      var mark = document.createElementNS(ns, "rect");
      mark.setAttribute("x", String(Math.min(994, ((e.time - g.first) / span) * 994)));
      mark.setAttribute("y", "3"); mark.setAttribute("width", "6"); mark.setAttribute("height", "16"); mark.setAttribute("rx", "2");
      mark.setAttribute("fill", hue(e.host));
      mark.setAttribute("data-host", e.host);
      svg.appendChild(mark);
    });
    return svg;
  }

  function render() {
    if (!dirty || paused) return;
    dirty = false;
    var f = filters(), main = $("groups");
    var shown = Array.from(groups.values()).filter(function (g) { return groupShown(g, f); })
      .sort(function (a, b) { return b.last - a.last; }).slice(0, SHOWN_GROUPS);
    var frag = document.createDocumentFragment();
    shown.forEach(function (g) {
      var card = el("section", { "class": "group", "data-canonical": g.id });
      var head = el("header");
      head.appendChild(el("code", { "class": "canonical" }, g.id || "no identity (consent refused)"));
      head.appendChild(el("span", { "class": "meta" }, g.events.length + " events · " + g.domains.size + " domain" +
                         (g.domains.size === 1 ? "" : "s") + " · since " + clock(g.first)));
      card.appendChild(head);
      var doms = el("div", { "class": "domains" });
      g.domains.forEach(function (_n, host) {
        var chip = el("span", { "class": "chip", "data-host": host }, host);
        chip.style.background = hue(host);
        doms.appendChild(chip);
      });
      card.appendChild(doms);
      card.appendChild(strip(g));
      var links = el("ul", { "class": "links" });
      if (g.id) {
        var origin = el("li", { "data-source": g.source || "" });
        origin.appendChild(document.createTextNode("canonical id from "));
        origin.appendChild(el("span", { "class": "src" }, g.source || "?"));
        links.appendChild(origin);
      }
      g.links.forEach(function (source, original) {
        var li = el("li", { "data-source": source, "data-original": original });
        li.appendChild(el("code", {}, original));
        li.appendChild(document.createTextNode(" merged via "));
        li.appendChild(el("span", { "class": "src" }, source));
        links.appendChild(li);
      });
      card.appendChild(links);
      var table = el("table", { "class": "events" }), body = el("tbody");
      g.events.filter(function (e) { return eventShown(e, f); }).slice(-SHOWN_EVENTS).reverse().forEach(function (e) {
        var tr = el("tr", { "data-name": e.name, "data-outcome": e.outcome, "data-host": e.host });
        tr.appendChild(el("td", { "class": "t" }, clock(e.time)));
        tr.appendChild(el("td", { "class": "p" }, e.protocol));
        tr.appendChild(el("td", {}, e.name || e.route));
        tr.appendChild(el("td", { "class": "meta" }, e.host + " " + e.route));
        var o = el("td", { "class": "o" });
        o.appendChild(el("span", { "class": "outcome " + e.outcome, title: e.reason }, e.outcome.replace("_", " ")));
        tr.appendChild(o);
        body.appendChild(tr);
      });
      table.appendChild(body);
      card.appendChild(table);
      frag.appendChild(card);
    });
    main.replaceChildren(frag);
    if (!shown.length) main.appendChild(el("p", { "class": "empty" }, groups.size ? "No events match the filters." : "Waiting for events."));
  }

  function status(state, text) { var s = $("status"); s.dataset.state = state; s.textContent = text; }

  function connect() {
    var source = new EventSource("/live/events");
    source.onopen = function () { status(paused ? "paused" : "live", paused ? "paused" : "live"); };
    source.onerror = function () { status("lost", "connection lost, retrying…"); };
    source.onmessage = function (message) {
      var record = JSON.parse(message.data);
      if (paused) held.push(record); else apply(record);
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    ["f-id", "f-name", "f-domain", "f-outcome"].forEach(function (id) {
      $(id).addEventListener("input", function () { dirty = true; });
    });
    $("filters").addEventListener("submit", function (e) { e.preventDefault(); });
    $("pause").addEventListener("click", function () {
      paused = !paused;
      this.setAttribute("aria-pressed", String(paused));
      this.textContent = paused ? "resume" : "pause";
      status(paused ? "paused" : "live", paused ? "paused (" + held.length + " held)" : "live");
      if (!paused) { held.splice(0).forEach(apply); dirty = true; }
    });
    setInterval(render, 250);
    connect();
  });
})();

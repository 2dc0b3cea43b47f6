// The status page: polls status.json every second and draws it. No libraries, nothing fetched
// from elsewhere (the machines it runs on are often offline). Every number it shows is also in
// the DOM as a data attribute, for the test that reads the page back in a headless browser.
"use strict";

const REFRESH_MS = 1000;

function text(id, value) { document.getElementById(id).textContent = value; }

function fmtBytes(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " MB";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " kB";
  return n + " B";
}

function ago(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function svgElement(name, attributes) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attributes)) el.setAttribute(k, v);
  return el;
}

// One line per series over rounds; y from 0 (or the data's minimum when fixed01 is false).
function lineChart(svg, rounds, series, fixed01, format) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 320, H = 180, left = 58, right = 10, top = 10, bottom = 22;
  const all = series.flatMap(s => s.values).filter(v => v !== null);
  let lo = 0, hi = fixed01 ? 1 : Math.max(1, ...all);
  if (!fixed01 && all.length) hi = Math.max(...all) * 1.05 || 1;
  const x = i => left + (rounds.length > 1 ? i * (W - left - right) / (rounds.length - 1) : (W - left - right) / 2);
  const y = v => H - bottom - (v - lo) * (H - top - bottom) / (hi - lo || 1);
  svg.appendChild(svgElement("line", {class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom}));
  svg.appendChild(svgElement("line", {class: "axis", x1: left, y1: top, x2: left, y2: H - bottom}));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    const label = svgElement("text", {x: left - 4, y: y(v) + 3, "text-anchor": "end"});
    label.textContent = format(v);
    svg.appendChild(label);
  }
  if (rounds.length) {
    const ends = rounds.length > 1 ? [[0, "start"], [rounds.length - 1, "end"]] : [[0, "middle"]];
    for (const [i, anchor] of ends) {
      const label = svgElement("text", {x: x(i), y: H - 6, "text-anchor": anchor});
      label.textContent = "round " + rounds[i];
      svg.appendChild(label);
    }
  }
  svg.setAttribute("data-rounds", rounds.join(","));
  series.forEach((s, k) => {
    svg.setAttribute("data-" + s.name, s.values.join(","));
    const points = s.values.map((v, i) => v === null ? null : [x(i), y(v)]).filter(p => p);
    if (points.length > 1) {
      svg.appendChild(svgElement("polyline", {class: "s" + k, points: points.map(p => p.join(",")).join(" ")}));
    }
    for (const p of points) svg.appendChild(svgElement("circle", {class: "s" + k, cx: p[0], cy: p[1], r: 2.5}));
  });
}

function drawRun(s) {
  const run = s.run;
  text("run-name", run.name);
  text("run-meta", (run.task ? `task ${run.task} · ` : "") + `federation '${run.federation}' · ${run.dataset} · ` +
       `${run.model} · ${run.devices_per_round} devices per round (quorum ${run.min_devices})`);
  const round = document.getElementById("round");
  round.textContent = `round ${run.round} of ${run.rounds}` + (run.attempt > 1 ? ` (attempt ${run.attempt})` : "");
  round.dataset.round = run.round;
  round.dataset.completed = run.completed_rounds;
  text("phase", "· " + run.phase);
  text("activity", run.activity);
  const p = run.progress;
  const fill = document.getElementById("bar-fill");
  fill.style.width = p ? (100 * (p.reported + p.refused) / Math.max(1, p.selected)) + "%" :
    (100 * run.completed_rounds / Math.max(1, run.rounds)) + "%";
  let outcome = "";
  if (run.final_accuracy !== undefined && run.final_accuracy !== null) {
    outcome = `final accuracy ${run.final_accuracy.toFixed(4)}, sparsity ${run.final_sparsity.toFixed(3)} of the ` +
      `prunable weights (${run.final_sparsity_all_weights.toFixed(3)} of all)`;
    for (const e of run.exports || []) outcome += ` · ${e.precision}: ${fmtBytes(e.size_bytes)}` + (e.note ? " (" + e.note + ")" : "");
  }
  text("outcome", outcome);
}

function drawCharts(rounds) {
  const r = rounds.map(x => x.round);
  lineChart(document.getElementById("chart-accuracy"), r,
            [{name: "accuracy", values: rounds.map(x => x.accuracy)}], true, v => v.toFixed(2));
  lineChart(document.getElementById("chart-sparsity"), r,
            [{name: "sparsity", values: rounds.map(x => x.sparsity)},
             {name: "sparsity_all", values: rounds.map(x => x.sparsity_all)}], true, v => v.toFixed(2));
  lineChart(document.getElementById("chart-bytes"), r,
            [{name: "bytes_up", values: rounds.map(x => x.bytes_up)},
             {name: "bytes_down", values: rounds.map(x => x.bytes_down)}], false, fmtBytes);
}

function cell(row, value, cls, field, raw) {
  const td = row.insertCell();
  td.textContent = value;
  if (cls) td.className = cls;
  td.dataset.field = field;
  td.dataset.value = raw === undefined ? value : raw;
}

function drawDevices(devices, now) {
  const body = document.querySelector("#devices tbody");
  while (body.firstChild) body.removeChild(body.firstChild);
  for (const d of devices) {
    const row = body.insertRow();
    row.dataset.device = d.device_id;
    cell(row, d.device_id, "", "device_id");
    cell(row, d.online ? "online" : "offline", d.online ? "online" : "offline", "online", d.online);
    cell(row, ago(Math.max(0, now - d.last_seen)), "", "last_seen", d.last_seen);
    cell(row, d.rounds_done, "num", "rounds_done");
    cell(row, fmtBytes(d.bytes_up), "num", "bytes_up", d.bytes_up);
    cell(row, fmtBytes(d.bytes_down), "num", "bytes_down", d.bytes_down);
    cell(row, d.trainer, "", "trainer");
    cell(row, d.runtime, "", "runtime");
    cell(row, d.last_error, d.last_error ? "error" : "", "last_error");
  }
  text("device-count", `(${devices.filter(d => d.online).length} online of ${devices.length})`);
}

async function refresh() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("status.json: HTTP " + response.status);
    const s = await response.json();
    drawRun(s);
    drawCharts(s.rounds);
    drawDevices(s.devices, s.time);
    document.getElementById("error").hidden = true;
    text("updated", "updated " + new Date(s.time * 1000).toLocaleTimeString());
    document.body.dataset.loaded = "1";
  } catch (e) {
    const error = document.getElementById("error");
    error.hidden = false;
    error.textContent = "no answer from the aggregator (" + e.message + "); the run may have ended";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();

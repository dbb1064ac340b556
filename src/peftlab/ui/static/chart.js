// A small SVG line chart: several series over a shared x axis (step), with axes and a legend.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563",
  "#ca8a04"];

function niceNumber(v) {
  if (v === 0 || !isFinite(v)) return "0";
  const a = Math.abs(v);
  if (a >= 1000 || a < 0.001) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

// series: [{label, points: [[x, y], ...]}]; returns an <svg> element.
function lineChart(title, series, width = 420, height = 240) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("class", "chart");
  svg.dataset.title = title;
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.appendChild(el);
    return el;
  };
  const left = 58, right = 12, top = 26, bottom = 40 + 14 * Math.ceil(series.length / 3);
  const pw = width - left - right, ph = height - top - bottom;
  add("text", {x: left, y: 16, "font-size": 13, "font-weight": "bold"}, title);
  const all = series.flatMap(s => s.points);
  if (all.length === 0) {
    add("text", {x: left + 10, y: top + ph / 2, "font-size": 12, fill: "#94a3b8"}, "no data yet");
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = x => left + (x - x0) / (x1 - x0) * pw;
  const sy = y => top + (1 - (y - y0) / (y1 - y0)) * ph;
  add("rect", {x: left, y: top, width: pw, height: ph, fill: "none", stroke: "#d1d5db"});
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, xv = x0 + (x1 - x0) * i / 4;
    add("line", {x1: left, x2: left + pw, y1: sy(yv), y2: sy(yv), stroke: "#f1f5f9"});
    add("text", {x: left - 4, y: sy(yv) + 4, "font-size": 10, "text-anchor": "end"},
      niceNumber(yv));
    add("text", {x: sx(xv), y: top + ph + 13, "font-size": 10, "text-anchor": "middle"},
      niceNumber(Math.round(xv * 100) / 100));
  }
  add("text", {x: left + pw / 2, y: top + ph + 26, "font-size": 10, "text-anchor": "middle",
    fill: "#6b7280"}, "step");
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = s.points.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    const line = add("polyline", {points: pts, fill: "none", stroke: color, "stroke-width": 1.8});
    line.dataset.series = s.label;
    line.dataset.n = s.points.length;
    if (s.points.length === 1) {
      add("circle", {cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 3, fill: color});
    }
    const lx = left + (i % 3) * (pw / 3), ly = top + ph + 40 + 14 * Math.floor(i / 3);
    add("rect", {x: lx, y: ly - 8, width: 10, height: 10, fill: color});
    add("text", {x: lx + 14, y: ly + 1, "font-size": 11}, s.label.slice(0, 28));
  });
  return svg;
}

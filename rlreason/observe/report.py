"""``rlreason inspect RUN_DIR --html report.html``: one self-contained page with the run's curves and a browser
of its completions, to open from disk or attach to a message.

No server, no network, no CDN: the data is embedded as JSON and drawn by a little inline JavaScript as SVG.
The browser holds every evaluation's samples and, per training step, up to ``samples_per_step``
completions spread evenly over the step (a long run with all its completions would make a page of
gigabytes). A URL fragment picks the view, e.g. ``report.html#source=step-40&min=0.5&q=wait``.

An episode is shown turn by turn, each observation in a box of its own colour and labelled with its role (a
failed tool call in red), so what the environment wrote is never mistaken for the policy's text.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rlreason.observe.inspect_run import CURVES, Run
from rlreason.observe.runlog import spread

_KEEP = ("task", "prompt", "answer", "completion", "rewards", "total", "advantage", "length", "truncated", "turns")


def _weighted_total(rewards: dict[str, Any], weights: dict[str, float]) -> float:
    """An eval sample's total reward, computed as the trainer computes it (rewards that do not apply skipped)."""
    return sum(weights.get(k, 1.0) * v for k, v in rewards.items() if isinstance(v, (int, float)))


def _step_sources(run: Run, samples_per_step: int) -> list[dict[str, Any]]:
    """One sample source per logged step, reading completions.jsonl once and holding one step at a time."""
    sources: list[dict[str, Any]] = []

    def flush(step: int, rows: list[dict[str, Any]]) -> None:
        kept = spread(rows, samples_per_step)
        sources.append({
            "key": f"step-{step}",
            "label": f"step {step}" + (f" ({len(kept)} of {len(rows)})" if len(kept) < len(rows) else ""),
            "samples": [{k: r[k] for k in _KEEP if k in r} for r in kept],
        })

    step, rows = None, []
    for row in run.completions():
        if row["step"] != step and rows:
            flush(step, rows)
            rows = []
        step = row["step"]
        rows.append(row)
    if rows:
        flush(step, rows)
    return sources


def _eval_sources(run: Run) -> list[dict[str, Any]]:
    weights = {r["name"]: r.get("weight", 1.0) for r in run.config.get("rewards", [])}
    return [
        {
            "key": f"eval-{e['stage']}@{e['step']}",
            "label": f"eval {e['stage']}@{e['step']} (greedy, accuracy {'n/a' if e['accuracy'] is None else format(e['accuracy'], '.3f')})",
            "samples": [{**s, "total": _weighted_total(s.get("rewards", {}), weights)} for s in e.get("samples", [])],
        }
        for e in run.evals
    ]


def report_data(run: Run, samples_per_step: int = 32) -> dict[str, Any]:
    """Everything the page shows, as plain JSON: plots (series of [step, value]), the metrics that were 0 at every
    step (named in one line instead of a flat plot each) and sample sources."""
    milestones = [{"step": step, "label": name} for name, step in run.milestones().items() if step is not None]
    plots, zero = [], []
    for title, patterns in CURVES:
        series = []
        for name in run.curve_names(patterns):
            points = run.curve(name)
            if all(value == 0 for _, value in points):
                zero.append(name)
            else:
                series.append({"name": name, "points": points})
        if title.startswith("Accuracy") and run.evals:
            series.append({"name": "held-out (greedy)", "points": [[e["step"], e["accuracy"]] for e in run.evals if e["accuracy"] is not None], "dots": True})
        if series:
            names = {s["name"] for s in series}
            plots.append({"title": title, "series": series, "markers": [m for m in milestones if m["label"] in names]})
    cfg = run.config
    return {
        "title": run.name,
        "meta": {
            "model": cfg.get("model", {}).get("name"),
            "task": cfg.get("task", {}).get("name"),
            "env": cfg.get("rollout", {}).get("env"),
            "steps": run.metrics[-1]["step"] if run.metrics else 0,
            "rewards": [f"{r['name']} x{r.get('weight', 1.0):g}" for r in cfg.get("rewards", [])],
        },
        "plots": plots,
        "always_zero": zero,
        "sources": _step_sources(run, samples_per_step) + _eval_sources(run),
    }


def write_report(run: Run, path: str | Path, samples_per_step: int = 32) -> Path:
    """Write the page to ``path``; returns it."""
    data = json.dumps(report_data(run, samples_per_step), allow_nan=False, default=str)
    # "<" escaped so no completion can close the script element or open a comment
    page = _PAGE.replace("__TITLE__", html.escape(run.name)).replace("__DATA__", data.replace("<", "\\u003c"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>rlreason: __TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .5em; }
#meta { color: #555; }
#plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plot-box { border: 1px solid #ddd; border-radius: 4px; padding: 6px; width: 440px; position: relative; }
.plot-box h3 { font-size: 13px; margin: 0 0 4px; }
svg.plot text { font-size: 10px; fill: #555; }
svg.plot .axis { stroke: #aaa; } svg.plot .grid { stroke: #eee; }
svg.plot .marker { stroke: #c33; stroke-dasharray: 3 3; }
.legend { font-size: 11px; } .legend span { margin-right: 10px; white-space: nowrap; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; vertical-align: middle; }
.tip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #999; padding: 2px 5px;
       font-size: 11px; display: none; white-space: pre; }
#controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 8px; }
#controls input[type=number] { width: 6em; }
#browser { display: flex; gap: 12px; align-items: flex-start; }
#samples { list-style: none; padding: 0; margin: 0; width: 40%; max-height: 70vh; overflow: auto; border: 1px solid #ddd; }
#samples li { padding: 4px 6px; border-bottom: 1px solid #eee; cursor: pointer; font-size: 12px; }
#samples li.selected { background: #e8f0fe; }
#samples li b { font-family: monospace; }
#sample-view { flex: 1; border: 1px solid #ddd; padding: 8px; min-height: 8em; }
#sample-view pre { white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 6px; }
.turn { margin: 6px 0; border-left: 4px solid #bbb; padding-left: 6px; }
.turn pre { margin: 2px 0; }
.turn .role { font-size: 11px; font-weight: bold; text-transform: uppercase; color: #555; }
.turn.observation { border-color: #d4a017; } .turn.observation pre { background: #fff5d6; }
.turn.observation.user { border-color: #3a8f4a; } .turn.observation.user pre { background: #e4f4e7; }
.turn.observation.error { border-color: #c62828; } .turn.observation.error pre { background: #fde4e4; }
.good { color: #080; } .bad { color: #b00; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div id="meta"></div>
<h2>Curves</h2>
<div id="plots"></div>
<p id="always-zero"></p>
<h2>Samples</h2>
<div id="controls">
  <label>source <select id="source"></select></label>
  <label>reward &ge; <input id="min" type="number" step="any"></label>
  <label>reward &le; <input id="max" type="number" step="any"></label>
  <label>text <input id="q" type="search" placeholder="regex, e.g. wait|check"></label>
  <label>order <select id="order"><option value="logged">as logged</option>
    <option value="best">best first</option><option value="worst">worst first</option></select></label>
  <span id="count"></span>
</div>
<div id="browser"><ul id="samples"></ul><div id="sample-view"></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text, ns) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  const a = Math.abs(v);
  return a !== 0 && (a < 0.001 || a >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(3));
}
function ticks(lo, hi, n) {
  const out = [];
  for (let i = 0; i <= n; i++) out.push(lo + (hi - lo) * i / n);
  return out;
}
function tickLabel(v, spacing) {  // as many decimals as the spacing of the ticks needs, so close ticks differ
  if (Math.abs(v) >= 1e5) return v.toExponential(1);
  return v.toFixed(Math.max(0, Math.min(8, 1 - Math.floor(Math.log10(spacing)))));
}

function drawPlot(plot) {
  const W = 430, H = 200, L = 44, R = 8, T = 8, B = 22;
  const pts = plot.series.flatMap((s) => s.points);
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  const box = el("div", {class: "plot-box"});
  box.appendChild(el("h3", {}, plot.title));
  const svg = el("svg", {class: "plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`}, undefined, SVG);
  for (const y of ticks(y0, y1, 4)) {
    svg.appendChild(el("line", {class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y)}, undefined, SVG));
    svg.appendChild(el("text", {x: L - 4, y: sy(y) + 3, "text-anchor": "end"}, tickLabel(y, (y1 - y0) / 4), SVG));
  }
  for (const x of new Set(ticks(x0, x1, Math.min(4, x1 - x0)).map(Math.round))) {  // steps are integers
    svg.appendChild(el("text", {x: sx(x), y: H - 6, "text-anchor": "middle"}, String(x), SVG));
  }
  svg.appendChild(el("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}, undefined, SVG));
  svg.appendChild(el("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}, undefined, SVG));
  for (const m of plot.markers) {
    const line = el("line", {class: "marker", x1: sx(m.step), x2: sx(m.step), y1: T, y2: H - B}, undefined, SVG);
    line.appendChild(el("title", {}, `${m.label} reached its milestone at step ${m.step}`, SVG));
    svg.appendChild(line);
  }
  plot.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    if (s.dots) {
      for (const [x, y] of s.points) svg.appendChild(el("circle", {class: "dot", cx: sx(x), cy: sy(y), r: 3.5, fill: color}, undefined, SVG));
    } else {
      const d = s.points.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
      svg.appendChild(el("path", {class: "line", d, fill: "none", stroke: color, "stroke-width": 1.5}, undefined, SVG));
    }
  });
  const tip = el("div", {class: "tip"});
  svg.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const x = x0 + (ev.clientX - r.left - L) / (W - L - R) * (x1 - x0);
    const lines = plot.series.map((s) => {
      const p = s.points.reduce((a, b) => Math.abs(b[0] - x) < Math.abs(a[0] - x) ? b : a);
      return `${s.name} @${p[0]}: ${fmt(p[1])}`;
    });
    tip.textContent = lines.join("\\n");
    tip.style.display = "block";
    tip.style.left = (ev.clientX - r.left + 12) + "px";
    tip.style.top = (ev.clientY - r.top + 20) + "px";
  });
  svg.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  box.appendChild(svg);
  const legend = el("div", {class: "legend"});
  plot.series.forEach((s, i) => {
    const item = el("span");
    item.appendChild(el("i", {style: `background:${COLORS[i % COLORS.length]}`}));
    item.appendChild(document.createTextNode(s.name));
    legend.appendChild(item);
  });
  box.appendChild(legend);
  box.appendChild(tip);
  $("plots").appendChild(box);
}

let shown = [];
function filtered() {
  const source = DATA.sources[$("source").selectedIndex];
  if (!source) return [];
  const lo = parseFloat($("min").value), hi = parseFloat($("max").value);
  let re = null;
  try { re = $("q").value ? new RegExp($("q").value, "i") : null; } catch (e) { re = null; }
  const rows = source.samples.map((s, i) => ({...s, index: i})).filter((s) =>
    !(s.total < lo) && !(s.total > hi) && (!re || re.test(s.completion)));
  const order = $("order").value;
  if (order !== "logged") rows.sort((a, b) => order === "best" ? b.total - a.total : a.total - b.total);
  return rows;
}
function renderList(select) {
  shown = filtered();
  const list = $("samples");
  list.replaceChildren();
  const source = DATA.sources[$("source").selectedIndex];
  $("count").textContent = source ? `${shown.length} of ${source.samples.length} samples` : "no samples logged";
  shown.forEach((s, i) => {
    const li = el("li", {class: "sample", "data-index": s.index});
    li.appendChild(el("b", {}, `${fmt(s.total)} `));
    li.appendChild(document.createTextNode(s.completion.slice(0, 90).replace(/\\s+/g, " ")));
    li.addEventListener("click", () => showSample(i));
    list.appendChild(li);
  });
  if (shown.length) showSample(Math.min(select || 0, shown.length - 1));
  else $("sample-view").replaceChildren(el("p", {}, "no samples match the filter"));
}
function showSample(i) {
  const s = shown[i];
  [...$("samples").children].forEach((li, j) => li.classList.toggle("selected", j === i));
  const view = $("sample-view");
  view.replaceChildren();
  view.appendChild(el("p", {}, `sample ${s.index + 1}` + (s.task ? ` · ${s.task}` : "")));
  view.appendChild(el("pre", {class: "prompt"}, s.prompt));
  if (s.answer !== null && s.answer !== undefined) view.appendChild(el("p", {}, `reference answer: ${s.answer}`));
  const scores = Object.entries(s.rewards || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
  const head = [`total ${fmt(s.total)}`];
  if (s.advantage !== undefined) head.push(`advantage ${fmt(s.advantage)}`);
  if (s.length !== undefined) head.push(`${s.length} tokens${s.truncated ? " (truncated)" : ""}`);
  view.appendChild(el("p", {class: s.total > 0 ? "good" : "bad"}, head.join(" · ") + (scores ? " | " + scores : "")));
  view.appendChild(s.turns ? episodeView(s.turns) : el("pre", {class: "completion"}, s.completion));
}
function episodeView(turns) {  // the policy's turns grey, each observation boxed in its role's colour
  const box = el("div", {class: "episode"});
  let policy = 0;
  for (const t of turns) {
    const observed = t.role !== "assistant";
    const turn = el("div", {class: observed ? `turn observation ${t.role}${t.error ? " error" : ""}` : "turn policy"});
    const tokens = t.tokens === undefined ? "" : ` · ${t.tokens} tokens`;
    const label = observed ? `${t.role}${t.error ? " (error)" : ""}${tokens}` : `policy · turn ${++policy}`;
    turn.appendChild(el("span", {class: "role"}, label));
    turn.appendChild(el("pre", {}, t.content));
    box.appendChild(turn);
  }
  return box;
}

function init() {
  const m = DATA.meta;
  $("meta").textContent = `model ${m.model} · task ${m.task}` + (m.env ? ` · env ${m.env}` : "")
    + ` · ${m.steps} steps · rewards ${m.rewards.join(", ")}`;
  DATA.plots.forEach(drawPlot);
  if (!DATA.plots.length && !DATA.always_zero.length) $("plots").textContent = "no metrics logged yet";
  if (DATA.always_zero.length) $("always-zero").textContent = `always 0: ${DATA.always_zero.join(", ")}`;
  DATA.sources.forEach((s) => $("source").appendChild(el("option", {value: s.key}, s.label)));
  const params = new URLSearchParams(location.hash.slice(1));
  const steps = DATA.sources.filter((s) => s.key.startsWith("step-"));
  const start = params.get("source") || (steps.length ? steps[steps.length - 1].key : "");
  const index = DATA.sources.findIndex((s) => s.key === start);
  $("source").selectedIndex = Math.max(index, 0);
  for (const k of ["min", "max", "q", "order"]) if (params.has(k)) $(k).value = params.get(k);
  for (const k of ["source", "min", "max", "q", "order"]) $(k).addEventListener("input", () => renderList(0));
  renderList(parseInt(params.get("sample") || "0", 10));
}
init();
</script>
</body>
</html>
"""

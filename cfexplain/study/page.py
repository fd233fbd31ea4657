"""The reader's page: one static HTML file with its script inline, images beside it.

Opens from disk (file://) with no network. One item at a time on a dark background, large
image, keyboard first. Progress and answers live in localStorage under the study id and reader
id, so a reload resumes; "Download answers" saves them as JSON or CSV through a Blob link.
The page holds image names and, for counterfactuals, f's probabilities; never a truth.
"""

from __future__ import annotations

import json
from typing import Any

from cfexplain.utils.markup import esc

ANSWERS_FORMAT = "cfexplain-study-answers/1"

_STYLE = """
:root { color-scheme: dark; }
body { margin: 0; background: #000; color: #ddd; font: 18px/1.45 system-ui, sans-serif; }
header { display: flex; justify-content: space-between; padding: 8px 16px; color: #999;
  font-size: 15px; border-bottom: 1px solid #222; }
main { padding: 12px 16px; text-align: center; }
.view { display: flex; gap: 16px; justify-content: center; align-items: flex-start; }
.view figure { margin: 0; }
.view img { height: min(52vh, 700px); width: auto; max-width: 45vw; background: #000; }
.view img.single { height: min(72vh, 900px); max-width: 90vw; }
figcaption { color: #aaa; font-size: 16px; }
.strip { display: flex; gap: 6px; justify-content: center; margin: 8px 0; flex-wrap: wrap; }
.strip button { background: none; border: 2px solid #333; padding: 2px; color: #bbb;
  font-size: 13px; }
.strip button.on { border-color: #6cf; color: #fff; }
.strip img { height: 64px; display: block; }
.answers { margin: 12px auto; display: flex; gap: 12px; justify-content: center;
  flex-wrap: wrap; align-items: center; }
button.choice { background: #222; color: #eee; border: 2px solid #444; border-radius: 6px;
  font-size: 18px; padding: 6px 14px; min-width: 48px; }
button.choice.on { background: #2a5d8a; border-color: #6cf; }
button:focus-visible, textarea:focus-visible { outline: 3px solid #fc6; }
.question { padding: 4px 8px; border-radius: 6px; }
.question.current { background: #1a2633; }
.keys { color: #888; font-size: 15px; margin-top: 10px; }
kbd { border: 1px solid #555; border-radius: 4px; padding: 0 5px; color: #eee; }
#timer { color: #fc6; min-height: 1.4em; }
#hidden { height: min(72vh, 900px); display: flex; align-items: center;
  justify-content: center; color: #fc6; }
textarea { width: min(60vw, 700px); height: 3.5em; background: #111; color: #eee;
  border: 1px solid #444; font-size: 16px; }
a.download { color: #6cf; margin: 0 8px; }
.note { color: #aaa; max-width: 60em; margin: 0 auto; text-align: left; }
"""

_SCRIPT = r"""
"use strict";
const S = JSON.parse(document.getElementById("study").textContent);
const STORE = "cfexplain-study:" + S.study + ":" + S.reader;
const steps = [{kind: "intro"}];
S.turing.forEach((it, i) => steps.push({kind: "turing", item: it, n: i}));
if (S.counterfactual.length) steps.push({kind: "cfintro"});
S.counterfactual.forEach((it, i) => steps.push({kind: "cf", item: it, n: i}));
steps.push({kind: "done"});
let st = load();
let frame = 0, question = 0, tick = null;
// The <img> nodes of the current item, kept across re-renders: a key press must not reload
// (and flicker) the image the reader is looking at.
const pics = new Map();
const $ = (id) => document.getElementById(id);

function load() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE));
    if (s && s.study === S.study && s.reader === S.reader) return s;
  } catch (e) { /* a damaged entry starts afresh */ }
  return {study: S.study, reader: S.reader, pos: 0, turing: {}, cf: {}, shown: {}};
}
function save() { localStorage.setItem(STORE, JSON.stringify(st)); }
function step() { return steps[Math.min(st.pos, steps.length - 1)]; }
function answer() {
  const s = step();
  if (s.kind === "turing") return st.turing[s.item.id] || (st.turing[s.item.id] = {});
  if (s.kind === "cf") return st.cf[s.item.id] || (st.cf[s.item.id] = {});
  return null;
}
function complete() {
  const s = step(), a = answer();
  if (s.kind === "turing") return !!a.answer && !!a.confidence;
  if (s.kind === "cf") return S.questions.every((q) => !!a[q.id]);
  return s.kind !== "done";
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function choice(label, on, act, key) {
  const b = el("button", {class: "choice" + (on ? " on" : ""), type: "button",
                          "aria-pressed": on ? "true" : "false"}, label);
  if (key) b.setAttribute("aria-keyshortcuts", key);
  b.addEventListener("click", () => { act(); render(); });
  return b;
}
function pic(src, alt, role) {
  const id = role + " " + src;
  if (!pics.has(id)) pics.set(id, el("img", {src}));
  const img = pics.get(id);
  img.setAttribute("alt", alt);
  img.className = role === "single" ? "single" : "";
  return img;
}
function keys(html) { const p = el("p", {class: "keys"}); p.innerHTML = html; return p; }

function render() {
  clearInterval(tick);
  const s = step(), m = $("stage");
  m.replaceChildren();
  $("progress").textContent = s.kind === "turing" ? `Image ${s.n + 1} of ${S.turing.length}`
    : s.kind === "cf" ? `Counterfactual ${s.n + 1} of ${S.counterfactual.length}` : "";
  $("reader").textContent = S.reader;
  if (s.kind === "intro") return intro(m);
  if (s.kind === "cfintro") return cfIntro(m);
  if (s.kind === "done") return finished(m);
  if (!st.shown[s.item.id]) { st.shown[s.item.id] = Date.now(); save(); }
  if (s.kind === "turing") turing(m, s); else counterfactual(m, s);
  timer();
}

function intro(m) {
  m.append(el("h1", {}, "Reader study"));
  const p = el("div", {class: "note"});
  p.append(el("p", {}, `Part 1: ${S.turing.length} images, one at a time. Some are real ` +
    "images of patients, some were made by a generative model. Say which you think each is, and how " +
    "sure you are (1: guessing, 5: certain)."));
  if (S.time_limit_s > 0) p.append(el("p", {}, `Each image is shown for ${S.time_limit_s} s; ` +
    "answer after it is hidden if you need to."));
  if (S.counterfactual.length) p.append(el("p", {}, `Part 2: ${S.counterfactual.length} ` +
    "images with the changes that move a classifier's decision; rate three statements."));
  p.append(el("p", {}, "Your answers stay in this browser until you download them; a reload " +
    "continues where you were."));
  m.append(p, startRow(), keys("<kbd>Enter</kbd> start"));
}

function startRow() {
  const r = el("div", {class: "answers"});
  const b = el("button", {type: "button", class: "choice", id: "next"}, "Start (Enter)");
  b.addEventListener("click", next);
  r.append(b);
  return r;
}

function cfIntro(m) {
  m.append(el("h1", {}, "Part 2: counterfactuals"));
  m.append(el("p", {class: "note"}, "Left: the image. Right: the same image changed step by " +
    `step until the classifier's probability of "${S.target}" (under each step) changes. ` +
    "Rate each statement from 1 (disagree) to 5 (agree)."));
  m.append(startRow(), keys("<kbd>Enter</kbd> start"));
}

function turing(m, s) {
  const a = answer();
  const v = el("div", {class: "view"});
  const img = pic(s.item.src, "image " + (s.n + 1), "single");
  v.append(expired(s) ? hiddenNote() : img);
  m.append(v, el("div", {id: "timer"}));
  const row = el("div", {class: "answers"});
  row.append(choice("Real (R)", a.answer === "real", () => set("answer", "real"), "R"));
  row.append(choice("Generated (G)", a.answer === "generated",
                    () => set("answer", "generated"), "G"));
  row.append(el("span", {}, "Confidence:"));
  for (let c = 1; c <= 5; c++) row.append(choice(String(c), a.confidence === c,
                                                  () => set("confidence", c), String(c)));
  m.append(row, nextRow(), keys("<kbd>R</kbd> real · <kbd>G</kbd> generated · " +
    "<kbd>1</kbd>–<kbd>5</kbd> confidence · <kbd>Enter</kbd> next · <kbd>D</kbd> download answers"));
}

function counterfactual(m, s) {
  const a = answer(), f = s.item.frames;
  frame = Math.min(frame, f.length - 1);
  const v = el("div", {class: "view"});
  const left = el("figure");
  left.append(pic(s.item.input, "input image", "input"),
              el("figcaption", {}, `image · p(${S.target}) = ${s.item.input_p.toFixed(2)}`));
  const right = el("figure");
  right.append(pic(f[frame].src, "changed image, step " + (frame + 1), "frame"),
    el("figcaption", {}, `step ${frame + 1} of ${f.length} · p(${S.target}) = ${f[frame].p.toFixed(2)}`));
  v.append(left, expired(s) ? hiddenNote() : right);
  const strip = el("div", {class: "strip"});
  f.forEach((fr, k) => {
    const b = el("button", {type: "button", class: k === frame ? "on" : ""});
    b.append(pic(fr.src, "step " + (k + 1), "thumb"), el("span", {}, fr.p.toFixed(2)));
    b.addEventListener("click", () => { frame = k; render(); });
    strip.append(b);
  });
  m.append(v, strip, el("div", {id: "timer"}));
  S.questions.forEach((q, qi) => {
    const row = el("div", {class: "answers question" + (qi === question ? " current" : "")});
    row.append(el("span", {}, q.text + ":"));
    for (let c = 1; c <= 5; c++) row.append(choice(String(c), a[q.id] === c,
      () => { question = qi; likert(c); }));
    m.append(row);
  });
  const t = el("textarea", {id: "comment", placeholder: "Comment (optional)",
                            "aria-label": "comment"});
  t.value = a.comment || "";
  t.addEventListener("input", () => { answer().comment = t.value; save(); });
  m.append(t, nextRow(), keys("<kbd>1</kbd>–<kbd>5</kbd> rate the highlighted statement · " +
    "<kbd>↑</kbd> <kbd>↓</kbd> statement · <kbd>←</kbd> <kbd>→</kbd> step · <kbd>C</kbd> " +
    "comment (<kbd>Esc</kbd> leaves it) · <kbd>Enter</kbd> next · <kbd>D</kbd> download answers"));
}

function nextRow() {
  const r = el("div", {class: "answers"});
  const b = el("button", {type: "button", class: "choice", id: "next"}, "Next (Enter)");
  if (!complete()) b.setAttribute("disabled", "");
  b.addEventListener("click", next);
  r.append(b, downloads());
  return r;
}

function finished(m) {
  m.append(el("h1", {}, "Thank you"));
  m.append(el("p", {}, "All answers are given. Download them and send the file to the study team."));
  const r = el("div", {class: "answers"});
  r.append(downloads());
  m.append(r, keys("<kbd>D</kbd> download answers (JSON)"));
}

function downloads() {
  const span = el("span");
  const j = el("a", {href: "#", class: "download", id: "download-json"}, "Download answers (JSON)");
  j.addEventListener("click", (e) => { e.preventDefault(); download("json"); });
  const c = el("a", {href: "#", class: "download", id: "download-csv"}, "(CSV)");
  c.addEventListener("click", (e) => { e.preventDefault(); download("csv"); });
  span.append(j, c);
  return span;
}

function set(field, value) {
  answer()[field] = value;
  save();
}
function likert(c) {
  answer()[S.questions[question].id] = c;
  save();
  const a = answer();
  const open = S.questions.findIndex((q) => !a[q.id]);
  if (open >= 0) question = open;
}

function expired(s) {
  return S.time_limit_s > 0 && Date.now() - st.shown[s.item.id] >= S.time_limit_s * 1000;
}
function hiddenNote() { return el("div", {id: "hidden"}, "Time is up: answer from memory."); }
function timer() {
  if (!(S.time_limit_s > 0)) return;
  const s = step(), shown = st.shown[s.item.id];
  const show = () => {
    const left = S.time_limit_s - (Date.now() - shown) / 1000;
    if (left <= 0) { clearInterval(tick); if (!$("hidden")) render(); return; }
    $("timer").textContent = `${Math.ceil(left)} s`;
  };
  show();
  tick = setInterval(show, 250);
}

function next() {
  if (!complete()) return;
  const s = step();
  if (s.kind === "turing" || s.kind === "cf") {
    const a = answer();
    a.ms = Math.round(Date.now() - st.shown[s.item.id]);
  }
  st.pos = Math.min(st.pos + 1, steps.length - 1);
  frame = 0;
  question = 0;
  pics.clear();
  save();
  render();
  window.scrollTo(0, 0);
}

function records() {
  const turing = S.turing.filter((it) => st.turing[it.id] && st.turing[it.id].ms !== undefined)
    .map((it, i) => ({order: i + 1, item: it.id, answer: st.turing[it.id].answer,
                      confidence: st.turing[it.id].confidence, ms: st.turing[it.id].ms}));
  const cf = S.counterfactual.filter((it) => st.cf[it.id] && st.cf[it.id].ms !== undefined)
    .map((it, i) => {
      const a = st.cf[it.id], r = {order: i + 1, item: it.id};
      S.questions.forEach((q) => { r[q.id] = a[q.id]; });
      r.comment = a.comment || "";
      r.ms = a.ms;
      return r;
    });
  return {turing, counterfactual: cf};
}
function csvCell(v) {
  const s = v === undefined || v === null ? "" : String(v);
  return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}
function download(kind) {
  const r = records(), finished = step().kind === "done";
  let text, type;
  if (kind === "json") {
    text = JSON.stringify({format: S.answers_format, study: S.study, reader: S.reader, finished,
                           turing: r.turing, counterfactual: r.counterfactual}, null, 2);
    type = "application/json";
  } else {
    const cols = ["study", "reader", "part", "order", "item", "answer", "confidence",
                  ...S.questions.map((q) => q.id), "comment", "ms"];
    const rows = [cols];
    r.turing.forEach((a) => rows.push(cols.map((c) => c === "study" ? S.study
      : c === "reader" ? S.reader : c === "part" ? "turing" : a[c])));
    r.counterfactual.forEach((a) => rows.push(cols.map((c) => c === "study" ? S.study
      : c === "reader" ? S.reader : c === "part" ? "counterfactual" : a[c])));
    text = rows.map((row) => row.map(csvCell).join(",")).join("\n") + "\n";
    type = "text/csv";
  }
  const a = el("a", {href: URL.createObjectURL(new Blob([text], {type})),
                     download: `answers-${S.reader}-${S.study}.${kind}`});
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "TEXTAREA") {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const s = step(), k = e.key.toLowerCase();
  if (k === "enter") { e.preventDefault(); next(); return; }
  if (k === "d") { download("json"); return; }
  if (s.kind === "turing") {
    if (k === "r") set("answer", "real");
    else if (k === "g") set("answer", "generated");
    else if (k >= "1" && k <= "5") set("confidence", Number(k));
    else return;
  } else if (s.kind === "cf") {
    const n = s.item.frames.length;
    if (k >= "1" && k <= "5") likert(Number(k));
    else if (k === "arrowup") question = (question + S.questions.length - 1) % S.questions.length;
    else if (k === "arrowdown") question = (question + 1) % S.questions.length;
    else if (k === "arrowleft") frame = Math.max(0, frame - 1);
    else if (k === "arrowright") frame = Math.min(n - 1, frame + 1);
    else if (k === "c") { e.preventDefault(); $("comment").focus(); return; }
    else return;
  } else return;
  e.preventDefault();
  render();
});
render();
"""


def render_page(spec: dict[str, Any]) -> str:
    """The reader page of ``spec`` (study id, reader id, time limit, target class name,
    questions, Turing items ``{id, src}``, counterfactual items ``{id, input, input_p,
    frames: [{src, p}]}``), as one HTML document."""
    spec = {**spec, "answers_format": ANSWERS_FORMAT}
    data = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>Reader study · {esc(spec["reader"])}</title>
<style>{_STYLE}</style>
</head>
<body>
<header><span id="reader"></span><span id="progress" aria-live="polite"></span></header>
<main id="stage" aria-live="polite"></main>
<noscript><p>This page needs JavaScript (no network: everything is in this folder).</p></noscript>
<script type="application/json" id="study">{data}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""

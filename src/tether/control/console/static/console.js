// Tether console: times in the viewer's zone (UTC on hover) and the live tasks table.
"use strict";
function localTimes(root) {
  for (const el of root.querySelectorAll("time[data-ms], time[data-ms-iso]")) {
    const ms = el.dataset.ms ? Number(el.dataset.ms) : Date.parse(el.dataset.msIso);
    if (!ms || el.dataset.local) continue;
    const d = new Date(ms);
    el.title = d.toISOString().replace(".000Z", "Z") + " (UTC)";
    el.dateTime = d.toISOString();
    el.textContent = d.toLocaleString(undefined, {
      year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
    });
    el.dataset.local = "1";
  }
}
function live() {
  const box = document.getElementById("live");
  const rows = document.getElementById("task-rows");
  if (!box || !rows || !window.EventSource) return;
  const state = document.getElementById("live-state");
  const source = new EventSource(box.dataset.events);
  source.addEventListener("open", () => { state.textContent = "on"; });
  source.addEventListener("error", () => { state.textContent = "reconnecting"; });
  source.addEventListener("rows", (ev) => {
    rows.innerHTML = ev.data;
    localTimes(rows);
    state.textContent = "on";
  });
}
document.addEventListener("DOMContentLoaded", () => { localTimes(document); live(); });

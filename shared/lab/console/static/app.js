// paylab console: polls the gateway's /console/api/view, shows the network, and on a click
// the ladder of one transaction (/console/api/trace). No framework, no build step.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token") || "paylab-lab-reader"; // the lab's public reader token
const headers = { Authorization: "Bearer " + token };
const SERVICES = ["acquirer", "gateway", "billing", "hsm"];

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function getJson(path) {
  const r = await fetch(path, { headers });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function showNetwork(view) {
  for (const name of SERVICES) {
    const box = document.querySelector(`.box[data-service="${name}"]`);
    const up = view.services[name];
    box.classList.toggle("up", up === true);
    box.classList.toggle("down", up === false);
    box.querySelector(".state").textContent = up ? "up" : "down";
    const tps = view.tps[name];
    box.querySelector(".tps").textContent = tps === null || tps === undefined ? "" : tps.toFixed(1) + " req/s";
  }
  const rows = {};
  for (const l of view.links || []) rows[l.upstream] = rows[l.upstream] || l;
  const rtts = {};
  for (const l of view.gateway_links || []) rtts[l.name] = l.last_echo_rtt_ms;
  for (const name of ["gateway", "billing", "hsm"]) {
    const link = document.querySelector(`.link[data-link="${name}"]`);
    const row = rows[name];
    const healthy = row && row.healthy !== null && row.healthy > 0;
    link.classList.toggle("healthy", !!healthy);
    link.classList.toggle("unhealthy", !!row && !healthy);
    const parts = [];
    if (row) {
      if (row.healthy !== null) parts.push(row.target === null ? `${row.healthy} healthy` : `${row.healthy}/${row.target} healthy`);
      if (row.breaker) parts.push("breaker " + row.breaker);
    }
    if (rtts[name] !== undefined && rtts[name] !== null) parts.push(`echo ${rtts[name]} ms`);
    link.querySelector(".detail").textContent = parts.join(" · ");
  }
  const codes = document.querySelector("#codes tbody");
  codes.replaceChildren();
  for (const c of view.codes || []) {
    const tr = el("tr");
    for (const v of [c.code, c.meaning, c.interval, c.total]) tr.append(el("td", v));
    codes.append(tr);
  }
  const q = view.saf;
  document.getElementById("queue").textContent = q
    ? `${q.queued} queued · ${q.in_flight} in flight · ${q.dead} dead · ${q.done} done`
    : "not available";
}

let selected = null;

function showTransactions(rows) {
  const body = document.querySelector("#transactions tbody");
  body.replaceChildren();
  for (const t of rows) {
    const tr = el("tr");
    tr.dataset.rrn = t.rrn || "";
    if (t.rrn && t.rrn === selected) tr.classList.add("selected");
    const when = (t.received_at || "").replace("T", " ").slice(0, 19);
    for (const v of [when, t.mti, t.rrn, t.stan, t.terminal_id, t.bill_number, t.amount, t.response_code, t.status]) {
      tr.append(el("td", v));
    }
    tr.addEventListener("click", () => t.rrn && showTrace(t.rrn));
    body.append(tr);
  }
}

function ms(us) {
  return us === null || us === undefined ? "" : (us / 1000).toFixed(2) + " ms";
}

async function showTrace(rrn) {
  selected = rrn;
  document.getElementById("trace").hidden = false;
  document.getElementById("trace-rrn").textContent = rrn;
  const ladder = document.getElementById("ladder");
  ladder.replaceChildren(el("div", "loading…", "muted"));
  let data;
  try {
    data = await getJson("/console/api/trace?rrn=" + encodeURIComponent(rrn));
  } catch (e) {
    ladder.replaceChildren(el("div", String(e), "note"));
    return;
  }
  ladder.replaceChildren();
  const t0 = data.arrows.length ? (data.arrows[0].sent_us ?? data.arrows[0].received_us) : 0;
  for (const a of data.arrows) {
    const row = el("div", null, "arrow-row");
    row.dataset.from = a.from;
    row.dataset.to = a.to;
    row.dataset.code = a.code;
    const at = (a.sent_us ?? a.received_us) - t0;
    row.append(el("span", "t=" + ms(at)));
    row.append(el("span", `${a.from} → ${a.to}`));
    const label = el("span", a.label);
    if (a.result) label.append(el("b", ` [${a.result}${a.result_text ? " " + a.result_text : ""}]`, "result"));
    if (a.note) label.append(el("span", "  (" + a.note + ")", "note"));
    row.append(label);
    row.append(el("span", (a.hop_us !== null ? "+" + ms(a.hop_us) : "") + (a.transit_us !== null ? " wire " + ms(a.transit_us) : ""), "muted"));
    if (a.result && a.result !== "00") row.classList.add("declined");
    ladder.append(row);
    if (a.fields && a.fields.length) {
      const box = el("div", null, "fields");
      box.hidden = true;
      const table = el("table");
      for (const f of a.fields) {
        const tr = el("tr");
        for (const v of [f.field === "t" ? "MTI" : f.field, f.name, f.format, f.value, f.meaning]) tr.append(el("td", v));
        table.append(tr);
      }
      box.append(table);
      row.addEventListener("click", () => { box.hidden = !box.hidden; });
      ladder.append(box);
    }
  }
  if (!data.arrows.length) ladder.append(el("div", "no messages recorded for this transaction", "muted"));
}

async function tick() {
  try {
    const view = await getJson("/console/api/view");
    showNetwork(view);
    showTransactions(view.transactions || []);
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "yes";
  } catch (e) {
    document.getElementById("status").textContent = String(e);
  }
}

tick();
setInterval(tick, 2000);
const first = params.get("rrn");
if (first) showTrace(first);

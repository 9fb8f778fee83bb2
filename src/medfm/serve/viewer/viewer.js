// medfm viewer: PACS studies, a window/level + zoom canvas, model results with overlays, the draft report
// and its cited cases. Plain JS, same-origin fetch (the login cookie authenticates every call). Every value
// from the service goes into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  // Objects without pixels to show (mirrors medfm.pacs.types.NON_IMAGE_MODALITIES).
  const NON_IMAGE = new Set(["SR", "SEG", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RTPLAN"]);
  const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  const MIN_SCALE = 0.05;
  const MAX_SCALE = 40;

  const state = {
    gen: 0, // bumped on every study / image change: late answers for an earlier one are dropped
    study: null,
    instance: null, // the QIDO row of the image shown
    img: null, // {data: Float32Array, rows, cols, min, max, wc0, ww0, pixels: ImageData}
    wc: 0,
    ww: 1,
    scale: 1,
    panX: 0,
    panY: 0,
    busy: false,
    pacs: false,
    storedSR: null,
    frame: 0,
  };

  // ---- talking to the service ------------------------------------------------------------------------
  function detailOf(body, status) {
    const d = body && body.detail;
    if (typeof d === "string" && d) return d;
    if (Array.isArray(d)) return d.map((e) => (e && e.msg) || String(e)).join("; ");
    return `HTTP ${status}`;
  }

  async function api(path, options) {
    let r;
    try {
      r = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
    } catch (_) {
      throw new Error("the medfm service is not reachable");
    }
    if (!r.ok) {
      let body = null;
      try {
        body = await r.json();
      } catch (_) {
        body = null;
      }
      throw new Error(detailOf(body, r.status));
    }
    return r;
  }

  const getJSON = async (path, options) => (await api(path, options)).json();
  const enc = encodeURIComponent;
  const query = (o) => new URLSearchParams(o).toString();

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.className = "status" + (kind ? " " + kind : "");
  }

  function showError(e, what) {
    const msg = (e && e.message) || String(e);
    setStatus(`${what}: ${msg}`, "error");
    console.error(what, e);
  }

  // ---- small helpers ---------------------------------------------------------------------------------
  const asList = (v) => (Array.isArray(v) ? v : v == null || v === "" ? [] : [v]);

  function formatDate(d) {
    const s = String(d || "");
    return /^\d{8}$/.test(s) ? `${s.slice(0, 4)}-${s.slice(4, 6)}-${s.slice(6, 8)}` : s || "(no date)";
  }

  function isMedfm(row) {
    const maker = String(row.Manufacturer || "").trim().toLowerCase();
    const desc = String(row.SeriesDescription || "").trim().toLowerCase();
    return maker === "medfm" || desc.startsWith("medfm ");
  }

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    Object.assign(e, props || {});
    for (const c of children) e.append(c);
    return e;
  }

  function clear(node) {
    while (node.firstChild) node.firstChild.remove();
  }

  // ---- studies ---------------------------------------------------------------------------------------
  async function loadStudies() {
    const body = $("studies");
    setStatus("Loading studies…", "busy");
    let rows;
    try {
      rows = await getJSON("/v1/pacs/studies");
    } catch (e) {
      showError(e, "Could not list the studies");
      return;
    }
    clear(body);
    rows.sort((a, b) => String(b.StudyDate || "").localeCompare(String(a.StudyDate || "")));
    $("studies-empty").hidden = rows.length > 0;
    for (const s of rows) {
      const uid = s.StudyInstanceUID;
      if (!uid) continue;
      const open = el("button", { type: "button", className: "study", textContent: formatDate(s.StudyDate) });
      open.dataset.study = uid;
      open.setAttribute("aria-label", `Open study of ${formatDate(s.StudyDate)}`);
      const tr = el("tr", {},
        el("td", {}, open),
        el("td", { textContent: asList(s.ModalitiesInStudy).join(", ") || "—" }),
        el("td", { textContent: s.NumberOfStudyRelatedInstances == null ? "—" :
          String(s.NumberOfStudyRelatedInstances) }),
        el("td", { className: "has-results", textContent: "…" }));
      tr.dataset.study = uid;
      if (uid === state.study) tr.classList.add("selected");
      tr.addEventListener("click", () => openStudy(uid));
      body.append(tr);
    }
    setStatus(rows.length ? `${rows.length} ${rows.length === 1 ? "study" : "studies"}` : "No studies", "");
    checkResults(rows.map((s) => s.StudyInstanceUID).filter(Boolean));
  }

  function studyRow(uid) {
    for (const tr of $("studies").rows) if (tr.dataset.study === uid) return tr;
    return null;
  }

  function markResults(uid, n) {
    const tr = studyRow(uid);
    if (!tr) return;
    const cell = tr.querySelector(".has-results");
    clear(cell);
    if (n > 0) {
      cell.append(el("span", { className: "badge", textContent: "results" }));
      cell.setAttribute("aria-label", `${n} medfm result objects`);
    } else {
      cell.textContent = n === 0 ? "—" : "?";
    }
  }

  async function medfmResults(uid) {
    const rows = await getJSON(`/v1/pacs/studies/${enc(uid)}/results`);
    return rows.filter(isMedfm);
  }

  async function checkResults(uids) {
    // A few searches at a time: enough for a worklist, gentle on the PACS.
    const queue = uids.slice(0, 200);
    const worker = async () => {
      while (queue.length) {
        const uid = queue.shift();
        try {
          markResults(uid, (await medfmResults(uid)).length);
        } catch (_) {
          markResults(uid, -1);
        }
      }
    };
    await Promise.all([worker(), worker(), worker()]);
  }

  async function openStudy(uid) {
    const gen = ++state.gen;
    state.study = uid;
    state.storedSR = null;
    for (const tr of $("studies").rows) tr.classList.toggle("selected", tr.dataset.study === uid);
    clearAnalysis();
    clearResultsList();
    setStatus("Loading study…", "busy");
    let rows;
    try {
      rows = await getJSON(`/v1/pacs/studies/${enc(uid)}/instances`);
    } catch (e) {
      if (gen === state.gen) showError(e, "Could not list the study's images");
      return;
    }
    if (gen !== state.gen) return;
    const images = rows.filter((r) => !NON_IMAGE.has(String(r.Modality || "")) && !isMedfm(r));
    images.sort((a, b) => (Number(a.InstanceNumber) || 0) - (Number(b.InstanceNumber) || 0));
    const select = $("instances");
    clear(select);
    images.forEach((r, i) => {
      const label = `${r.Modality || "image"} #${r.InstanceNumber == null ? i + 1 : r.InstanceNumber}`;
      select.append(el("option", { value: String(i), textContent: label }));
    });
    select.disabled = images.length < 2;
    select.onchange = () => loadImage(images[Number(select.value)]);
    refreshResults(uid);
    if (!images.length) {
      setStatus("This study has no image to show", "error");
      return;
    }
    await loadImage(images[0]);
  }

  // ---- the image -------------------------------------------------------------------------------------
  async function loadImage(row) {
    const gen = ++state.gen;
    state.instance = null;
    setControls(false);
    clearAnalysis();
    setStatus("Loading image…", "busy");
    const q = query({ study: row.StudyInstanceUID || state.study, series: row.SeriesInstanceUID,
      instance: row.SOPInstanceUID });
    let r, buf;
    try {
      r = await api(`/v1/pacs/image?${q}`);
      buf = await r.arrayBuffer();
    } catch (e) {
      if (gen === state.gen) showError(e, "Could not load the image");
      return;
    }
    if (gen !== state.gen) return;
    const rows = Number(r.headers.get("X-Rows"));
    const cols = Number(r.headers.get("X-Cols"));
    if (!(rows > 0 && cols > 0) || buf.byteLength !== rows * cols * 4) {
      setStatus("The service sent an image of unexpected size", "error");
      return;
    }
    let data;
    if (LITTLE_ENDIAN) {
      data = new Float32Array(buf);
    } else {
      const view = new DataView(buf);
      data = new Float32Array(rows * cols);
      for (let i = 0; i < data.length; i++) data[i] = view.getFloat32(4 * i, true);
    }
    let min = Infinity;
    let max = -Infinity;
    for (let i = 0; i < data.length; i++) {
      const v = data[i];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    if (!Number.isFinite(min)) {
      min = 0;
      max = 1;
    }
    const wcHeader = parseFloat(r.headers.get("X-Window-Center"));
    const wwHeader = parseFloat(r.headers.get("X-Window-Width"));
    const canvas = $("canvas");
    for (const c of [canvas, $("overlay"), $("saliency")]) {
      c.width = cols;
      c.height = rows;
    }
    const pixels = canvas.getContext("2d").createImageData(cols, rows);
    state.img = {
      data, rows, cols, min, max, pixels,
      wc0: Number.isFinite(wcHeader) ? wcHeader : (min + max) / 2,
      ww0: Number.isFinite(wwHeader) && wwHeader > 0 ? wwHeader : Math.max(max - min, 1e-3),
    };
    state.instance = row;
    setupSliders();
    resetWindow();
    fit();
    $("viewport-hint").hidden = true;
    setControls(true);
    canvas.dataset.loaded = "true";
    setStatus(`Image ${cols} × ${rows}`, "");
  }

  function range() {
    const img = state.img;
    return Math.max(img.max - img.min, 1e-3);
  }

  function setupSliders() {
    const img = state.img;
    const step = range() / 1000;
    const wc = $("wc");
    const ww = $("ww");
    wc.min = String(img.min - range() / 2);
    wc.max = String(img.max + range() / 2);
    wc.step = String(step);
    ww.min = String(step);
    ww.max = String(range() * 2);
    ww.step = String(step);
  }

  function resetWindow() {
    state.wc = state.img.wc0;
    state.ww = state.img.ww0;
    render();
  }

  function render() {
    if (!state.img || state.frame) return;
    state.frame = requestAnimationFrame(() => {
      state.frame = 0;
      draw();
    });
  }

  function draw() {
    const img = state.img;
    if (!img) return;
    const px = img.pixels.data; // Uint8ClampedArray: assignments clamp to 0..255 and round
    const lo = state.wc - state.ww / 2;
    const k = 255 / state.ww;
    const d = img.data;
    for (let i = 0, j = 0; i < d.length; i++, j += 4) {
      const g = (d[i] - lo) * k;
      px[j] = g;
      px[j + 1] = g;
      px[j + 2] = g;
      px[j + 3] = 255;
    }
    $("canvas").getContext("2d").putImageData(img.pixels, 0, 0);
    $("wc").value = String(state.wc);
    $("ww").value = String(state.ww);
    const digits = range() > 100 ? 0 : 2;
    $("wl-readout").textContent =
      `Window level ${state.wc.toFixed(digits)}, width ${state.ww.toFixed(digits)}`;
  }

  // ---- zoom and pan: one CSS transform on the stack of image + overlay canvases ----------------------
  function applyTransform() {
    $("stack").style.transform = `translate(${state.panX}px, ${state.panY}px) scale(${state.scale})`;
    $("zoom-level").textContent = `${Math.round(state.scale * 100)}%`;
  }

  function fit() {
    const img = state.img;
    if (!img) return;
    const vp = $("viewport");
    const s = Math.min(vp.clientWidth / img.cols, vp.clientHeight / img.rows) || 1;
    state.scale = Math.min(Math.max(s, MIN_SCALE), MAX_SCALE);
    state.panX = (vp.clientWidth - img.cols * state.scale) / 2;
    state.panY = (vp.clientHeight - img.rows * state.scale) / 2;
    applyTransform();
  }

  function zoomAt(factor, cx, cy) {
    if (!state.img) return;
    const next = Math.min(Math.max(state.scale * factor, MIN_SCALE), MAX_SCALE);
    const f = next / state.scale;
    state.panX = cx - (cx - state.panX) * f;
    state.panY = cy - (cy - state.panY) * f;
    state.scale = next;
    applyTransform();
  }

  function zoomCentre(factor) {
    const vp = $("viewport");
    zoomAt(factor, vp.clientWidth / 2, vp.clientHeight / 2);
  }

  function setControls(on) {
    for (const id of ["wc", "ww", "wl-reset", "zoom-in", "zoom-out", "zoom-fit"]) $(id).disabled = !on;
    updateRunButtons();
  }

  function updateRunButtons() {
    const off = !state.instance || state.busy || !state.pacs;
    $("run").disabled = off;
    $("run-store").disabled = off;
  }

  function bindViewport() {
    const vp = $("viewport");
    vp.addEventListener("wheel", (e) => {
      if (!state.img) return;
      e.preventDefault();
      const r = vp.getBoundingClientRect();
      zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });

    let drag = null;
    vp.addEventListener("pointerdown", (e) => {
      if (!state.img || (e.button !== 0 && e.button !== 1)) return;
      e.preventDefault();
      vp.focus();
      vp.setPointerCapture(e.pointerId);
      drag = { x: e.clientX, y: e.clientY, wc: state.wc, ww: state.ww, panX: state.panX, panY: state.panY,
        pan: e.shiftKey || e.button === 1 };
      vp.classList.toggle("panning", drag.pan);
    });
    vp.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x;
      const dy = e.clientY - drag.y;
      if (drag.pan) {
        state.panX = drag.panX + dx;
        state.panY = drag.panY + dy;
        applyTransform();
        return;
      }
      // Horizontal drag: width; vertical: level (one viewport width ~ the image's value range).
      const per = range() / Math.max(vp.clientWidth, 1);
      state.ww = Math.max(range() / 1000, drag.ww + dx * per);
      state.wc = drag.wc + dy * per;
      render();
    });
    const end = (e) => {
      if (!drag) return;
      drag = null;
      vp.classList.remove("panning");
      if (vp.hasPointerCapture(e.pointerId)) vp.releasePointerCapture(e.pointerId);
    };
    vp.addEventListener("pointerup", end);
    vp.addEventListener("pointercancel", end);
    vp.addEventListener("keydown", (e) => {
      if (!state.img) return;
      if (e.key === "+" || e.key === "=") zoomCentre(1.25);
      else if (e.key === "-") zoomCentre(0.8);
      else if (e.key === "0") fit();
      else return;
      e.preventDefault();
    });
    window.addEventListener("resize", () => state.img && fit());
  }

  // ---- analysis --------------------------------------------------------------------------------------
  function clearAnalysis() {
    clear($("findings"));
    $("ood-warning").hidden = true;
    $("ood-score").textContent = "";
    $("report").textContent = "Run the models to draft a report.";
    $("report").classList.add("muted");
    clear($("cited"));
    for (const [layer, toggle] of [["overlay", "overlay-toggle"], ["saliency", "saliency-toggle"]]) {
      const c = $(layer);
      c.getContext("2d").clearRect(0, 0, c.width, c.height);
      c.hidden = true;
      delete c.dataset.drawn;
      $(toggle).disabled = true;
    }
    closeCase();
  }

  function clearResultsList() {
    clear($("results"));
    const a = $("download-sr");
    a.hidden = true;
    a.removeAttribute("href");
  }

  async function runModels(store) {
    const row = state.instance;
    if (!row || state.busy) return;
    const gen = state.gen;
    const study = row.StudyInstanceUID || state.study;
    state.busy = true;
    updateRunButtons();
    $("results-title").parentElement.setAttribute("aria-busy", "true");
    setStatus(store ? "Running the models and storing the results in the PACS…" : "Running the models…",
      "busy");
    try {
      const body = new URLSearchParams({ study, series: row.SeriesInstanceUID,
        instance: row.SOPInstanceUID, store: store ? "true" : "false" });
      const res = await getJSON("/v1/pacs/analyse", { method: "POST", body });
      if (gen !== state.gen) return;
      await showAnalysis(res);
      if (res.stored) {
        state.storedSR = res.stored.SR || null;
        await refreshResults(study);
        setStatus(`Stored in the PACS: ${Object.keys(res.stored).join(", ")}`, "ok");
      } else {
        setStatus("Models done (nothing stored)", "ok");
      }
    } catch (e) {
      if (gen === state.gen) showError(e, "The models failed");
    } finally {
      state.busy = false;
      updateRunButtons();
      $("results-title").parentElement.removeAttribute("aria-busy");
    }
  }

  async function showAnalysis(res) {
    clearAnalysis();
    showFindings(res.findings);
    showOod(res.ood);
    showReport(res.report);
    await Promise.all([
      showLayer("overlay", "overlay-toggle", res.overlay),
      showLayer("saliency", "saliency-toggle", res.saliency),
    ]);
  }

  function showFindings(findings) {
    const body = $("findings");
    if (!Array.isArray(findings) || !findings.length) {
      body.append(el("tr", {}, el("td", { colSpan: 3, className: "muted", textContent: "No classifier served." })));
      return;
    }
    for (const f of findings) {
      const p = Number(f.probability);
      const pct = Number.isFinite(p) ? `${(p * 100).toFixed(1)} %` : "—";
      const fill = el("span");
      fill.style.width = `${Math.round(Math.min(Math.max(p, 0), 1) * 100)}%`;
      const bar = el("span", { className: "prob-bar" }, fill);
      bar.setAttribute("aria-hidden", "true");
      const tr = el("tr", {},
        el("th", { scope: "row", textContent: String(f.name) }),
        el("td", {}, el("span", { className: "prob" }, bar, el("span", { className: "prob-value", textContent: pct }))),
        el("td", { className: f.positive ? "positive" : "", textContent: f.positive ? "Yes" : "No" }));
      tr.dataset.finding = String(f.name);
      body.append(tr);
    }
  }

  function showOod(ood) {
    const banner = $("ood-warning");
    if (!ood) {
      $("ood-score").textContent = "No out-of-distribution check served.";
      return;
    }
    const text = `score ${ood.score} (threshold ${ood.threshold})`;
    $("ood-score").textContent = `Out-of-distribution ${text}`;
    if (ood.out_of_distribution) {
      banner.textContent = `Warning: this image is out of distribution (${text}). It is unlike the data the ` +
        "model was validated on: treat the findings with caution.";
      banner.hidden = false;
    }
  }

  function showReport(report) {
    const box = $("report");
    const list = $("cited");
    if (!report) {
      box.textContent = "No report: the service has no image-report model with a case index.";
      return;
    }
    box.textContent = String(report.report || "(empty report)");
    box.classList.remove("muted");
    const evidence = new Map(asList(report.evidence).map((e) => [e.case_id, e]));
    const cited = asList(report.cited);
    if (!cited.length) list.append(el("li", { className: "muted", textContent: "No case cited." }));
    for (const id of cited) {
      const ev = evidence.get(id);
      const a = el("a", { href: `#case-${id}`, textContent: String(id) });
      a.dataset.case = id;
      a.addEventListener("click", (e) => {
        e.preventDefault();
        openCase(id, a);
      });
      const extra = ev ? ` — similarity ${ev.similarity}` +
        (asList(ev.positive_findings).length ? `; ${asList(ev.positive_findings).join(", ")}` : "") : "";
      list.append(el("li", {}, a, el("span", { className: "muted", textContent: extra })));
    }
  }

  function showLayer(layerId, toggleId, dataUrl) {
    const canvas = $(layerId);
    const toggle = $(toggleId);
    if (!dataUrl || !state.img) {
      toggle.disabled = true;
      canvas.hidden = true;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const im = new Image();
      im.onload = () => {
        const ctx = canvas.getContext("2d");
        ctx.clearRect(0, 0, canvas.width, canvas.height);
        ctx.drawImage(im, 0, 0, canvas.width, canvas.height); // same grid as the image (scaled if not)
        canvas.dataset.drawn = "true";
        toggle.disabled = false;
        canvas.hidden = !toggle.checked;
        resolve();
      };
      im.onerror = () => {
        setStatus(`Could not decode the ${layerId} image`, "error");
        resolve();
      };
      im.src = dataUrl;
    });
  }

  // ---- stored results --------------------------------------------------------------------------------
  async function refreshResults(uid) {
    let rows;
    try {
      rows = await medfmResults(uid);
    } catch (e) {
      if (uid === state.study) showError(e, "Could not search the study's results");
      return;
    }
    markResults(uid, rows.length);
    if (uid !== state.study) return;
    clearResultsList();
    const list = $("results");
    if (!rows.length) {
      list.append(el("li", { className: "muted", textContent: "No medfm results stored in this study." }));
      return;
    }
    const href = (r) => `/v1/pacs/dicom?${query({ study: r.StudyInstanceUID || uid,
      series: r.SeriesInstanceUID, instance: r.SOPInstanceUID })}`;
    for (const r of rows) {
      const a = el("a", { href: href(r), textContent: `${r.Modality || "object"}` });
      a.setAttribute("download", "");
      const desc = r.SeriesDescription ? ` — ${r.SeriesDescription}` : "";
      list.append(el("li", {}, a, el("span", { className: "muted", textContent: desc })));
    }
    const srs = rows.filter((r) => r.Modality === "SR");
    if (srs.length) {
      const sr = srs.find((r) => r.SOPInstanceUID === state.storedSR) || srs[srs.length - 1];
      const link = $("download-sr");
      link.href = href(sr);
      link.hidden = false;
    }
  }

  // ---- a cited case in the side panel ----------------------------------------------------------------
  let caseOpener = null;
  let caseUrl = null;

  async function openCase(id, opener) {
    const panel = $("case-panel");
    caseOpener = opener || null;
    $("case-title").textContent = `Similar case ${id}`;
    $("case-report").textContent = "Loading…";
    const img = $("case-image");
    img.removeAttribute("src");
    img.hidden = true;
    panel.hidden = false;
    panel.dataset.case = id;
    $("case-close").focus();
    try {
      const c = await getJSON(`/v1/cases/${enc(id)}`);
      if (panel.dataset.case !== id) return;
      $("case-report").textContent = String(c.report || "(no report)");
      const blob = await (await api(`/v1/cases/${enc(id)}/image`)).blob();
      if (panel.dataset.case !== id) return;
      if (caseUrl) URL.revokeObjectURL(caseUrl);
      caseUrl = URL.createObjectURL(blob);
      img.src = caseUrl;
      img.hidden = false;
    } catch (e) {
      if (panel.dataset.case === id) {
        if ($("case-report").textContent === "Loading…") $("case-report").textContent = "";
        showError(e, `Could not open case ${id}`);
      }
    }
  }

  function closeCase() {
    const panel = $("case-panel");
    if (panel.hidden) return;
    panel.hidden = true;
    delete panel.dataset.case;
    if (caseOpener && document.body.contains(caseOpener)) caseOpener.focus();
    caseOpener = null;
  }

  // ---- start -----------------------------------------------------------------------------------------
  async function start() {
    bindViewport();
    $("wc").addEventListener("input", (e) => {
      state.wc = Number(e.target.value);
      render();
    });
    $("ww").addEventListener("input", (e) => {
      state.ww = Math.max(Number(e.target.value), range() / 1000);
      render();
    });
    $("wl-reset").addEventListener("click", resetWindow);
    $("zoom-in").addEventListener("click", () => zoomCentre(1.25));
    $("zoom-out").addEventListener("click", () => zoomCentre(0.8));
    $("zoom-fit").addEventListener("click", fit);
    $("overlay-toggle").addEventListener("change", (e) => {
      $("overlay").hidden = !e.target.checked || !$("overlay").dataset.drawn;
    });
    $("saliency-toggle").addEventListener("change", (e) => {
      $("saliency").hidden = !e.target.checked || !$("saliency").dataset.drawn;
    });
    $("run").addEventListener("click", () => runModels(false));
    $("run-store").addEventListener("click", () => runModels(true));
    $("refresh-studies").addEventListener("click", loadStudies);
    $("case-close").addEventListener("click", closeCase);
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") closeCase();
    });

    let health;
    try {
      health = await getJSON("/health");
    } catch (e) {
      $("models").textContent = "";
      showError(e, "The medfm service did not answer");
      return;
    }
    const models = asList(health.models);
    $("models").textContent = models.length
      ? "Models: " + models.map((m) => `${m.name} (${m.kind})`).join(" · ")
      : "No models served";
    state.pacs = Boolean(health.pacs);
    if (!state.pacs) {
      setStatus("No PACS configured: start the service with --pacs URL", "error");
      $("studies-empty").hidden = false;
      $("studies-empty").textContent = "No PACS configured.";
      return;
    }
    await loadStudies();
  }

  document.addEventListener("DOMContentLoaded", start);
})();

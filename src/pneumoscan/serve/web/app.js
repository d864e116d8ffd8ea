// pneumoscan triage page: upload X-rays, show a worklist sorted suspected-pneumonia first.
// Plain JavaScript with no dependencies: everything is served by the pneumoscan app itself.
"use strict";

(() => {
  const state = {
    model: null, // GET /v1/model
    results: [], // every result so far, with an upload sequence number
    sequence: 0,
    apiKey: sessionStorage.getItem("pneumoscan-api-key") || "",
  };
  const $ = (selector) => document.querySelector(selector);

  function headers() {
    return state.apiKey ? { "X-API-Key": state.apiKey } : {};
  }

  function setStatus(text, isError = false) {
    const status = $("#status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function formatMB(bytes) {
    return `${Math.round((bytes / (1024 * 1024)) * 10) / 10} MB`;
  }

  async function detail(response) {
    try {
      const body = await response.json();
      return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (error) {
      return response.statusText;
    }
  }

  // ----------------------------------------------------------------------- model information

  async function loadModel() {
    let response;
    try {
      response = await fetch("/v1/model", { headers: headers() });
    } catch (error) {
      $("#model").textContent = "Cannot reach the pneumoscan server.";
      return;
    }
    if (response.status === 401) {
      $("#key-row").hidden = false;
      $("#model").textContent = "This server needs an API key.";
      return;
    }
    if (response.status === 503) {
      $("#model").textContent = "The model is loading…";
      setTimeout(loadModel, 2000);
      return;
    }
    if (!response.ok) {
      $("#model").textContent = `Model unavailable: ${await detail(response)}`;
      return;
    }
    state.model = await response.json();
    $("#key-row").hidden = true;
    const threshold = formatThreshold(state.model.threshold);
    $("#model").textContent =
      `Model ${state.model.name} · operating threshold P(pneumonia) ≥ ${threshold}`;
    const limits = state.model.limits;
    $("#limits").textContent =
      `Up to ${limits.max_files} files at a time, ${formatMB(limits.max_upload_bytes)} each.`;
  }

  // ----------------------------------------------------------------------------- uploading

  // Thresholds show at least 4 decimals, more where fewer would round them to 0 or 1 (0.99996
  // must not read 1.0000): as pneumoscan.formatting.format_threshold.
  function thresholdDecimals(value) {
    let decimals = 4;
    while (decimals < 10) {
      const shown = Number(value.toFixed(decimals));
      if ((shown >= 1 && value < 1) || (shown <= 0 && value > 0)) {
        decimals += 1;
      } else {
        break;
      }
    }
    return decimals;
  }

  function formatThreshold(value) {
    return value == null || Number.isNaN(value) ? "n/a" : value.toFixed(thresholdDecimals(value));
  }

  // A probability shown with as many decimals as the threshold beside it.
  function formatProbability(p, threshold) {
    return p.toFixed(threshold == null ? 3 : Math.max(3, thresholdDecimals(threshold)));
  }

  function localError(file, reason) {
    return {
      filename: file.name,
      status: "error",
      probability: null,
      decision: null,
      p_viral: null,
      subtype_estimate: null,
      threshold: state.model ? state.model.threshold : null,
      reason,
      heatmap: null,
      image: null,
    };
  }

  async function uploadBatch(files) {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    const heatmap = state.model && state.model.heatmaps ? "true" : "false";
    const response = await fetch(`/v1/predict?heatmap=${heatmap}&image=true`, {
      method: "POST",
      headers: headers(),
      body: form,
    });
    if (response.status === 401) {
      $("#key-row").hidden = false;
      throw new Error("The server needs a valid API key.");
    }
    if (!response.ok) throw new Error(await detail(response));
    return (await response.json()).results;
  }

  async function analyse(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    if (!state.model) await loadModel();
    if (!state.model) {
      setStatus("The model is not available yet; try again shortly.", true);
      return;
    }
    const limits = state.model.limits;
    const accepted = [];
    for (const file of files) {
      if (file.size > limits.max_upload_bytes) {
        addResults([localError(file, `${file.name}: larger than the ${formatMB(limits.max_upload_bytes)} limit per file`)]);
      } else {
        accepted.push(file);
      }
    }
    let failed = 0;
    for (let start = 0; start < accepted.length; start += limits.max_files) {
      const batch = accepted.slice(start, start + limits.max_files);
      setStatus(`Analysing ${accepted.length} X-ray${accepted.length === 1 ? "" : "s"}…`);
      try {
        addResults(await uploadBatch(batch));
      } catch (error) {
        failed += batch.length;
        setStatus(`Upload failed: ${error.message}`, true);
      }
    }
    if (!failed) setStatus(`Analysed ${files.length} file${files.length === 1 ? "" : "s"}.`);
  }

  // ----------------------------------------------------------------------------- worklist

  function rank(result) {
    // Triage order: suspected pneumonia, then scores close to the threshold (read with
    // care), then files nobody analysed (a human must look), then no pneumonia detected.
    if (result.status === "ok" && result.decision === "PNEUMONIA" && !result.near_threshold) {
      return 0;
    }
    if (result.status === "ok" && result.near_threshold) return 1;
    if (result.status !== "ok") return 2;
    return 3;
  }

  function compare(a, b) {
    return (
      rank(a) - rank(b) ||
      (b.probability ?? -1) - (a.probability ?? -1) ||
      a.sequence - b.sequence
    );
  }

  function addResults(results) {
    for (const result of results) state.results.push({ ...result, sequence: state.sequence++ });
    render();
  }

  // The words never contradict the number: a score close to the operating threshold is not
  // called "no pneumonia" (or "pneumonia") with confidence, whichever side it falls on.
  function decisionText(result) {
    if (result.status === "ok") {
      if (result.near_threshold) {
        const side = result.decision === "PNEUMONIA" ? "just above" : "just below";
        return `Close to the threshold: read with care (${side} it)`;
      }
      return result.decision === "PNEUMONIA"
        ? "Pneumonia suspected — review first"
        : "No pneumonia detected";
    }
    if (result.status === "rejected") return "Not analysed: not a frontal chest X-ray";
    return "Not analysed: the file could not be read";
  }

  function kind(result) {
    if (result.status !== "ok") return result.status;
    if (result.near_threshold) return "near";
    return result.decision === "PNEUMONIA" ? "suspected" : "normal";
  }

  // The bar shows the score relative to the operating point (TorchXRayVision's op_norm):
  // the threshold always sits in the middle, so a bar's length says how far a score is from
  // the decision, not a frequency the model cannot promise at a new site.
  function renderMeter(item, result) {
    const block = item.querySelector(".meter-block");
    if (result.status !== "ok") {
      block.hidden = true;
      return;
    }
    const p = result.probability;
    const score = result.op_score;
    const meter = item.querySelector(".meter");
    meter.setAttribute("aria-valuenow", String(score));
    meter.setAttribute("aria-label", `Score relative to the threshold for ${result.filename}`);
    meter.setAttribute(
      "aria-valuetext",
      `${score.toFixed(2)} (threshold at 0.50; P(pneumonia) ${formatProbability(p, result.threshold)})`,
    );
    // Style properties set from script are allowed by the page's CSP (no inline styles).
    item.querySelector(".fill").style.width = `${(score * 100).toFixed(2)}%`;
    item.querySelector(".threshold-mark").style.left = "50%";
    item.querySelector(".meter-text").textContent =
      `Score ${score.toFixed(2)} (threshold at 0.50) · ` +
      `P(pneumonia) ${formatProbability(p, result.threshold)}, ` +
      `threshold ${formatThreshold(result.threshold)}`;
  }

  // The service sends a subtype only for PNEUMONIA decisions of a model with a subtype
  // head; the label travels with the number so it never reads as a diagnosis.
  const SUBTYPE_LABEL = "estimate, not a microbiological diagnosis";

  function renderSubtype(item, result) {
    const line = item.querySelector(".subtype");
    const shown =
      result.status === "ok" &&
      result.decision === "PNEUMONIA" &&
      result.subtype_estimate != null &&
      result.p_viral != null;
    line.hidden = !shown;
    if (!shown) return;
    line.textContent =
      `Subtype estimate: ${result.subtype_estimate} ` +
      `(P(viral) ${result.p_viral.toFixed(2)}) — ${SUBTYPE_LABEL}`;
  }

  function renderPicture(item, result) {
    const picture = item.querySelector(".picture");
    const toggle = item.querySelector(".heatmap-toggle");
    const imageSource = result.image ? `data:image/png;base64,${result.image}` : null;
    const heatmapSource = result.heatmap ? `data:image/png;base64,${result.heatmap}` : null;
    if (!imageSource && !heatmapSource) {
      picture.hidden = true;
      item.querySelector(".no-image").hidden = false;
    } else {
      picture.src = imageSource || heatmapSource;
      picture.alt = `X-ray ${result.filename}`;
    }
    if (!heatmapSource) {
      item.querySelector(".toggle").hidden = true;
      return;
    }
    toggle.setAttribute("aria-label", `Show heatmap for ${result.filename}`);
    toggle.addEventListener("change", () => {
      const showHeatmap = toggle.checked || !imageSource;
      picture.src = showHeatmap ? heatmapSource : imageSource;
      picture.alt = `${showHeatmap ? "Heatmap overlay on" : "X-ray"} ${result.filename}`;
      item.classList.toggle("showing-heatmap", showHeatmap);
    });
  }

  function renderItem(result) {
    const item = $("#result-template").content.firstElementChild.cloneNode(true);
    item.classList.add(kind(result));
    item.dataset.status = result.status;
    if (result.probability !== null) item.dataset.probability = String(result.probability);
    item.querySelector(".filename").textContent = result.filename;
    item.querySelector(".decision").textContent = decisionText(result);
    const reason = item.querySelector(".reason");
    reason.textContent = result.reason || "";
    reason.hidden = !result.reason;
    renderMeter(item, result);
    renderSubtype(item, result);
    renderPicture(item, result);
    return item;
  }

  function render() {
    const list = $("#worklist");
    const sorted = [...state.results].sort(compare);
    list.replaceChildren(...sorted.map(renderItem));
    $("#empty").hidden = sorted.length > 0;
    $("#clear").hidden = sorted.length === 0;
  }

  // ----------------------------------------------------------------------------- wiring

  function wireDropZone() {
    const drop = $("#drop");
    for (const type of ["dragenter", "dragover"]) {
      document.addEventListener(type, (event) => {
        event.preventDefault();
        drop.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "dragend"]) {
      document.addEventListener(type, () => drop.classList.remove("dragging"));
    }
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
      if (event.dataTransfer && event.dataTransfer.files.length) analyse(event.dataTransfer.files);
    });
  }

  function wire() {
    wireDropZone();
    const input = $("#files");
    input.addEventListener("change", async () => {
      await analyse(input.files);
      input.value = ""; // choosing the same files again analyses them again
    });
    $("#clear").addEventListener("click", () => {
      state.results = [];
      render();
      setStatus("");
    });
    $("#key-save").addEventListener("click", () => {
      state.apiKey = $("#api-key").value.trim();
      sessionStorage.setItem("pneumoscan-api-key", state.apiKey);
      loadModel();
    });
    loadModel();
  }

  document.addEventListener("DOMContentLoaded", wire);
})();

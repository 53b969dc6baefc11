/* cxrbench browser app: OOD gate, calibrated probabilities and a CAM heat-map, all inside this page.
 *
 * Written by `cxrbench export-web`; reads config.json (labels, preprocessing, operating points, OOD cutoff)
 * and the exported graphs in models/. Preprocessing reproduces cxrbench.preprocess.Preprocess:
 * grey = Pillow's ITU-R 601-2 luma, square centre crop, then Pillow's two-pass antialiased resampling
 * (float64 sums, float32 intermediate, as Pillow's mode "F"), clip to [0, 1], optional histogram
 * equalisation (scikit-image's equalize_hist), normalisation (x - mean) / std. The "canvas-*" resize
 * modes use the browser's drawImage instead (the path Chester used; for the preprocessing study).
 *
 * API for tests and scripts:
 *   window.cxrbenchReady                     Promise of {load_s, threads, ort}
 *   window.cxrbenchAnalyze(src, options)     Promise of {probabilities (calibrated), raw, logits, ood_score, ...}
 *   window.cxrbenchPreprocess(src, options)  Promise of {x, x_ood, size, channels, ood_size}: the model inputs,
 *                                            flat arrays (or base64 float32 with options.encoding = "base64")
 * src: URL string, File/Blob, HTMLImageElement, HTMLCanvasElement or ImageBitmap.
 * options: {resize: "pillow" | "canvas-high" | "canvas-low", allowOod: bool, render: bool, preprocess: {...}}
 */
(function () {
  "use strict";
  const state = { config: null, cam: null, ood: null };
  const now = () => performance.now();

  // ------------------------------------------------------------------ resampling (Pillow's Resample.c)
  const FILTERS = {
    bilinear: { support: 1.0, f: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; } },
    area: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) },
    bicubic: { support: 2.0, f: (x) => {
      const a = -0.5; x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0; } },
    lanczos: { support: 3.0, f: (x) => {
      const sinc = (t) => (t === 0.0 ? 1.0 : Math.sin(t * Math.PI) / (t * Math.PI));
      return -3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0; } },
  };

  function coefficients(inSize, outSize, filter) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = filter.support * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Float64Array(outSize * ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1.0 / filterscale;
      const xmin = Math.max(0, Math.trunc(center - support + 0.5));
      const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) {
        const w = filter.f((x + xmin - center + 0.5) * ss);
        kk[xx * ksize + x] = w;
        ww += w;
      }
      if (ww !== 0.0) for (let x = 0; x < xmax; x++) kk[xx * ksize + x] /= ww;
      bounds[2 * xx] = xmin;
      bounds[2 * xx + 1] = xmax;
    }
    return { bounds, kk, ksize };
  }

  /** Pillow Image.resize of a mode-"F" square image: horizontal pass, then vertical. */
  function resizePillow(src, n, size, resample) {
    const filter = FILTERS[resample];
    if (!filter) throw new Error(`resample '${resample}' is not supported in the browser`);
    const c = coefficients(n, size, filter);
    const tmp = new Float32Array(n * size);
    for (let y = 0; y < n; y++) {
      for (let xx = 0; xx < size; xx++) {
        const xmin = c.bounds[2 * xx], xmax = c.bounds[2 * xx + 1], k = xx * c.ksize;
        let ss = 0.0;
        for (let x = 0; x < xmax; x++) ss += src[y * n + xmin + x] * c.kk[k + x];
        tmp[y * size + xx] = ss;
      }
    }
    const out = new Float32Array(size * size);
    for (let yy = 0; yy < size; yy++) {
      const ymin = c.bounds[2 * yy], ymax = c.bounds[2 * yy + 1], k = yy * c.ksize;
      for (let xx = 0; xx < size; xx++) {
        let ss = 0.0;
        for (let y = 0; y < ymax; y++) ss += tmp[(ymin + y) * size + xx] * c.kk[k + y];
        out[yy * size + xx] = ss;
      }
    }
    for (let i = 0; i < out.length; i++) out[i] = Math.min(1, Math.max(0, out[i]));
    return out;
  }

  // ------------------------------------------------------------------ decoding
  async function toBitmap(src) {
    // as cxrbench.io.read_image: no colour management, no EXIF rotation, alpha kept apart
    const opts = { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "none" };
    if (typeof src === "string") {
      const response = await fetch(src);
      if (!response.ok) throw new Error(`cannot read ${src}: HTTP ${response.status}`);
      src = await response.blob();
    }
    try {
      return await createImageBitmap(src, opts);
    } catch (err) {
      throw new Error(`cannot read this file as an image (${err.message || err})`);
    }
  }

  /** Grey pixels in [0, 1] as float32, as cxrbench.io.read_image gives them for 8-bit images. */
  function greyPixels(bitmap) {
    const w = bitmap.width, h = bitmap.height;
    if (!w || !h) throw new Error("the image is empty (0 pixels)");
    const canvas = new OffscreenCanvas(w, h);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const rgba = ctx.getImageData(0, 0, w, h).data;
    const grey = new Float32Array(w * h);
    for (let i = 0; i < w * h; i++) {
      const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2], a = rgba[4 * i + 3];
      const luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16; // Pillow's convert("L")
      grey[i] = a === 255 ? luma / 255 : (luma * (a / 255)) / 255;
    }
    return { grey, width: w, height: h };
  }

  function squareBox(w, h, crop) {
    if (crop === "pad") {
      const side = Math.max(w, h);
      return { side, left: -Math.floor((side - w) / 2), top: -Math.floor((side - h) / 2) };
    }
    const side = Math.min(w, h);
    return { side, left: Math.floor((w - side) / 2), top: Math.floor((h - side) / 2) };
  }

  /** Preprocess.geometry: (size, size) float32 in [0, 1]. */
  function geometry(img, bitmap, pp, resize) {
    const box = squareBox(img.width, img.height, pp.crop);
    if (resize === "pillow" || box.side === pp.size) {
      const sq = new Float32Array(box.side * box.side);
      for (let y = 0; y < box.side; y++) {
        const sy = y + box.top;
        if (sy < 0 || sy >= img.height) continue;
        for (let x = 0; x < box.side; x++) {
          const sx = x + box.left;
          if (sx >= 0 && sx < img.width) sq[y * box.side + x] = img.grey[sy * img.width + sx];
        }
      }
      return box.side === pp.size ? sq : resizePillow(sq, box.side, pp.size, pp.resample);
    }
    const canvas = new OffscreenCanvas(pp.size, pp.size);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pp.size, pp.size);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = resize === "canvas-high" ? "high" : "low";
    ctx.drawImage(bitmap, box.left, box.top, box.side, box.side, 0, 0, pp.size, pp.size);
    return greyPixels(canvas.transferToImageBitmap()).grey;
  }

  /** scikit-image equalize_hist(image, nbins=256) on float32 values (float32 bin edges, as numpy). */
  function equalizeHist(x) {
    let lo = Infinity, hi = -Infinity;
    for (const v of x) { if (v < lo) lo = v; if (v > hi) hi = v; }
    if (hi - lo < 1e-8) return x;
    const f = Math.fround, nb = 256, edges = new Float32Array(nb + 1), hist = new Float64Array(nb);
    const span = f(hi - lo), step = f(span / nb); // numpy 2 computes linspace in float32 here
    for (let i = 0; i < nb; i++) edges[i] = f(f(i * step) + lo);
    edges[nb] = hi;
    for (const v of x) {
      let i = Math.min(nb - 1, Math.floor(f(f(f(v - lo) / span) * nb)));
      if (v < edges[i]) i -= 1;
      else if (i < nb - 1 && v >= edges[i + 1]) i += 1;
      hist[i] += 1;
    }
    const cdf = new Float64Array(nb), centers = new Float32Array(nb);
    let total = 0;
    for (let i = 0; i < nb; i++) { total += hist[i]; cdf[i] = total; }
    for (let i = 0; i < nb; i++) { cdf[i] /= total; centers[i] = (edges[i] + edges[i + 1]) / 2; }
    const out = new Float32Array(x.length);
    for (let p = 0; p < x.length; p++) {
      const v = x[p];
      let y;
      if (v <= centers[0]) y = cdf[0];
      else if (v >= centers[nb - 1]) y = cdf[nb - 1];
      else {
        let a = 0, b = nb - 1; // centers[a] <= v < centers[b]
        while (b - a > 1) { const m = (a + b) >> 1; if (centers[m] <= v) a = m; else b = m; }
        y = ((cdf[b] - cdf[a]) / (centers[b] - centers[a])) * (v - centers[a]) + cdf[a];
      }
      out[p] = Math.min(1, Math.max(0, y));
    }
    return out;
  }

  /** Preprocess.intensity: (C, size, size) float32 model input. */
  function intensity(img, pp, mean, std) {
    if (pp.equalize === "hist") img = equalizeHist(img);
    else if (pp.equalize !== "none") throw new Error(`equalize '${pp.equalize}' is not available in the browser`);
    const n = img.length, out = new Float32Array(pp.channels * n);
    for (let c = 0; c < pp.channels; c++) {
      for (let i = 0; i < n; i++) out[c * n + i] = Math.fround(img[i] - mean[c]) / std[c];
    }
    return out;
  }

  function statsOf(pp) {
    const c = pp.channels;
    if (pp.normalize === "zero_one") return [Array(c).fill(0), Array(c).fill(1)];
    if (pp.normalize === "minus1_1") return [Array(c).fill(0.5), Array(c).fill(0.5)];
    if (pp.normalize === "xrv") return [Array(c).fill(0.5), Array(c).fill(0.5 / 1024)];
    const m = [0.485, 0.456, 0.406], s = [0.229, 0.224, 0.225];
    if (c === 3) return [m, s];
    return [[(m[0] + m[1] + m[2]) / 3], [(s[0] + s[1] + s[2]) / 3]];
  }

  async function preprocess(src, options = {}) {
    const cfg = await ready();
    const resize = options.resize || "pillow";
    const pp = options.preprocess || cfg.preprocess;
    const [mean, std] = options.preprocess ? statsOf(pp).map((a) => a.map(Math.fround)) : [cfg.normalize_mean, cfg.normalize_std];
    const t0 = now();
    const bitmap = src instanceof ImageBitmap ? src : await toBitmap(src);
    const img = greyPixels(bitmap);
    const t1 = now();
    const display = geometry(img, bitmap, pp, resize);
    const x = intensity(display, pp, mean.map(Math.fround), std.map(Math.fround));
    let xOod = null, oodDisplay = null;
    if (cfg.ood_preprocess) {
      const opp = cfg.ood_preprocess;
      oodDisplay = geometry(img, bitmap, opp, resize);
      const [om, os] = statsOf(opp);
      xOod = intensity(oodDisplay, opp, om.map(Math.fround), os.map(Math.fround));
    }
    return { x, xOod, display, oodDisplay, pp, decode_s: (t1 - t0) / 1000, preprocess_s: (now() - t1) / 1000 };
  }

  // ------------------------------------------------------------------ models
  async function init() {
    const t0 = now();
    const response = await fetch("config.json");
    const cfg = await response.json();
    ort.env.wasm.wasmPaths = new URL("./", document.baseURI).href;
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    ort.env.wasm.proxy = false;
    const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    state.cam = await ort.InferenceSession.create(cfg.graphs.cam, opts);
    state.ood = cfg.graphs.ood ? await ort.InferenceSession.create(cfg.graphs.ood, opts) : null;
    state.config = cfg;
    const info = { load_s: (now() - t0) / 1000, threads: ort.env.wasm.numThreads, ort: (ort.env.versions && ort.env.versions.web) || "" };
    status(`models loaded in ${info.load_s.toFixed(1)} s (${info.threads} thread${info.threads > 1 ? "s" : ""}); choose an image.`);
    return info;
  }
  const readyPromise = init().catch((err) => { status(`could not load the models: ${err.message || err}`); throw err; });
  const ready = async () => { await readyPromise; return state.config; };

  async function analyze(src, options = {}) {
    const cfg = await ready();
    const t0 = now();
    const p = await preprocess(src, options);
    const result = { findings: cfg.labels, operating_points: cfg.thresholds, resize: options.resize || "pillow",
                     rejected: false, in_distribution: null, ood_score: null,
                     timings: { decode: p.decode_s, preprocess: p.preprocess_s } };
    if (state.ood) {
      const t = now();
      const s = p.oodDisplay.length;
      const side = Math.round(Math.sqrt(s));
      const out = await state.ood.run({ x: new ort.Tensor("float32", p.xOod, [1, 1, side, side]) });
      const cut = cfg.ood_cutoff || { scorer: "ssim", threshold: Infinity };
      const scores = {};
      for (const k of ["l1", "l2", "ssim", "ssim_raw", "latent"]) scores[k] = out[k].data[0];
      result.ood = { scorer: cut.scorer, cutoff: cut.threshold, scores };
      result.ood_score = scores[cut.scorer];
      result.in_distribution = result.ood_score <= cut.threshold;
      result.rejected = !result.in_distribution && !options.allowOod;
      result.reconstruction = out.reconstruction.data;
      result.timings.ood = (now() - t) / 1000;
    }
    if (!result.rejected) {
      const t = now();
      const pp = p.pp;
      const out = await state.cam.run({ x: new ort.Tensor("float32", p.x, [1, pp.channels, pp.size, pp.size]) });
      result.logits = Array.from(out.logits.data);
      result.raw = Array.from(out.probabilities.data);
      result.calibrated = Array.from(out.calibrated.data, (v) => (Number.isNaN(v) ? null : v));
      result.probabilities = result.calibrated;
      result.timings.classify = (now() - t) / 1000;
      const order = result.calibrated.map((v, i) => [v === null ? -1 : v, i]).sort((a, b) => b[0] - a[0]);
      result.cam_finding = cfg.labels[order[0][1]];
      result.cam = out.cam.data.subarray(order[0][1] * pp.size * pp.size, (order[0][1] + 1) * pp.size * pp.size);
    }
    result.timings.total = (now() - t0) / 1000;
    if (options.render !== false) render(result, p);
    delete result.cam;
    delete result.reconstruction;
    return result;
  }

  // ------------------------------------------------------------------ drawing
  function status(text) { const el = document.getElementById("status"); if (el) el.textContent = text; }

  function jet(v) { // blue -> cyan -> yellow -> red, v in [0, 1]
    const r = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 3)));
    const g = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 2)));
    const b = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 1)));
    return [255 * r, 255 * g, 255 * b];
  }

  function paint(canvas, grey, side, heat) {
    canvas.width = side; canvas.height = side;
    const ctx = canvas.getContext("2d");
    const im = ctx.createImageData(side, side);
    let lo = Infinity, hi = -Infinity;
    if (heat) for (const v of heat) { if (v < lo) lo = v; if (v > hi) hi = v; }
    for (let i = 0; i < side * side; i++) {
      let rgb = [255 * grey[i], 255 * grey[i], 255 * grey[i]];
      if (heat && hi > lo) {
        const c = jet((heat[i] - lo) / (hi - lo));
        rgb = rgb.map((g, k) => 0.55 * g + 0.45 * c[k]);
      }
      im.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
    }
    ctx.putImageData(im, 0, 0);
  }

  function render(result, p) {
    const verdict = document.getElementById("verdict");
    if (result.in_distribution === null) { verdict.textContent = "no OOD gate in this export"; verdict.className = ""; }
    else if (result.in_distribution) { verdict.textContent = "Looks like a frontal chest X-ray."; verdict.className = "ok"; }
    else {
      verdict.textContent = `This does not look like a frontal chest X-ray (${result.ood.scorer} score ` +
        `${result.ood_score.toFixed(3)} > cutoff ${result.ood.cutoff.toFixed(3)})` + (result.rejected ? "; no prediction is made." : "; analysed anyway.");
      verdict.className = "rejected";
    }
    paint(document.getElementById("display"), p.display, p.pp.size, result.rejected ? null : result.cam);
    document.getElementById("cam-title").textContent = result.rejected ? "image" : `CAM heat-map: ${result.cam_finding}`;
    if (p.oodDisplay && result.reconstruction) {
      const side = Math.round(Math.sqrt(p.oodDisplay.length));
      paint(document.getElementById("ood-input"), p.oodDisplay, side, null);
      paint(document.getElementById("ood-recon"), result.reconstruction, side, null);
      document.getElementById("ood-score").textContent = `${result.ood.scorer} = ${result.ood_score.toFixed(3)} (cutoff ${result.ood.cutoff.toFixed(3)})`;
    }
    const body = document.querySelector("#results tbody");
    body.textContent = "";
    if (!result.rejected) {
      const rows = result.findings.map((f, i) => [f, result.calibrated[i], result.raw[i]]);
      rows.sort((a, b) => (b[1] ?? -1) - (a[1] ?? -1));
      for (const [f, cal, raw] of rows) {
        const tr = document.createElement("tr");
        const bar = cal === null ? "" : `<span class="bar${cal > 0.5 ? " above" : ""}" style="width:${(100 * cal).toFixed(0)}px"></span>`;
        tr.innerHTML = `<td>${f}</td><td class="num">${cal === null ? "n/a" : cal.toFixed(3)}</td><td>${bar}</td><td class="num">${raw.toFixed(3)}</td>`;
        body.appendChild(tr);
      }
    }
    status(`analysed in ${result.timings.total.toFixed(2)} s, in this browser.`);
  }

  async function onFile() {
    const input = document.getElementById("file");
    if (!input.files || !input.files.length) return;
    status("analysing…");
    try {
      await analyze(input.files[0], { resize: document.getElementById("resize").value,
                                      allowOod: document.getElementById("allow-ood").checked });
    } catch (err) {
      status(`Cannot read ${input.files[0].name}: ${err.message || err}`);
    }
  }

  window.cxrbenchReady = readyPromise;
  window.cxrbenchAnalyze = analyze;
  function base64(floats) { // little-endian float32 bytes, base64 (much faster to hand over than a JSON list)
    const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(text);
  }
  window.cxrbenchPreprocess = async (src, options = {}) => {
    const p = await preprocess(src, options);
    const encode = options.encoding === "base64" ? base64 : (a) => Array.from(a);
    return { x: encode(p.x), x_ood: p.xOod ? encode(p.xOod) : null, size: p.pp.size, channels: p.pp.channels,
             ood_size: p.oodDisplay ? Math.round(Math.sqrt(p.oodDisplay.length)) : null };
  };
  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("file").addEventListener("change", onFile);
  });
})();

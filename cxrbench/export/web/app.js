/* cxrbench browser app: OOD gate, calibrated probabilities and a CAM or saliency heat-map, all inside this page.
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
 *   window.cxrbenchAnalyze(src, options)     Promise of {probabilities (calibrated), raw, logits, ood_score, guard,
 *                                            reason, map_kind, map_finding, timings, map_b64 (with returnMap), ...}
 *   window.cxrbenchPreprocess(src, options)  Promise of {x, x_ood, size, channels, ood_size}: the model inputs,
 *                                            flat arrays (or base64 float32 with options.encoding = "base64")
 * src: URL string, File/Blob, HTMLImageElement, HTMLCanvasElement or ImageBitmap.
 * options: {resize: "pillow" | "canvas-high" | "canvas-low", allowOod: bool, render: bool, preprocess: {...},
 *           explain: "cam" | "saliency", finding: "all" | "top" | name | index (saliency), returnMap: bool}
 * The gate runs the blank-image guard of cxrbench.ood.guard (thresholds in config.json) before the OOD model; a
 * 16-bit greyscale PNG is decoded with UPNG.js (not the 8-bit canvas) and scaled by its effective bit depth; the
 * canvas-* modes resize it on float16 canvases where the browser has them (result.canvas_precision), else at 8 bits.
 */
(function () {
  "use strict";
  const state = { config: null, cam: null, ood: null, saliency: null, saliencyLoad: null };
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

  // ------------------------------------------------------------------ 16-bit greyscale PNG (cxrbench.io.read_image)
  const PNG_MAGIC = [137, 80, 78, 71, 13, 10, 26, 10];
  const EFFECTIVE_DEPTHS = [8, 10, 12, 14, 16];

  /** IHDR fields and the sBIT of a PNG (null if the bytes are not a PNG). */
  function pngHeader(bytes) {
    if (bytes.length < 33 || PNG_MAGIC.some((v, i) => bytes[i] !== v)) return null;
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const info = { width: dv.getUint32(16), height: dv.getUint32(20), depth: bytes[24], ctype: bytes[25], sbit: null };
    for (let pos = 8; pos + 8 <= bytes.length;) {
      const len = dv.getUint32(pos), kind = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
      if (kind === "IDAT" || kind === "IEND") break;
      if (kind === "sBIT" && len >= 1 && pos + 8 < bytes.length) {
        const b = bytes[pos + 8];
        info.sbit = b >= 1 && b <= 16 ? b : null;
      }
      pos += 12 + len;
    }
    return info;
  }

  /** A 16-bit greyscale PNG scaled by its effective bit depth (sBIT, else the smallest of 8..16 holding its maximum). */
  function grey16(bytes, header) {
    if (typeof UPNG === "undefined" || typeof pako === "undefined") {
      throw new Error("16-bit PNG: this app folder lacks its PNG decoder (UPNG.js, pako.min.js); write it again with cxrbench export-web");
    }
    let png;
    try {
      png = UPNG.decode(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    } catch (err) {
      throw new Error(`cannot read this file as an image (16-bit PNG: ${err.message || err})`);
    }
    const w = png.width, h = png.height, n = w * h, d = png.data;
    if (!w || !h) throw new Error("the image is empty (0 pixels)");
    if (!d || d.length < 2 * n) throw new Error("cannot read this file as an image (16-bit PNG: truncated image data)");
    const raw = new Uint16Array(n);
    let vmax = 0;
    for (let i = 0; i < n; i++) { const v = (d[2 * i] << 8) | d[2 * i + 1]; raw[i] = v; if (v > vmax) vmax = v; }
    const bits = header.sbit !== null ? header.sbit : EFFECTIVE_DEPTHS.find((b) => b >= 16 || vmax < 2 ** b);
    const scale = 2 ** bits - 1, grey = new Float32Array(n);
    for (let i = 0; i < n; i++) grey[i] = raw[i] / scale; // float32(v / scale): float32 division of the same integers
    return { grey, width: w, height: h, bit_depth: 16, effective_bits: bits };
  }

  /** Decoded source: {img: {grey, width, height, bit_depth, effective_bits}, bitmap (null for 16-bit PNG)}. */
  async function decode(src) {
    if (src instanceof ImageBitmap) return { img: greyPixels(src), bitmap: src };
    if (typeof src === "string") {
      const response = await fetch(src);
      if (!response.ok) throw new Error(`cannot read ${src}: HTTP ${response.status}`);
      src = await response.blob();
    }
    if (src instanceof Blob) {
      const bytes = new Uint8Array(await src.arrayBuffer());
      const header = pngHeader(bytes);
      if (header && header.depth === 16 && header.ctype === 0) return { img: grey16(bytes, header), bitmap: null };
    }
    const bitmap = await toBitmap(src);
    return { img: greyPixels(bitmap), bitmap };
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
    return { grey, width: w, height: h, bit_depth: 8, effective_bits: 8 };
  }

  function greyBitmap(img) {
    const canvas = new OffscreenCanvas(img.width, img.height);
    const ctx = canvas.getContext("2d");
    const im = ctx.createImageData(img.width, img.height);
    for (let i = 0; i < img.grey.length; i++) {
      const v = Math.round(255 * img.grey[i]);
      im.data[4 * i] = v; im.data[4 * i + 1] = v; im.data[4 * i + 2] = v; im.data[4 * i + 3] = 255;
    }
    ctx.putImageData(im, 0, 0);
    return canvas.transferToImageBitmap();
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
    if (!bitmap) return canvasResize16(img, box, pp.size, resize); // a 16-bit PNG
    const ctx = canvasFor(pp.size, resize, {});
    ctx.drawImage(bitmap, box.left, box.top, box.side, box.side, 0, 0, pp.size, pp.size);
    return greyPixels(ctx.canvas.transferToImageBitmap()).grey;
  }

  /** A size x size 2-D context, black, with the smoothing of the canvas-* resize mode. */
  function canvasFor(size, resize, settings) {
    const ctx = new OffscreenCanvas(size, size).getContext("2d", { willReadFrequently: true, ...settings });
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, size, size);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = resize === "canvas-high" ? "high" : "low";
    return ctx;
  }

  /** Whether this browser's 2-D canvas holds float16 pixels (colorType "float16", ImageData "rgba-float16"). */
  const FLOAT16_CANVAS = (() => {
    try {
      const ctx = new OffscreenCanvas(1, 1).getContext("2d", { colorType: "float16" });
      return typeof Float16Array !== "undefined" && ctx.getContextAttributes().colorType === "float16" &&
        ctx.getImageData(0, 0, 1, 1, { pixelFormat: "rgba-float16" }).data instanceof Float16Array;
    } catch (err) { return false; }
  })();

  /** The canvas-* resize of a 16-bit PNG: drawn on float16 canvases (11 significant bits, so a 16-bit image keeps
   * about 12 bits near white and more below) where the browser has them, else on its 8-bit rendering. */
  function canvasResize16(img, box, size, resize) {
    if (!FLOAT16_CANVAS) {
      const ctx = canvasFor(size, resize, {});
      ctx.drawImage(greyBitmap(img), box.left, box.top, box.side, box.side, 0, 0, size, size);
      return greyPixels(ctx.canvas.transferToImageBitmap()).grey;
    }
    const f16 = { colorType: "float16" }, rgba = new Float16Array(4 * img.grey.length);
    for (let i = 0; i < img.grey.length; i++) {
      const v = img.grey[i];
      rgba[4 * i] = v; rgba[4 * i + 1] = v; rgba[4 * i + 2] = v; rgba[4 * i + 3] = 1;
    }
    const source = new OffscreenCanvas(img.width, img.height).getContext("2d", f16);
    source.putImageData(new ImageData(rgba, img.width, img.height, { pixelFormat: "rgba-float16" }), 0, 0);
    const ctx = canvasFor(size, resize, f16);
    ctx.drawImage(source.canvas, box.left, box.top, box.side, box.side, 0, 0, size, size);
    const out = ctx.getImageData(0, 0, size, size, { pixelFormat: "rgba-float16" }).data, grey = new Float32Array(size * size);
    for (let i = 0; i < grey.length; i++) grey[i] = Math.min(1, Math.max(0, out[4 * i]));
    return grey;
  }

  /** How the canvas-* resize modes hold an image of this bit depth: "8-bit", or "float16" for a 16-bit PNG. */
  function canvasPrecision(img) { return img.bit_depth === 16 && FLOAT16_CANVAS ? "float16" : "8-bit"; }

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
    const { img, bitmap } = await decode(src);
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
    return { x, xOod, display, oodDisplay, pp, img, decode_s: (t1 - t0) / 1000, preprocess_s: (now() - t1) / 1000 };
  }

  // ------------------------------------------------------------------ the blank-image guard (cxrbench.ood.guard)
  /** numpy's round-half-to-even of a value >= 0. */
  function roundEven(v) {
    const f = Math.floor(v), d = v - f;
    return d > 0.5 ? f + 1 : d < 0.5 ? f : (f % 2 === 0 ? f : f + 1);
  }

  /** Python's f"{x:.{digits}f}" (ties of the binary value to even, where JS's toFixed rounds them up). */
  function pyFixed(x, digits) {
    const s = x * 10 ** digits;
    if (Number.isInteger(2 * s) && !Number.isInteger(s)) return (roundEven(s) / 10 ** digits).toFixed(digits);
    return x.toFixed(digits);
  }

  /** The size of Pillow's PNG of an 8-bit grey image at compress_level 9: its per-row filter choice
   * (None, Up, Sub, Paeth: least sum of |filtered byte|, ZipEncode.c) and zlib (pako) with its settings. */
  function pillowPngBytes(u8, w, h) {
    const cost = (v) => (v < 128 ? v : 256 - v);
    const out = new Uint8Array(h * (w + 1)), cand = new Uint8Array(w);
    let prev = new Uint8Array(w);
    for (let y = 0; y < h; y++) {
      const row = u8.subarray(y * w, (y + 1) * w), o = y * (w + 1);
      let sum = 0;
      for (let i = 0; i < w; i++) sum += cost(row[i]);
      out[o] = 0; out.set(row, o + 1);
      const tryFilter = (type, predict) => {
        let s = 0;
        for (let i = 0; i < w; i++) { cand[i] = (row[i] - predict(i)) & 255; s += cost(cand[i]); }
        if (s < sum) { sum = s; out[o] = type; out.set(cand, o + 1); }
      };
      if (sum > 0) tryFilter(2, (i) => prev[i]);
      if (sum > 0) tryFilter(1, (i) => (i > 0 ? row[i - 1] : 0));
      if (sum > 0) {
        tryFilter(4, (i) => {
          const a = i > 0 ? row[i - 1] : 0, b = prev[i], c = i > 0 ? prev[i - 1] : 0;
          const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c);
          return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
        });
      }
      prev = row;
    }
    const z = pako.deflate(out, { level: 9, windowBits: 15, memLevel: 9, strategy: 1 }); // Z_FILTERED
    return 8 + 25 + 12 + z.length + 12; // signature, IHDR, IDAT around the stream, IEND
  }

  function percentile(sorted, q) { // numpy's default (linear) method
    const pos = (q / 100) * (sorted.length - 1), lo = Math.floor(pos), t = pos - lo;
    const a = sorted[lo], b = sorted[Math.min(lo + 1, sorted.length - 1)];
    return t >= 0.5 ? b - (b - a) * (1 - t) : a + (b - a) * t;
  }

  /** image_information: bits_per_pixel (PNG size of the 8-bit size-px crop) and spread (1st to 99th percentile). */
  function imageInformation(img, size) {
    const small = geometry(img, null, { size, crop: "center", resample: "bilinear" }, "pillow");
    const u8 = new Uint8Array(small.length);
    for (let i = 0; i < small.length; i++) u8[i] = roundEven(Math.fround(small[i] * 255));
    const sorted = Float32Array.from(small).sort();
    const spread = Math.fround(Math.fround(percentile(sorted, 99)) - Math.fround(percentile(sorted, 1)));
    return { bits_per_pixel: (8 * pillowPngBytes(u8, size, size)) / u8.length, spread };
  }

  /** ImageGuard.check: size first, then information; the same verdict and reason text as Python. */
  function guardCheck(img, guard) {
    const w = img.width, h = img.height;
    if (Math.min(w, h) < guard.min_side) {
      return { passed: false, check: "size", overridable: false, measures: { short_side: Math.min(w, h) },
               reason: `too small (${w}x${h} px; a chest radiograph needs at least ${guard.min_side} px on the short side)` };
    }
    if (typeof pako === "undefined") throw new Error("this app folder lacks pako.min.js (the blank-image guard needs it)");
    const info = imageInformation(img, guard.size);
    if (info.spread < guard.min_spread || info.bits_per_pixel < guard.min_bits_per_pixel) {
      return { passed: false, check: "information", overridable: true, measures: info,
               reason: "almost no image content (blank, flat or a simple pattern: " +
                 `${pyFixed(info.bits_per_pixel, 2)} bits/pixel, intensity spread ${pyFixed(info.spread, 3)}; ` +
                 `chest radiographs have at least ${pyFixed(guard.min_bits_per_pixel, 2)} and ${pyFixed(guard.min_spread, 3)})` };
    }
    return { passed: true, check: "", overridable: true, measures: info, reason: "" };
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
    cfg.guard = cfg.guard || { min_side: 64, min_bits_per_pixel: 2.5, min_spread: 0.15, size: 64 };
    state.config = cfg;
    const info = { load_s: (now() - t0) / 1000, threads: ort.env.wasm.numThreads, ort: (ort.env.versions && ort.env.versions.web) || "" };
    status(`models loaded in ${info.load_s.toFixed(1)} s (${info.threads} thread${info.threads > 1 ? "s" : ""}); choose an image.`);
    return info;
  }
  const readyPromise = init().catch((err) => { status(`could not load the models: ${err.message || err}`); throw err; });
  const ready = async () => { await readyPromise; return state.config; };

  /** The saliency graph's session, created on first use (it is as large as the classifier). */
  function saliencySession() {
    const cfg = state.config;
    if (!cfg.graphs.saliency) throw new Error("this export has no saliency graph (models/saliency.onnx); write it again with cxrbench export-web");
    if (!state.saliency) {
      const t = now();
      state.saliency = ort.InferenceSession.create(cfg.graphs.saliency, { executionProviders: ["wasm"], graphOptimizationLevel: "all" })
        .then((session) => { state.saliencyLoad = (now() - t) / 1000; return session; });
      state.saliency.catch(() => { state.saliency = null; });
    }
    return state.saliency;
  }

  function probabilityOutputs(result, out) {
    result.logits = Array.from(out.logits.data);
    result.raw = Array.from(out.probabilities.data);
    result.calibrated = Array.from(out.calibrated.data, (v) => (Number.isNaN(v) ? null : v));
    result.probabilities = result.calibrated;
  }

  function topFinding(calibrated) {
    return calibrated.map((v, i) => [v === null ? -1 : v, i]).sort((a, b) => b[0] - a[0])[0][1];
  }

  /** Chester's saliency: the gradient graph with logit weights w (ones: every finding summed; one-hot: one finding). */
  async function explainSaliency(result, p, options, cfg) {
    const session = await saliencySession();
    const pp = p.pp, n = cfg.labels.length;
    const x = new ort.Tensor("float32", p.x, [1, pp.channels, pp.size, pp.size]);
    const run = (w) => session.run({ x, w: new ort.Tensor("float32", w, [1, n]) });
    const t = now();
    let out = await run(new Float32Array(n).fill(1));
    probabilityOutputs(result, out);
    let target = options.finding === undefined || options.finding === null || options.finding === "all" ? null : options.finding;
    if (target === "top") target = topFinding(result.calibrated);
    else if (typeof target === "string") target = cfg.labels.indexOf(target);
    if (target !== null) {
      if (!(target >= 0 && target < n)) throw new Error(`no finding ${options.finding} in this model`);
      const w = new Float32Array(n); w[target] = 1;
      out = await run(w);
    }
    result.timings.saliency = (now() - t) / 1000;
    result.timings.saliency_load = state.saliencyLoad;
    result.map = out.saliency.data;
    result.map_kind = "saliency";
    result.map_finding = target === null ? "all findings" : cfg.labels[target];
  }

  async function explainCam(result, p, cfg) {
    const pp = p.pp, t = now();
    const out = await state.cam.run({ x: new ort.Tensor("float32", p.x, [1, pp.channels, pp.size, pp.size]) });
    probabilityOutputs(result, out);
    result.timings.classify = (now() - t) / 1000;
    const top = topFinding(result.calibrated);
    result.map = out.cam.data.subarray(top * pp.size * pp.size, (top + 1) * pp.size * pp.size);
    result.map_kind = "CAM";
    result.map_finding = cfg.labels[top];
  }

  /** The gate: the blank-image guard first (a rejected image gets no OOD score), then the OOD score vs the cutoff. */
  async function gate(result, p, options, cfg) {
    const verdict = guardCheck(p.img, cfg.guard);
    result.guard = verdict;
    if (!verdict.passed) {
      result.in_distribution = false;
      result.rejected = !verdict.overridable || !options.allowOod;
      result.reason = verdict.reason;
      return;
    }
    if (!state.ood) return;
    const t = now();
    const side = Math.round(Math.sqrt(p.oodDisplay.length));
    const out = await state.ood.run({ x: new ort.Tensor("float32", p.xOod, [1, 1, side, side]) });
    const cut = cfg.ood_cutoff || { scorer: "ssim", threshold: Infinity };
    const scores = {};
    for (const k of ["l1", "l2", "ssim", "ssim_raw", "latent"]) scores[k] = out[k].data[0];
    result.ood = { scorer: cut.scorer, cutoff: cut.threshold, scores };
    result.ood_score = scores[cut.scorer];
    result.in_distribution = result.ood_score <= cut.threshold;
    result.rejected = !result.in_distribution && !options.allowOod;
    if (!result.in_distribution) { // Python's OODResult.reason
      result.reason = `reconstruction error (${cut.scorer} score ${pyFixed(result.ood_score, 3)} > cutoff ` +
        `${pyFixed(cut.threshold, 3)}: unlike the chest X-rays the gate was trained on)`;
    }
    result.reconstruction = out.reconstruction.data;
    result.timings.ood = (now() - t) / 1000;
  }

  /** options.explain: "cam" (default) or "saliency"; options.finding (saliency): "all" (default), "top", a name or index. */
  async function analyze(src, options = {}) {
    const cfg = await ready();
    const t0 = now();
    const p = await preprocess(src, options);
    const result = { findings: cfg.labels, operating_points: cfg.thresholds, resize: options.resize || "pillow",
                     rejected: false, in_distribution: null, ood_score: null, reason: null,
                     bit_depth: p.img.bit_depth, effective_bits: p.img.effective_bits,
                     canvas_precision: (options.resize || "pillow") === "pillow" ? null : canvasPrecision(p.img),
                     timings: { decode: p.decode_s, preprocess: p.preprocess_s } };
    await gate(result, p, options, cfg);
    if (!result.rejected) {
      if ((options.explain || "cam") === "saliency") await explainSaliency(result, p, options, cfg);
      else await explainCam(result, p, cfg);
      result.cam_finding = result.map_finding; // the name before saliency was offered
    }
    result.timings.total = (now() - t0) / 1000;
    if (options.render !== false) render(result, p);
    if (options.returnMap && result.map) result.map_b64 = base64(result.map);
    delete result.map;
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
    if (result.guard && !result.guard.passed) {
      verdict.textContent = `This image cannot be analysed: ${result.guard.reason}` +
        (result.rejected ? "; no prediction is made." : "; analysed anyway.");
      verdict.className = "rejected";
    } else if (result.in_distribution === null) { verdict.textContent = "no OOD gate in this export"; verdict.className = ""; }
    else if (result.in_distribution) { verdict.textContent = "Looks like a frontal chest X-ray."; verdict.className = "ok"; }
    else {
      verdict.textContent = `This does not look like a frontal chest X-ray (${result.ood.scorer} score ` +
        `${result.ood_score.toFixed(3)} > cutoff ${result.ood.cutoff.toFixed(3)})` + (result.rejected ? "; no prediction is made." : "; analysed anyway.");
      verdict.className = "rejected";
    }
    paint(document.getElementById("display"), p.display, p.pp.size, result.rejected ? null : result.map);
    document.getElementById("cam-title").textContent = result.rejected ? "image"
      : `${result.map_kind} heat-map: ${result.map_finding}` +
        (result.map_kind === "saliency" ? ` (${result.timings.saliency.toFixed(2)} s)` : "");
    if (p.oodDisplay && !result.reconstruction) { // not scored (the guard rejected it): no stale panel
      for (const id of ["ood-input", "ood-recon"]) document.getElementById(id).getContext("2d").clearRect(0, 0, 64, 64);
      document.getElementById("ood-score").textContent = result.guard && !result.guard.passed
        ? `not scored: the blank-image guard rejected it (${result.guard.check})` : "";
    }
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
    const precision = result.bit_depth === 16 && result.canvas_precision
      ? (result.canvas_precision === "float16" ? " The canvas resize held this 16-bit image as float16 (about 12 bits)."
        : " This browser's canvas holds 8 bits, so the canvas resize saw this 16-bit image at 8 bits; the exact resize keeps them all.")
      : "";
    status(`analysed in ${result.timings.total.toFixed(2)} s, in this browser.${precision}`);
  }

  async function onFile() {
    const input = document.getElementById("file");
    if (!input.files || !input.files.length) return;
    status("analysing…");
    try {
      const [explain, finding] = document.getElementById("explain").value.split(":");
      await analyze(input.files[0], { resize: document.getElementById("resize").value, explain, finding,
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
    document.getElementById("explain").addEventListener("change", onFile);
  });
})();

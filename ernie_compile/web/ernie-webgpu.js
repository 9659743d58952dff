/**
 * ernie-webgpu.js — run an ernie-compile WebGPU artifact in the browser (docs/webgpu-artifact.md).
 *
 * A dependency-free ES module, no build step. The compiler copies it, with index.html, into every
 * `--target webgpu` artifact folder; serve that folder over http(s) and:
 *
 *     import { loadArtifact } from "./ernie-webgpu.js";
 *     const model = await loadArtifact("./");                 // fetch, verify sha256, build on the GPU
 *     const logits = await model.step([17, 300, 5], 0);       // Float32Array(vocab) after the last id
 *     const { tokens, prefill_ms, decode_tok_s } = await model.generate([17, 300, 5], 16);
 *
 * Everything the spec lets a host do once is done in loadArtifact: every file it reads is checked
 * against manifest.json["files"]; all buffers, pipelines (one per kernel, explicit bind-group layout:
 * the kernel's storage buffers at 0…n−1, its uniform at n), bind groups and per-launch uniform
 * buffers are created then. A step only writes the inputs and the uniforms whose values changed,
 * encodes every launch into one compute pass and reads the output back. The kernels write the KV
 * cache at the positions they are given, so a new sequence simply starts again at position 0.
 *
 * One Artifact runs one step at a time: await each call before the next.
 */

const GRID_X_LIMIT = 65536;  // grids this wide in x are folded into z, as TVM's web runtime does
const SCALAR_SETTERS = { i32: "setInt32", u32: "setUint32", f32: "setFloat32" };
const OUTPUT_DTYPES = { float32: 4, float16: 2 };
const OPS = {
  add: (a, b) => a + b, sub: (a, b) => a - b, mul: (a, b) => a * b,
  floordiv: (a, b) => Math.floor(a / b), floormod: (a, b) => a - b * Math.floor(a / b),
  min: Math.min, max: Math.max,
  lt: (a, b) => +(a < b), le: (a, b) => +(a <= b), gt: (a, b) => +(a > b),
  ge: (a, b) => +(a >= b), eq: (a, b) => +(a === b), ne: (a, b) => +(a !== b),
};

/** Fetch, verify and set up the artifact at `baseUrl` (a folder URL); `log` receives progress lines. */
export async function loadArtifact(baseUrl = "./", { log = () => {} } = {}) {
  const base = new URL(baseUrl.endsWith("/") ? baseUrl : baseUrl + "/", globalThis.location?.href);
  if (!globalThis.crypto?.subtle) {
    throw new Error("crypto.subtle is unavailable (serve the page from https or localhost) — cannot verify sha256");
  }
  const manifest = JSON.parse(await fetchText(new URL("manifest.json", base)));
  if (manifest.format_version !== 2 || manifest.backend !== "webgpu") {
    throw new Error(`not a WebGPU artifact (format_version ${manifest.format_version}, backend "${manifest.backend}")`);
  }
  const files = manifest.files || {};
  const read = async (name) => fetchVerified(base, name, files);

  const plan = JSON.parse(new TextDecoder().decode(await read("plan.json")));
  if (plan.format !== "ernie-webgpu-plan" || plan.version !== 1) {
    throw new Error(`plan.json: unsupported format ${plan.format} version ${plan.version}`);
  }
  if (!navigator.gpu) throw new Error("this browser has no WebGPU (navigator.gpu is undefined)");
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new Error("WebGPU is present but no adapter is available");
  const requiredLimits = neededLimits(plan);
  checkAdapter(adapter, plan.features || [], requiredLimits);
  const device = await adapter.requestDevice({ requiredFeatures: plan.features || [], requiredLimits });
  log(`adapter: ${describeAdapter(adapter)}`);
  try {
    return await build(device, adapter, manifest, plan, read, log);
  } catch (e) {
    device.destroy();
    throw e;
  }
}

/** Everything loadArtifact creates on the device: buffers, pipelines, bind groups, uniforms. */
async function build(device, adapter, manifest, plan, read, log) {
  device.pushErrorScope("validation");
  const shards = [];
  for (const s of plan.shards || []) shards.push(await read(s.file));
  const buffers = plan.buffers.map((b) => createBuffer(device, b, shards));
  log(`buffers: ${buffers.length}, ${plan.buffers.reduce((n, b) => n + b.bytes, 0)} bytes`);

  const kernels = {};
  for (const [name, k] of Object.entries(plan.kernels)) {
    const code = new TextDecoder().decode(await read(k.wgsl));
    kernels[name] = await createKernel(device, name, k, code);
  }
  log(`kernels: ${Object.keys(kernels).length}`);

  if (!plan.functions?.prefill) throw new Error("plan.json has no prefill function");
  const functions = {};
  for (const [name, f] of Object.entries(plan.functions)) {
    functions[name] = prepareFunction(device, name, f, plan, kernels, buffers);
  }
  const error = await device.popErrorScope();
  if (error) throw new Error(`WebGPU validation error while loading: ${error.message}`);
  const artifact = new Artifact(manifest, plan, adapter, device, buffers, functions);
  if (manifest.tokenizer?.vocab) {
    artifact.vocab = JSON.parse(new TextDecoder().decode(await read(manifest.tokenizer.vocab)));
  }
  return artifact;
}

/** A loaded artifact: its buffers live on `device` and the KV cache persists between steps. */
class Artifact {
  constructor(manifest, plan, adapter, device, buffers, functions) {
    Object.assign(this, { manifest, plan, device, buffers, functions });
    this.adapterInfo = describeAdapter(adapter);
    this.eos = new Set((manifest.tokenizer?.eos_token_ids || []).filter((t) => t !== null));
    this.lost = null;
    device.lost.then((info) => { this.lost = info.message || info.reason; });
  }

  /** Append `ids` at positions startPos…; return the logits after the last one (Float32Array). */
  async step(ids, startPos) {
    if (this.lost) throw new Error(`the WebGPU device was lost: ${this.lost}`);
    const T = ids.length;
    if (T === 0) throw new Error("step: no token ids");
    if (startPos + T > this.plan.max_seq_len) {
      throw new Error(`sequence of ${startPos + T} tokens exceeds max_seq_len ${this.plan.max_seq_len}`);
    }
    const vocab = this.manifest.vocab_size;
    const bad = ids.find((i) => !Number.isInteger(i) || i < 0 || (vocab && i >= vocab));
    if (bad !== undefined) throw new Error(`token id ${bad} is outside the vocabulary [0, ${vocab})`);
    // decode is prefill specialised to T = 1; use it when there is one token and the plan has it.
    const useDecode = T === 1 && this.functions.decode;
    const fn = useDecode ? this.functions.decode : this.functions.prefill;
    const vars = useDecode ? {} : { T };
    const [lo, hi] = this.plan.vars?.T ?? [1, this.plan.max_seq_len];
    if (!useDecode && T > hi) {  // longer prompts run as consecutive chunks; a token's cache row is its position
      let logits;
      for (let at = 0; at < T; at += hi) logits = await this.step(ids.slice(at, at + hi), startPos + at);
      return logits;
    }
    if (!useDecode && T < lo) throw new Error(`prefill of ${T} tokens: T must lie in [${lo}, ${hi}]`);

    const { queue } = this.device;
    const positions = Int32Array.from(ids, (_, i) => startPos + i);
    queue.writeBuffer(this.buffers[fn.inputs.input_ids], 0, Int32Array.from(ids));
    queue.writeBuffer(this.buffers[fn.inputs.position_ids], 0, positions);

    this.device.pushErrorScope("validation");
    const encoder = this.device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    for (const launch of fn.launches) {
      const [gx, gy] = launch.grid.map((e) => evaluate(e, vars));
      const uniform = launch.uniformValues(vars, gx);
      if (uniform.some((v, i) => v !== launch.lastUniform?.[i])) {
        queue.writeBuffer(launch.uniform, 0, uniform.buffer);
        launch.lastUniform = uniform;
      }
      const [x, z] = foldGrid(gx);
      pass.setPipeline(launch.pipeline);
      pass.setBindGroup(0, launch.bindGroup);
      pass.dispatchWorkgroups(x, gy ?? 1, z);
    }
    pass.end();
    const count = evaluate(fn.output.count, vars);
    const bytes = roundUp(count * OUTPUT_DTYPES[fn.output.dtype], 4);
    encoder.copyBufferToBuffer(this.buffers[fn.output.buffer], 0, fn.readback, 0, bytes);
    queue.submit([encoder.finish()]);
    // Both settle after the GPU work; a validation error explains a failed map, so it is reported first.
    const [scope, map] = await Promise.allSettled([
      this.device.popErrorScope(), fn.readback.mapAsync(GPUMapMode.READ, 0, bytes)]);
    if (scope.value) {
      if (map.status === "fulfilled") fn.readback.unmap();
      throw new Error(`WebGPU validation error in a step: ${scope.value.message}`);
    }
    if (map.status === "rejected") throw map.reason;
    const raw = fn.readback.getMappedRange(0, bytes).slice(0);
    fn.readback.unmap();
    return fn.output.dtype === "float16" ? halfToFloat(new Uint16Array(raw, 0, count))
      : new Float32Array(raw, 0, count);
  }

  /** Text of token ids from the artifact's vocabulary (SentencePiece pieces: "▁" is a space,
   * <0xNN> a byte); ids outside it show as " ⁇ ". Empty when the artifact has no vocabulary. */
  decode(ids) {
    if (!this.vocab) return "";
    const bytes = [];
    const utf8 = new TextEncoder();
    for (const id of ids) {
      const piece = this.vocab[id];
      const byte = piece && /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
      if (byte) bytes.push(parseInt(byte[1], 16));
      else bytes.push(...utf8.encode(piece === undefined || piece === null ? " ⁇ " : piece.replaceAll("▁", " ")));
    }
    const text = new TextDecoder().decode(new Uint8Array(bytes));
    return this.manifest.tokenizer?.strip_leading_space && text.startsWith(" ") ? text.slice(1) : text;
  }

  /** Greedy generation from position 0; stops after an end-of-sequence token or maxNewTokens. */
  async generate(promptIds, maxNewTokens) {
    const tokens = [];
    let t0 = performance.now();
    let logits = await this.step(promptIds, 0);
    const prefill_ms = performance.now() - t0;
    let pos = promptIds.length, decodeSteps = 0;
    t0 = performance.now();
    while (tokens.length < maxNewTokens) {
      const token = argmax(logits);
      tokens.push(token);
      if (this.eos.has(token) || tokens.length === maxNewTokens) break;
      logits = await this.step([token], pos++);
      decodeSteps++;
    }
    const decode_s = (performance.now() - t0) / 1000;
    return { tokens, prefill_ms, decode_tok_s: decodeSteps ? decodeSteps / decode_s : null };
  }

  destroy() { this.device.destroy(); }
}

/** The plan's limits, raised where a buffer is larger (buffers are bound whole). */
function neededLimits(plan) {
  const limits = { ...(plan.limits || {}) };
  const largest = Math.max(4, ...plan.buffers.map((b) => roundUp(b.bytes, 4)));
  for (const name of ["maxBufferSize", "maxStorageBufferBindingSize"]) {
    limits[name] = Math.max(limits[name] || 0, largest);
  }
  return limits;
}

function checkAdapter(adapter, features, limits) {
  const problems = features.filter((f) => !adapter.features.has(f)).map((f) => `feature "${f}" is missing`);
  for (const [name, need] of Object.entries(limits)) {
    const have = adapter.limits[name];
    if (have === undefined) problems.push(`limit ${name} is unknown to this browser`);
    else if (name.startsWith("min") ? have > need : have < need) {
      problems.push(`${name} is ${have}, the plan needs ${need}`);
    }
  }
  if (problems.length) {
    throw new Error(`this WebGPU adapter (${describeAdapter(adapter)}) cannot run the artifact: ` +
                    problems.join("; "));
  }
}

function describeAdapter(adapter) {
  const i = adapter.info || {};
  return [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(" / ") || "unknown adapter";
}

function createBuffer(device, spec, shards) {
  const size = Math.max(4, roundUp(spec.bytes, 4));
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
  if (spec.kind !== "weight") return device.createBuffer({ size, usage });  // WebGPU zero-fills: kv starts at 0
  const shard = shards[spec.shard];
  if (!shard || spec.offset + spec.bytes > shard.byteLength) {
    const range = `${spec.offset}…${spec.offset + spec.bytes}`;
    throw new Error(`weight ${spec.name}: bytes ${range} lie outside shard ${spec.shard}`);
  }
  const buffer = device.createBuffer({ size, usage, mappedAtCreation: true });
  new Uint8Array(buffer.getMappedRange()).set(new Uint8Array(shard, spec.offset, spec.bytes));
  buffer.unmap();
  return buffer;
}

async function createKernel(device, name, spec, code) {
  const entries = spec.buffers.map((access, binding) => {
    if (access !== "read" && access !== "read_write") throw new Error(`kernel ${name}: buffer access "${access}"`);
    const type = access === "read" ? "read-only-storage" : "storage";
    return { binding, visibility: GPUShaderStage.COMPUTE, buffer: { type } };
  });
  entries.push({ binding: spec.buffers.length, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform" } });
  const layout = device.createBindGroupLayout({ entries });
  const module = device.createShaderModule({ code, label: name });
  const info = await module.getCompilationInfo();
  const errors = info.messages.filter((m) => m.type === "error");
  if (errors.length) {
    const where = (m) => `${m.lineNum}:${m.linePos} ${m.message}`;
    throw new Error(`kernel ${name}: WGSL error: ${errors.map(where).join("; ")}`);
  }
  const pipeline = await device.createComputePipelineAsync({
    label: name, layout: device.createPipelineLayout({ bindGroupLayouts: [layout] }),
    compute: { module, entryPoint: name },
  }).catch((e) => { throw new Error(`kernel ${name}: ${e.message}`); });
  return { spec, pipeline };
}

/** Bind groups and one uniform buffer per launch, created once. */
function prepareFunction(device, fname, f, plan, kernels, buffers) {
  const launches = f.launches.map((l, i) => {
    const where = `${fname} launch ${i} (${l.kernel})`;
    const kernel = kernels[l.kernel];
    if (!kernel) throw new Error(`${where}: no such kernel in plan.kernels`);
    const { spec } = kernel;
    if (l.buffers.length !== spec.buffers.length || l.scalars.length !== spec.scalars.length) {
      throw new Error(`${where}: ${l.buffers.length} buffers / ${l.scalars.length} scalars, the kernel takes ` +
                      `${spec.buffers.length} / ${spec.scalars.length}`);
    }
    l.buffers.forEach((b) => { if (!buffers[b]) throw new Error(`${where}: buffer id ${b} out of range`); });
    const setters = spec.scalars.map((t) => SCALAR_SETTERS[t] ?? badType(where, t));
    const nbytes = (spec.scalars.length + 1) * 4;  // scalars, then packGridDimX
    const uniform = device.createBuffer({ size: roundUp(nbytes, 16),
                                          usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
    const entries = l.buffers.map((b, binding) => ({ binding, resource: { buffer: buffers[b] } }));
    entries.push({ binding: l.buffers.length, resource: { buffer: uniform } });
    const uniformValues = (vars, packGridDimX) => {
      const view = new DataView(new ArrayBuffer(nbytes));
      l.scalars.forEach((e, j) => view[setters[j]](j * 4, evaluate(e, vars), true));
      view.setUint32(nbytes - 4, packGridDimX, true);
      return new Uint8Array(view.buffer);
    };
    return { grid: l.grid, pipeline: kernel.pipeline, uniform, uniformValues, lastUniform: null,
             bindGroup: device.createBindGroup({ layout: kernel.pipeline.getBindGroupLayout(0), entries }) };
  });
  const out = plan.buffers[f.output.buffer];
  if (!out || !OUTPUT_DTYPES[f.output.dtype]) throw new Error(`${fname}: bad output ${JSON.stringify(f.output)}`);
  // Sized by the output buffer, the most `count` can be.
  const readback = device.createBuffer({ size: Math.max(4, roundUp(out.bytes, 4)),
                                         usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  return { inputs: f.inputs, output: f.output, launches, readback };
}

/** An expression of plan.json: an integer, a variable name, or [op, a, b]. */
export function evaluate(expr, vars) {
  if (typeof expr === "number") return expr;
  if (typeof expr === "string") {
    if (!(expr in vars)) throw new Error(`expression uses unbound variable "${expr}"`);
    return vars[expr];
  }
  if (expr[0] === "select") return evaluate(expr[1], vars) ? evaluate(expr[2], vars) : evaluate(expr[3], vars);
  const [op, a, b] = expr;
  if (!OPS[op]) throw new Error(`unknown expression op "${op}"`);
  return OPS[op](evaluate(a, vars), evaluate(b, vars));
}

/** [x, z] workgroups for a grid of `x` in x: halve x (rounding up) and double z until x < 65536. */
export function foldGrid(x) {
  let z = 1;
  while (x >= GRID_X_LIMIT) { x = Math.ceil(x / 2); z *= 2; }
  return [x, z];
}

async function fetchVerified(base, name, files) {
  if (!(name in files)) throw new Error(`${name} is not listed in manifest.json "files"; refusing to load it`);
  const response = await fetch(new URL(name, base));
  if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
  const bytes = await response.arrayBuffer();
  const digest = [...new Uint8Array(await crypto.subtle.digest("SHA-256", bytes))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  if (digest !== files[name]) {
    throw new Error(`${name} does not match its sha256 in the manifest (modified or corrupt); refusing to load it`);
  }
  return bytes;
}

async function fetchText(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.text();
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

function halfToFloat(halves) {
  const out = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i++) {
    const h = halves[i], sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
    out[i] = exp === 0 ? sign * 2 ** -14 * (frac / 1024)
      : exp === 31 ? (frac ? NaN : sign * Infinity)
      : sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }
  return out;
}

const roundUp = (n, m) => Math.ceil(n / m) * m;
const badType = (where, t) => { throw new Error(`${where}: scalar type "${t}" (want i32, u32 or f32)`); };

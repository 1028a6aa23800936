// Runs a wasm32-wasip1 test binary under Node.js's WASI (preview1), for
// cargo's CARGO_TARGET_WASM32_WASIP1_RUNNER:
//   node --no-warnings .ci/wasi-runner.mjs <binary.wasm> [libtest args...]
//
// The lib's test binary also links src/host, so it imports the proxy-wasm
// host calls (`env.proxy_*`) that only Envoy provides. Each import outside
// WASI gets a stub that throws, so a unit test that reaches the host fails
// loudly instead of the module failing to instantiate.
//
// proxy-wasm's `main!` exports `_initialize` beside libtest's `_start`, and
// Node's `WASI.start()` rejects an instance that exports both, so start()
// gets a view of the exports without `_initialize`.
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import { WASI } from "node:wasi";

const [wasmPath, ...testArgs] = process.argv.slice(2);
if (!wasmPath) {
  console.error("usage: node --no-warnings wasi-runner.mjs <binary.wasm> [args...]");
  process.exit(2);
}

// libtest reads RUST_TEST_* and RUST_BACKTRACE. The rest of the
// environment stays outside the sandbox.
const env = Object.fromEntries(
  Object.entries(process.env).filter(([name]) => name.startsWith("RUST_")),
);
const wasi = new WASI({
  version: "preview1",
  args: [basename(wasmPath), ...testArgs],
  env,
  returnOnExit: true,
});

const module = await WebAssembly.compile(await readFile(wasmPath));
const imports = { wasi_snapshot_preview1: wasi.wasiImport };
for (const { module: from, name, kind } of WebAssembly.Module.imports(module)) {
  if (from === "wasi_snapshot_preview1") continue;
  if (kind !== "function") {
    console.error(`wasi-runner: cannot stub import ${from}.${name}: it is a ${kind}, and only functions can be stubbed`);
    process.exit(2);
  }
  imports[from] ??= {};
  imports[from][name] = () => {
    throw new Error(`${from}.${name} called, but unit tests run without a proxy-wasm host`);
  };
}

const instance = await WebAssembly.instantiate(module, imports);
const { memory, _start } = instance.exports;
let code;
try {
  code = wasi.start({ exports: { memory, _start } });
} catch (error) {
  // A panic aborts, which traps as `unreachable`. libtest prints the panic
  // message only when it does not capture output (`make test-wasm32` sets
  // RUST_TEST_NOCAPTURE=1), so this adds the trap and sets the status.
  console.error(`wasi-runner: ${basename(wasmPath)} trapped: ${error}`);
  code = 101;
}
process.exit(code);

// `npm run build` after tsc: bundles the CLI (esbuild) into dist/cli/main.cjs, one CommonJS file
// that bin/vbd-shadow (CommonJS too: bin/package.json) loads, with V8's code cache beside it. Node then starts without its
// ESM loader and reads one file instead of resolving and linking some 20 to 90 modules; what a
// command imports lazily (`await import(…)`: the daemon, the flush engine, offline image
// transfer…) is in the same file but initialized only when the command runs, so `status` and
// `flush` still never load koffi or chokidar (test/cli/startup-modules.test.ts). The native and
// watcher packages stay in node_modules. bin/vbd-shadow runs the bundle only while it is at least
// as new as tsc's output (a later `tsc -p .` alone is never shadowed by an older bundle).

import { build } from 'esbuild';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import Module from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Script } from 'node:vm';

const root = fileURLToPath(new URL('..', import.meta.url));
rmSync(join(root, 'dist/cli'), { recursive: true, force: true }); // nothing of an earlier bundle is left to load
const common = {
  absWorkingDir: root,
  outdir: 'dist/cli',
  entryNames: '[name]',
  bundle: true,
  platform: 'node',
  target: 'node20',
  external: ['koffi', 'chokidar', '@node-rs/xxhash'],
  minify: true,
  // Stack traces (VBD_SHADOW_DEBUG=1) keep the functions' names.
  keepNames: true,
  logLevel: 'warning',
};

await build({
  ...common,
  entryPoints: { main: 'dist/src/cli/main.js' },
  format: 'cjs',
  outExtension: { '.js': '.cjs' },
  // import.meta.url in CommonJS: this file's URL (the package root is found from it, and the
  // layout module runner beside it).
  define: { 'import.meta.url': '__vbdImportMetaUrl' },
  banner: { js: "const __vbdImportMetaUrl = require('node:url').pathToFileURL(__filename).href;" },
});

// V8's code cache of the bundle, compiled as bin/vbd-shadow compiles it (the CommonJS wrapper
// around it): Node then deserializes the compiled script instead of parsing 250 KB at every
// start. A Node whose V8 does not match rejects it, and compiles as usual.
const bundle = join(root, 'dist/cli/main.cjs');
const script = new Script(Module.wrap(readFileSync(bundle, 'utf8')), { filename: bundle });
writeFileSync(`${bundle}.v8cache`, script.createCachedData());

// Run by path, as its own process, from beside main.cjs (src/layouts/user-module.ts, RUNNER).
await build({ ...common, entryPoints: { 'module-runner': 'dist/src/layouts/module-runner.js' }, format: 'esm' });

// The scan pool's worker, loaded by URL from beside the code that starts it (src/flush/scan-pool.ts,
// WORKER_URL): in the bundle that is beside main.cjs.
await build({ ...common, entryPoints: { 'scan-worker': 'dist/src/flush/scan-worker.js' }, format: 'esm' });

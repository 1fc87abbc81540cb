// `npm run build` after tsc: bundles the CLI into dist/cli/ (esbuild), so that a command loads
// one file for the part every command needs (commander, the command table, runtime state) and
// one chunk per part it imports lazily (the daemon, the flush engine, offline image transfer…),
// instead of some 20 to 90 modules each resolved and linked by Node's ESM loader. bin/vbd-shadow
// runs the bundle only while it is newer than tsc's output (a later `tsc -p .` alone is never
// shadowed by an older bundle). The native and watcher packages stay in node_modules.

import { build } from 'esbuild';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));

await build({
  absWorkingDir: root,
  // module-runner is run by path beside the chunk of user-module.ts (new URL('./module-runner.js', import.meta.url)).
  entryPoints: { main: 'dist/src/cli/main.js', 'module-runner': 'dist/src/layouts/module-runner.js' },
  outdir: 'dist/cli',
  entryNames: '[name]',
  chunkNames: '[name]-[hash]',
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  external: ['koffi', 'chokidar', '@node-rs/xxhash'],
  // commander is CommonJS: its require() of Node's built-ins needs a real require in ESM output.
  banner: { js: "import { createRequire as __vbdCreateRequire } from 'node:module'; const require = __vbdCreateRequire(import.meta.url);" },
  sourcemap: true,
  minifyWhitespace: true,
  minifySyntax: true,
  logLevel: 'warning',
});

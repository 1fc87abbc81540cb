// The child process that runs a user's layout module — the only place it is ever imported.
// It is started confined (src/sys/run-as.ts: as the owner, reset limits, clean environment,
// time limit, capped output) by user-module.ts; never import this file from anywhere else.
// Input (stdin): { path, geometry, params } as JSON. Output (stdout): offsets (f64) then files (u32).

import { pathToFileURL } from 'node:url';
import { placementTable, type Geometry, type Layout, type PlacementTable } from './layout.js';

const MAX_INPUT = 8 * 2 ** 20;

class LayoutModuleError extends Error {}

function isLayout(value: unknown): value is Layout {
  return typeof value === 'object' && value !== null && typeof (value as Layout).place === 'function';
}

/** Imports the module and computes its table, checking every value's type. */
async function moduleTable(path: string, geometry: Geometry, params: Record<string, unknown>): Promise<PlacementTable> {
  let mod: { createLayout?: unknown; default?: { createLayout?: unknown } };
  try {
    mod = (await import(pathToFileURL(path).href)) as typeof mod;
  } catch (err) {
    throw new LayoutModuleError(`cannot load layout module ${path}: ${err instanceof Error ? err.message : String(err)}`);
  }
  const create = mod.createLayout ?? mod.default?.createLayout;
  if (typeof create !== 'function') throw new LayoutModuleError(`layout module ${path} does not export createLayout(geometry, params)`);
  const layout: unknown = create(Object.freeze({ ...geometry, fileSizes: Object.freeze([...geometry.fileSizes]) }), params);
  if (!isLayout(layout)) throw new LayoutModuleError(`layout module ${path}: createLayout() must return an object with place(chunk)`);
  const checked: Layout = {
    place(chunk) {
      const p: unknown = layout.place(chunk);
      const { file, offset } = (p ?? {}) as { file?: unknown; offset?: unknown };
      if (typeof file !== 'number' || !Number.isSafeInteger(file) || file < 0 || file > 0xffffffff || typeof offset !== 'number' || !Number.isSafeInteger(offset)) {
        throw new LayoutModuleError(`layout module ${path}: place(${chunk}) must return { file, offset } as non-negative integers, got ${JSON.stringify(p)?.slice(0, 200)}`);
      }
      return { file, offset };
    },
  };
  return placementTable(checked, geometry);
}

async function main(): Promise<void> {
  // Whatever the module logs goes to stderr: stdout carries only the table.
  console.log = console.error;
  console.info = console.error;
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of process.stdin) {
    size += (chunk as Buffer).length;
    if (size > MAX_INPUT) throw new LayoutModuleError(`layout module runner: more than ${MAX_INPUT} bytes of input`);
    chunks.push(chunk as Buffer);
  }
  const input = JSON.parse(Buffer.concat(chunks).toString()) as { path: string; geometry: Geometry; params: Record<string, unknown> };
  const table = await moduleTable(input.path, input.geometry, input.params);
  process.stdout.write(Buffer.from(table.offset.buffer, table.offset.byteOffset, table.offset.byteLength));
  process.stdout.write(Buffer.from(table.file.buffer, table.file.byteOffset, table.file.byteLength));
}

main().catch((err: unknown) => {
  const message = err instanceof LayoutModuleError ? err.message : err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  process.stderr.write(`${message.split('\n')[0] ?? ''}\n`);
  process.exitCode = 1;
});

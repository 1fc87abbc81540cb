// `module:PATH`: the user's own layout, a JS module exporting
//   createLayout(geometry, params) → { place(chunk) → { file, offset } }
// It is user code: when we are root it runs in a child process as the volume owner
// (module-runner.ts), and whatever it returns is validated like any other layout.

import { spawn } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { VbdError, failure } from '../common/errors.js';
import { newTable, placementTable, type Geometry, type Layout, type PlacementTable } from './layout.js';

export interface RunAs {
  uid: number;
  gid: number;
}

function isLayout(value: unknown): value is Layout {
  return typeof value === 'object' && value !== null && typeof (value as Layout).place === 'function';
}

/** Imports the module in this process and computes its table, checking every value's type. */
export async function userModuleTable(path: string, geometry: Geometry, params: Record<string, unknown>): Promise<PlacementTable> {
  let mod: { createLayout?: unknown; default?: { createLayout?: unknown } };
  try {
    mod = (await import(pathToFileURL(path).href)) as typeof mod;
  } catch (err) {
    throw failure(`cannot load layout module ${path}`, err);
  }
  const create = mod.createLayout ?? mod.default?.createLayout;
  if (typeof create !== 'function') throw new VbdError(`layout module ${path} does not export createLayout(geometry, params)`);
  const layout: unknown = create(Object.freeze({ ...geometry, fileSizes: Object.freeze([...geometry.fileSizes]) }), params);
  if (!isLayout(layout)) throw new VbdError(`layout module ${path}: createLayout() must return an object with place(chunk)`);
  const checked: Layout = {
    place(chunk) {
      const p: unknown = layout.place(chunk);
      const { file, offset } = (p ?? {}) as { file?: unknown; offset?: unknown };
      if (typeof file !== 'number' || !Number.isSafeInteger(file) || file < 0 || typeof offset !== 'number' || !Number.isSafeInteger(offset)) {
        throw new VbdError(`layout module ${path}: place(${chunk}) must return { file, offset } as non-negative integers, got ${JSON.stringify(p)}`);
      }
      return { file, offset };
    },
  };
  return placementTable(checked, geometry);
}

const RUNNER = fileURLToPath(new URL('./module-runner.js', import.meta.url));

/** Runs the module in a child process as `runAs` and reads back its table (binary, on stdout). */
export function userModuleTableAs(runAs: RunAs, path: string, geometry: Geometry, params: Record<string, unknown>): Promise<PlacementTable> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [RUNNER], {
      uid: runAs.uid,
      gid: runAs.gid,
      cwd: '/',
      env: { PATH: '/usr/bin:/bin' },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', (e) => reject(failure(`cannot run layout module ${path} as uid ${runAs.uid}`, e)));
    child.on('close', (code) => {
      if (code !== 0) {
        const line = err.trim().split('\n').pop() ?? '';
        return reject(new VbdError(line.startsWith('layout') ? line : `layout module ${path} failed (exit ${code}): ${line}`));
      }
      const data = Buffer.concat(out);
      const n = geometry.chunkCount;
      if (data.length !== n * 12) return reject(new VbdError(`layout module ${path}: runner returned ${data.length} bytes, expected ${n * 12}`));
      const table = newTable(n);
      const aligned = Buffer.from(data); // fresh buffer: offset 0, aligned for typed views
      table.offset.set(new Float64Array(aligned.buffer, aligned.byteOffset, n));
      table.file.set(new Uint32Array(aligned.buffer, aligned.byteOffset + n * 8, n));
      resolve(table);
    });
    child.stdin.end(JSON.stringify({ path, geometry, params }));
  });
}

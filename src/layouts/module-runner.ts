// Child process that computes a user's module layout table with the user's own privileges.
// Input (stdin): { path, geometry, params } as JSON. Output (stdout): offsets (f64) then files (u32).

import { userModuleTable } from './user-module.js';
import type { Geometry } from './layout.js';

async function main(): Promise<void> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  const input = JSON.parse(Buffer.concat(chunks).toString()) as { path: string; geometry: Geometry; params: Record<string, unknown> };
  const table = await userModuleTable(input.path, input.geometry, input.params);
  process.stdout.write(Buffer.from(table.offset.buffer, table.offset.byteOffset, table.offset.byteLength));
  process.stdout.write(Buffer.from(table.file.buffer, table.file.byteOffset, table.file.byteLength));
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});

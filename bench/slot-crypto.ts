// Seal/open throughput of the sealed slot format on one core, with buffer reuse as populate and
// flush will use it: chunks are sealed from windows of a plaintext image into one reused slot
// buffer, and slots are opened straight into the image's windows. Prints; asserts nothing.
// Run: npx tsc -p . && node dist/bench/slot-crypto.js [--mib 256] [--rounds 3]

import { execFileSync } from 'node:child_process';
import { randomBytes, randomFillSync } from 'node:crypto';
import { VolumeKeys } from '../src/store/keys.js';
import { openChunk, sealChunk, slotSize } from '../src/store/slot.js';

function option(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

const MIB = option('mib', 256);
const ROUNDS = option('rounds', 3);

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
}

function mibPerSecond(bytes: number, ms: number): number {
  return bytes / 2 ** 20 / (ms / 1000);
}

/** openssl's single-core AES-256-GCM figure at this block size, the ceiling for one thread. */
function opensslSpeed(bytes: number): number | undefined {
  try {
    const out = execFileSync('openssl', ['speed', '-elapsed', '-seconds', '2', '-bytes', String(bytes), '-evp', 'aes-256-gcm'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    const line = out.split('\n').reverse().find((l) => /^AES-256-GCM\s/i.test(l.trim()) || /^aes-256-gcm\s/i.test(l.trim()));
    const k = line === undefined ? undefined : /([\d.]+)k\s*$/.exec(line.trim());
    return k?.[1] === undefined ? undefined : (Number(k[1]) * 1000) / 2 ** 20;
  } catch {
    return undefined;
  }
}

const keys = new VolumeKeys(randomBytes(32), randomBytes(16));
const key = keys.slotKey(0);
const image = Buffer.alloc(MIB * 2 ** 20);
randomFillSync(image);

console.log(`slot crypto, one core, ${MIB} MiB per run, median of ${ROUNDS} (node ${process.version}, OpenSSL ${process.versions.openssl})`);
console.log('chunk    seal MiB/s   open MiB/s   µs/seal   µs/open   openssl 1-core MiB/s');
for (const chunk of [65536, 4096]) {
  const count = image.length / chunk;
  const slot = Buffer.alloc(slotSize(chunk));
  // A ring of sealed slots to open: as many as fit in 64 MiB (what a populate read window holds).
  const ringCount = Math.min(count, Math.floor((64 * 2 ** 20) / slot.length));
  const ring = Buffer.alloc(ringCount * slot.length);
  for (let i = 0; i < ringCount; i++) {
    sealChunk(key, { chunk: i, epoch: 1 }, image.subarray(i * chunk, (i + 1) * chunk), ring.subarray(i * slot.length, (i + 1) * slot.length));
  }
  const seal: number[] = [];
  const open: number[] = [];
  for (let r = 0; r < ROUNDS + 1; r++) {
    let t = performance.now();
    for (let c = 0; c < count; c++) sealChunk(key, { chunk: c, epoch: 2 }, image.subarray(c * chunk, (c + 1) * chunk), slot);
    const sealMs = performance.now() - t;
    t = performance.now();
    for (let c = 0; c < count; c++) {
      const i = c % ringCount;
      openChunk(key, { chunk: i, epoch: 1 }, ring.subarray(i * slot.length, (i + 1) * slot.length), image.subarray(c * chunk, (c + 1) * chunk));
    }
    const openMs = performance.now() - t;
    if (r > 0) {
      seal.push(sealMs);
      open.push(openMs);
    }
  }
  const s = median(seal);
  const o = median(open);
  const ossl = opensslSpeed(chunk);
  console.log(
    `${String(chunk / 1024).padStart(3)} KiB  ${mibPerSecond(image.length, s).toFixed(0).padStart(10)}   ${mibPerSecond(image.length, o).toFixed(0).padStart(10)}` +
      `   ${((s * 1000) / count).toFixed(2).padStart(7)}   ${((o * 1000) / count).toFixed(2).padStart(7)}   ${ossl === undefined ? 'n/a' : ossl.toFixed(0).padStart(10)}`,
  );
}
keys.wipe();

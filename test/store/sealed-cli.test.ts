// Sealed volumes offline, end to end through the real CLI, as an ordinary user in her own home
// (when the tests run as root): init --sealed, import, export, passwd; what the files show; and
// every tampering the issue names, each detected, named and refused with nothing written.

import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MANIFEST_NAME } from '../../src/volume/manifest.js';
import { MAP_NAME, SEALED_JOURNAL_NAME } from '../../src/volume/volume.js';
import { logOffset, mapRegionBytes, regionOffset, MAP_HEADER_BYTES } from '../../src/store/map.js';
import { logRecordBytes } from '../../src/store/map-log.js';
import { slotSize } from '../../src/store/slot.js';
import type { ChunkPlace } from '../../src/store/chunk-store.js';
import { cli, sha256, treeHash, type CliResult } from '../helpers/cli.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, cliAs, type User } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';
import { withStore } from '../helpers/volumes.js';

type Json = Record<string, unknown>;

const PASS = 'sealed: correct horse battery staple';
/** Printable, so `grep -F` can look for it; 16 bytes. */
const MARKER = 'Qz7!vbd-MARKER#9';

/** A user's home to work in: as a real unprivileged user when we are root, else as ourselves. */
interface Home {
  home: string;
  user: User | undefined;
  run(args: string[]): CliResult;
  ok(args: string[]): CliResult;
  /** A file in the home, owned by the user, mode 0600. */
  put(name: string, data: Buffer | string): string;
}

function homeOf(): Home {
  let home: string;
  let user: User | undefined;
  if (IS_ROOT) {
    const o = ownedScratch();
    home = o.home;
    user = o.user;
  } else {
    home = tempDir();
  }
  const run = (args: string[]): CliResult => (user !== undefined ? cliAs(user, args) : cli(args));
  return {
    home, user, run,
    ok(args) {
      const r = run(args);
      if (r.status !== 0) throw new Error(`vbd-shadow ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
      return r;
    },
    put(name, data) {
      const path = join(home, name);
      writeFileSync(path, data, { mode: 0o600 });
      if (user !== undefined) chownSync(path, user.uid, user.gid);
      return path;
    },
  };
}

interface Sealed extends Home {
  dir: string;
  key: string;
  keyArgs: string[];
  size: number;
  chunk: number;
  /** Imports `image` through the CLI; returns its stdout. */
  importImage(image: Buffer, keyArgs?: string[]): CliResult;
  /** Exports through the CLI into a fresh file; returns the result and the image (if written). */
  exportImage(extra?: string[]): { r: CliResult; image: Buffer | undefined };
}

function sealedVolume(o: { size: number; files: number; chunk: number; layout?: string; spare?: string }): Sealed {
  const h = homeOf();
  const dir = join(h.home, 'vault');
  const key = h.put('pass', `${PASS}\n`);
  const keyArgs = ['--key-file', key];
  const args = ['init', dir, '--sealed', '--size', String(o.size), '--files', String(o.files), '--chunk', String(o.chunk), '--layout', o.layout ?? 'keyed', ...keyArgs];
  if (o.spare !== undefined) args.push('--spare', o.spare);
  h.ok(args);
  let n = 0;
  return {
    ...h, dir, key, keyArgs, size: o.size, chunk: o.chunk,
    importImage(image, k = keyArgs) {
      const path = h.put(`in-${n++}.img`, image);
      return h.run(['import', dir, path, ...k]);
    },
    exportImage(extra = keyArgs) {
      const path = join(h.home, `out-${n++}.img`);
      const r = h.run(['export', dir, path, ...extra]);
      return { r, image: existsSync(path) ? readFileSync(path) : undefined };
    },
  };
}

function exported(v: Sealed, extra?: string[]): Buffer {
  const { r, image } = v.exportImage(extra);
  if (r.status !== 0 || image === undefined) throw new Error(`export exited ${r.status}: ${r.stderr}`);
  return image;
}

function locate(v: Sealed, chunk: number): Promise<ChunkPlace> {
  return withStore(v.dir, Buffer.from(PASS), false, (store) => store.locate(chunk));
}

function readPlace(dir: string, p: ChunkPlace): Buffer {
  return readFileSync(join(dir, p.name)).subarray(p.offset, p.offset + p.bytes);
}

function writePlace(dir: string, p: ChunkPlace, bytes: Buffer): void {
  const path = join(dir, p.name);
  const file = readFileSync(path);
  bytes.copy(file, p.offset);
  writeFileSync(path, file); // an existing file: owner and mode stay
}

function editManifest(dir: string, edit: (m: Json) => void): void {
  const path = join(dir, MANIFEST_NAME);
  const m = JSON.parse(readFileSync(path, 'utf8')) as Json;
  edit(m);
  writeFileSync(path, JSON.stringify(m, null, 2));
}

/** One line on stderr, a non-zero exit. */
function expectRefusal(r: CliResult, error: RegExp): void {
  expect(r.status, r.stderr).not.toBe(0);
  expect(r.stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
  expect(r.stderr).toMatch(error);
}

/** An image with MARKER at many places (some across chunk boundaries) over random bytes. */
function markedImage(size: number, chunk: number): Buffer {
  const image = randomBytes(size);
  for (let i = 0; i < 40; i++) {
    const at = i % 2 === 0 ? Math.floor(Math.random() * (size - 16)) : Math.min(size - 16, (i + 1) * chunk - 7);
    image.write(MARKER, at, 'latin1');
  }
  return image;
}

/** Names of the files in `dir` that hold `needle` (every file, the manifest and map included). */
function filesHolding(dir: string, needle: Buffer): string[] {
  return readdirSync(dir).filter((n) => readFileSync(join(dir, n)).includes(needle));
}

describe('sealed volumes through the CLI', () => {
  it('round trip import → export at several chunk sizes and file counts, every built-in layout', () => {
    const shapes = [
      { size: 256 * 1024, files: 1, chunk: 512 },
      { size: 3 * 2 ** 20, files: 10, chunk: 16384 },
      { size: 8 * 2 ** 20, files: 13, chunk: 65536 },
      { size: 8 * 2 ** 20, files: 3, chunk: 2 ** 20 },
    ];
    for (const layout of ['linear', 'striped', 'keyed']) {
      for (const s of shapes) {
        const v = sealedVolume({ ...s, layout });
        const image = randomBytes(s.size);
        const r = v.importImage(image);
        expect(r.status, r.stderr).toBe(0);
        // The default spares (20%) are fewer than the chunks: an import goes through the journal.
        expect(r.stdout).toBe('');
        expect(r.stderr).toMatch(new RegExp(`^imported into 'vault' from \\S+: ${s.size} bytes, ${s.size / s.chunk} chunks sealed and committed as epoch 4, \\d+ into free slots, \\d+ through the overflow journal`));
        expect(sha256(exported(v)), `${layout} ${JSON.stringify(s)}`).toBe(sha256(image));
      }
    }
  });

  it('init fills every slot with ciphertext: sizes are whole slots, no run of zeros anywhere, a new volume exports as zeros', () => {
    const v = sealedVolume({ size: 1024 * 1024, files: 5, chunk: 4096, spare: '25%' });
    const m = JSON.parse(readFileSync(join(v.dir, MANIFEST_NAME), 'utf8')) as { files: { path: string; size: number }[]; sealed: { spareSlots: number } };
    expect(m.sealed.spareSlots).toBe(64);
    const slots = m.files.reduce((sum, f) => sum + f.size / slotSize(4096), 0);
    expect(slots).toBe(256 + 64);
    for (const f of m.files) {
      expect(f.size % slotSize(4096)).toBe(0);
      expect(readFileSync(join(v.dir, f.path)).includes(Buffer.alloc(32))).toBe(false);
    }
    expect(readdirSync(v.dir).sort()).toEqual([...m.files.map((f) => f.path), MANIFEST_NAME, MAP_NAME].sort());
    expect(exported(v).equals(Buffer.alloc(1024 * 1024))).toBe(true);
  });

  it('a distinctive pattern imported is in no file of a sealed volume, and is found in a plain one', () => {
    const size = 2 * 2 ** 20;
    const image = markedImage(size, 16384);
    // Windows inside one chunk each (a plain striped volume keeps a chunk's bytes together).
    const windows = [0, 12345, 3 * 16384 + 100, size - 16].map((at) => image.subarray(at, at + 16));
    const v = sealedVolume({ size, files: 4, chunk: 16384 });
    expect(v.importImage(image).status).toBe(0);
    expect(spawnSync('grep', ['-rlaF', MARKER, v.dir]).status).toBe(1); // grep: nothing found
    expect(filesHolding(v.dir, Buffer.from(MARKER, 'latin1'))).toEqual([]);
    for (const w of windows) expect(filesHolding(v.dir, w)).toEqual([]);
    expect(exported(v).equals(image)).toBe(true);

    // The same import into a plain volume: the test can see the pattern when it is there.
    const plainDir = join(v.home, 'plain');
    v.ok(['init', plainDir, '--size', String(size), '--files', '4', '--chunk', '16K', '--layout', 'striped']);
    v.ok(['import', plainDir, v.put('plain.img', image)]);
    const grep = spawnSync('grep', ['-rlaF', MARKER, plainDir], { encoding: 'utf8' });
    expect(grep.status).toBe(0);
    expect(grep.stdout).toMatch(/plain\/file00\d/);
    for (const w of windows) expect(filesHolding(plainDir, w).length).toBeGreaterThan(0);
  });

  it('a flipped byte in a used slot: export refused naming file, offset and chunk; --zero-damaged zeroes exactly that chunk and lists it', async () => {
    const v = sealedVolume({ size: 512 * 1024, files: 3, chunk: 4096 });
    const image = randomBytes(512 * 1024);
    expect(v.importImage(image).status).toBe(0);
    const p = await locate(v, 77);
    const bytes = readPlace(v.dir, p);
    bytes[200] ^= 0x01;
    writePlace(v.dir, p, bytes);
    const before = treeHash(v.home);
    const { r, image: none } = v.exportImage();
    expectRefusal(r, new RegExp(`export refused: 1 chunk fails authentication .*: chunk 77 \\(${p.name} at offset ${p.offset}, epoch 3\\); nothing was written \\(--zero-damaged exports them as zeros\\)`));
    expect(none).toBeUndefined();
    expect(treeHash(v.home)).toBe(before);

    const { r: z, image: out } = v.exportImage([...v.keyArgs, '--zero-damaged']);
    expect(z.status, z.stderr).toBe(0);
    expect(z.stderr).toContain(`zeroed damaged chunk 77 (${p.name} at offset ${p.offset}, epoch 3)\n`);
    const want = Buffer.from(image);
    want.fill(0, 77 * 4096, 78 * 4096);
    expect(out?.equals(want)).toBe(true);
  });

  it('one slot copied over another is refused, naming the chunk whose slot it replaced', async () => {
    const v = sealedVolume({ size: 256 * 1024, files: 2, chunk: 4096, layout: 'linear' });
    expect(v.importImage(randomBytes(256 * 1024)).status).toBe(0);
    const from = await locate(v, 3);
    const to = await locate(v, 40);
    writePlace(v.dir, to, readPlace(v.dir, from));
    expectRefusal(v.exportImage().r, new RegExp(`1 chunk fails authentication .*: chunk 40 \\(${to.name} at offset ${to.offset}, epoch 3\\)`));
  });

  it('an older copy of a slot put back (from a copy of the files taken before a later import) is refused', async () => {
    const v = sealedVolume({ size: 256 * 1024, files: 3, chunk: 4096, spare: '100%' });
    expect(v.importImage(randomBytes(256 * 1024)).status).toBe(0);
    const snapshot = new Map(readdirSync(v.dir).map((n) => [n, readFileSync(join(v.dir, n))]));
    const old = await locate(v, 12);
    expect(v.importImage(randomBytes(256 * 1024)).status).toBe(0);
    const now = await locate(v, 12);
    const oldCopy = snapshot.get(old.name)?.subarray(old.offset, old.offset + old.bytes) ?? Buffer.alloc(0);
    // Chunk 12's slot of the earlier epoch, put where chunk 12 lives now: a replay.
    writePlace(v.dir, now, oldCopy);
    expectRefusal(v.exportImage().r, new RegExp(`: chunk 12 \\(${now.name} at offset ${now.offset}, epoch 4\\); nothing was written`));
    // And what that place held before (whatever it was) fails the same way.
    writePlace(v.dir, now, snapshot.get(now.name)?.subarray(now.offset, now.offset + now.bytes) ?? Buffer.alloc(0));
    expectRefusal(v.exportImage().r, /chunk 12 /);
  });

  it('an edited manifest (sizes, spare count, name, layout, the sealed flag) is refused as a wrong key or an edited manifest; nothing changes', () => {
    const edits: [string, (m: Json) => void, RegExp][] = [
      ['deviceSize halved', (m) => { m['deviceSize'] = (m['deviceSize'] as number) / 2; }, /wrong key or manifest edited/],
      ['one spare slot fewer', (m) => { (m['sealed'] as Json)['spareSlots'] = ((m['sealed'] as Json)['spareSlots'] as number) - 1; }, /wrong key or manifest edited/],
      ['chunk size halved', (m) => { m['chunkSize'] = 2048; }, /wrong key or manifest edited|invalid manifest/],
      ['renamed', (m) => { m['name'] = 'other'; }, /wrong key or manifest edited/],
      ['layout changed', (m) => { m['layout'] = { kind: 'linear' }; }, /wrong key or manifest edited/],
      ['format 1, sealed object kept', (m) => { m['format'] = 1; }, /format 1 with a sealed object: wrong key or manifest edited/],
      ['format 1, sealed object removed', (m) => { m['format'] = 1; delete m['sealed']; m['layout'] = { kind: 'linear' }; }, /holds a sealed volume's position map .* wrong key or manifest edited/],
    ];
    const v = sealedVolume({ size: 256 * 1024, files: 2, chunk: 4096 });
    expect(v.importImage(randomBytes(256 * 1024)).status).toBe(0);
    const original = readFileSync(join(v.dir, MANIFEST_NAME));
    const image = v.put('again.img', randomBytes(256 * 1024));
    for (const [what, edit, error] of edits) {
      writeFileSync(join(v.dir, MANIFEST_NAME), original);
      editManifest(v.dir, edit);
      const before = treeHash(v.home);
      expectRefusal(v.exportImage().r, error);
      expectRefusal(v.run(['import', v.dir, image, ...v.keyArgs]), error);
      expect(treeHash(v.home), what).toBe(before);
    }
    writeFileSync(join(v.dir, MANIFEST_NAME), original);
    expect(v.exportImage().r.status).toBe(0);
  });

  it('a wrong passphrase is refused before anything is read or written', () => {
    const v = sealedVolume({ size: 128 * 1024, files: 2, chunk: 4096 });
    const wrong = v.put('wrong', 'not the passphrase\n');
    const input = v.put('in.img', randomBytes(128 * 1024));
    const before = treeHash(v.home);
    expectRefusal(v.exportImage(['--key-file', wrong]).r, /wrong key or manifest edited/);
    expectRefusal(v.run(['import', v.dir, input, '--key-file', wrong]), /wrong key or manifest edited/);
    expect(treeHash(v.home)).toBe(before);
  });

  it('a damaged map log record or map copy: export decodes the epoch before it and says so', () => {
    const v = sealedVolume({ size: 256 * 1024, files: 2, chunk: 4096, spare: '100%' });
    const one = randomBytes(256 * 1024);
    const two = randomBytes(256 * 1024);
    const chunks = 64;
    // init: map A at epoch 1, map B at epoch 2 (the checkpoint the log builds on); each import
    // appends one record of its 64 entries: epoch 3, then epoch 4.
    expect(v.importImage(one).status).toBe(0);
    expect(v.importImage(two).status).toBe(0);
    const mapPath = join(v.dir, MAP_NAME);
    const flip = (offset: number): void => {
      const map = readFileSync(mapPath);
      map[offset] ^= 0x20;
      writeFileSync(mapPath, map);
    };
    const a = regionOffset(chunks, 0);
    const b = regionOffset(chunks, 1);
    expect(b - a).toBe(mapRegionBytes(chunks));
    const log = logOffset(chunks);
    const second = log + logRecordBytes(chunks, 0);
    const auth = 'fails authentication (corrupted, tampered with, torn by a crash, or of another volume)';
    /** Export says `warning`, then gives `expected`, or (undefined) refuses: that older epoch's slots were reused since. */
    const warned = (expected: Buffer | undefined, warning: string): void => {
      const { r, image } = v.exportImage();
      if (expected === undefined) {
        expect(r.status).not.toBe(0);
        expect(r.stderr).toMatch(/^vbd-shadow: warning: [^\n]+\nvbd-shadow: export refused: 64 chunks fail authentication [^\n]+\n$/);
      } else {
        expect(r.status, r.stderr).toBe(0);
        expect(image?.equals(expected)).toBe(true);
      }
      expect(r.stderr.split('\n')[0]).toBe(`vbd-shadow: warning: ${warning}`);
    };

    flip(second + 100); // the last record: that commit did not happen
    warned(one, `the last map log record (${MAP_NAME} at offset ${second}, epoch 4) ${auth}: the commit it holds did not happen; the files decode to epoch 3`);
    flip(second + 100);
    expect(exported(v).equals(two)).toBe(true);

    // A middle record: it and every record after it are not applied, and that is said. Epoch 2's
    // slots were the free ones epoch 4 wrote (full imports, 100% spare), so nothing is exposed.
    flip(log + 100);
    warned(undefined, `map log record (${MAP_NAME} at offset ${log}, epoch 3) ${auth}; it and 1 later record of the log are not applied (a crash tears only the last record: the log was damaged or tampered with); the files decode to epoch 2`);
    flip(log + 100);

    flip(b + MAP_HEADER_BYTES + 7); // the checkpoint the log builds on: the older copy, without that log (slots reused: refused)
    warned(undefined, `map B (${MAP_NAME} at offset ${b}) ${auth}; using map A (${MAP_NAME} at offset ${a}), epoch 1 (if the failed copy held a later commit, that commit is lost)`);
    flip(b + MAP_HEADER_BYTES + 7);

    flip(a + 30); // the older copy: B and its log still win, and A's damage is said
    warned(two, `map A (${MAP_NAME} at offset ${a}) ${auth}; using map B (${MAP_NAME} at offset ${b}) and the map log after it, epoch 4 (if the failed copy held a later commit, that commit is lost)`);
    flip(b + 100);
    expectRefusal(v.exportImage().r, /no valid position map: map A .* fails authentication.*; map B .* fails authentication/);
  });

  it('passwd: the old passphrase is refused afterwards, the new one works, no byte of slots or map changed', () => {
    const v = sealedVolume({ size: 256 * 1024, files: 3, chunk: 4096 });
    const image = randomBytes(256 * 1024);
    expect(v.importImage(image).status).toBe(0);
    const data = (): string => readdirSync(v.dir).filter((n) => n !== MANIFEST_NAME).sort().map((n) => `${n}:${sha256(readFileSync(join(v.dir, n)))}`).join();
    const before = data();
    const fresh = v.put('new-pass', 'a brand new passphrase\n');
    const wrong = v.put('wrong', 'nope\n');
    const manifest = readFileSync(join(v.dir, MANIFEST_NAME));
    expectRefusal(v.run(['passwd', v.dir, '--key-file', wrong, '--new-key-file', fresh]), /wrong key or manifest edited/);
    expect(readFileSync(join(v.dir, MANIFEST_NAME)).equals(manifest)).toBe(true);

    const r = v.ok(['passwd', v.dir, '--key-file', v.key, '--new-key-file', fresh]);
    expect(r.stdout).toMatch(/passphrase changed/);
    expect(data()).toBe(before);
    expectRefusal(v.exportImage().r, /wrong key or manifest edited/);
    expect(exported(v, ['--key-file', fresh]).equals(image)).toBe(true);
    expectRefusal(v.run(['passwd', join(v.home, 'nope')]), /cannot open volume directory/);
  });

  it('an import larger than the spare slots commits one whole snapshot (through the overflow journal) and says so', () => {
    const v = sealedVolume({ size: 512 * 1024, files: 4, chunk: 8192, spare: '5' });
    const image = randomBytes(512 * 1024);
    const r = v.importImage(image);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^imported into 'vault' from \S+: 524288 bytes, 64 chunks sealed and committed as epoch 4, 5 into free slots, 59 through the overflow journal \(more chunks than free slots: committed as one whole snapshot, those written twice\), in \d+\.\d\d s\n$/);
    expect(existsSync(join(v.dir, SEALED_JOURNAL_NAME))).toBe(false);
    expect(exported(v).equals(image)).toBe(true);
    const again = randomBytes(512 * 1024);
    expect(v.importImage(again).status).toBe(0);
    expect(exported(v).equals(again)).toBe(true);
  });

  it('init --sealed refuses bad --spare values and --spare without --sealed', () => {
    const h = homeOf();
    const key = h.put('k', 'x\n');
    for (const [spare, error] of [['0', /--spare: expected PERCENT% or a number of slots \(at least 1\), got '0'/], ['abc', /--spare: expected/], ['0%', /--spare: a percentage from above 0/]] as const) {
      expectRefusal(h.run(['init', join(h.home, 'v'), '--sealed', '--size', '64K', '--files', '1', '--chunk', '4K', '--spare', spare, '--key-file', key]), error);
    }
    expectRefusal(h.run(['init', join(h.home, 'v'), '--size', '64K', '--files', '1', '--chunk', '4K', '--spare', '3']), /--spare only applies to a sealed volume/);
    expectRefusal(h.run(['init', join(h.home, 'v'), '--sealed', '--size', '64K', '--files', '1', '--chunk', '4K']), /give --key-file FILE \(no terminal to ask on\)/);
    expect(existsSync(join(h.home, 'v'))).toBe(false);
  });
});

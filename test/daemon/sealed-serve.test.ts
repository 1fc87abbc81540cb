// Sealed volumes served by the daemon, for real: a volume owned by an unprivileged user, started
// by root with her passphrase. Round trips through start → write → flush → stop → export with every
// built-in layout (and a flush of more changed chunks than free slots); what the files show of data
// written through a mounted filesystem (nothing, where a plain volume shows it); tampering and
// rollback refused at start with nothing exposed, and the explicit ways past each.

import { randomBytes } from 'node:crypto';
import { chownSync, closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { InspectReport } from '../../src/cli/inspect-command.js';
import { readEpochRecord } from '../../src/daemon/epoch-record.js';
import { readStatus, type DaemonStatus } from '../../src/daemon/runtime.js';
import type { ChunkPlace } from '../../src/store/chunk-store.js';
import type { SealedStore } from '../../src/store/sealed-store.js';
import { EXIT } from '../../src/common/exit-codes.js';
import { MANIFEST_NAME } from '../../src/volume/manifest.js';
import { startAgent } from '../helpers/agent.js';
import { cli, cliOk, sha256, treeHash } from '../helpers/cli.js';
import { eventsOf, startDaemon, stopDaemon, waitLive, waitState, type TestDaemon } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers, runAs, type User } from '../helpers/system.js';
import { withStore } from '../helpers/volumes.js';

const PASS = 'a sealed passphrase for the daemon';
const KiB = 1024;
const MiB = 2 ** 20;

interface SealedHome {
  user: User;
  scratch: string;
  home: string;
  /** The passphrase file (the user's, 0600; root reads it for `start --key-file`). */
  key: string;
  dir: string;
  name: string;
}

function sealedHome(tag: string): SealedHome {
  const { user, scratch, home } = ownedScratch();
  const key = join(home, 'pass');
  writeFileSync(key, `${PASS}\n`, { mode: 0o600 });
  chownSync(key, user.uid, user.gid);
  return { user, scratch, home, key, dir: join(home, 'vol'), name: `${TEST_PREFIX}${tag}` };
}

function asUser(h: SealedHome, args: string[]): void {
  const r = cliAs(h.user, args);
  if (r.status !== 0) throw new Error(`vbd-shadow ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
}

function initSealed(h: SealedHome, size: string, files: number, chunk: string, layout = 'linear'): void {
  asUser(h, ['init', h.dir, '--sealed', '--size', size, '--files', String(files), '--chunk', chunk, '--layout', layout, '--name', h.name, '--key-file', h.key]);
}

/** Imports `image` as the user (offline), so the volume holds known bytes. */
function importAs(h: SealedHome, image: Buffer): void {
  const path = join(h.home, 'in.img');
  writeFileSync(path, image);
  chownSync(path, h.user.uid, h.user.gid);
  asUser(h, ['import', h.dir, path, '--key-file', h.key]);
}

/** Exports as the user and returns the bytes (throws with the CLI's message if refused). */
function exportAs(h: SealedHome): Buffer {
  const path = join(h.home, 'out.img');
  rmSync(path, { force: true });
  asUser(h, ['export', h.dir, path, '--key-file', h.key]);
  return readFileSync(path);
}

/** Fills `image[offset, offset + length)` with random bytes and returns them (what is written to the device there). */
function fill(image: Buffer, offset: number, length: number): Buffer {
  const data = randomBytes(length);
  data.copy(image, offset);
  return data;
}

function uuidOf(h: SealedHome): string {
  return (JSON.parse(readFileSync(join(h.dir, MANIFEST_NAME), 'utf8')) as { sealed: { uuid: string } }).sealed.uuid;
}

function keyGenerationOf(h: SealedHome): number {
  return (JSON.parse(readFileSync(join(h.dir, MANIFEST_NAME), 'utf8')) as { sealed: { keyGeneration: number } }).sealed.keyGeneration;
}

function flush(name: string): DaemonStatus {
  cliOk(['flush', name]);
  const s = readStatus(name);
  if (s === undefined) throw new Error(`no status for ${name}`);
  return s;
}

function locate(h: SealedHome, chunk: number): Promise<ChunkPlace> {
  return withStore(h.dir, Buffer.from(PASS), false, (store) => store.locate(chunk));
}

function readAt(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    expect(readSync(fd, buf, 0, length, offset)).toBe(length);
    return buf;
  } finally {
    closeSync(fd);
  }
}

/** Writes `data` at `offset` of a file or a device, in place. */
function writeAt(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** The passphrase for a sealed volume; nothing for a plain one (a key file it has no use for is refused). */
function keyArgs(h: SealedHome): string[] {
  const m = JSON.parse(readFileSync(join(h.dir, MANIFEST_NAME), 'utf8')) as { sealed?: unknown };
  return m.sealed !== undefined ? ['--key-file', h.key] : [];
}

/**
 * A start that must be refused: the start exits 1, no device is published, the files are
 * untouched. Returns the daemon's status if it got as far as writing one (refused by the
 * daemon), else undefined (refused by the command before any daemon state: then its one line).
 */
async function refusedStart(h: SealedHome, exitStatus: number): Promise<{ status: DaemonStatus | undefined; output: string }> {
  const before = treeHash(h.dir);
  const daemon = startDaemon(h.name, [h.dir, ...keyArgs(h)]);
  expect(await daemon.exited, daemon.output()).toBe(exitStatus);
  const s = readStatus(h.name);
  const ours = s !== undefined && s.pid === daemon.child.pid ? s : undefined;
  if (ours !== undefined) {
    expect(ours.state).toBe('failed');
    expect(ours.device).toBeUndefined();
  }
  expect(existsSync(`/dev/vbd-shadow/${h.user.name}/${h.name}`)).toBe(false);
  expect(treeHash(h.dir)).toBe(before);
  expect(leftovers()).toEqual([]);
  return { status: ours, output: daemon.output() };
}

/** A start refused by the daemon (after its checks of the files): its status says why. */
async function expectRefusedStart(h: SealedHome, exitStatus: number): Promise<DaemonStatus> {
  const { status, output } = await refusedStart(h, exitStatus);
  expect(status, output).toBeDefined();
  return status as DaemonStatus;
}

async function serve(h: SealedHome, extra: string[] = []): Promise<{ daemon: TestDaemon; live: DaemonStatus }> {
  const daemon = startDaemon(h.name, [h.dir, ...keyArgs(h), '--interval', '1h', ...extra]);
  return { daemon, live: await waitLive(daemon) };
}

describe.skipIf(!IS_ROOT)(`sealed volumes served by the daemon (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  const cases = [
    { layout: 'linear', chunk: '4K', files: 3 },
    { layout: 'striped', chunk: '16K', files: 7 },
    { layout: 'keyed', chunk: '64K', files: 5 },
  ] as const;
  for (const c of cases) {
    it(`round trip, ${c.layout} layout, ${c.chunk} chunks, ${c.files} files: start → write → flush → stop → export; a flush larger than the free slots`, async () => {
      const h = sealedHome(`sealed-rt-${c.layout}`);
      const size = 4 * MiB;
      initSealed(h, '4M', c.files, c.chunk, c.layout);
      const image = randomBytes(size);
      importAs(h, image);
      const { daemon, live } = await serve(h);
      const device = live.link ?? '';
      expect(sha256(readFileSync(device))).toBe(sha256(image));
      expect(live.sealedVolume).toBe(true);
      expect(live.populateThreads).toBe(availableParallelism());
      const chunkSize = live.chunkSize;
      const freeSlots = live.sealed?.freeSlots ?? 0;
      expect(freeSlots).toBeGreaterThan(0);

      // A few chunks: copy-on-write into free slots, one epoch further.
      const small = randomBytes(3 * chunkSize);
      writeAt(device, 5 * chunkSize, small);
      small.copy(image, 5 * chunkSize);
      const epochBefore = live.sealed?.epoch ?? 0;
      const s1 = flush(h.name);
      expect(s1.lastFlush?.chunksChanged).toBe(3);
      expect(s1.lastFlush?.sealed).toMatchObject({ inFreeSlots: 3, throughJournal: 0 });
      expect(s1.lastFlush?.sealed?.epoch).toBeGreaterThan(epochBefore);
      expect(s1.lastFlush?.sealed?.threads).toBe(0); // three chunks: sealed on the daemon's thread
      expect(s1.sealed?.epoch).toBe(s1.lastFlush?.sealed?.epoch);
      // Root's record follows the commit.
      expect(readEpochRecord(h.user.uid, uuidOf(h))?.committedEpoch).toBe(s1.sealed?.epoch);

      // The whole device: more changed chunks than free slots, still one commit.
      const whole = randomBytes(size);
      writeAt(device, 0, whole);
      const s2 = flush(h.name);
      const chunks = size / chunkSize;
      expect(s2.lastFlush?.chunksChanged).toBe(chunks);
      expect(s2.lastFlush?.sealed?.inFreeSlots).toBe(freeSlots);
      expect(s2.lastFlush?.sealed?.throughJournal).toBe(chunks - freeSlots);

      // A last write reaches the files at stop.
      const last = randomBytes(chunkSize);
      writeAt(device, 0, last);
      last.copy(whole, 0);
      expect(await stopDaemon(daemon)).toBe(0);
      expect(sha256(exportAs(h))).toBe(sha256(whole));
      expect(readdirSync(h.dir).filter((n) => n.includes('journal'))).toEqual([]);
      expect(leftovers()).toEqual([]);
    });
  }

  it('populate opens the slots on the pool\'s threads, straight into the image, over several jobs; a large flush seals on them, into free slots and through the overflow journal: the files hold what was written', async () => {
    const h = sealedHome('sealed-pool');
    // 160 MiB: three populate jobs of at most 64 MiB each, every one cut into pieces the threads claim.
    const size = 160 * MiB;
    initSealed(h, '160M', 9, '64K', 'keyed');
    const image = randomBytes(size);
    importAs(h, image);
    const { daemon, live } = await serve(h);
    expect(live.populateThreads).toBe(availableParallelism());
    expect(availableParallelism()).toBeGreaterThan(1);
    const device = live.link ?? '';
    expect(sha256(readFileSync(device))).toBe(sha256(image));

    // 24 MiB changed (fits the 32 MiB of free slots): sealed and written by the pool's threads.
    const part = randomBytes(24 * MiB);
    writeAt(device, 40 * MiB, part);
    part.copy(image, 40 * MiB);
    const s1 = flush(h.name);
    expect(s1.lastFlush?.chunksChanged).toBe(384);
    expect(s1.lastFlush?.sealed).toMatchObject({ inFreeSlots: 384, throughJournal: 0, threads: availableParallelism() });
    // The whole device: more than the free slots, the rest through the overflow journal, on the pool too.
    const whole = randomBytes(size);
    writeAt(device, 0, whole);
    const s2 = flush(h.name);
    expect(s2.lastFlush?.chunksChanged).toBe(size / (64 * KiB));
    expect(s2.lastFlush?.sealed?.threads).toBe(availableParallelism());
    expect(s2.lastFlush?.sealed?.throughJournal).toBeGreaterThan(0);
    expect(await stopDaemon(daemon)).toBe(0);
    expect(sha256(exportAs(h))).toBe(sha256(whole));
  });

  it('re-key while live: a flush that would pass the re-key point (lowered by VBD_SHADOW_REKEY_AT) moves to the next key generation; the same passphrase opens everything after', async () => {
    const h = sealedHome('sealed-rekey');
    initSealed(h, '2M', 3, '4K', 'keyed'); // 512 chunks, sealed once each by init
    const image = Buffer.alloc(2 * MiB);
    const manifestBefore = JSON.parse(readFileSync(join(h.dir, MANIFEST_NAME), 'utf8')) as { sealed: { keyGeneration: number; wrappedKey: string } };
    const daemon = startDaemon(h.name, [h.dir, '--key-file', h.key, '--interval', '1h'], undefined, { VBD_SHADOW_REKEY_AT: '600' });
    const live = await waitLive(daemon);
    expect(live.sealed).toMatchObject({ keyGeneration: 0, seals: 512, rekeyAt: 600 });
    const device = live.link ?? '';
    const writeChunks = (first: number, count: number): void => {
      const data = randomBytes(count * 4 * KiB);
      writeAt(device, first * 4 * KiB, data);
      data.copy(image, first * 4 * KiB);
    };
    writeChunks(0, 50);
    expect(flush(h.name).sealed).toMatchObject({ keyGeneration: 0, seals: 562 });
    writeChunks(100, 50); // 562 + 50 > 600
    const rekeyed = flush(h.name);
    expect(rekeyed.lastFlush?.ok).toBe(true);
    expect(rekeyed.sealed).toMatchObject({ keyGeneration: 1, seals: 50 });
    const manifestAfter = JSON.parse(readFileSync(join(h.dir, MANIFEST_NAME), 'utf8')) as { sealed: { keyGeneration: number; wrappedKey: string } };
    expect(manifestAfter.sealed.keyGeneration).toBe(1);
    expect(manifestAfter.sealed.wrappedKey).not.toBe(manifestBefore.sealed.wrappedKey);
    writeChunks(300, 100);
    expect(flush(h.name).sealed).toMatchObject({ keyGeneration: 1, seals: 150 });
    // A passphrase change while it is served is refused: the next re-key would re-wrap under the old one.
    const fresh = join(h.home, 'new-pass');
    writeFileSync(fresh, 'another passphrase\n', { mode: 0o600 });
    chownSync(fresh, h.user.uid, h.user.gid);
    const manifestLive = readFileSync(join(h.dir, MANIFEST_NAME), 'utf8');
    expect(cliAs(h.user, ['passwd', h.dir, '--key-file', h.key, '--new-key-file', fresh]).status).toBe(EXIT.busy);
    expect(readFileSync(join(h.dir, MANIFEST_NAME), 'utf8')).toBe(manifestLive);
    expect(await stopDaemon(daemon)).toBe(0);
    // The owner's own tools: the manifest is still hers, the passphrase unchanged, both generations decode.
    expect(runAs(h.user, 'test', ['-O', join(h.dir, MANIFEST_NAME)]).status).toBe(0);
    expect(sha256(exportAs(h))).toBe(sha256(image));
    const again = await serve(h);
    expect(again.live.sealed).toMatchObject({ keyGeneration: 1, seals: 150 });
    expect(sha256(readFileSync(again.live.link ?? ''))).toBe(sha256(image));
    expect(await stopDaemon(again.daemon)).toBe(0);
    expect(leftovers()).toEqual([]);
  });

  it('a pattern written through a mounted sealed volume is in no file of its directory; on a plain volume it is found', async () => {
    // 64 distinctive bytes, repeated: every 16-byte window of it is searched for in every file.
    const motif = Buffer.from('vbd-shadow:sealed?MARKER<0123456789abcdef>ZYXWVUTSRQPONMLK!pattern', 'ascii').subarray(0, 64);
    const windows = [0, 16, 32, 48].map((at) => motif.subarray(at, at + 16));
    const found = async (sealed: boolean): Promise<number> => {
      const h = sealedHome(sealed ? 'pattern-sealed' : 'pattern-plain');
      const mnt = join(h.scratch, 'mnt');
      mkdirSync(mnt);
      chownSync(mnt, h.user.uid, h.user.gid);
      if (sealed) initSealed(h, '32M', 6, '64K');
      else asUser(h, ['init', h.dir, '--size', '32M', '--files', '6', '--chunk', '64K', '--name', h.name]);
      const { daemon } = await serve(h, ['--mount', mnt, '--mkfs', 'ext4']);
      const data = Buffer.alloc(2 * MiB);
      for (let at = 0; at < data.length; at += motif.length) motif.copy(data, at);
      const file = join(mnt, 'secret.bin');
      writeFileSync(join(h.scratch, 'data'), data);
      expect(runAs(h.user, 'cp', [join(h.scratch, 'data'), file]).status).toBe(0);
      expect(runAs(h.user, 'sync', [file]).status).toBe(0);
      const s = flush(h.name);
      expect(s.lastFlush?.ok).toBe(true);
      expect(s.lastFlush?.chunksChanged).toBeGreaterThanOrEqual((2 * MiB) / (64 * KiB));
      let hits = 0;
      for (const entry of readdirSync(h.dir)) {
        const bytes = readFileSync(join(h.dir, entry));
        for (const w of windows) if (bytes.includes(w)) hits++;
      }
      expect(await stopDaemon(daemon)).toBe(0);
      return hits;
    };
    expect(await found(false)).toBeGreaterThanOrEqual(4); // the search can see the pattern
    expect(await found(true)).toBe(0);
  });

  it('a flipped byte in a used slot is refused at start, naming chunk, file and offset; --zero-damaged serves it as zeros and seals it anew', async () => {
    const h = sealedHome('sealed-flip');
    initSealed(h, '2M', 3, '4K');
    const image = randomBytes(2 * MiB);
    importAs(h, image);
    const chunk = 77;
    const place = await locate(h, chunk);
    const path = join(h.dir, place.name);
    const byte = readAt(path, place.offset + 100, 1);
    writeAt(path, place.offset + 100, Buffer.from([(byte[0] ?? 0) ^ 0x01]));

    const refused = await expectRefusedStart(h, EXIT.io);
    expect(refused.error).toContain(`chunk ${chunk} (${place.name} at offset ${place.offset},`);

    const { daemon, live } = await serve(h, ['--zero-damaged']);
    // Found by a pool thread, named here by the daemon.
    expect(live.populateThreads).toBe(availableParallelism());
    expect(live.damagedChunks?.map((d) => [d.chunk, d.name, d.offset])).toEqual([[chunk, place.name, place.offset]]);
    const device = readFileSync(live.link ?? '');
    expect(device.subarray(chunk * 4096, (chunk + 1) * 4096).equals(Buffer.alloc(4096))).toBe(true);
    image.fill(0, chunk * 4096, (chunk + 1) * 4096);
    expect(sha256(device)).toBe(sha256(image));
    expect(await stopDaemon(daemon)).toBe(0);
    // The teardown sealed the zeroed chunk anew: the files decode whole again.
    expect(sha256(exportAs(h))).toBe(sha256(image));
  });

  it('a slot copied over another, and an older slot put back after a later flush, are each refused at start naming the chunk', async () => {
    const h = sealedHome('sealed-swap');
    initSealed(h, '2M', 3, '4K');
    importAs(h, randomBytes(2 * MiB));
    // Chunk 9's slot as it is now, before a flush moves chunk 9 to another slot.
    const old = await locate(h, 9);
    const oldSlot = readAt(join(h.dir, old.name), old.offset, old.bytes);
    const { daemon, live } = await serve(h);
    writeAt(live.link ?? '', 9 * 4096, randomBytes(4096));
    expect(flush(h.name).lastFlush?.chunksChanged).toBe(1);
    expect(await stopDaemon(daemon)).toBe(0);
    const moved = await locate(h, 9);
    expect([moved.name, moved.offset]).not.toEqual([old.name, old.offset]);
    const current = readAt(join(h.dir, moved.name), moved.offset, moved.bytes);

    // The older slot of chunk 9 put where the map now looks for chunk 9.
    writeAt(join(h.dir, moved.name), moved.offset, oldSlot);
    expect((await expectRefusedStart(h, EXIT.io)).error).toContain(`chunk 9 (${moved.name} at offset ${moved.offset},`);
    writeAt(join(h.dir, moved.name), moved.offset, current);

    // Chunk 3's slot copied over chunk 4's.
    const three = await locate(h, 3);
    const four = await locate(h, 4);
    const saved = readAt(join(h.dir, four.name), four.offset, four.bytes);
    writeAt(join(h.dir, four.name), four.offset, readAt(join(h.dir, three.name), three.offset, three.bytes));
    expect((await expectRefusedStart(h, EXIT.io)).error).toContain(`chunk 4 (${four.name} at offset ${four.offset},`);
    writeAt(join(h.dir, four.name), four.offset, saved);

    // Put right, it starts.
    const again = await serve(h);
    expect(await stopDaemon(again.daemon)).toBe(0);
  });

  it('every file restored from an older copy is refused at start; --accept-rollback serves it and says so, its seal count raised to root\'s high-water; a plain manifest put in its place is refused', async () => {
    const h = sealedHome('sealed-rollback');
    initSealed(h, '2M', 3, '4K');
    const old = randomBytes(2 * MiB);
    importAs(h, old);
    const first = await serve(h);
    expect(await stopDaemon(first.daemon)).toBe(0);
    // The user's own copy of the directory (cp -a: her files, her modes).
    const backup = join(h.home, 'backup');
    expect(runAs(h.user, 'cp', ['-a', h.dir, backup]).status).toBe(0);
    const copied = first.live.sealed;

    const second = await serve(h);
    writeAt(second.live.link ?? '', 0, randomBytes(64 * KiB));
    const committed = flush(h.name).sealed?.epoch ?? 0;
    expect(await stopDaemon(second.daemon)).toBe(0);
    const uuid = uuidOf(h);
    const recorded = readEpochRecord(h.user.uid, uuid);
    // The 16 seals of that flush under generation 0 were recorded before they were made.
    expect(recorded?.keyGeneration).toBe(0);
    expect(recorded?.sealsReserved).toBeGreaterThanOrEqual((copied?.seals ?? 0) + 16);

    // Every file put back from the copy (same directory, same owner).
    expect(runAs(h.user, 'cp', ['-a', `${backup}/.`, `${h.dir}/`]).status).toBe(0);
    const refused = await expectRefusedStart(h, EXIT.refused);
    expect(refused.error).toContain(`but epoch ${committed} was committed here`);

    const accepted = await serve(h, ['--accept-rollback']);
    expect(sha256(readFileSync(accepted.live.link ?? ''))).toBe(sha256(old));
    const filesEpoch = accepted.live.sealed?.epoch ?? -1;
    expect(filesEpoch).toBeLessThan(committed);
    // Same generation: seals continue from root's high-water, not from the copy's count.
    const resumed = {
      files: { generation: 0, used: copied?.seals }, record: { generation: 0, used: recorded?.sealsReserved },
      now: { generation: 0, used: recorded?.sealsReserved }, how: 'count-raised', applied: true,
    };
    expect(accepted.live.sealed).toMatchObject({ keyGeneration: 0, seals: recorded?.sealsReserved, resumed });
    expect(eventsOf(h.name).filter((e) => e.kind === 'rollback-accepted')).toEqual([
      { kind: 'rollback-accepted', filesEpoch, committedEpoch: committed, reservedEpoch: recorded?.reservedEpoch, budget: resumed },
    ]);
    const again = Buffer.from(old);
    writeAt(accepted.live.link ?? '', 0, fill(again, 0, 8 * KiB));
    expect(flush(h.name).sealed).toMatchObject({ keyGeneration: 0, seals: (recorded?.sealsReserved ?? 0) + 2 });
    expect(await stopDaemon(accepted.daemon)).toBe(0);
    expect(readEpochRecord(h.user.uid, uuid)?.committedEpoch).toBeGreaterThan(filesEpoch);
    expect(sha256(exportAs(h))).toBe(sha256(again));

    // The sealed manifest swapped for a plain one (format 1): the daemon would write plaintext.
    const m = JSON.parse(readFileSync(join(h.dir, MANIFEST_NAME), 'utf8')) as { name: string; deviceSize: number; chunkSize: number; files: { path: string; size: number }[] };
    const plainFiles = m.files.map((f) => ({ path: f.path, size: Math.floor(f.size / m.chunkSize) * m.chunkSize }));
    writeFileSync(join(h.dir, MANIFEST_NAME), JSON.stringify({ format: 1, name: m.name, deviceSize: m.deviceSize, chunkSize: m.chunkSize, files: plainFiles, layout: { kind: 'linear' } }));
    chownSync(join(h.dir, MANIFEST_NAME), h.user.uid, h.user.gid);
    for (const f of plainFiles) runAs(h.user, 'truncate', ['-s', String(f.size), join(h.dir, f.path)]);
    // With the position map still there, opening the volume refuses it (no daemon state at all).
    const withMap = await refusedStart(h, EXIT.refused);
    expect(withMap.status).toBeUndefined();
    expect(withMap.output).toContain(`holds a sealed volume's position map (vbd-shadow.map) but its manifest is plain`);
    // The map removed too: root's record of the sealed volume in this directory refuses it.
    rmSync(join(h.dir, 'vbd-shadow.map'));
    const stripped = await expectRefusedStart(h, EXIT.refused);
    expect(stripped.error).toContain(`this directory held sealed volume ${uuid}`);
  });

  it('a rollback accepted across a re-key (VBD_SHADOW_REKEY_AT): seals continue under a fresh key generation above the one root\'s record shows used; the volume holds what was written', async () => {
    const h = sealedHome('sealed-rollback-rekey');
    initSealed(h, '2M', 3, '4K'); // 512 chunks, sealed by init: 512 seals under generation 0
    const image = randomBytes(2 * MiB);
    importAs(h, image); // 1024
    const backup = join(h.home, 'backup');
    expect(runAs(h.user, 'cp', ['-a', h.dir, backup]).status).toBe(0);

    // After the copy: 1024 + 50, then 50 more pass the re-key point: generation 1, then 80 seals under it.
    const daemon = startDaemon(h.name, [h.dir, '--key-file', h.key, '--interval', '1h'], undefined, { VBD_SHADOW_REKEY_AT: '1100' });
    const live = await waitLive(daemon);
    expect(live.sealed).toMatchObject({ keyGeneration: 0, seals: 1024 });
    const device = live.link ?? '';
    const later = Buffer.from(image);
    writeAt(device, 0, fill(later, 0, 50 * 4 * KiB));
    expect(flush(h.name).sealed).toMatchObject({ keyGeneration: 0, seals: 1074 });
    writeAt(device, 100 * 4 * KiB, fill(later, 100 * 4 * KiB, 50 * 4 * KiB));
    expect(flush(h.name).sealed).toMatchObject({ keyGeneration: 1, seals: 50 });
    writeAt(device, 300 * 4 * KiB, fill(later, 300 * 4 * KiB, 30 * 4 * KiB));
    const committed = flush(h.name).sealed?.epoch ?? 0;
    expect(await stopDaemon(daemon)).toBe(0);
    const uuid = uuidOf(h);
    const recorded = readEpochRecord(h.user.uid, uuid);
    expect(recorded).toMatchObject({ committedEpoch: committed, keyGeneration: 1, sealsReserved: 80 });

    // Every file put back from the copy: its manifest and map say generation 0, 1024 seals.
    expect(runAs(h.user, 'cp', ['-a', `${backup}/.`, `${h.dir}/`]).status).toBe(0);
    const resumed = { files: { generation: 0, used: 1024 }, record: { generation: 1, used: 80 }, now: { generation: 2, used: 0 }, how: 'fresh-generation', applied: true };
    // inspect, as the owner: root's record, and what the next writable open will do (nothing done yet).
    const inspected = cliAs(h.user, ['inspect', h.dir, '--key-file', h.key, '--json']);
    expect(inspected.status).toBe(0);
    const seal = (JSON.parse(inspected.stdout) as InspectReport).seal;
    expect(seal?.epochRecord).toMatchObject({ committedEpoch: committed, keyGeneration: 1, sealsReserved: 80 });
    expect(seal?.unlocked?.budgetAtNextWrite).toEqual({ ...resumed, applied: false });
    expect(keyGenerationOf(h)).toBe(0);
    const accepted = await serve(h, ['--accept-rollback']);
    expect(sha256(readFileSync(accepted.live.link ?? ''))).toBe(sha256(image));
    expect(accepted.live.sealed).toMatchObject({ keyGeneration: 2, seals: 0, resumed });
    const filesEpoch = accepted.live.sealed?.epoch ?? -1;
    expect(eventsOf(h.name).filter((e) => e.kind === 'rollback-accepted')).toEqual([
      { kind: 'rollback-accepted', filesEpoch, committedEpoch: committed, reservedEpoch: recorded?.reservedEpoch, budget: resumed },
    ]);
    expect(keyGenerationOf(h)).toBe(2);

    const after = Buffer.from(image);
    writeAt(accepted.live.link ?? '', 200 * 4 * KiB, fill(after, 200 * 4 * KiB, 20 * 4 * KiB));
    const s = flush(h.name);
    // 20 seals under generation 2, which root's record (generation 1 at most) shows never sealed.
    expect(s.sealed).toMatchObject({ keyGeneration: 2, seals: 20 });
    expect(s.sealed?.keyGeneration).toBeGreaterThan(recorded?.keyGeneration ?? Infinity);
    const now = readEpochRecord(h.user.uid, uuid);
    expect(now?.keyGeneration).toBe(2);
    expect(now?.sealsReserved).toBeGreaterThanOrEqual(20);
    expect(await stopDaemon(accepted.daemon)).toBe(0);

    // The map: the chunks written sit in slots of generation 2 and epochs above any root reserved before.
    const entries = await withStore(h.dir, Buffer.from(PASS), false, (store) => Array.from({ length: 20 }, (_, i) => (store as SealedStore).entry(200 + i)));
    expect(entries.every((e) => e.generation === 2 && e.epoch > (recorded?.reservedEpoch ?? Infinity))).toBe(true);
    expect(sha256(exportAs(h))).toBe(sha256(after));
    expect(leftovers()).toEqual([]);
  });

  it('the agent brings the passphrase: a wrong one is refused with nothing written, the right one serves', async () => {
    const h = sealedHome('sealed-agent');
    initSealed(h, '2M', 3, '4K');
    const image = randomBytes(2 * MiB);
    importAs(h, image);
    const wrong = join(h.home, 'wrong');
    writeFileSync(wrong, 'not the passphrase\n', { mode: 0o600 });
    chownSync(wrong, h.user.uid, h.user.gid);
    const daemon = startDaemon(h.name, [h.dir, '--canary', 'wait']);
    await waitState(daemon, 'waiting');
    const before = treeHash(h.dir);
    const refused = startAgent(h.user, [h.dir, '--key-file', wrong]);
    expect(await refused.exited).toBe(EXIT.wrongKey); // 5, not 1: the agent unit stops restarting
    expect(treeHash(h.dir)).toBe(before);
    await waitState(daemon, 'waiting');

    const agent = startAgent(h.user, [h.dir, '--key-file', h.key]);
    const live = await waitLive(daemon);
    expect(sha256(readFileSync(live.link ?? ''))).toBe(sha256(image));
    agent.child.kill('SIGTERM');
    await waitState(daemon, 'waiting');
    expect(await stopDaemon(daemon)).toBe(0);
    expect(cli(['status', h.name, '--json']).status).toBe(0);
  });
});

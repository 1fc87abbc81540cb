// Crash and power-loss trials of a live sealed volume, for real (issue 10, "Must show"): a
// mounted ext4 on a sealed volume owned by a real user, a writer (that user) syncing files into
// it and logging each synced file's sha256 outside the mount, flushes requested by the test.
// The moment is random, in turn: anywhere in the flush (sync, scan, frozen scan, commit); inside
// its commit (from the first write to the sealed map file, which reserves the epoch); or right at
// the commit point (0-2 ms after the new map's bytes show in the map file).
//
//  1. kill -9 of the daemon. Before any recovery the FILES are decoded offline by the owner
//     (`vbd-shadow export`: every slot authenticates, one whole epoch: the last committed or the
//     one being committed), the image is `e2fsck -fn` clean, and every file synced before the last
//     completed flush is in it, byte for byte (read with debugfs, no mount). Then root's `recover`
//     writes the surviving RAM image back, and the next start shows every file synced before the kill.
//  2. power loss: the volume directory lives on an ext4 of its own over a second loop device; the
//     daemon is stopped and that ext4's backing file copied (the disk at a power cut: what the
//     ext4 still had in its page cache is lost), then the daemon goes on. The copy is attached and
//     mounted (ext4 replays its journal), the sealed volume on it exported: one whole epoch — the
//     one committed before the cut or the one being committed — `e2fsck -fn` clean, every file
//     synced before the last completed flush present.

import { chmodSync, chownSync, existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { DaemonStatus, FlushReport } from '../../src/daemon/runtime.js';
import { readKeyFile } from '../../src/layouts/secret.js';
import { MAP_NAME, SEALED_JOURNAL_NAME } from '../../src/volume/volume.js';
import { cli } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive, type TestDaemon } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { copyDisk, loopExt4, mountCopy, release, shmDir } from '../helpers/power-cut-fs.js';
import {
  dumpFromImage, flushDoneSince, flushNow, forgetRecordAfterTest, fsckImage, missingOrWrong, ownerKeyFile, randomMomentOfFlush, sleep, startUserWriter, statusOf,
  stopProcess, type MomentMode, type SyncedFile,
} from '../helpers/sealed-live.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers, type User } from '../helpers/system.js';
import { withStore } from '../helpers/volumes.js';

const TRIALS = 20;
const MiB = 2 ** 20;
/** Per trial, at most this much is written (the ext4 on the 32 MiB volume never fills up). */
const WRITER_BYTES = 14 * MiB;

function initSealed(user: User, dir: string, key: string, name: string): void {
  // 512 chunks of 64 KiB and 51 spare slots: a flush of more than 51 changed chunks takes the
  // overflow journal, one of fewer goes straight into free slots; the writer makes both.
  const r = cliAs(user, ['init', dir, '--sealed', '--size', '32M', '--files', '8', '--chunk', '64K', '--layout', 'keyed', '--spare', '10%', '--key-file', key, '--name', name]);
  expect(r.status, r.stderr).toBe(0);
}

function daemonArgs(dir: string, key: string, mnt: string): string[] {
  // Flushes only when the test asks for one.
  return [dir, '--key-file', key, '--mkfs', 'ext4', '--mount', mnt, '--interval', '1h', '--max-dirty', '1G'];
}

function pidOf(d: TestDaemon): number {
  const pid = d.child.pid;
  if (pid === undefined) throw new Error('daemon has no pid');
  return pid;
}

const MODES: readonly MomentMode[] = ['anywhere', 'commit', 'map'];
const modeOf = (trial: number): MomentMode => MODES[trial % MODES.length] ?? 'anywhere';

function whereIn(mode: MomentMode, like: FlushReport): string {
  if (mode === 'anywhere') return `flush (~${like.durationMs.toFixed(0)} ms)`;
  if (mode === 'commit') return `commit (~${(like.timings?.['applyMs'] ?? 0).toFixed(0)} ms)`;
  return 'map write (the commit point)';
}

/** The epoch the files in `dir` decode to (the library, read-only, as export opens them). */
async function filesEpoch(dir: string, key: string): Promise<number> {
  const epoch = await withStore(dir, readKeyFile(key), false, (store) => store.epoch);
  if (epoch === undefined) throw new Error(`${dir} is not sealed`);
  return epoch;
}

/** The owner exports the volume: it must succeed (no slot fails authentication). Returns its warnings. */
function exportAsOwner(user: User, dir: string, key: string, out: string): string {
  const r = cliAs(user, ['export', dir, out, '--key-file', key]);
  expect(r.status, `export as the owner: ${r.stderr}`).toBe(0);
  return r.stderr.trim();
}

/** The latest flush, if it wrote something, is the latest check, and started at or after `since`. */
function flushSince(s: DaemonStatus, since: string): FlushReport | undefined {
  const f = s.lastFlush;
  return f !== undefined && f.at >= since && f.at === s.lastCheck?.at ? f : undefined;
}

/** The flush just asked for (by flushNow), which must have written something: the yardstick of the next one. */
function wroteSomething(s: DaemonStatus, since: string): FlushReport {
  const f = flushSince(s, since);
  if (f?.sealed === undefined) throw new Error(`the flush asked for wrote nothing: ${JSON.stringify(s.lastCheck)}`);
  return f;
}

function sealedOf(s: DaemonStatus): { epoch: number; reservedEpoch: number } {
  if (s.sealed === undefined) throw new Error('status has no sealed state');
  return s.sealed;
}

function mustHave(synced: readonly SyncedFile[], lastGood: string | undefined): SyncedFile[] {
  return lastGood === undefined ? [] : synced.filter((f) => f.at < lastGood);
}

/**
 * Where the decoded epoch stands against the status read at the crash: the last committed
 * epoch, or — the flush not yet over — the one being committed: E (its reservation follows the
 * last one's), or E+1, the second commit of a journaled one (pending chunks cleared).
 */
function judgeEpoch(epoch: number, at: { epoch: number; reservedEpoch: number }, flushOver: boolean, maybeJournal: boolean): 'old' | 'committed' | 'journal completed' | 'WRONG' {
  if (epoch === at.epoch) return 'old';
  if (flushOver) return 'WRONG';
  if (epoch === at.reservedEpoch + 1) return 'committed';
  if (maybeJournal && epoch === at.reservedEpoch + 2) return 'journal completed';
  return 'WRONG';
}

const seconds = (since: number): string => `${((performance.now() - since) / 1000).toFixed(1)} s`;

describe.skipIf(!IS_ROOT)(`sealed volume, live: crash and power loss during flushes (${IS_ROOT ? `${TRIALS} + ${TRIALS} real trials` : ROOT_SKIP_REASON})`, () => {
  it(`${TRIALS} kill -9 during flushes under write load: the files decode to one whole epoch, e2fsck clean, nothing synced before the last completed flush lost`, async () => {
    const t0 = performance.now();
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const mnt = join(scratch, 'mnt');
    mkdirSync(mnt);
    chownSync(mnt, user.uid, user.gid);
    const key = ownerKeyFile(home, user, 'live crash trials passphrase');
    const name = `${TEST_PREFIX}sealed-kill`;
    initSealed(user, dir, key, name);
    forgetRecordAfterTest(dir, user);
    const out = join(home, 'export.img');
    const dump = join(scratch, 'dump');

    const notes: string[] = [];
    const tally = { old: 0, committed: 0, journalCompleted: 0, journalLeft: 0, killedAfterFlushEnded: 0, killedFrozen: 0, filesChecked: 0, filesCheckedAfterRecover: 0 };
    let previous: { prefix: string; synced: SyncedFile[] } | undefined;
    for (let trial = 0; trial < TRIALS; trial++) {
      const tt = performance.now();
      const daemon = startDaemon(name, daemonArgs(dir, key, mnt));
      await waitLive(daemon);
      const pid = pidOf(daemon);
      if (previous !== undefined) {
        // The RAM image survived the kill: after root's recover, everything synced before it is there.
        expect(missingOrWrong(mnt, previous.synced), `trial ${trial - 1}, after recover and restart`).toEqual([]);
        tally.filesCheckedAfterRecover += previous.synced.length;
        rmSync(join(mnt, previous.prefix), { recursive: true });
      }
      const prefix = `t${trial}`;
      const writer = startUserWriter(user, mnt, prefix, join(home, `writer-${trial}.log`), WRITER_BYTES);
      await sleep(200 + Math.random() * 300);
      const since = new Date().toISOString();
      const like = wroteSomething(await flushNow(name, pid), since);
      await sleep(150 + Math.random() * 350);

      const mode = modeOf(trial);
      const moment = await randomMomentOfFlush(name, pid, join(dir, MAP_NAME), like, mode);
      expect(writer.child.exitCode, `trial ${trial}: the writer was still writing at the kill`).toBe(null);
      daemon.child.kill('SIGKILL');
      await daemon.exited;
      writer.child.kill('SIGKILL'); // it exits once its filesystem is thawed (by recover, if the kill froze it)

      const at = statusOf(name); // the killed daemon's last word
      const sealed = sealedOf(at);
      const flushOver = flushSince(at, moment.requested) !== undefined;
      if (flushOver) tally.killedAfterFlushEnded++;
      const required = mustHave(writer.synced(), at.lastGoodFlush);
      const journalLeft = existsSync(join(dir, SEALED_JOURNAL_NAME));
      if (journalLeft) tally.journalLeft++;

      // Before any recovery: the files alone, decoded by the owner.
      const warnings = exportAsOwner(user, dir, key, out);
      const epoch = await filesEpoch(dir, key);
      const outcome = judgeEpoch(epoch, sealed, flushOver, true);
      const note = `trial ${trial}: SIGKILL ${moment.delay.toFixed(1)} ms into the ${whereIn(mode, like)}` +
        `${flushOver ? ', the flush had ended' : ''}; files at epoch ${epoch} (${outcome}; status: committed ${sealed.epoch}, reserved ${sealed.reservedEpoch})` +
        `${journalLeft ? ', overflow journal left' : ''}; ${required.length} files synced before the last completed flush` +
        `${warnings === '' ? '' : ` [export: ${warnings.replace(/\n/g, ' | ')}]`}`;
      expect(outcome, note).not.toBe('WRONG');
      if (outcome === 'old') tally.old++;
      else if (outcome === 'committed') tally.committed++;
      else tally.journalCompleted++;
      const fsck = fsckImage(out);
      expect(fsck.status, `${note}\ne2fsck -fn: ${fsck.output}`).toBe(0);
      dumpFromImage(out, `/${prefix}`, dump);
      expect(missingOrWrong(dump, required), note).toEqual([]);
      tally.filesChecked += required.length;

      // Root cleans up the killed daemon's leftovers: thaw, unmount, detach, the RAM image written back.
      const r = cli(['recover', dir, '--key-file', key]);
      expect(r.status, `${note}\nrecover: ${r.stderr}`).toBe(0);
      if (r.stdout.includes('recovery: thawed')) tally.killedFrozen++;
      await writer.gone;
      previous = { prefix, synced: writer.synced() };
      notes.push(`${note}; ${previous.synced.length} synced before the kill; ${seconds(tt)}`);
    }

    // The last kill's survivors, then a clean stop: the files hold a clean ext4 with all of it.
    const last = startDaemon(name, daemonArgs(dir, key, mnt));
    await waitLive(last);
    expect(missingOrWrong(mnt, previous?.synced ?? []), `trial ${TRIALS - 1}, after recover and restart`).toEqual([]);
    tally.filesCheckedAfterRecover += previous?.synced.length ?? 0;
    expect(await stopDaemon(last)).toBe(0);
    exportAsOwner(user, dir, key, out);
    expect(fsckImage(out).status).toBe(0);
    expect(leftovers()).toEqual([]);
    process.stdout.write(`kill -9 trials (${seconds(t0)}): ${JSON.stringify(tally)}\n  ${notes.join('\n  ')}\n`);
    expect(tally.old + tally.committed + tally.journalCompleted).toBe(TRIALS);
    expect(tally.filesChecked).toBeGreaterThan(0);
  }, 600_000);

  it(`${TRIALS} power cuts during flushes, the volume directory on an ext4 of its own: the disk decodes to one whole epoch, the one before or the one being committed`, async () => {
    const t0 = performance.now();
    const { user, scratch, home } = ownedScratch();
    const shm = shmDir();
    const disk = loopExt4(shm, 96, join(scratch, 'disk'));
    const volumes = join(disk.mountpoint, 'home');
    mkdirSync(volumes);
    chmodSync(volumes, 0o755);
    chownSync(volumes, user.uid, user.gid);
    const dir = join(volumes, 'vol');
    const mnt = join(scratch, 'mnt');
    mkdirSync(mnt);
    chownSync(mnt, user.uid, user.gid);
    const key = ownerKeyFile(home, user, 'power cut trials passphrase');
    const name = `${TEST_PREFIX}sealed-cut`;
    initSealed(user, dir, key, name);
    forgetRecordAfterTest(dir, user);
    const out = join(home, 'export.img');
    const dump = join(scratch, 'dump');
    const copy = join(shm, 'copy.img');
    const copyMount = join(scratch, 'copy');

    const daemon = startDaemon(name, daemonArgs(dir, key, mnt));
    await waitLive(daemon);
    const pid = pidOf(daemon);
    await flushNow(name, pid); // the new filesystem into the files

    const notes: string[] = [];
    const tally = { old: 0, committed: 0, journalCompleted: 0, cutAfterFlushEnded: 0, cutInJournaledCommit: 0, journalOnDisk: 0, copiesRetaken: 0, filesChecked: 0 };
    for (let trial = 0; trial < TRIALS; trial++) {
      const tt = performance.now();
      const prefix = `p${trial}`;
      if (trial > 0) rmSync(join(mnt, `p${trial - 1}`), { recursive: true });
      const writer = startUserWriter(user, mnt, prefix, join(home, `writer-${trial}.log`), WRITER_BYTES);
      await sleep(200 + Math.random() * 300);
      const since = new Date().toISOString();
      const like = wroteSomething(await flushNow(name, pid), since);
      await sleep(150 + Math.random() * 350);

      const mode = modeOf(trial);
      const moment = await randomMomentOfFlush(name, pid, join(dir, MAP_NAME), like, mode);
      expect(writer.child.exitCode, `trial ${trial}: the writer was still writing at the cut`).toBe(null);
      await stopProcess(pid);
      const before = statusOf(name);
      let copies: number;
      try {
        copies = copyDisk(disk, copy);
      } finally {
        process.kill(pid, 'SIGCONT');
      }
      if (copies > 1) tally.copiesRetaken++;
      const after = await flushDoneSince(name, moment.requested);
      writer.child.kill('SIGKILL');
      await writer.gone;

      const sealed = sealedOf(before);
      const flushOver = flushSince(before, moment.requested) !== undefined;
      if (flushOver) tally.cutAfterFlushEnded++;
      // The flush under way at the cut, as it ended once the daemon went on.
      const underWay = flushOver ? undefined : flushSince(after, moment.requested);
      const viaJournal = (underWay?.sealed?.throughJournal ?? 0) > 0;
      if (viaJournal) tally.cutInJournaledCommit++;
      const required = mustHave(writer.synced(), before.lastGoodFlush);

      // The disk after the power cut: mounted (journal replayed), the sealed volume on it decoded.
      const onCopy = mountCopy(copy, copyMount);
      let warnings: string;
      let epoch: number;
      let journalOnDisk: boolean;
      try {
        const copyDir = join(onCopy.mountpoint, 'home', 'vol');
        journalOnDisk = existsSync(join(copyDir, SEALED_JOURNAL_NAME));
        warnings = exportAsOwner(user, copyDir, key, out);
        epoch = await filesEpoch(copyDir, key);
      } finally {
        release(onCopy);
        rmSync(copy, { force: true });
      }
      if (journalOnDisk) tally.journalOnDisk++;
      const outcome = judgeEpoch(epoch, sealed, flushOver, viaJournal);
      const note = `trial ${trial}: cut ${moment.delay.toFixed(1)} ms into the ${whereIn(mode, like)}` +
        `${flushOver ? ', the flush had ended' : ''}${viaJournal ? `, a journaled commit (${underWay?.sealed?.throughJournal} of ${underWay?.chunksChanged} chunks)` : ''}` +
        `${copies > 1 ? `; disk copied in ${copies} tries` : ''}; decodes to epoch ${epoch} (${outcome}; before: committed ${sealed.epoch}, reserved ${sealed.reservedEpoch}; ` +
        `the flush committed ${underWay?.sealed?.epoch ?? '-'})${journalOnDisk ? ', overflow journal on disk' : ''}; ${required.length} files synced before the last completed flush` +
        `${warnings === '' ? '' : ` [export: ${warnings.replace(/\n/g, ' | ')}]`}`;
      expect(outcome, note).not.toBe('WRONG');
      if (outcome === 'old') tally.old++;
      else if (outcome === 'committed') tally.committed++;
      else tally.journalCompleted++;
      const fsck = fsckImage(out);
      expect(fsck.status, `${note}\ne2fsck -fn: ${fsck.output}`).toBe(0);
      dumpFromImage(out, `/${prefix}`, dump);
      expect(missingOrWrong(dump, required), note).toEqual([]);
      tally.filesChecked += required.length;
      notes.push(`${note}; ${seconds(tt)}`);
    }

    expect(await stopDaemon(daemon)).toBe(0);
    exportAsOwner(user, dir, key, out);
    expect(fsckImage(out).status).toBe(0);
    expect(leftovers()).toEqual([]);
    process.stdout.write(`power-cut trials (${seconds(t0)}): ${JSON.stringify(tally)}\n  ${notes.join('\n  ')}\n`);
    expect(tally.old + tally.committed + tally.journalCompleted).toBe(TRIALS);
    expect(tally.filesChecked).toBeGreaterThan(0);
  }, 600_000);
});

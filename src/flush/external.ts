// While a volume is live the RAM image is the truth. A change to a backing file that the
// daemon did not make (write, truncate, delete, rename) is reported; the file as it was found
// is copied into vbd-shadow-aside/ (nothing lost); a missing or replaced file is recreated,
// a resized one restored to its size; and all its chunks are rewritten at the next flush.
//
// Our own writes also raise events: after every flush the daemon records each file's
// (inode, size, mtime); an event whose file still matches that record is ours.
//
// Root works in a directory the owner controls: everything is reached through the volume's
// directory fd, one component at a time with O_NOFOLLOW, checked with fstat, and what root
// creates is handed to the owner at once (fchown). The watcher's cost does not grow with what
// the owner puts in the directory: entries the manifest does not list are ignored (no watch).

import { basename } from 'node:path';
import { closeSync, fchownSync, fstatSync, readlinkSync, ftruncateSync, lstatSync, mkdirSync, openSync, readSync, writeSync, constants as fsc, type BigIntStats } from 'node:fs';
import { watch, type FSWatcher } from 'chokidar';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { ASIDE_DIR, entryPath, type AnyVolume } from '../volume/volume.js';
import { messageOf, type Report } from '../daemon/events.js';

interface FileIdentity {
  ino: bigint;
  size: bigint;
  mtimeNs: bigint;
}

export interface ExternalChange {
  file: number;
  name: string;
  what: 'modified' | 'resized' | 'deleted' | 'replaced';
  keptAs: string | undefined;
}

function identity(st: BigIntStats): FileIdentity {
  return { ino: st.ino, size: st.size, mtimeNs: st.mtimeNs };
}

export class ExternalChangeWatcher {
  private readonly known: FileIdentity[];
  private watcher: FSWatcher | undefined;

  constructor(
    private readonly volume: AnyVolume,
    /** Resolves when no flush is writing (so our own writes have been recorded). */
    private readonly quiet: () => Promise<unknown>,
    private readonly onChange: (change: ExternalChange) => void,
    private readonly report: Report,
  ) {
    this.known = volume.fds.map((fd) => identity(fstatSync(fd, { bigint: true })));
  }

  /** Records the files' identities after our own writes (call after every flush). */
  recordOwnWrites(): void {
    this.volume.fds.forEach((fd, i) => (this.known[i] = identity(fstatSync(fd, { bigint: true }))));
  }

  async start(): Promise<void> {
    const names = new Map(this.volume.manifest.files.map((f, i) => [f.path, i]));
    // Where the directory we hold is now (the kernel's name for it; the watch only triggers
    // checks, which go through our fds — a re-pointed path can only make us miss events).
    const root = readlinkSync(`/proc/self/fd/${this.volume.dirFd}`);
    const listed = (path: string): boolean => path === root || names.has(basename(path));
    this.watcher = watch(root, { depth: 0, ignoreInitial: true, followSymlinks: false, persistent: true, ignored: (path: string) => !listed(path) });
    const onEvent = (path: string): void => {
      const file = path.startsWith(`${root}/`) ? names.get(path.slice(root.length + 1)) : undefined;
      if (file !== undefined) void this.quiet().then(() => this.check(file)).catch((err: unknown) => this.report({ kind: 'external-check-failed', error: messageOf(err) }));
    };
    this.watcher.on('change', onEvent).on('unlink', onEvent).on('add', onEvent);
    // Out of inotify watches and the like: said once, never fatal (the RAM image stays the truth).
    let reported = false;
    this.watcher.on('error', (err: unknown) => {
      if (reported) return;
      reported = true;
      this.report({ kind: 'watch-failed', error: messageOf(err) });
    });
    await new Promise<void>((resolve) => this.watcher?.on('ready', () => resolve()));
  }

  async stop(): Promise<void> {
    await this.watcher?.close();
    this.watcher = undefined;
  }

  private check(file: number): void {
    const name = this.volume.manifest.files[file]?.path ?? `#${file}`;
    const expectedSize = BigInt(this.volume.manifest.files[file]?.size ?? 0);
    const fd = this.volume.fds[file] ?? -1;
    const known = this.known[file];
    let atPath: BigIntStats | undefined;
    try {
      atPath = lstatSync(entryPath(this.volume, name), { bigint: true });
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw err;
    }
    const ours = fstatSync(fd, { bigint: true });
    let what: ExternalChange['what'];
    if (atPath === undefined) what = 'deleted';
    else if (!atPath.isFile() || atPath.ino !== ours.ino) what = 'replaced';
    else if (ours.size !== expectedSize) what = 'resized';
    else if (known !== undefined && ours.ino === known.ino && ours.size === known.size && ours.mtimeNs === known.mtimeNs) return;
    else what = 'modified';

    // Keep what was found: the file at its path if it is a regular file, else our open inode.
    const source = what === 'modified' || what === 'resized' || (what === 'replaced' && atPath?.isFile() === true)
      ? openSync(entryPath(this.volume, name), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK)
      : fd;
    let keptAs: string | undefined;
    try {
      keptAs = this.keepAside(name, source);
    } catch (err) {
      // Keeping a copy failed (the owner's aside directory is not usable): still repair the
      // volume, so writes after this reach the files.
      this.report({ kind: 'keep-aside-failed', file: name, error: messageOf(err) });
    } finally {
      if (source !== fd) closeSync(source);
    }
    if (what === 'deleted' || what === 'replaced') this.recreate(file, name);
    else if (what === 'resized') ftruncateSync(fd, Number(expectedSize));
    // Our repair is not someone else's change.
    this.known[file] = identity(fstatSync(this.volume.fds[file] ?? -1, { bigint: true }));
    this.onChange({ file, name, what, keptAs });
  }

  /**
   * Opens vbd-shadow-aside/ through the volume's directory fd (creating it for the owner if
   * missing): never through a symlink, and only a directory the owner owns.
   */
  private openAsideDir(): number {
    const { uid, gid } = this.volume.owner;
    let created = false;
    try {
      mkdirSync(entryPath(this.volume, ASIDE_DIR), { mode: 0o700 });
      created = true;
    } catch (err) {
      if (errnoCode(err) !== 'EEXIST') throw failure(`cannot create ${ASIDE_DIR}`, err);
    }
    let fd: number;
    try {
      fd = openSync(entryPath(this.volume, ASIDE_DIR), fsc.O_RDONLY | fsc.O_DIRECTORY | fsc.O_NOFOLLOW);
    } catch (err) {
      throw failure(`cannot open ${ASIDE_DIR}`, err);
    }
    const st = fstatSync(fd);
    // Made just now by us: it is the owner's.
    if (created && st.uid !== uid) fchownSync(fd, uid, gid);
    if (fstatSync(fd).uid !== uid) {
      closeSync(fd);
      throw new VbdError(`${ASIDE_DIR} belongs to uid ${st.uid}, not the volume owner`);
    }
    return fd;
  }

  /** Copies `source` to vbd-shadow-aside/NAME.TIME (owned by the volume owner); returns its path. */
  private keepAside(name: string, source: number): string | undefined {
    const asideFd = this.openAsideDir();
    const keptName = `${name}.${new Date().toISOString().replace(/[:.]/g, '-')}`;
    let target: number;
    try {
      target = openSync(`/proc/self/fd/${asideFd}/${keptName}`, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    } finally {
      closeSync(asideFd);
    }
    try {
      fchownSync(target, this.volume.owner.uid, this.volume.owner.gid);
      const buf = Buffer.alloc(2 ** 20);
      for (let at = 0; ; ) {
        const n = readSync(source, buf, 0, buf.length, at);
        if (n === 0) break;
        writeSync(target, buf, 0, n, at);
        at += n;
      }
    } finally {
      closeSync(target);
    }
    return `${ASIDE_DIR}/${keptName}`;
  }

  /** A new, empty backing file of the right size at the path; our fd moves to it. */
  private recreate(file: number, name: string): void {
    const path = entryPath(this.volume, name);
    const fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_NOFOLLOW | fsc.O_NONBLOCK, 0o600);
    const st = fstatSync(fd);
    if (!st.isFile() || st.nlink !== 1) {
      closeSync(fd);
      throw new Error(`cannot recreate backing file '${name}': something else is at its path`);
    }
    fchownSync(fd, this.volume.owner.uid, this.volume.owner.gid);
    ftruncateSync(fd, this.volume.manifest.files[file]?.size ?? 0);
    closeSync(this.volume.fds[file] ?? -1);
    this.volume.fds[file] = fd;
  }
}

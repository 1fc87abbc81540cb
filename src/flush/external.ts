// While a volume is live the RAM image is the truth. A change to a backing file that the
// daemon did not make (write, truncate, delete, rename) is reported; the file as it was found
// is copied into vbd-shadow-aside/ (nothing lost); a missing or replaced file is recreated,
// a resized one restored to its size; and all its chunks are rewritten at the next flush.
//
// Our own writes also raise events: after every flush the daemon records each file's
// (inode, size, mtime); an event whose file still matches that record is ours.

import { closeSync, fchownSync, fstatSync, ftruncateSync, lstatSync, mkdirSync, openSync, readSync, writeSync, constants as fsc, type BigIntStats } from 'node:fs';
import { watch, type FSWatcher } from 'chokidar';
import { errnoCode, failure } from '../common/errors.js';
import { ASIDE_DIR, entryPath, type Volume } from '../volume/volume.js';

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
    private readonly volume: Volume,
    /** Resolves when no flush is writing (so our own writes have been recorded). */
    private readonly quiet: () => Promise<unknown>,
    private readonly onChange: (change: ExternalChange) => void,
    private readonly log: (line: string) => void,
  ) {
    this.known = volume.fds.map((fd) => identity(fstatSync(fd, { bigint: true })));
  }

  /** Records the files' identities after our own writes (call after every flush). */
  recordOwnWrites(): void {
    this.volume.fds.forEach((fd, i) => (this.known[i] = identity(fstatSync(fd, { bigint: true }))));
  }

  async start(): Promise<void> {
    const names = new Map(this.volume.manifest.files.map((f, i) => [f.path, i]));
    this.watcher = watch(this.volume.dir, { depth: 0, ignoreInitial: true, followSymlinks: false, persistent: true });
    const onEvent = (path: string): void => {
      const file = names.get(path.slice(this.volume.dir.length + 1));
      if (file !== undefined) void this.quiet().then(() => this.check(file)).catch((err: unknown) => this.log(`external change check failed: ${String(err)}`));
    };
    this.watcher.on('change', onEvent).on('unlink', onEvent).on('add', onEvent);
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
    } finally {
      if (source !== fd) closeSync(source);
    }
    if (what === 'deleted' || what === 'replaced') this.recreate(file, name);
    else if (what === 'resized') ftruncateSync(fd, Number(expectedSize));
    // Our repair is not someone else's change.
    this.known[file] = identity(fstatSync(this.volume.fds[file] ?? -1, { bigint: true }));
    this.onChange({ file, name, what, keptAs });
  }

  /** Copies `source` to vbd-shadow-aside/NAME.TIME (owned by the volume owner); returns its path. */
  private keepAside(name: string, source: number): string | undefined {
    const asideDir = entryPath(this.volume, ASIDE_DIR);
    try {
      mkdirSync(asideDir, { mode: 0o700 });
    } catch (err) {
      if (errnoCode(err) !== 'EEXIST') throw failure(`cannot create ${ASIDE_DIR}`, err);
    }
    const dirStat = lstatSync(asideDir);
    if (!dirStat.isDirectory() || dirStat.uid !== this.volume.owner.uid) throw new Error(`${ASIDE_DIR} is not a directory of the volume owner`);
    const keptName = `${name}.${new Date().toISOString().replace(/[:.]/g, '-')}`;
    const target = openSync(`${asideDir}/${keptName}`, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
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

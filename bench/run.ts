// `npm run bench`: runs the benchmarks and writes docs/BENCHMARKS.md.
// Options: --only populate,flush,fio,references,sealed,startup  --sizes 1,2,4,8 (GiB)  --flush-sizes 1,8  --rounds 3
//          --files 100 --file-size 10 (MiB, fio)  --seconds 5 (per fio workload)
//          --device-runs 5 (sealed, references: interleaved fio runs on the devices)  --sealed-file-size 256 (MiB)  --refs-size 1024 (MiB)
//          --sealed-parts populate,devices,files,flush (the others kept from the last run's docs/bench/sealed.md)
//          --scan-sizes 1024,4096,8192 --scan-small 8,16,32,64,128 (MiB, full-scan throughput)
//          --change-sizes 1,4,8 (GiB) --change-kinds raw,mounted --change-modes old,scan,tracked
//          --lock /tmp/vbd-loop.lock (change: held once per volume size and kind, not for the whole run)

import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync } from 'node:child_process';
import { CHANGE_MODES, benchChange, benchFlush, type ChangeMode } from './flush.js';
import { benchPeers } from './peers.js';
import { benchReferences } from './references.js';
import { benchPopulate } from './populate.js';
import { benchScan } from './scan.js';
import { benchStartup } from './startup.js';
import { SEALED_PARTS, benchSealed, sealedVersions } from './sealed.js';
import { machine } from './lib.js';

function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? fallback) : fallback;
}

const PEERS: Record<string, string> = {
  fio: 'fio', nbdkit: 'nbdkit', nbdfuse: 'libnbd-bin', fusermount3: 'fuse3', rsync: 'rsync', openssl: 'openssl', gocryptfs: 'gocryptfs', cryfs: 'cryfs',
};

/** The peers come from Debian: installed here if missing. */
function installPeers(): void {
  const missing = Object.entries(PEERS).filter(([cmd]) => !commandExists(cmd)).map(([, pkg]) => pkg);
  if (!existsSyncPy()) missing.push('python3-fusepy');
  if (missing.length === 0) return;
  process.stderr.write(`bench: installing ${missing.join(' ')}\n`);
  execFileSync('apt-get', ['update', '-qq'], { stdio: 'inherit' });
  execFileSync('apt-get', ['install', '-y', '-qq', ...missing], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
}

function commandExists(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function existsSyncPy(): boolean {
  try {
    execFileSync('/usr/bin/python3', ['-c', 'import fusepy'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function versions(): string {
  const first = (cmd: string, args: string[]): string => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8' }).split('\n')[0]?.trim() ?? '?';
    } catch {
      return '?';
    }
  };
  return [first('fio', ['--version']), first('nbdkit', ['--version']), first('nbdfuse', ['--version']), `fusepy (Debian python3-fusepy) on ${first('/usr/bin/python3', ['--version'])}`, first('losetup', ['--version'])].join(', ');
}

interface Section {
  id: string;
  title: string;
  intro: string[];
  run: () => Promise<string>;
}

/** Each finished section is kept in docs/bench/ID.md (so a crash or `--only` loses nothing
 *  else); docs/BENCHMARKS.md is composed from all of them. */
/** A section as the last run wrote it (docs/bench/ID.md), if any. */
function previousSection(docs: string, id: string): string | undefined {
  const path = join(docs, 'bench', `${id}.md`);
  return existsSync(path) ? readFileSync(path, 'utf8') : undefined;
}

function writeSection(docs: string, section: Section, body: string): void {
  mkdirSync(join(docs, 'bench'), { recursive: true });
  const text = [`## ${section.title}`, '', `Measured ${machine()}.`, '', ...section.intro, '', body, ''].join('\n');
  writeFileSync(join(docs, 'bench', `${section.id}.md`), text);
}

function compose(docs: string, ids: string[]): string {
  const parts = ids.map((id) => join(docs, 'bench', `${id}.md`)).filter((f) => existsSync(f)).map((f) => readFileSync(f, 'utf8'));
  const doc = [
    '# Benchmarks',
    '',
    'Produced by `npm run bench` (as root). Figures are warm unless a section says otherwise: the backing',
    'files are in the page cache and each contender ran once before timing. Ratios compare contenders',
    'measured in the same run. What bounds each figure, and which targets are missed: [PERFORMANCE.md](PERFORMANCE.md).',
    '',
    ...parts,
  ].join('\n');
  writeFileSync(join(docs, 'BENCHMARKS.md'), doc);
  return doc;
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('the benchmarks need root (tmpfs mounts, mlock, loop devices)');
  const sizes = option('sizes', '1,2,4,8').split(',').map(Number);
  const flushSizes = option('flush-sizes', '1,8').split(',').map(Number);
  const only = option('only', 'populate,flush,fio,references,sealed,startup').split(',');
  const scanSizes = option('scan-sizes', '1024,4096,8192').split(',').map(Number);
  const scanSmall = option('scan-small', '8,16,32,64,128').split(',').map(Number);
  const changeSizes = option('change-sizes', '1,4,8').split(',').map(Number);
  const changeKinds = option('change-kinds', 'raw,mounted').split(',').map((k) => {
    if (k !== 'raw' && k !== 'mounted') throw new Error(`--change-kinds: '${k}' is not raw or mounted`);
    return k;
  });
  const changeModes = option('change-modes', CHANGE_MODES.join(',')).split(',').map((m) => {
    const mode = CHANGE_MODES.find((known) => known === m);
    if (mode === undefined) throw new Error(`--change-modes: '${m}' is not one of ${CHANGE_MODES.join(', ')}`);
    return mode;
  }) satisfies ChangeMode[];
  const lockIndex = process.argv.indexOf('--lock');
  const lock = lockIndex >= 0 ? process.argv[lockIndex + 1] : undefined;
  const files = Number(option('files', '100'));
  const fileMiB = Number(option('file-size', '10'));
  const seconds = Number(option('seconds', '5'));
  const rounds = Number(option('rounds', '3'));
  const deviceRuns = Math.max(5, Number(option('device-runs', '5')));
  const sealedFileMiB = Number(option('sealed-file-size', '256'));
  const startupRuns = Math.max(11, Number(option('startup-runs', '21')));
  const refsMiB = Number(option('refs-size', '1024'));
  const sealedParts = option('sealed-parts', SEALED_PARTS.join(',')).split(',').map((p) => {
    const part = SEALED_PARTS.find((known) => known === p);
    if (part === undefined) throw new Error(`--sealed-parts: '${p}' is not one of ${SEALED_PARTS.join(', ')}`);
    return part;
  });
  installPeers();
  const work = '/var/tmp/vbd-shadow-bench';
  const docs = fileURLToPath(new URL('../../docs/', import.meta.url));
  const sections: Section[] = [
    {
      id: 'populate',
      title: 'Populate: filling the RAM image from the files',
      intro: [
        'Against `cat` of the same 100 files into a new /dev/shm file (what a shell script would do), each layout',
        `against its own files; median of ${rounds} interleaved rounds after one warm-up round. Ratios above 1 mean`,
        'vbd-shadow is faster. Targets: ≥ 3× for linear, ≥ 2× for keyed 4 KiB chunks, linear in size.',
      ],
      run: () => benchPopulate(work, sizes, rounds),
    },
    {
      id: 'flush',
      title: 'Flush: writing back what changed',
      intro: [
        'Timed inside the daemon (`status --json` → lastFlush.timings / lastCheck). Linear volumes of 100 files, 64 KiB chunks;',
        `a 1%-dirty flush has 1% of the chunks rewritten with random data at random places, then \`vbd-shadow flush\` (median of ${rounds}).`,
        'Targets: idle < 1 ms; 1%-dirty flush of 1 GiB ≤ 50 ms with scan ≥ 15 GB/s and ≤ 1.05× the changed bytes written to the files (plus the journal).',
      ],
      run: () => benchFlush(work, flushSizes, rounds),
    },
    {
      id: 'scan',
      title: 'Full scan: the daemon\'s thread against the scan pool',
      intro: [
        'xxh64 of every 64 KiB chunk of a RAM image (random data in a huge-page tmpfs file, mapped in 1 GiB windows as the daemon',
        `maps it), in-process; median of ${Math.max(5, rounds)} interleaved rounds (small sizes: ≥ 9) after one warm-up round, every contender's hashes`,
        'checked against the single thread\'s. The pool is what the daemon uses (src/flush/scan-pool.ts: its threads read the',
        'daemon\'s mapping by address); pread into each thread\'s buffer and a mapping of each thread\'s own are the alternatives',
        'measured for the choice. Target (issue 13): the pool ≥ 1.7× the daemon\'s thread on this 2-core machine.',
      ],
      run: () => benchScan(work, scanSizes, scanSmall, Math.max(5, rounds)),
    },
    {
      id: 'change',
      title: 'Flush cost against volume size: full scan (before) against block-layer tracking, and the full scan on the pool',
      intro: [
        'Timed inside the daemon (status lastFlush / lastCheck). Linear volumes of 100 files, 64 KiB chunks; "raw": random data, the',
        'changes written through the raw device; "mounted": an ext4 the daemon made and mounted, the changes written into a file',
        `allocated over half of it. Each change (random 64 KiB pieces, new random data) then \`vbd-shadow flush\`, median of ${Math.max(5, rounds)}.`,
        'Each volume is served in turn by three daemons of the same build: "before" with VBD_SHADOW_TRACKING=off and',
        'VBD_SHADOW_SCAN_THREADS=1 (every flush hashes the whole image on one thread, as main did before issue 13); "full scan on',
        'the pool" with VBD_SHADOW_TRACKING=off (the fallback); "tracked" hashes only the chunks the trace names.',
        'Targets (issue 13): the same change on the larger volumes ≤ 1.2× the 1 GiB figure; idle < 1 ms; teardown of an',
        'unchanged 8 GiB volume ≤ 0.1× before.',
      ],
      run: () => benchChange(work, changeSizes, changeKinds, changeModes, Math.max(5, rounds), lock),
    },
    {
      id: 'fio',
      title: `fio on the block device, ${files} files × ${fileMiB} MiB`,
      intro: [
        `fio ${seconds} s per workload, direct=1, libaio, on the device each contender gives (MB/s, and the ratio to the ceiling),`,
        'after a 2 s warm-up that is not counted. With direct I/O off, reads of a FUSE-backed loop come from the page cache and',
        'hide the FUSE path; with it on they do not. After each run the whole device is hashed and compared with what the',
        `backing files hold. Targets: vbd-shadow ≥ 0.95× the ceiling everywhere, ≥ 10× the FUSE peers on random 4 KiB (direct I/O on).`,
        `Versions: ${versions()}.`,
      ],
      run: () => benchPeers(work, files, fileMiB, seconds),
    },
    {
      id: 'startup',
      title: 'CLI start-up: short commands against `node -e 0`',
      intro: [
        'Wall time of each command as a shell runs it (spawn to exit, output discarded), against Node starting and doing nothing',
        'and against `losetup -a` for reference. The short commands load only what they need (test/cli/startup-modules.test.ts)',
        'and bin/vbd-shadow runs the bundle `npm run build` makes (scripts/bundle.mjs). Target (issue 13): `status` and an idle',
        '`flush` ≤ 1.5× `node -e 0`. The machine is shared: other work may run beside it, so min – max is shown too.',
      ],
      run: () => benchStartup(work, startupRuns),
    },
    {
      id: 'references',
      title: 'fio against the honest references: a loop on a huge-page tmpfs file, and zram',
      intro: [
        `One ${refsMiB} MiB device per contender, set up, filled once with incompressible data, measured (fio ${seconds} s per workload,`,
        `direct=1, libaio) and torn down within its run; ${deviceRuns} interleaved rounds, order rotating; medians. The huge-page loop is`,
        'the same kernel path vbd-shadow uses (loop worker over shmem with huge pages): its ratio is the overhead vbd-shadow adds.',
        'zram is the kernel\'s RAM block device (no loop worker): the limit. Beside them vbd-shadow with change tracking off',
        '(VBD_SHADOW_TRACKING=off: what tracking costs) and with loop direct I/O (VBD_SHADOW_LOOP_DIRECT_IO=1).',
      ],
      run: () => benchReferences(work, refsMiB, seconds, deviceRuns),
    },
    {
      id: 'sealed',
      title: 'Sealed volumes: the crypto ceiling, populate, fio, flush; gocryptfs and CryFS beside them',
      intro: [
        'Everything in this section was measured in one run, side by side; ratios compare figures of that run. Sealed volumes keep',
        'every chunk in the files as AES-256-GCM ciphertext; the RAM image is plaintext, so reads and writes on the device cost',
        'no crypto, populate decrypts, flush encrypts. Targets (issue 10): populate ≥ 0.5× the two-process openssl ceiling;',
        'fio on the sealed device ≥ 0.95× unsealed; 1%-dirty flush time ≤ plain, bytes ≤ 1.1× slots + map.',
        `Versions: ${sealedVersions()}.`,
      ],
      run: () => benchSealed(work, { rounds, deviceRuns, seconds, fileMiB: sealedFileMiB, parts: sealedParts, previous: previousSection(docs, 'sealed') }),
    },
  ];
  mkdirSync(work, { recursive: true });
  try {
    for (const section of sections.filter((x) => only.includes(x.id))) {
      writeSection(docs, section, await section.run());
      compose(docs, sections.map((x) => x.id));
    }
    process.stdout.write(`${compose(docs, sections.map((x) => x.id))}\nwritten to ${join(docs, 'BENCHMARKS.md')}\n`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});

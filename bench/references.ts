// fio on vbd-shadow's device against the two honest references of this kernel (issue 13):
//   - a loop device over a file on a huge-page tmpfs: the same kernel path as vbd-shadow (loop
//     worker → shmem, huge pages), so its ratio is the overhead vbd-shadow itself adds;
//   - zram: the kernel's RAM block device, no loop worker hop: the limit for a RAM block device.
// Beside them vbd-shadow with change tracking off (what tracking costs) and with loop direct I/O
// (VBD_SHADOW_LOOP_DIRECT_IO=1: kept only if it is better). Every contender is set up, filled,
// measured and torn down within its own run; the runs interleave over rounds (order rotating),
// and the table shows medians.

import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, startBenchDaemon } from './daemon.js';
import { median, table } from './lib.js';
import { WORKLOADS, fio } from './peers.js';

const MiB = 2 ** 20;

interface Device {
  path: string;
  teardown: () => Promise<void>;
}

interface Contender {
  name: string;
  setup: () => Promise<Device>;
}

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8' });
}

/** Writes the whole device once with incompressible data, so no contender reads holes or zero pages. */
function fill(device: string, size: number): void {
  sh('fio', ['--name=fill', `--filename=${device}`, '--direct=1', '--ioengine=libaio', '--rw=write', '--bs=1M', '--iodepth=8', `--size=${size}`, '--refill_buffers', '--output-format=terse']);
}

function hugePageLoop(work: string, size: number): Contender {
  return {
    name: 'loop on a huge-page tmpfs file (reference)',
    setup: async () => {
      const mnt = join(work, 'hugetmpfs');
      mkdirSync(mnt, { recursive: true });
      sh('mount', ['-t', 'tmpfs', '-o', `size=${size + 64 * MiB},huge=always,mode=0700`, 'vbd-bench-huge', mnt]);
      const file = join(mnt, 'image');
      sh('truncate', ['-s', String(size), file]);
      const device = sh('losetup', ['--find', '--show', '--direct-io=off', file]).trim();
      return {
        path: device,
        teardown: () => {
          sh('losetup', ['-d', device]);
          sh('umount', [mnt]);
          rmSync(mnt, { recursive: true, force: true });
          return Promise.resolve();
        },
      };
    },
  };
}

function zram(size: number): Contender {
  return {
    name: 'zram (the RAM block device limit)',
    setup: () => {
      const index = Number(readFileSync('/sys/class/zram-control/hot_add', 'utf8').trim());
      writeFileSync(`/sys/block/zram${index}/disksize`, String(size));
      return Promise.resolve({
        path: `/dev/zram${index}`,
        teardown: () => {
          writeFileSync(`/sys/block/zram${index}/reset`, '1');
          writeFileSync('/sys/class/zram-control/hot_remove', String(index));
          return Promise.resolve();
        },
      });
    },
  };
}

function vbdShadow(work: string, size: number, label: string, env: Record<string, string>): Contender {
  return {
    name: `vbd-shadow linear 64K${label}`,
    setup: async () => {
      const name = 'bench-refs';
      const dir = join(work, name);
      cli(['init', dir, '--size', String(size), '--files', '16', '--chunk', '64K', '--force', '--yes']);
      const d = await startBenchDaemon(name, [dir], env);
      const device = d.status().device;
      if (device === undefined) throw new Error('the bench daemon is live without a device');
      return {
        path: device,
        teardown: async () => {
          await d.stop();
          rmSync(dir, { recursive: true, force: true });
        },
      };
    },
  };
}

export async function benchReferences(work: string, sizeMiB: number, seconds: number, rounds: number): Promise<string> {
  const size = sizeMiB * MiB;
  if (!existsSync('/sys/class/zram-control/hot_add')) sh('modprobe', ['zram', 'num_devices=0']);
  const contenders: Contender[] = [
    hugePageLoop(work, size),
    zram(size),
    vbdShadow(work, size, '', {}),
    vbdShadow(work, size, ', change tracking off', { VBD_SHADOW_TRACKING: 'off' }),
    vbdShadow(work, size, ', loop direct I/O', { VBD_SHADOW_LOOP_DIRECT_IO: '1' }),
  ];
  /** contender → workload → MB/s of each round */
  const runs = contenders.map(() => WORKLOADS.map((): number[] => []));
  for (let r = 0; r < rounds; r++) {
    for (let k = 0; k < contenders.length; k++) {
      const i = (k + r) % contenders.length;
      const c = contenders[i] as Contender;
      process.stderr.write(`references: round ${r + 1}/${rounds}: ${c.name}\n`);
      const device = await c.setup();
      try {
        fill(device.path, size);
        WORKLOADS.forEach((w, j) => runs[i]?.[j]?.push(fio(device.path, w, seconds, size)));
      } finally {
        await device.teardown();
      }
    }
  }
  const medians = runs.map((perWorkload) => perWorkload.map((v) => median(v)));
  const [huge, limit, vbd, untracked, direct] = medians;
  if (huge === undefined || limit === undefined || vbd === undefined || untracked === undefined || direct === undefined) throw new Error('internal: a contender without results');
  const ratio = (a: number[], b: number[], j: number): string => ((a[j] ?? 0) / (b[j] ?? 1)).toFixed(2);
  const header = ['contender', ...WORKLOADS.map((w) => `${w.name} MB/s`)];
  const body = contenders.map((c, i) => [c.name, ...(medians[i] ?? []).map((v) => v.toFixed(0))]);
  const ratios = [
    ['vbd-shadow ÷ huge-page loop (the overhead we add; target ≥ 0.95)', ...WORKLOADS.map((_, j) => ratio(vbd, huge, j))],
    ['vbd-shadow ÷ zram (the gap to the limit)', ...WORKLOADS.map((_, j) => ratio(vbd, limit, j))],
    ['tracking on ÷ off (its cost; target ≥ 0.95 on rand write 4K qd32)', ...WORKLOADS.map((_, j) => ratio(vbd, untracked, j))],
    ['loop direct I/O ÷ buffered (kept only if > 1)', ...WORKLOADS.map((_, j) => ratio(direct, vbd, j))],
  ];
  return [
    table(header, body),
    '',
    table(['ratio (medians of the same run)', ...WORKLOADS.map((w) => w.name)], ratios),
  ].join('\n');
}

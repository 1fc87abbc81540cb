// The unit pair passes systemd-analyze verify, with ExecStart pointing at the built binary
// (verify checks that the command exists and is executable); the system unit's exposure score
// cannot silently regress; it keeps out every directive that would hide its mounts, block new
// loop devices or make /sys read-only; and the root tests really run under its bounding set
// (scripts/test.sh, which `npm test` runs).

import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { BIN } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const HAS_SYSTEMD = spawnSync('systemd-analyze', ['--version']).status === 0;
const UNITS = new URL('../../systemd/', import.meta.url);
/** `systemd-analyze security --offline=true` of the system unit; lower it when the unit improves. */
const MAX_EXPOSURE = 4.0;

function instance(template: string, dir: string): string {
  const text = readFileSync(new URL(template, UNITS), 'utf8').replaceAll('/usr/local/bin/vbd-shadow', BIN);
  const path = join(dir, template.replace('@.service', '@home-alice-myvbd.service'));
  writeFileSync(path, text);
  return path;
}

const systemUnit = (): string => readFileSync(new URL('vbd-shadow@.service', UNITS), 'utf8');

/** Every value assigned to `name` in the unit, in order. */
function values(unit: string, name: string): string[] {
  return unit.split('\n').filter((l) => l.startsWith(`${name}=`)).map((l) => l.slice(name.length + 1));
}

describe.skipIf(!HAS_SYSTEMD)('systemd units', () => {
  it('the system unit verifies', () => {
    const dir = tempDir();
    const r = spawnSync('systemd-analyze', ['verify', instance('vbd-shadow@.service', dir)], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(systemUnit()).toMatch(/--canary wait/);
  });

  it('the user unit verifies', () => {
    const dir = tempDir();
    const runtime = join(dir, 'xdg');
    mkdirSync(runtime, { mode: 0o700 });
    const r = spawnSync('systemd-analyze', ['--user', 'verify', instance('vbd-shadow-agent@.service', dir)], { encoding: 'utf8', env: { ...process.env, XDG_RUNTIME_DIR: runtime } });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  for (const unit of ['vbd-shadow-sleep.service', 'vbd-shadow-hibernate.service']) {
    it(`${unit} verifies`, () => {
      const dir = tempDir();
      const r = spawnSync('systemd-analyze', ['verify', instance(unit, dir)], { encoding: 'utf8' });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
    });
  }

  it('both long-running units are Type=notify (main process only) and do not restart on configuration errors', () => {
    for (const name of ['vbd-shadow@.service', 'vbd-shadow-agent@.service']) {
      const unit = readFileSync(new URL(name, UNITS), 'utf8');
      expect(values(unit, 'Type'), name).toEqual(['notify']);
      expect(values(unit, 'NotifyAccess'), name).toEqual(['main']);
      // usage, not found, refused, wrong key: the statuses of src/common/exit-codes.ts.
      expect(values(unit, 'RestartPreventExitStatus').flatMap((v) => v.split(/\s+/)).map(Number).sort(), name)
        .toEqual([EXIT.usage, EXIT.notFound, EXIT.refused, EXIT.wrongKey]);
      expect(values(unit, 'Restart'), name).toEqual(['on-failure']);
    }
    // Stopped before the filesystem holding the volume is unmounted (stop order is the reverse).
    expect(values(systemUnit(), 'RequiresMountsFor')).toEqual(['%f']);
  });

  it('the sleep unit runs before sleep.target, the hibernation unit is required by every service that hibernates', () => {
    const sleep = readFileSync(new URL('vbd-shadow-sleep.service', UNITS), 'utf8');
    expect(values(sleep, 'Before')).toEqual(['sleep.target']);
    expect(values(sleep, 'WantedBy')).toEqual(['sleep.target']);
    expect(values(sleep, 'ExecStart')).toEqual(['/usr/local/bin/vbd-shadow sleep-hook suspend']);
    const hibernate = readFileSync(new URL('vbd-shadow-hibernate.service', UNITS), 'utf8');
    const hibernators = ['systemd-hibernate.service', 'systemd-hybrid-sleep.service', 'systemd-suspend-then-hibernate.service'];
    expect(values(hibernate, 'RequiredBy').flatMap((v) => v.split(' '))).toEqual(hibernators);
    expect(values(hibernate, 'Before').flatMap((v) => v.split(' '))).toEqual(expect.arrayContaining([...hibernators, 'hibernate.target']));
    expect(values(hibernate, 'ExecStart')).toEqual(['/usr/local/bin/vbd-shadow sleep-hook hibernate']);
  });

  it('verify would catch a unit whose binary is missing', () => {
    const dir = tempDir();
    const path = join(dir, 'broken@home-alice-myvbd.service');
    writeFileSync(path, systemUnit().replaceAll('/usr/local/bin/vbd-shadow', '/nonexistent/vbd-shadow'));
    const r = spawnSync('systemd-analyze', ['verify', path], { encoding: 'utf8' });
    expect(r.status).not.toBe(0);
  });

  it(`the system unit's exposure (systemd-analyze security) is at most ${MAX_EXPOSURE}`, () => {
    const dir = tempDir();
    const r = spawnSync('systemd-analyze', ['security', '--offline=true', '--no-pager', instance('vbd-shadow@.service', dir)], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const match = /Overall exposure level for \S+: (\d+(?:\.\d+)?) /.exec(r.stdout);
    expect(match, r.stdout).not.toBeNull();
    expect(Number(match?.[1])).toBeLessThanOrEqual(MAX_EXPOSURE);
  });

  it('the system unit has no directive that hides its mounts, blocks new loop devices or makes /sys read-only', () => {
    const unit = systemUnit();
    // Each of these gives the service its own mount namespace, a device policy or a read-only /sys.
    const forbidden = [
      'ProtectSystem', 'ProtectHome', 'PrivateTmp', 'PrivateDevices', 'PrivateIPC', 'ProtectKernelModules',
      'ProtectKernelLogs', 'ProtectKernelTunables', 'ProtectControlGroups', 'ProtectProc', 'ProcSubset',
      'ReadOnlyPaths', 'ReadWritePaths', 'InaccessiblePaths', 'ExecPaths', 'NoExecPaths', 'BindPaths',
      'BindReadOnlyPaths', 'TemporaryFileSystem', 'RootDirectory', 'RootImage', 'MountFlags', 'LogNamespace',
      'DeviceAllow', 'DevicePolicy', 'ProtectClock', 'MemoryDenyWriteExecute', 'PrivateUsers', 'DynamicUser',
    ];
    for (const name of forbidden) expect(values(unit, name), name).toEqual([]);
    // PrivateNetwork implies PrivateMounts since systemd 254 unless PrivateMounts=no is explicit.
    if (values(unit, 'PrivateNetwork').at(-1) === 'yes') expect(values(unit, 'PrivateMounts').at(-1)).toBe('no');
    else expect(values(unit, 'PrivateMounts')).not.toContain('yes');
  });
});

// capabilities(7) numbering, for reading CapBnd.
const CAPS = [
  'CHOWN', 'DAC_OVERRIDE', 'DAC_READ_SEARCH', 'FOWNER', 'FSETID', 'KILL', 'SETGID', 'SETUID', 'SETPCAP',
  'LINUX_IMMUTABLE', 'NET_BIND_SERVICE', 'NET_BROADCAST', 'NET_ADMIN', 'NET_RAW', 'IPC_LOCK', 'IPC_OWNER',
  'SYS_MODULE', 'SYS_RAWIO', 'SYS_CHROOT', 'SYS_PTRACE', 'SYS_PACCT', 'SYS_ADMIN', 'SYS_BOOT', 'SYS_NICE',
  'SYS_RESOURCE', 'SYS_TIME', 'SYS_TTY_CONFIG', 'MKNOD', 'LEASE', 'AUDIT_WRITE', 'AUDIT_CONTROL', 'SETFCAP',
  'MAC_OVERRIDE', 'MAC_ADMIN', 'SYSLOG', 'WAKE_ALARM', 'BLOCK_SUSPEND', 'AUDIT_READ', 'PERFMON', 'BPF',
  'CHECKPOINT_RESTORE',
];

function statusField(name: string): string {
  const match = new RegExp(`^${name}:\\s+(\\S+)$`, 'm').exec(readFileSync('/proc/self/status', 'utf8'));
  if (match?.[1] === undefined) throw new Error(`no ${name} in /proc/self/status`);
  return match[1];
}

const CONFINED = process.env['VBD_TEST_CONFINED'] === '1';

describe.skipIf(!CONFINED)('the root tests run under the system unit (scripts/test.sh)', () => {
  it("the bounding set is the unit's CapabilityBoundingSet, nothing ambient, no new privileges, its umask and memlock", () => {
    const unit = systemUnit();
    const want = values(unit, 'CapabilityBoundingSet').flatMap((v) => v.split(/\s+/)).filter((c) => c !== '').map((c) => c.replace(/^CAP_/, ''));
    const names = (field: string): string[] => {
      const mask = BigInt(`0x${statusField(field)}`);
      return CAPS.filter((_, bit) => ((mask >> BigInt(bit)) & 1n) === 1n).sort();
    };
    expect(names('CapBnd')).toEqual([...new Set(want)].sort());
    // Where RLIMIT_MEMLOCK cannot be raised as LimitMEMLOCK=infinity does, scripts/test.sh keeps
    // CAP_IPC_LOCK inheritable (outside the bounding set) as a stand-in; nothing else.
    const standIn = process.env['VBD_TEST_IPC_LOCK_STAND_IN'] === '1' ? ['IPC_LOCK'] : [];
    expect(names('CapInh')).toEqual(standIn);
    expect(names('CapEff')).toEqual([...new Set([...want, ...standIn])].sort());
    expect(names('CapAmb')).toEqual([]);
    expect(statusField('NoNewPrivs')).toBe(values(unit, 'NoNewPrivileges').at(-1) === 'yes' ? '1' : '0');
    // The daemon's umask is the unit's (the helpers run the CLI and daemons under it).
    expect(process.env['VBD_TEST_DAEMON_UMASK']).toBe(values(unit, 'UMask').at(-1) ?? '0022');
    if (standIn.length === 0 && values(unit, 'LimitMEMLOCK').at(-1) === 'infinity') {
      expect(readFileSync('/proc/self/limits', 'utf8')).toMatch(/^Max locked memory\s+unlimited\s+unlimited/m);
    }
  });
});

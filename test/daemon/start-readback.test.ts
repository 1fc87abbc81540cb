// After start, the block device holds exactly what export assembles from the files, and the
// whole image is locked in RAM. After SIGTERM nothing is left in the kernel, and the teardown
// says what it did in which order.

import { randomBytes } from 'node:crypto';
import { readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { EventOf } from '../../src/daemon/events.js';
import { cliOk, sha256 } from '../helpers/cli.js';
import { eventsOf, startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, leftovers, procStatus } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const SIZE = 24 * 2 ** 20;

describe.skipIf(!IS_ROOT)(`start: device equals export (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  for (const layout of ['linear', 'striped', 'keyed'] as const) {
    it(`${layout}`, async () => {
      const scratch = tempDir();
      const dir = join(scratch, 'vol');
      const name = `${TEST_PREFIX}read-${layout}`;
      const key = keyFile(scratch, `key for ${layout}`);
      const keyArgs = layout === 'keyed' ? ['--key-file', key] : [];
      cliOk(['init', dir, '--size', '24M', '--files', '9', '--chunk', '4K', '--layout', layout, '--name', name, ...keyArgs]);
      writeFileSync(join(scratch, 'in.img'), randomBytes(SIZE));
      cliOk(['import', dir, join(scratch, 'in.img'), ...keyArgs]);
      cliOk(['export', dir, join(scratch, 'exported.img'), ...keyArgs]);

      const daemon = startDaemon(name, [dir, ...keyArgs]);
      const status = await waitLive(daemon);
      expect(status.link).toBe(`/dev/vbd-shadow/root/${name}`);
      expect(realpathSync(status.link ?? '')).toBe(status.device);
      expect(sha256(readFileSync(status.link ?? ''))).toBe(sha256(readFileSync(join(scratch, 'exported.img'))));
      const pid = daemon.child.pid ?? 0;
      expect(procStatus(pid, 'VmLck')).toBeGreaterThanOrEqual(SIZE);
      expect(procStatus(pid, 'RssShmem')).toBeGreaterThanOrEqual(SIZE);

      expect(await stopDaemon(daemon)).toBe(0);
      expect(leftovers()).toEqual([]);
      const events = eventsOf(daemon.name);
      expect(events.at(-1)).toEqual({ kind: 'stopped' });
      // The teardown's steps in order (the final writeback after the device is unbound, before
      // the RAM is freed), and what the kernel finished alongside.
      const teardown = events.find((e): e is EventOf<'teardown-timings'> => e.kind === 'teardown-timings');
      expect(teardown?.steps.map((t) => [t.step, t.alongside === true])).toEqual([
        ['stop watching the backing files', false], ['stop periodic flushes', false], [`remove ${status.link}`, false], [`detach ${status.device}`, false],
        ['final writeback to the files', false], ['free the RAM image', false],
        [`remove ${status.device}`, true], ['remove the trace instance', true], ['end the scan threads', true],
      ]);
    });
  }
});

// `vbd-shadow completion bash`: the script bash sources, asked what it offers for what a user
// has typed so far (COMP_WORDS / COMP_CWORD, as bash's programmable completion sets them).

import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { cli, cliOk } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const script = (): string => cliOk(['completion', 'bash']).stdout;

/** What the completion offers for `words` (the last one being completed), run in `cwd`. */
function complete(file: string, words: string[], cwd: string): string[] {
  const r = spawnSync('bash', ['-c', 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _vbd_shadow; printf "%s\\n" "${COMPREPLY[@]}"', '_', file, ...words], { cwd, encoding: 'utf8' });
  expect(r.stderr).toBe('');
  return r.stdout.split('\n').filter((l) => l !== '').sort();
}

describe('bash completion', () => {
  it('is valid bash and completes commands, options, choices, files and directories', () => {
    const scratch = tempDir();
    const file = join(scratch, 'vbd-shadow.bash');
    writeFileSync(file, script());
    expect(spawnSync('bash', ['-n', file]).status).toBe(0);
    mkdirSync(join(scratch, 'vol'));
    writeFileSync(join(scratch, 'vol.img'), '');

    expect(complete(file, ['vbd-shadow', 'st'], scratch)).toEqual(['start', 'status', 'stop']);
    expect(complete(file, ['vbd-shadow', ''], scratch)).toContain('install-units');
    expect(complete(file, ['vbd-shadow', 'init', 'vol', '--la'], scratch)).toEqual(['--layout', '--layout-params']);
    expect(complete(file, ['vbd-shadow', 'init', 'vol', '--layout', ''], scratch)).toEqual(['keyed', 'linear', 'module:', 'striped']);
    expect(complete(file, ['vbd-shadow', 'start', 'vol', '--canary', ''], scratch)).toEqual(['none', 'spawn', 'wait']);
    expect(complete(file, ['vbd-shadow', 'start', 'vol', '--mkfs', 'ext'], scratch)).toEqual(['ext2', 'ext3', 'ext4']);
    expect(complete(file, ['vbd-shadow', 'start', 'vol', '--interval', ''], scratch)).toEqual([]);
    expect(complete(file, ['vbd-shadow', 'completion', ''], scratch)).toEqual(['bash']);
    expect(complete(file, ['vbd-shadow', 'status', '--a'], scratch)).toEqual(['--all']);
    // The volume directory: directories only; export's OUT and --key-file: files too.
    expect(complete(file, ['vbd-shadow', 'start', 'vo'], scratch)).toEqual(['vol']);
    expect(complete(file, ['vbd-shadow', 'export', 'vol', 'vo'], scratch)).toEqual(['vol', 'vol.img']);
    expect(complete(file, ['vbd-shadow', 'start', 'vol', '--nbd-tls-psk', 'vo'], scratch)).toEqual(['vol', 'vol.img']);
    expect(complete(file, ['vbd-shadow', 'export', '--key-file', 'k', 'vol', 'vo'], scratch)).toEqual(['vol', 'vol.img']);
    expect(complete(file, ['vbd-shadow', 'import', 'vol', '--key-file', 'vol.'], scratch)).toEqual(['vol.img']);
    // Hidden options stay hidden.
    expect(complete(file, ['vbd-shadow', 'start', 'vol', '--key-'], scratch)).toEqual(['--key-file']);
  });

  it('knows only bash', () => {
    const r = cli(['completion', 'fish']);
    expect(r.stderr).toMatch(/value 'fish' is invalid for argument 'shell'. Allowed choices are bash/);
    expect(r.status).toBe(EXIT.usage);
  });
});

// Every bad input gives one clear line on stderr, a non-zero exit, and changes nothing:
// the test hashes the whole tree (volume, key files, would-be outputs) before and after.

import { chmodSync, linkSync, mkdirSync, readFileSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MANIFEST_NAME } from '../../src/volume/manifest.js';
import { cli, cliOk, treeHash } from '../helpers/cli.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

type Json = Record<string, unknown>;

interface Case {
  name: string;
  /** Breaks the fresh volume in `dir` (optional: some cases break only the command line). */
  mutate?: (dir: string, scratch: string) => void;
  /** The command to run; default: export the volume. */
  args?: (dir: string, scratch: string) => string[];
  keyed?: boolean;
  error: RegExp;
}

function editManifest(dir: string, edit: (m: Json) => void): void {
  const path = join(dir, MANIFEST_NAME);
  const m = JSON.parse(readFileSync(path, 'utf8')) as Json;
  edit(m);
  writeFileSync(path, JSON.stringify(m));
}
const files = (m: Json): Json[] => m['files'] as Json[];
const layout = (m: Json): Json => m['layout'] as Json;

const CASES: Case[] = [
  { name: 'malformed manifest', mutate: (d) => writeFileSync(join(d, MANIFEST_NAME), '{"format": 1,,}'), error: /invalid manifest: not valid JSON/ },
  { name: 'truncated manifest', mutate: (d) => truncateSync(join(d, MANIFEST_NAME), 60), error: /invalid manifest: not valid JSON/ },
  { name: 'empty manifest', mutate: (d) => writeFileSync(join(d, MANIFEST_NAME), ''), error: /invalid manifest: not valid JSON/ },
  { name: 'manifest is an array', mutate: (d) => writeFileSync(join(d, MANIFEST_NAME), '[]'), error: /manifest must be an object/ },
  { name: 'missing manifest', mutate: (d) => rmSync(join(d, MANIFEST_NAME)), error: /cannot open manifest 'vbd-shadow.json': no such file/ },
  { name: 'symlinked manifest', mutate: (d, s) => { writeFileSync(join(s, 'm.json'), readFileSync(join(d, MANIFEST_NAME))); rmSync(join(d, MANIFEST_NAME)); symlinkSync(join(s, 'm.json'), join(d, MANIFEST_NAME)); }, error: /cannot open manifest .*symbolic link/ },
  { name: 'unknown format version', mutate: (d) => editManifest(d, (m) => { m['format'] = 3; }), error: /format must be 1 \(plain\) or 2 \(sealed\), got 3/ },
  { name: 'format 2 without its sealed object', mutate: (d) => editManifest(d, (m) => { m['format'] = 2; }), error: /a format 2 manifest needs its sealed object/ },
  { name: 'unknown field', mutate: (d) => editManifest(d, (m) => { m['owner'] = 'root'; }), error: /unknown field 'owner'/ },
  { name: 'size of the wrong type', mutate: (d) => editManifest(d, (m) => { m['deviceSize'] = '64K'; }), error: /deviceSize must be an integer, got "64K"/ },
  { name: 'negative size', mutate: (d) => editManifest(d, (m) => { m['deviceSize'] = -65536; }), error: /deviceSize must be between/ },
  { name: 'zero chunk size', mutate: (d) => editManifest(d, (m) => { m['chunkSize'] = 0; }), error: /chunkSize must be between 512/ },
  { name: 'huge size', mutate: (d) => editManifest(d, (m) => { m['deviceSize'] = 2 ** 50; }), error: /deviceSize must be between/ },
  { name: 'fractional size', mutate: (d) => editManifest(d, (m) => { m['deviceSize'] = 65536.5; }), error: /deviceSize must be an integer/ },
  { name: 'chunk not a power of two', mutate: (d) => editManifest(d, (m) => { m['chunkSize'] = 3072; }), error: /chunkSize must be a power of two, got 3072/ },
  { name: 'size not whole chunks', mutate: (d) => editManifest(d, (m) => { m['deviceSize'] = 65536 - 512; }), error: /not a multiple of chunkSize/ },
  { name: 'files hold less than the device', mutate: (d) => editManifest(d, (m) => { m['deviceSize'] = 2 * 65536; }), error: /the files hold 65536 bytes in all, less than deviceSize 131072/ },
  { name: 'no files', mutate: (d) => editManifest(d, (m) => { m['files'] = []; }), error: /files must be a non-empty array/ },
  { name: 'bad volume name', mutate: (d) => editManifest(d, (m) => { m['name'] = '../etc'; }), error: /name must be 1-64 characters .* got "\.\.\/etc"/ },
  { name: 'volume name with a space', mutate: (d) => editManifest(d, (m) => { m['name'] = 'my vol'; }), error: /name must be 1-64 characters/ },
  { name: 'unknown layout', mutate: (d) => editManifest(d, (m) => { m['layout'] = { kind: 'zigzag' }; }), error: /layout.kind must be one of linear, striped, keyed, module, got "zigzag"/ },
  { name: '".." backing path', mutate: (d) => editManifest(d, (m) => { (files(m)[0] as Json)['path'] = '../file001'; }), error: /files\[0\].path must be a plain file name/ },
  { name: 'absolute backing path', mutate: (d) => editManifest(d, (m) => { (files(m)[1] as Json)['path'] = '/etc/passwd'; }), error: /files\[1\].path must be a plain file name/ },
  { name: 'backing path listed twice', mutate: (d) => editManifest(d, (m) => { (files(m)[1] as Json)['path'] = 'file001'; }), error: /files\[1\].path 'file001' is listed twice/ },
  { name: 'missing backing file', mutate: (d) => rmSync(join(d, 'file003')), error: /cannot open backing file 'file003': no such file/ },
  { name: 'extra backing file', mutate: (d) => writeFileSync(join(d, 'file005'), Buffer.alloc(16384)), error: /holds 'file005', which the manifest does not list/ },
  { name: 'wrong file size', mutate: (d) => truncateSync(join(d, 'file002'), 4096), error: /backing file 'file002' is 4096 bytes, the manifest says 16384/ },
  { name: 'symlinked backing file', mutate: (d, s) => { writeFileSync(join(s, 'elsewhere'), Buffer.alloc(16384)); rmSync(join(d, 'file003')); symlinkSync(join(s, 'elsewhere'), join(d, 'file003')); }, error: /cannot open backing file 'file003': is a symbolic link/ },
  { name: 'hard-linked backing file', mutate: (d, s) => linkSync(join(d, 'file004'), join(s, 'second-name')), error: /backing file 'file004' has 2 hard links/ },
  { name: 'backing file is a directory', mutate: (d) => { rmSync(join(d, 'file001')); mkdirSync(join(d, 'file001')); }, error: /backing file 'file001' is not a regular file/ },
  { name: 'volume directory writable by others', mutate: (d) => chmodSync(d, 0o777), error: /is writable by group or others \(mode 777\)/ },
  { name: 'volume directory writable by group', mutate: (d) => chmodSync(d, 0o770), error: /volume directory .*vol is writable by group or others \(mode 770\); chmod go-w it/ },
  { name: 'reserved name: the journal as a backing file', mutate: (d) => editManifest(d, (m) => { (files(m)[0] as Json)['path'] = 'vbd-shadow.journal'; }), error: /files\[0\].path 'vbd-shadow.journal' is reserved: names starting with 'vbd-shadow' belong to the tool/ },
  { name: 'reserved name: the aside directory as a backing file', mutate: (d) => editManifest(d, (m) => { (files(m)[2] as Json)['path'] = 'vbd-shadow-aside'; }), error: /files\[2\].path 'vbd-shadow-aside' is reserved/ },
  { name: 'reserved name: anything starting with vbd-shadow', mutate: (d) => editManifest(d, (m) => { (files(m)[1] as Json)['path'] = 'vbd-shadow.lock'; }), error: /files\[1\].path 'vbd-shadow.lock' is reserved/ },
  { name: 'more chunks than allowed', mutate: (d) => editManifest(d, (m) => { m['chunkSize'] = 512; m['deviceSize'] = 2 ** 40; }), error: /deviceSize 1099511627776 in chunks of 512 makes 2147483648 chunks, more than the 16777216 allowed/ },
  { name: 'more chunk slots than allowed', mutate: (d) => editManifest(d, (m) => { (files(m)[0] as Json)['size'] = 2 ** 40; }), error: /the files hold 268435468 chunk slots of 4096 bytes, more than the 16777216 allowed/ },
  { name: 'module path with control characters', mutate: (d) => editManifest(d, (m) => { m['layout'] = { kind: 'module', path: '/tmp/x\x1b[31m.mjs', params: {}, fingerprint: '0'.repeat(64) }; }), error: /layout.path must be an absolute path to a JS module \(no control characters\), got "\/tmp\/x\\u001b\[31m.mjs"/ },
  { name: 'init: module path with control characters', args: (_d, s) => ['init', join(s, 'new'), '--size', '64K', '--files', '2', '--chunk', '4K', '--layout', 'module:/tmp/x\x07.mjs'], error: /--layout module:PATH: the path must not hold control characters, got "\/tmp\/x\\u0007.mjs"/ },
  { name: 'scrypt memory above the cap', keyed: true, mutate: (d) => editManifest(d, (m) => { layout(m)['kdf'] = { N: 2 ** 20, r: 32, p: 16 }; }), error: /layout.kdf needs 4096 MiB \(128·N·r with N=1048576, r=32\), more than the 256 MiB allowed/ },
  { name: 'scrypt parallelism above the cap', keyed: true, mutate: (d) => editManifest(d, (m) => { layout(m)['kdf'] = { N: 1024, r: 8, p: 16 }; }), error: /layout.kdf p=16 is more than the 4 allowed/ },
  { name: 'volume directory is a symlink', args: (d, s) => { symlinkSync(d, join(s, 'link')); return ['export', join(s, 'link'), join(s, 'out')]; }, error: /cannot open volume directory .*link/ },
  { name: 'keyed layout without salt', keyed: true, mutate: (d) => editManifest(d, (m) => { delete layout(m)['salt']; }), error: /layout.salt must be a string, got undefined/ },
  { name: 'unreadable key file', keyed: true, args: (d, s) => ['export', d, join(s, 'out'), '--key-file', join(s, 'no-such-key')], error: /cannot read key file .*no-such-key: no such file/ },
  { name: 'key file readable by others', keyed: true, args: (d, s) => { const k = keyFile(s, 'x', 'open-key'); chmodSync(k, 0o644); return ['export', d, join(s, 'out'), '--key-file', k]; }, error: /key file .* is accessible by group or others \(mode 644\)/ },
  { name: 'keyed volume, no key and no terminal', keyed: true, args: (d, s) => ['export', d, join(s, 'out')], error: /give --key-file FILE/ },
  { name: 'import of an image of the wrong size', args: (d, s) => { writeFileSync(join(s, 'small.img'), Buffer.alloc(4096)); return ['import', d, join(s, 'small.img')]; }, error: /image .*small.img is 4096 bytes, the device is 65536/ },
  { name: 'init: size not whole sectors', args: (_d, s) => ['init', join(s, 'new'), '--size', '1000', '--files', '2', '--chunk', '512'], error: /--size 1000 is not a whole number of 512-byte sectors/ },
  { name: 'init: size not whole chunks', args: (_d, s) => ['init', join(s, 'new'), '--size', '100K', '--files', '2', '--chunk', '64K'], error: /--size 100K is not a whole number of 64K chunks/ },
  { name: 'init: unknown layout', args: (_d, s) => ['init', join(s, 'new'), '--size', '1M', '--files', '2', '--layout', 'zigzag'], error: /option '--layout <kind>' argument 'zigzag' is invalid. Allowed choices are linear, striped, keyed, module:PATH/ },
  { name: 'init: zero files', args: (_d, s) => ['init', join(s, 'new'), '--size', '1M', '--files', '0'], error: /--files must be from 1 to/ },
  { name: 'init: non-empty directory', args: (_d, s) => ['init', s, '--size', '1M', '--files', '2'], error: /is not empty \(use --force/ },
  { name: 'init: bad name', args: (_d, s) => ['init', join(s, 'new'), '--size', '1M', '--files', '2', '--name', 'a/b'], error: /volume name 'a\/b' must be/ },
];

describe('bad input: one line, non-zero exit, nothing changed', () => {
  it('has at least 20 cases', () => expect(CASES.length).toBeGreaterThanOrEqual(20));

  for (const c of CASES) {
    it(c.name, () => {
      const scratch = tempDir();
      const dir = join(scratch, 'vol');
      const key = keyFile(scratch, 'the key');
      const layoutArgs = c.keyed === true ? ['--layout', 'keyed', '--key-file', key] : [];
      cliOk(['init', dir, '--size', '64K', '--files', '4', '--chunk', '4K', ...layoutArgs]);
      c.mutate?.(dir, scratch);
      const args = c.args?.(dir, scratch) ?? ['export', dir, join(scratch, 'out'), ...(c.keyed === true ? ['--key-file', key] : [])];
      const before = treeHash(scratch);
      const r = cli(args, { stdio: ['ignore', 'pipe', 'pipe'] });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
      expect(r.stderr).toMatch(c.error);
      expect(treeHash(scratch)).toBe(before);
    });
  }
});

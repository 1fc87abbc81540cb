// The key hierarchy with real crypto: the wrap is the key check, and it covers the geometry.

import { createDecipheriv, hkdfSync, scryptSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { VbdError } from '../../src/common/errors.js';
import {
  HKDF_LABELS, UNWRAP_FAILED, VolumeKeys, createVolumeKeys, encodeGeometryAD, newVolumeUuid, rewrapVolumeKey,
  slotKeyInfo, unwrapVolumeKeys, wipe, type SealedGeometry, type WrappedVolumeKey,
} from '../../src/store/keys.js';
import { openChunk, sealChunk, slotSize } from '../../src/store/slot.js';
import type { ScryptParams } from '../../src/volume/manifest.js';

/** Cheap scrypt for tests (1 MiB); one test uses the volume default. */
const FAST: ScryptParams = { N: 1024, r: 8, p: 1 };
const pass = (s: string): Buffer => Buffer.from(s, 'utf8');

function geometry(over: Partial<SealedGeometry> = {}): SealedGeometry {
  return {
    uuid: Buffer.alloc(16, 0x11),
    format: 2,
    sealed: true,
    name: 'vol',
    deviceSize: 1 << 20,
    chunkSize: 65536,
    files: [{ path: 'file001', size: 600_000 }, { path: 'file002', size: 600_000 }],
    spareSlots: 2,
    keyGeneration: 0,
    layout: '{"kind":"linear"}',
    ...over,
  };
}

function fails(fn: () => unknown): VbdError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(VbdError);
    return err as VbdError;
  }
  throw new Error('expected a refusal');
}

describe('volume keys: wrap and unwrap', () => {
  const g = geometry();
  const { wrapped, keys } = createVolumeKeys(pass('correct horse'), g, FAST);

  it('the wrap is JSON-able and holds no key in the clear', () => {
    const back = JSON.parse(JSON.stringify(wrapped)) as WrappedVolumeKey;
    expect(back).toEqual(wrapped);
    expect(wrapped.wrappedKey).toMatch(/^[0-9a-f]{120}$/);
    expect(wrapped.kdf).toEqual({ N: 1024, r: 8, p: 1, salt: expect.stringMatching(/^[0-9a-f]{32}$/) as unknown });
    for (const k of [keys.mapKey, keys.placementKey, keys.slotKey(0).key]) expect(wrapped.wrappedKey).not.toContain(k.toString('hex'));
  });

  it('round trip: the same passphrase and geometry give the same keys', () => {
    const again = unwrapVolumeKeys(pass('correct horse'), wrapped, geometry());
    expect(again.mapKey.equals(keys.mapKey)).toBe(true);
    expect(again.placementKey.equals(keys.placementKey)).toBe(true);
    expect(again.slotKey(0).key.equals(keys.slotKey(0).key)).toBe(true);
    expect(again.slotKey(7).key.equals(keys.slotKey(7).key)).toBe(true);
    again.wipe();
  });

  it('a wrong passphrase is refused with the honest message', () => {
    const err = fails(() => unwrapVolumeKeys(pass('correct horsf'), wrapped, g));
    expect(err.message).toBe(UNWRAP_FAILED);
    expect(err.message.startsWith('wrong key or manifest edited')).toBe(true);
  });

  const edits: [string, Partial<SealedGeometry>][] = [
    ['sealed flag cleared', { sealed: false }],
    ['format version', { format: 1 }],
    ['volume name', { name: 'vol2' }],
    ['device size', { deviceSize: 2 << 20 }],
    ['chunk size', { chunkSize: 32768 }],
    ['a file size', { files: [{ path: 'file001', size: 600_000 }, { path: 'file002', size: 700_000 }] }],
    ['a file name', { files: [{ path: 'file001', size: 600_000 }, { path: 'file003', size: 600_000 }] }],
    ['file order', { files: [{ path: 'file002', size: 600_000 }, { path: 'file001', size: 600_000 }] }],
    ['a file dropped', { files: [{ path: 'file001', size: 600_000 }] }],
    ['spare slots', { spareSlots: 3 }],
    ['key generation', { keyGeneration: 1 }],
    ['layout kind', { layout: '{"kind":"striped"}' }],
    ['volume UUID', { uuid: Buffer.alloc(16, 0x12) }],
  ];
  for (const [what, edit] of edits) {
    it(`an edited ${what} makes the unwrap fail`, () => {
      expect(encodeGeometryAD(geometry(edit)).equals(encodeGeometryAD(g))).toBe(false);
      expect(fails(() => unwrapVolumeKeys(pass('correct horse'), wrapped, geometry(edit))).message).toBe(UNWRAP_FAILED);
    });
  }

  it('an edited wrap (salt, nonce, tag, ciphertext, kdf) fails', () => {
    const flip = (hex: string, at: number): string => hex.slice(0, at) + (hex[at] === '0' ? '1' : '0') + hex.slice(at + 1);
    const variants: WrappedVolumeKey[] = [
      { ...wrapped, kdf: { ...wrapped.kdf, salt: flip(wrapped.kdf.salt, 5) } },
      { ...wrapped, kdf: { ...wrapped.kdf, N: 2048 } },
      { ...wrapped, wrappedKey: flip(wrapped.wrappedKey, 3) },   // nonce
      { ...wrapped, wrappedKey: flip(wrapped.wrappedKey, 30) },  // tag
      { ...wrapped, wrappedKey: flip(wrapped.wrappedKey, 100) }, // ciphertext
    ];
    for (const v of variants) expect(fails(() => unwrapVolumeKeys(pass('correct horse'), v, g)).message).toBe(UNWRAP_FAILED);
  });

  it('a malformed wrap or costly scrypt is refused before any work', () => {
    expect(fails(() => unwrapVolumeKeys(pass('x'), { ...wrapped, wrappedKey: 'abc' }, g)).message).toMatch(/wrapped key must be 120 hex digits/);
    expect(fails(() => unwrapVolumeKeys(pass('x'), { ...wrapped, kdf: { ...wrapped.kdf, N: 2 ** 20, r: 8 } }, g)).message)
      .toMatch(/scrypt parameters refused: needs 1024 MiB/);
    expect(fails(() => unwrapVolumeKeys(pass('x'), { ...wrapped, kdf: { ...wrapped.kdf, N: 1000 } }, g)).message).toMatch(/scrypt parameters refused/);
    expect(fails(() => unwrapVolumeKeys(Buffer.alloc(0), wrapped, g)).message).toBe('empty passphrase');
  });

  it('two volumes never share keys, even with the same passphrase and geometry', () => {
    const other = createVolumeKeys(pass('correct horse'), g, FAST);
    expect(other.wrapped.kdf.salt).not.toBe(wrapped.kdf.salt);
    expect(other.keys.mapKey.equals(keys.mapKey)).toBe(false);
    other.keys.wipe();
  });

  it('works at the default scrypt cost of the tool (N=2^15, r=8)', () => {
    const made = createVolumeKeys(pass('pw'), g, { N: 2 ** 15, r: 8, p: 1 });
    const back = unwrapVolumeKeys(pass('pw'), made.wrapped, g);
    expect(back.mapKey.equals(made.keys.mapKey)).toBe(true);
    made.keys.wipe();
    back.wipe();
  });
});

describe('subkeys', () => {
  const g = geometry({ uuid: newVolumeUuid() });
  const { keys } = createVolumeKeys(pass('pw'), g, FAST);

  it('slot, map and placement keys are 32 bytes, distinct, and each generation has its own slot key', () => {
    const all = [keys.mapKey, keys.placementKey, keys.slotKey(0).key, keys.slotKey(1).key, keys.slotKey(2 ** 32 - 1).key];
    for (const k of all) expect(k.length).toBe(32);
    expect(new Set(all.map((k) => k.toString('hex'))).size).toBe(all.length);
    expect(keys.slotKey(1).generation).toBe(1);
    expect(keys.slotKey(1).uuid.equals(g.uuid)).toBe(true);
    expect(() => keys.slotKey(2 ** 32)).toThrow(/key generation must be an integer from 0 to 2\^32-1/);
  });

  it('the format of docs/FORMAT.md, recomputed by hand, gives the same keys', () => {
    const made = createVolumeKeys(pass('by hand'), g, FAST);
    const salt = Buffer.from(made.wrapped.kdf.salt, 'hex');
    const blob = Buffer.from(made.wrapped.wrappedKey, 'hex');
    const kek = scryptSync(pass('by hand'), salt, 32, { N: 1024, r: 8, p: 1 });
    const d = createDecipheriv('aes-256-gcm', kek, blob.subarray(0, 12));
    d.setAAD(encodeGeometryAD(g));
    d.setAuthTag(blob.subarray(12, 28));
    const volumeKey = Buffer.concat([d.update(blob.subarray(28)), d.final()]);
    expect(volumeKey.length).toBe(32);
    const hk = (info: Buffer): Buffer => Buffer.from(hkdfSync('sha256', volumeKey, g.uuid, info, 32));
    expect(hk(Buffer.from('vbd-shadow/map\0')).equals(made.keys.mapKey)).toBe(true);
    expect(hk(Buffer.from('vbd-shadow/placement\0')).equals(made.keys.placementKey)).toBe(true);
    expect(hk(Buffer.concat([Buffer.from('vbd-shadow/slot\0'), Buffer.from([0, 0, 0, 3])])).equals(made.keys.slotKey(3).key)).toBe(true);
    expect(slotKeyInfo(3).equals(Buffer.from('vbd-shadow/slot\0\0\0\0\x03', 'latin1'))).toBe(true);
    expect(HKDF_LABELS).toEqual({ slot: 'vbd-shadow/slot', map: 'vbd-shadow/map', placement: 'vbd-shadow/placement' });
    made.keys.wipe();
  });

  it('the geometry AD is the documented byte string', () => {
    const ad = encodeGeometryAD(geometry({ files: [{ path: 'f1', size: 70000 }], layout: '{"kind":"linear"}' }));
    const expected = Buffer.concat([
      Buffer.from('vbd-shadow/wrap\0'),
      Buffer.alloc(16, 0x11),
      Buffer.from([0, 0, 0, 2]),              // format
      Buffer.from([1]),                       // sealed
      Buffer.from([0, 0, 0, 3]), Buffer.from('vol'), // name
      Buffer.from([0, 0, 0, 0, 0, 0x10, 0, 0]), // deviceSize 1 MiB (u64)
      Buffer.from([0, 1, 0, 0]),              // chunkSize 65536
      Buffer.from([0, 0, 0, 2]),              // spareSlots
      Buffer.from([0, 0, 0, 0]),              // keyGeneration
      Buffer.from([0, 0, 0, 1]),              // one file
      Buffer.from([0, 0, 0, 2]), Buffer.from('f1'), Buffer.from([0, 0, 0, 0, 0, 1, 0x11, 0x70]), // 70000
      Buffer.from([0, 0, 0, 17]), Buffer.from('{"kind":"linear"}'),
    ]);
    expect(ad.toString('hex')).toBe(expected.toString('hex'));
  });

  it('geometry fields out of range are refused, not truncated', () => {
    expect(() => encodeGeometryAD(geometry({ uuid: Buffer.alloc(15) }))).toThrow(/UUID must be 16 bytes/);
    expect(() => encodeGeometryAD(geometry({ chunkSize: 2 ** 32 }))).toThrow(/chunkSize must be an integer from 0 to 2\^32-1/);
    expect(() => encodeGeometryAD(geometry({ deviceSize: -1 }))).toThrow(/deviceSize must be a non-negative safe integer/);
    expect(() => encodeGeometryAD(geometry({ deviceSize: 1.5 }))).toThrow(/deviceSize/);
  });

  it('wipe() zeroes every key handed out and later use is refused', () => {
    const made = createVolumeKeys(pass('w'), g, FAST);
    const k = made.keys;
    const handed = [k.mapKey, k.placementKey, k.slotKey(0).key, k.slotKey(5).key];
    k.wipe();
    for (const b of handed) expect(b.equals(Buffer.alloc(32))).toBe(true);
    expect(k.wiped).toBe(true);
    expect(() => k.slotKey(0)).toThrow(/used after they were wiped/);
    expect(() => k.wrapUnder(pass('w'), FAST, g)).toThrow(/used after they were wiped/);
    const b = Buffer.from('secret');
    wipe(b, undefined);
    expect(b.equals(Buffer.alloc(6))).toBe(true);
  });

  it('a volume key of the wrong size or a UUID of another volume is refused', () => {
    expect(() => new VolumeKeys(Buffer.alloc(16), g.uuid)).toThrow(/volume key must be 32 bytes/);
    expect(() => keys.wrapUnder(pass('x'), FAST, geometry({ uuid: Buffer.alloc(16, 9) }))).toThrow(/not the UUID these keys belong to/);
  });
});

describe('passphrase change', () => {
  const g = geometry({ uuid: newVolumeUuid() });

  it('re-wraps the same volume key: slots sealed before open after; the old passphrase stops working', () => {
    const { wrapped, keys } = createVolumeKeys(pass('old pass'), g, FAST);
    const chunk = Buffer.alloc(4096, 0x5a);
    const slot = Buffer.alloc(slotSize(chunk.length));
    sealChunk(keys.slotKey(0), { chunk: 9, epoch: 4 }, chunk, slot);
    keys.wipe();

    const rewrapped = rewrapVolumeKey(pass('old pass'), pass('new pass'), wrapped, g);
    expect(rewrapped.kdf.salt).not.toBe(wrapped.kdf.salt);
    expect(rewrapped.wrappedKey).not.toBe(wrapped.wrappedKey);
    expect(fails(() => unwrapVolumeKeys(pass('old pass'), rewrapped, g)).message).toBe(UNWRAP_FAILED);

    const after = unwrapVolumeKeys(pass('new pass'), rewrapped, g);
    const out = Buffer.alloc(chunk.length);
    openChunk(after.slotKey(0), { chunk: 9, epoch: 4 }, slot, out);
    expect(out.equals(chunk)).toBe(true);
    after.wipe();
  });

  it('refuses a wrong old passphrase and changes nothing', () => {
    const { wrapped, keys } = createVolumeKeys(pass('old'), g, FAST);
    keys.wipe();
    expect(fails(() => rewrapVolumeKey(pass('guess'), pass('new'), wrapped, g)).message).toBe(UNWRAP_FAILED);
  });

  it('can move the binding (the next key generation) and the scrypt cost in the same re-wrap', () => {
    const { wrapped, keys } = createVolumeKeys(pass('p'), g, FAST);
    const next = geometry({ uuid: g.uuid, keyGeneration: 1 });
    const moved = rewrapVolumeKey(pass('p'), pass('p'), wrapped, g, { newGeometry: next, kdf: { N: 2048, r: 8, p: 1 } });
    expect(moved.kdf.N).toBe(2048);
    expect(fails(() => unwrapVolumeKeys(pass('p'), moved, g)).message).toBe(UNWRAP_FAILED);
    const back = unwrapVolumeKeys(pass('p'), moved, next);
    expect(back.mapKey.equals(keys.mapKey)).toBe(true);
    back.wipe();
    keys.wipe();
    expect(() => rewrapVolumeKey(pass('p'), pass('p'), moved, next, { newGeometry: geometry({ uuid: Buffer.alloc(16, 3) }) }))
      .toThrow(/not the UUID these keys belong to/);
  });
});

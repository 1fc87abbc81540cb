// The position map format with real AES-256-GCM: copies, their choice, tampering, reservations.

import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  MAP_HEADER_BYTES, MapCopyError, RESERVE_OFFSETS, clonePositionMap, loadPositionMap, loadReservation, mapFileBytes, newPositionMap,
  openPositionMap, openReservation, pendingChunks, regionOffset, sealPositionMap, sealReservation, setPending, writePositionMap,
  writeReservation, type MapKey, type PositionMap,
} from '../../src/store/map.js';
import { tempDir } from '../helpers/tmp.js';

const key: MapKey = { key: randomBytes(32), uuid: randomBytes(16) };
const N = 100;
const T = 130;

function sample(epoch: number): PositionMap {
  const m = newPositionMap(N, T);
  m.epoch = epoch;
  for (let c = 0; c < N; c++) {
    m.slot[c] = (c * 7 + epoch) % T;
    m.epochs[c] = 1 + (c % epoch);
    m.generation[c] = c % 2;
  }
  m.budget = { generation: 1, used: 12345 };
  return m;
}

function mapFile(): { path: string; fd: number } {
  const path = join(tempDir(), 'vbd-shadow.map');
  writeFileSync(path, Buffer.alloc(mapFileBytes(N)));
  return { path, fd: openSync(path, 'r+') };
}

describe('position map copies', () => {
  it('round trip: every entry, the pending set and the budget', () => {
    const m = sample(9);
    setPending(m, 3);
    setPending(m, 97);
    const back = openPositionMap(sealPositionMap(m, key), key, N, T);
    expect(back).toEqual(m);
    expect([...pendingChunks(back)]).toEqual([3, 97]);
  });

  it('holds no entry in the clear: the same map sealed twice shares nothing past the header', () => {
    const m = sample(5);
    const a = sealPositionMap(m, key);
    const b = sealPositionMap(m, key);
    expect(a.subarray(0, 36).equals(b.subarray(0, 36))).toBe(true); // magic, version, epoch, counts
    expect(a.subarray(MAP_HEADER_BYTES).equals(b.subarray(MAP_HEADER_BYTES))).toBe(false);
  });

  it('a flipped byte anywhere, another volume, another key or edited counts are refused', () => {
    const sealed = sealPositionMap(sample(4), key);
    for (const at of [13, 36, 50, MAP_HEADER_BYTES, MAP_HEADER_BYTES + 500, sealed.length - 1]) {
      const bad = Buffer.from(sealed);
      bad[at] = (bad[at] ?? 0) ^ 0x40;
      expect(() => openPositionMap(bad, key, N, T), `byte ${at}`).toThrow(MapCopyError);
    }
    expect(() => openPositionMap(sealed, { key: key.key, uuid: randomBytes(16) }, N, T)).toThrow(/fails authentication/);
    expect(() => openPositionMap(sealed, { key: randomBytes(32), uuid: key.uuid }, N, T)).toThrow(/fails authentication/);
    expect(() => openPositionMap(sealed, key, N, T + 1)).toThrow(/describes 100 chunks in 130 slots/);
    expect(() => openPositionMap(Buffer.alloc(sealed.length), key, N, T)).toThrow(/never written/);
  });

  it('a sealed map that is not a bijection onto the slots is refused even with a valid tag', () => {
    const twice = sample(3);
    twice.slot[1] = twice.slot[0] ?? 0;
    expect(() => openPositionMap(sealPositionMap(twice, key), key, N, T)).toThrow(/holds two chunks/);
    const future = sample(3);
    future.epochs[5] = 4;
    expect(() => openPositionMap(sealPositionMap(future, key), key, N, T)).toThrow(/after the map's own/);
  });

  it('the newer valid copy wins; a failing copy is reported; none valid is refused', () => {
    const { path, fd } = mapFile();
    try {
      writePositionMap(fd, 'vbd-shadow.map', key, sample(6), 0);
      writePositionMap(fd, 'vbd-shadow.map', key, sample(7), 1);
      let loaded = loadPositionMap(fd, 'vbd-shadow.map', key, N, T);
      expect(loaded.map.epoch).toBe(7);
      expect(loaded.region).toBe(1);
      expect(loaded.fallback).toBeUndefined();

      // Corrupt B (the newer): A is used, and that is said.
      const bytes = readFileSync(path);
      bytes[regionOffset(N, 1) + MAP_HEADER_BYTES + 10] ^= 1;
      writeFileSync(path, bytes);
      loaded = loadPositionMap(fd, 'vbd-shadow.map', key, N, T);
      expect(loaded.map.epoch).toBe(6);
      expect(loaded.fallback).toMatch(new RegExp(`^map B \\(vbd-shadow.map at offset ${regionOffset(N, 1)}\\) fails authentication .*; using map A \\(vbd-shadow.map at offset 4096\\), epoch 6`));

      bytes[regionOffset(N, 0) + 20] ^= 1;
      writeFileSync(path, bytes);
      expect(() => loadPositionMap(fd, 'vbd-shadow.map', key, N, T)).toThrow(/^no valid position map: map A .*; map B .* fails authentication/);
    } finally {
      closeSync(fd);
    }
  });

  it('two valid copies of the same epoch are refused (never written by us)', () => {
    const { fd } = mapFile();
    try {
      writePositionMap(fd, 'm', key, sample(6), 0);
      writePositionMap(fd, 'm', key, sample(6), 1);
      expect(() => loadPositionMap(fd, 'm', key, N, T)).toThrow(/both claim epoch 6/);
    } finally {
      closeSync(fd);
    }
  });

  it('a copy is independent of the other: cloning and editing one leaves the first intact', () => {
    const m = sample(2);
    const c = clonePositionMap(m);
    c.slot[0] = 99;
    setPending(c, 0);
    expect(m.slot[0]).not.toBe(99);
    expect(m.pendingCount).toBe(0);
  });
});

describe('epoch reservations', () => {
  it('round trip, authenticated, bound to the volume', () => {
    const r = { epochHigh: 41, generation: 2, sealsHigh: 2 ** 33 + 5 };
    const sealed = sealReservation(r, key);
    expect(openReservation(sealed, key)).toEqual(r);
    const bad = Buffer.from(sealed);
    bad[30] ^= 1;
    expect(() => openReservation(bad, key)).toThrow(/fails authentication/);
    expect(() => openReservation(sealed, { key: key.key, uuid: randomBytes(16) })).toThrow(/fails authentication/);
  });

  it('the newest valid record counts; never-written records are silent, damaged ones reported', () => {
    const { path, fd } = mapFile();
    try {
      expect(loadReservation(fd, 'm', key)).toEqual({ problems: [] });
      writeReservation(fd, 'm', key, { epochHigh: 3, generation: 0, sealsHigh: 10 }, 0);
      writeReservation(fd, 'm', key, { epochHigh: 5, generation: 0, sealsHigh: 20 }, 1);
      expect(loadReservation(fd, 'm', key).newest).toEqual({ reservation: { epochHigh: 5, generation: 0, sealsHigh: 20 }, index: 1 });
      const bytes = readFileSync(path);
      bytes[RESERVE_OFFSETS[1] + 40] ^= 1;
      writeFileSync(path, bytes);
      const loaded = loadReservation(fd, 'm', key);
      expect(loaded.newest?.reservation.epochHigh).toBe(3);
      expect(loaded.problems).toEqual(['epoch reservation 1 (m at offset 512) fails authentication']);
    } finally {
      closeSync(fd);
    }
  });
});

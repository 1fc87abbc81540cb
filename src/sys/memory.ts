// How much this process may still allocate, and its resource limits, as the kernel says:
// MemAvailable (/proc/meminfo, via os.freemem) and the address-space limit less what is mapped.

import { readFileSync } from 'node:fs';
import { freemem } from 'node:os';

export interface Limit {
  soft: number;
  hard: number;
}

/** Resource limits of this process from /proc/self/limits, by name ("Max locked memory" …); Infinity = unlimited. */
export function processLimits(): Map<string, Limit> {
  const limits = new Map<string, Limit>();
  const text = readFileSync('/proc/self/limits', 'utf8');
  for (const line of text.split('\n').slice(1)) {
    const m = /^(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)/.exec(line);
    if (m === null) continue;
    const value = (s: string | undefined): number => (s === 'unlimited' || s === undefined ? Infinity : Number(s));
    limits.set(m[1] ?? '', { soft: value(m[2]), hard: value(m[3]) });
  }
  return limits;
}

export interface MemoryBudget {
  bytes: number;
  /** What bounds it, for messages. */
  source: 'MemAvailable' | 'address-space limit';
}

/** The memory this process can still allocate: the smaller of MemAvailable and its address-space headroom. */
export function availableMemory(): MemoryBudget {
  const available = freemem();
  const as = processLimits().get('Max address space')?.soft ?? Infinity;
  if (Number.isFinite(as)) {
    const m = /^VmSize:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'));
    const mapped = m === null ? 0 : Number(m[1]) * 1024;
    const headroom = Math.max(0, as - mapped);
    if (headroom < available) return { bytes: headroom, source: 'address-space limit' };
  }
  return { bytes: available, source: 'MemAvailable' };
}

// A volume's identity, apart from opening it: the runtime state is keyed by it, and reading
// that state (status, flush, stop) must not load what opening a volume needs.

/** What a volume is, whatever its path: root keys runtime state, logs and leftovers by it. */
export interface VolumeIdentity {
  uid: number;
  dev: bigint;
  ino: bigint;
  /** Birth time of the directory (ns): a new directory that reuses the inode is another volume. */
  bornNs: bigint;
}

/** `UID/DEV.INO`: the identity as a relative path (no user-chosen text in it). */
export function identityKey(id: VolumeIdentity): string {
  return `${id.uid}/${id.dev}.${id.ino}`;
}

export function sameIdentity(a: VolumeIdentity, b: VolumeIdentity): boolean {
  return a.uid === b.uid && a.dev === b.dev && a.ino === b.ino && a.bornNs === b.bornNs;
}

#!/usr/bin/env bash
# npm test: build, then run vitest. As root, vitest — and everything the tests spawn, the daemon
# first — runs under what systemd/vbd-shadow@.service imposes that can be imposed without
# systemd as PID 1, read from the unit itself so that there is one source of truth:
#   CapabilityBoundingSet=  setpriv --bounding-set=-all,+… with an empty inheritable set, so a
#                           root exec gets exactly the bounding set, as the service's process does
#   NoNewPrivileges=yes     setpriv --no-new-privs
#   LimitMEMLOCK=infinity   prlimit --memlock=unlimited:unlimited (needs CAP_SYS_RESOURCE; where
#                           that is missing, CAP_IPC_LOCK stands in for it, and says so)
#   UMask=                  umask
# Not imposed (they need systemd to set them up): SystemCallFilter, PrivateNetwork,
# IPAddressDeny, RestrictAddressFamilies, RestrictNamespaces, ProtectHostname, LockPersonality,
# RestrictRealtime, RestrictSUIDSGID, KeyringMode; nor LimitCORE=0 (a test raises the core limit
# to check that the layout module's is reset). test/systemd/units.test.ts checks from inside
# that the rest took effect. VBD_TEST_UNCONFINED=1 runs the root tests with every capability.
set -euo pipefail
cd "$(dirname "$0")/.."
UNIT=systemd/vbd-shadow@.service

# What ships: tsc's output and the bundle bin/vbd-shadow runs (scripts/bundle.mjs).
node_modules/.bin/tsc -p .
node scripts/bundle.mjs

# Every tracked flush of every daemon the suite starts also scans the whole image and fails
# loudly if the change tracker's set missed a changed chunk (src/flush/engine.ts, verify).
export VBD_SHADOW_VERIFY_TRACKING=1

if [ "$(id -u)" != 0 ] || [ "${VBD_TEST_UNCONFINED:-}" = 1 ]; then
  unset VBD_TEST_CONFINED VBD_TEST_IPC_LOCK_STAND_IN
  exec node_modules/.bin/vitest run "$@"
fi

die() { echo "scripts/test.sh: $*" >&2; exit 1; }

# The last value given to a directive (a later assignment wins), or empty.
directive() { sed -n "s/^$1=//p" "$UNIT" | tail -n 1; }

# CapabilityBoundingSet= lines are merged by OR; only that plain form is understood here.
caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$UNIT" | tr -s ' \t' '\n' | sed '/^$/d' | sort -u)
[ -n "$caps" ] || die "$UNIT has no CapabilityBoundingSet=; refusing to run the root tests with every capability"
bounding=-all
for cap in $caps; do
  case "$cap" in
    CAP_[A-Z_]*) bounding+=",+$(printf '%s' "${cap#CAP_}" | tr 'A-Z' 'a-z')" ;;
    *) die "cannot read CapabilityBoundingSet entry '$cap' in $UNIT (only plain CAP_* lists)" ;;
  esac
done

nnp=()
[ "$(directive NoNewPrivileges)" = yes ] && nnp=(--no-new-privs)

inheritable=-all
limits=()
case "$(directive LimitMEMLOCK)" in
  infinity)
    if prlimit --memlock=unlimited:unlimited -- true 2>/dev/null; then
      limits=(--memlock=unlimited:unlimited)
    elif ! grep -qx CAP_IPC_LOCK <<<"$caps"; then
      # Raising a hard limit needs CAP_SYS_RESOURCE. CAP_IPC_LOCK (mlock past the limit) stands
      # in for it outside the bounding set: inheritable, which a root exec adds to its permitted
      # set, and which a test can still drop (setpriv --inh-caps=-ipc_lock; dropping from the
      # bounding set needs CAP_SETPCAP, which the unit does not have).
      echo "scripts/test.sh: RLIMIT_MEMLOCK cannot be raised to unlimited here (no CAP_SYS_RESOURCE) as LimitMEMLOCK=infinity does;" >&2
      echo "scripts/test.sh: CAP_IPC_LOCK stands in for it, inheritable only (the unit's bounding set does not have it)" >&2
      inheritable=-all,+ipc_lock
      export VBD_TEST_IPC_LOCK_STAND_IN=1
    fi ;;
  '') ;;
  *) die "LimitMEMLOCK=$(directive LimitMEMLOCK) in $UNIT: only infinity is understood here" ;;
esac

mask=$(directive UMask)
[ -n "$mask" ] || mask=0022

# The inheritable set first: it can only be raised while the bounding set still has the cap.
confine=(setpriv "--inh-caps=$inheritable" -- setpriv "--bounding-set=$bounding" "${nnp[@]}" --)
[ "${#limits[@]}" -eq 0 ] || confine=(prlimit "${limits[@]}" -- "${confine[@]}")
echo "scripts/test.sh: as root, under the unit's limits: ${confine[*]} vitest run $* (daemon and CLI under umask $mask)" >&2
export VBD_TEST_CONFINED=1
# The unit's umask is the daemon's: the test helpers run the CLI and every daemon under it
# (test/helpers/cli.ts), while the harness itself keeps the usual one for its fixtures.
export VBD_TEST_DAEMON_UMASK=$mask
exec "${confine[@]}" node_modules/.bin/vitest run "$@"

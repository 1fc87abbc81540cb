#!/usr/bin/env bash
# `npm run demo`: the main job on a small default volume, start to finish.
# Creates a 64 MiB volume of 16 files (keyed layout: scattered by a secret), serves it as a
# RAM block device with an ext4 on it, writes a file, flushes, stops, and shows that the
# scattered files hold the filesystem. Run as root. Leaves the volume in ./demo/ to play with.
set -euo pipefail
cd "$(dirname "$0")/.."
vbd() { node bin/vbd-shadow "$@"; }
if [ "$(id -u)" != 0 ]; then
  echo "demo: needs root (tmpfs, mlock, loop devices): sudo npm run demo" >&2
  exit 1
fi
demo=$PWD/demo
mkdir -p "$demo" && chmod 700 "$demo"
key=$demo/demo.key
[ -f "$key" ] || { head -c 24 /dev/urandom | base64 > "$key"; chmod 600 "$key"; }
if [ ! -f "$demo/volume/vbd-shadow.json" ]; then
  echo "== init: 64M volume, 16 files, 4K chunks, keyed layout"
  vbd init "$demo/volume" --size 64M --files 16 --chunk 4K --layout keyed --name demo --key-file "$key"
fi
echo "== start: RAM image, /dev/vbd-shadow/$(id -un)/demo, ext4 on first use, mounted on $demo/mnt"
vbd start "$demo/volume" --key-file "$key" --mkfs ext4 --mount "$demo/mnt" --canary none
trap 'vbd stop demo >/dev/null 2>&1 || true' EXIT
date > "$demo/mnt/hello.txt"
echo "== wrote $demo/mnt/hello.txt: $(cat "$demo/mnt/hello.txt")"
echo "== flush"
vbd flush demo
vbd status demo
echo "== stop"
vbd stop demo
trap - EXIT
echo "== export (offline, no root needed) and check what the scattered files hold"
vbd export "$demo/volume" "$demo/export.img" --key-file "$key"
e2fsck -fn "$demo/export.img" | tail -1
echo "hello.txt in the files: $(debugfs -R 'cat /hello.txt' "$demo/export.img" 2>/dev/null)"
rm -f "$demo/export.img"
echo "== done. Start it again with: sudo bin/vbd-shadow start $demo/volume --key-file $key --mount $demo/mnt"

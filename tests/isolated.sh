#!/usr/bin/env bash
# Run COMMAND as if on another machine of a cluster (the two-node test of issue 21): in a private mount
# namespace with an empty /tmp, every --hide folder replaced by an empty one, and only the --keep folders
# visible at their own paths (the image's virtualenv and Python, a storage folder every node mounts like NFS).
#   bash tests/isolated.sh [--keep DIR]... [--hide DIR]... -- COMMAND [ARG]...
# Needs mount namespaces (root, or unprivileged user namespaces). What it does not isolate: the network (the
# nodes talk over 127.0.0.1, as nodes of one host would) and the process table.
set -euo pipefail

keep=()
hide=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep+=("$(realpath -m "$2")"); shift 2 ;;
    --hide) hide+=("$(realpath -m "$2")"); shift 2 ;;
    --) shift; break ;;
    *) echo "isolated.sh: unknown option $1 (use --keep DIR, --hide DIR, then -- COMMAND)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "isolated.sh: no command after --" >&2; exit 2; }

# the kept folders are parked here (a private tmpfs inside the namespace) while /tmp and the hidden ones go
hold="$(mktemp -d /dev/shm/metaprep-isolated.XXXXXX)"
trap 'rmdir "$hold" 2>/dev/null || true' EXIT

inner='
set -euo pipefail
hold="$1"; nkeep="$2"; nhide="$3"; shift 3
keep=("${@:1:$nkeep}"); shift "$nkeep"
hide=("${@:1:$nhide}"); shift "$nhide"
mount -t tmpfs metaprep-hold "$hold"
for i in "${!keep[@]}"; do mkdir "$hold/$i"; mount --bind "${keep[$i]}" "$hold/$i"; done
mount -t tmpfs metaprep-tmp /tmp
for d in "${hide[@]}"; do if [ -d "$d" ]; then mount -t tmpfs metaprep-hidden "$d"; fi; done
for i in "${!keep[@]}"; do mkdir -p "${keep[$i]}"; mount --bind "$hold/$i" "${keep[$i]}"; done
# a hidden folder inside a kept one (the state folder of a kept checkout) is hidden again
for d in "${hide[@]}"; do
  for k in "${keep[@]}"; do
    case "$d/" in "$k"/*) if [ -d "$d" ]; then mount -t tmpfs metaprep-hidden "$d"; fi ;; esac
  done
done
cd /tmp
exec "$@"
'
unshare --mount --propagation private -- bash -c "$inner" isolated "$hold" "${#keep[@]}" "${#hide[@]}" \
  "${keep[@]}" "${hide[@]}" "$@"

#!/usr/bin/env bash
# Build the User-Mode Linux kernel of the uml test tier, or reuse a cached one; print its path.
#
#   tests/uml/build-kernel.sh            build if missing, print the binary's path
#   tests/uml/build-kernel.sh --path     print where the binary is (or would be); build nothing
#
# Source: Debian's linux-source-6.1 (/usr/src/linux-source-6.1.tar.xz), `make ARCH=um defconfig`
# plus tests/uml/kernel.config, with tests/uml/um-virtpci-root-port.patch applied (a platform-side
# PCI fixup in arch/um; drivers/net/wwan/iosm stays unmodified, see docs/uml-virtpci.md §3).
# The tree is unpacked and built under the cache directory (about 2 GB while building), never in
# the work tree; only the stripped binary is kept, at $IOSM_UML_CACHE/<key>/linux, where <key>
# hashes the source package version, the config fragment and the patches. A fresh build takes
# about 6-7 minutes on two cores.
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
FRAGMENT=$HERE/kernel.config
PATCHES=("$HERE/um-virtpci-root-port.patch" "$HERE/um-xstate-full-area.patch")
TARBALL=/usr/src/linux-source-6.1.tar.xz
CACHE=${IOSM_UML_CACHE:-/var/cache/iosm-cuse/uml}

die() { printf 'build-kernel: %s\n' "$*" >&2; exit 1; }

VERSION=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) \
    || die "linux-source-6.1 is not installed (apt-get install linux-source-6.1)"
[ -f "$TARBALL" ] || die "$TARBALL is missing"
KEY=$( { printf 'linux-source-6.1 %s\n' "$VERSION"; cat "$FRAGMENT" "${PATCHES[@]}"; } \
    | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY/linux

if [ "${1:-}" = --path ]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE/$KEY"
# One build at a time per key; a second caller waits and then reuses the binary.
exec 9>"$CACHE/$KEY/.lock"
flock 9
if [ -x "$OUT" ]; then
    echo "$OUT"
    exit 0
fi

WORK=$(mktemp -d "$CACHE/$KEY/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
printf 'build-kernel: building UML from linux-source-6.1 %s in %s\n' "$VERSION" "$WORK" >&2
tar -C "$WORK" -xJf "$TARBALL"
cd "$WORK/linux-source-6.1"
for p in "${PATCHES[@]}"; do patch -p1 --quiet < "$p"; done
make -s ARCH=um defconfig >&2
ARCH=um scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >/dev/null
make -s ARCH=um olddefconfig >&2
# Kconfig drops an option whose dependencies are not met without a word: check every one.
while IFS= read -r line; do
    case $line in
        CONFIG_*=*) grep -qxF "$line" .config || die "config fragment line not in effect: $line" ;;
    esac
done < "$FRAGMENT"
make -s ARCH=um -j"$(nproc)" linux >&2
strip -o linux.stripped linux
mv linux.stripped "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$OUT"

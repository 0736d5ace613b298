#!/usr/bin/env bash
# Builds a Debian package of the router with dpkg-deb (no extra tools), from a release build.
# Usage: packaging/build-deb.sh [OUTPUT_DIR]   (default: target/debian)
# The package installs /usr/bin/docker-socket-router and the systemd unit; it does not enable
# the service, because a rootful Docker may own /var/run/docker.sock on the target host.
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir=${1:-target/debian}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
cargo build --release --locked

stage=$(mktemp -d)
chmod 755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -D -m 755 target/release/docker-socket-router "$stage/usr/bin/docker-socket-router"
install -D -m 644 packaging/docker-socket-router.service \
  "$stage/lib/systemd/system/docker-socket-router.service"
install -D -m 644 README.md "$stage/usr/share/doc/docker-socket-router/README.md"
install -D -m 644 packaging/debian/copyright "$stage/usr/share/doc/docker-socket-router/copyright"
install -d "$stage/DEBIAN"
for script in postinst prerm postrm; do
  install -m 755 "packaging/debian/$script" "$stage/DEBIAN/$script"
done
installed_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$installed_kib/" \
  packaging/debian/control >"$stage/DEBIAN/control"

mkdir -p "$out_dir"
deb="$out_dir/docker-socket-router_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$deb"

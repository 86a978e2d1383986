#!/bin/bash
# build-deb.sh: build the hotreload .deb from this checkout and print its path.
#
#   packaging/build-deb.sh            # the path of the .deb is the last line on stdout
#
# Steps: gzip the manual pages into target/man/ (`gzip -9n`: no name or time stamp in the
# header, so the package is reproducible; the .gz files are build products, not checked
# in), then `cargo deb`, which builds the release binaries and packs the assets listed in
# [package.metadata.deb] of Cargo.toml. Installs cargo-deb with `cargo install --locked`
# when it is missing. Works with any CARGO_TARGET_DIR (cargo-deb resolves the
# target/release/ prefix of the assets itself).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

die() { echo "build-deb: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"
if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: installing cargo-deb (takes a few minutes)" >&2
  cargo install cargo-deb --locked >&2
fi

# Assets that other parts of the project provide; fail with a clear message, not with
# cargo-deb's "file not found" deep in the build.
for f in README.md man/hotreloadd.8 man/hotreloadctl.1 man/hotreload.toml.5 \
         packaging/hotreload.toml packaging/copyright packaging/changelog \
         systemd/hotreloadd.service systemd/hotreloadd.socket systemd/user/hotreloadd.service; do
  [ -f "$f" ] || die "$f is missing (a packaged asset)"
done

mkdir -p target/man
for page in man/hotreloadd.8 man/hotreloadctl.1 man/hotreload.toml.5; do
  gzip -9n -c "$page" >"target/man/$(basename "$page").gz"
done

mkdir -p target/debian
# --strip: [profile.release] keeps line tables for backtraces in development builds;
# a Debian binary package ships stripped executables (lintian: unstripped-binary-or-object).
out=$(cargo deb --locked --strip --output target/debian/ | tail -n 1)
[ -f "$out" ] || die "cargo deb did not report a .deb (last line: $out)"
out=$(realpath "$out")
echo "$out"

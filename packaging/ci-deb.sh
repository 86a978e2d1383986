#!/bin/bash
# ci-deb.sh: build the hotreload .deb, lint it, and install, exercise, remove and purge it
# on this machine, checking that purge leaves nothing behind.
#
#   sudo packaging/ci-deb.sh [--deb FILE]     # --deb: test FILE instead of building one
#
# For CI on a fresh Debian 12 machine or container, as root. Idempotent: a hotreload
# package left installed by an earlier run is purged first. Tools it needs (lintian,
# man-db, groff) are installed with apt-get. Where systemd is not PID 1 the package's
# maintainer scripts only record the units' enablement and start nothing; the units'
# runtime behaviour is tested by packaging/lab-test.sh.
#
# Steps: units lint (verify-units.sh) -> build (build-deb.sh) -> lintian (fails on any E:)
# -> dpkg -i -> installed files, conffile, group, enablement -> `hotreloadd
# --check-config` on /etc/hotreload/hotreload.toml -> `man -l` on each page -> dpkg -r
# (conffile kept) -> dpkg --purge -> nothing left that installing created.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PKG=hotreload
GROUP=hotreload
deb=""
case "${1:-}" in
  --deb) deb=$(realpath "${2:?--deb needs a file}") ;;
  "") ;;
  *) echo "usage: $0 [--deb FILE]" >&2; exit 64 ;;
esac

failures=0
step() { printf '\n==== %s\n' "$*"; }
ok()   { printf 'ok   %s\n' "$*"; }
bad()  { printf 'FAIL %s\n' "$*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
die()  { echo "ci-deb: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs and purges the package)"
command -v dpkg >/dev/null || die "not a Debian system (no dpkg)"

need_tools() {
  local missing=() t
  for t in lintian:lintian man:man-db groff:groff-base gzip:gzip; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
need_tools

step "systemd units"
check "systemd-analyze verify prints nothing" "$here/verify-units.sh"

if [ -z "$deb" ]; then
  step "build"
  deb=$("$here/build-deb.sh" | tail -n 1)
fi
[ -f "$deb" ] || die "no package at $deb"
echo "package: $deb"

step "lintian"
# --fail-on error: the exit status reflects E: tags only; warnings are printed for the
# reader (the known ones are listed in packaging/README.md).
if lintian --fail-on error --info "$deb"; then ok "lintian: no errors"; else bad "lintian reported errors"; fi

step "clean slate"
if dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null | grep -qv '^not-installed$'; then
  echo "purging $PKG left from an earlier run"
  dpkg --purge "$PKG"
fi
group_before=no
getent group "$GROUP" >/dev/null && group_before=yes
echo "group $GROUP before install: $group_before"
for p in /etc/hotreload /var/lib/hotreload /run/hotreload; do
  if [ -e "$p" ]; then echo "note: $p exists before install (not created by this run)"; fi
done

step "dpkg -i"
# --path-include: container images often exclude /usr/share/man; the pages are tested.
dpkg --path-include='/usr/share/man/man*/hotreload*' -i "$deb"
mapfile -t files < <(dpkg-query -L "$PKG" | while read -r f; do
  if [ -f "$f" ] || [ -L "$f" ]; then echo "$f"; fi
done)
echo "${#files[@]} files installed"
for f in /usr/bin/hotreloadd /usr/bin/hotreloadctl \
         /usr/lib/systemd/system/hotreloadd.service /usr/lib/systemd/system/hotreloadd.socket \
         /usr/lib/systemd/user/hotreloadd.service /etc/hotreload/hotreload.toml \
         /usr/share/man/man8/hotreloadd.8.gz /usr/share/man/man1/hotreloadctl.1.gz \
         /usr/share/man/man5/hotreload.toml.5.gz /usr/share/doc/$PKG/copyright \
         /usr/share/doc/$PKG/README.md /usr/share/doc/$PKG/changelog.Debian.gz \
         /usr/share/bash-completion/completions/hotreloadctl \
         /usr/share/zsh/vendor-completions/_hotreloadctl \
         /usr/share/fish/vendor_completions.d/hotreloadctl.fish; do
  check "installed $f" test -f "$f"
done
check "the bash completion loads (complete -p hotreloadctl)" \
  bash -c 'source /usr/share/bash-completion/completions/hotreloadctl && complete -p hotreloadctl >/dev/null'
check "the installed completions are those of the installed hotreloadctl" \
  cmp -s /usr/share/bash-completion/completions/hotreloadctl <(/usr/bin/hotreloadctl completions bash)
check "/etc/hotreload/hotreload.toml is a conffile" \
  sh -c "dpkg-query -W -f='\${Conffiles}' $PKG | grep -q '^ /etc/hotreload/hotreload.toml '"
check "group $GROUP exists" getent group "$GROUP"
check "hotreloadd.service enabled (multi-user.target.wants)" \
  test -L /etc/systemd/system/multi-user.target.wants/hotreloadd.service
check "hotreloadd.socket enabled (sockets.target.wants)" \
  test -L /etc/systemd/system/sockets.target.wants/hotreloadd.socket
if [ -d /run/systemd/system ]; then
  echo "note: systemd is running here; the package started hotreloadd"
else
  # By executable path: other hotreloadd processes (a developer's, a test suite's) may run.
  # shellcheck disable=SC2016 # expanded by the inner shell
  check "nothing started without systemd" sh -c '
    for exe in /proc/[0-9]*/exe; do
      [ "$(readlink "$exe" 2>/dev/null)" = /usr/bin/hotreloadd ] && exit 1
    done
    exit 0'
fi

step "hotreloadd --check-config"
# A clean environment, so no HOTRELOAD_* of the CI job changes the result. The effective
# configuration must show the shipped values.
if out=$(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /usr/bin/hotreloadd --check-config \
           --config /etc/hotreload/hotreload.toml 2>&1); then
  printf '%s\n' "$out" | sed 's/^/    /'
  check "effective configuration supervises every plugin dir (watch_patterns = [\"*\"])" \
    grep -qxF 'watch_patterns = ["*"]' <<<"$out"
  check "effective configuration shows the shipped plugins_dir" \
    grep -q '/var/lib/hotreload/plugins' <<<"$out"
else
  rc=$?
  printf '%s\n' "$out" | sed 's/^/    /'
  bad "hotreloadd --check-config exited $rc"
fi

step "manual pages"
for page in /usr/share/man/man8/hotreloadd.8.gz /usr/share/man/man1/hotreloadctl.1.gz \
            /usr/share/man/man5/hotreload.toml.5.gz; do
  # --warnings: groff's warnings on stderr; a page must render without any.
  if warn=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null) && [ -z "$warn" ]; then
    ok "man -l $page"
  else
    bad "man -l $page: ${warn:-exit status $?}"
  fi
done
check "man finds hotreloadd(8) by name" sh -c 'man -w hotreloadd >/dev/null'

step "dpkg -r"
dpkg -r "$PKG"
for f in "${files[@]}"; do
  case "$f" in
    /etc/hotreload/hotreload.toml) check "conffile kept after remove" test -f "$f" ;;
    *) if [ -e "$f" ]; then bad "still present after remove: $f"; fi ;;
  esac
done
ok "package files removed (except the conffile)"

step "dpkg --purge"
dpkg --purge "$PKG"
check "package forgotten by dpkg" \
  sh -c "! dpkg-query -W -f='\${db:Status-Status}' $PKG 2>/dev/null | grep -qv '^not-installed$'"
for f in "${files[@]}"; do
  if [ -e "$f" ]; then bad "still present after purge: $f"; fi
done
for p in /etc/hotreload /var/lib/hotreload /run/hotreload; do
  check "$p removed" test ! -e "$p"
done
leftover=$(find /etc/systemd/system /var/lib/systemd/deb-systemd-helper-enabled \
                /var/lib/systemd/deb-systemd-helper-masked -name 'hotreloadd*' 2>/dev/null || true)
check "no unit enablement or mask left" test -z "$leftover"
if [ -n "$leftover" ]; then printf '%s\n' "$leftover" | sed 's/^/    /'; fi
if [ "$group_before" = no ]; then
  check "group $GROUP removed (the package created it)" sh -c "! getent group $GROUP"
else
  check "group $GROUP kept (it existed before)" getent group "$GROUP"
fi

echo
if [ "$failures" -gt 0 ]; then
  echo "ci-deb: $failures check(s) FAILED"
  exit 1
fi
echo "ci-deb: all checks passed"

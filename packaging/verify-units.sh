#!/bin/bash
# verify-units.sh: lint the shipped systemd units with `systemd-analyze verify`.
#
#   packaging/verify-units.sh [--bin-dir DIR]
#
# Fails when systemd-analyze prints anything at all for any unit: it exits 0 for unknown
# keys and unparseable values (it only warns), so its output is the real verdict
# (research: linux-pitfalls.md §2.8). Checks the system units together (the service
# Wants= the socket) and the user unit with --user.
#
# `verify` insists that ExecStart=/ExecReload= binaries exist at their absolute paths.
# When /usr/bin/hotreloadd and /usr/bin/hotreloadctl are not installed, they are provided
# in a private mount namespace: an overlay on /usr/bin holding the binaries from --bin-dir
# (e.g. target/release) or, by default, two stub scripts. The host's /usr/bin is not
# touched. Works without systemd as PID 1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
bin_dir=""
case "${1:-}" in
  --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
  "") ;;
  *) echo "usage: $0 [--bin-dir DIR]" >&2; exit 64 ;;
esac

die() { echo "verify-units: $*" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null; then
  [ "$(id -u)" = 0 ] || die "systemd-analyze is missing; install the systemd package"
  echo "verify-units: installing systemd (for systemd-analyze)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

work=$(mktemp -d /tmp/verify-units.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/runtime"
chmod 700 "$work/runtime"

# The checks, run either directly or inside the namespace below. Prints every line
# systemd-analyze wrote; exit status 1 when there was any.
cat >"$work/check.sh" <<'CHECK'
#!/bin/bash
set -u
repo=$1 runtime=$2 canary=$3
bad=0
run() {
  local label=$1; shift
  local out
  out=$("$@" 2>&1) || out="${out:+$out$'\n'}(exit status $?)"
  if [ -n "$out" ]; then
    echo "FAIL $label:"; printf '%s\n' "$out" | sed 's/^/    /'; bad=1
  else
    echo "ok   $label"
  fi
}
# Canary: the verifier must complain about an unknown key, or silence proves nothing.
if [ -z "$(systemd-analyze verify --man=no "$canary" 2>&1)" ]; then
  echo "FAIL systemd-analyze printed nothing for a unit with an unknown key; cannot trust it"
  exit 1
fi
run "system: hotreloadd.service hotreloadd.socket" \
  systemd-analyze verify --man=no "$repo/systemd/hotreloadd.service" "$repo/systemd/hotreloadd.socket"
run "user: hotreloadd.service" \
  env XDG_RUNTIME_DIR="$runtime" systemd-analyze --user verify --man=no "$repo/systemd/user/hotreloadd.service"
exit $bad
CHECK
chmod 755 "$work/check.sh"
mkdir -p "$work/canary"
printf '[Service]\nExecStart=/bin/true\nWatchdogSecs=3\n' >"$work/canary/verify-canary.service"
canary=$work/canary/verify-canary.service

if [ -x /usr/bin/hotreloadd ] && [ -x /usr/bin/hotreloadctl ] && [ -z "$bin_dir" ]; then
  "$work/check.sh" "$repo" "$work/runtime" "$canary"
  exit
fi

[ "$(id -u)" = 0 ] || die "/usr/bin/hotreloadd is not installed; run as root to verify with stand-ins"
mkdir -p "$work/upper" "$work/ovl-work"
for b in hotreloadd hotreloadctl; do
  if [ -n "$bin_dir" ]; then
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing or not executable"
    cp "$bin_dir/$b" "$work/upper/$b"
  else
    printf '#!/bin/sh\n# stand-in for systemd-analyze verify\nexit 0\n' >"$work/upper/$b"
    chmod 755 "$work/upper/$b"
  fi
done
# shellcheck disable=SC2016 # the inner script expands its own positional parameters
unshare -m --propagation private bash -c '
  set -e
  mount -t overlay overlay -o "lowerdir=/usr/bin,upperdir=$1,workdir=$2" /usr/bin
  exec "$3" "$4" "$5" "$6"
' _ "$work/upper" "$work/ovl-work" "$work/check.sh" "$repo" "$work/runtime" "$canary"

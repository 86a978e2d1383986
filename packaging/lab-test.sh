#!/bin/bash
# lab-test.sh: test the hotreload .deb under a real systemd 252 (Debian 12) booted by
# ../shared/lab/systemd-lab.sh: units, socket activation, journald, watchdog, the user
# unit and purge, with the real systemctl.
#
#   sudo packaging/lab-test.sh [--deb FILE] [--keep]
#
# Without --deb the package is built first (packaging/build-deb.sh). --keep keeps the
# lab's run directory (guest journal) for inspection. Prints PASS/FAIL per check and
# exits 1 when any check failed. When the lab cannot boot here (not root, no lab script,
# no nspawn or debootstrap, no network for the first rootfs build, ...) it says why IN
# CAPITALS and exits 0: a machine without the lab is not a failure of the package.
#
# The guest script below is self-contained: it installs the .deb (whose postinst enables
# and starts hotreloadd.socket and hotreloadd.service), then checks, in order:
#   1  the service is Type=notify and becomes active only through READY=1 (a runtime
#      drop-in sets TimeoutStartSec=20s, so a daemon that never sends READY=1 fails to
#      start instead of hanging, and WatchdogSec=3s, so step 6 needs seconds, not minutes);
#      it received the control socket from hotreloadd.socket;
#   2  `hotreloadctl status` and socat answer on /run/hotreload/control.sock; the socket
#      is 0660 root:hotreload in a 0751 directory; a member of `hotreload` may connect
#      and disable/enable, a non-member may not connect;
#   3  a plugin put into the configured plugins dir (/var/lib/hotreload/plugins) runs from
#      a snapshot, and `hotreloadctl install --wait` reloads it with a new version and pid;
#   3b reinstalling (the upgrade path: postinst restarts socket and service) leaves a
#      daemon that answers on the new socket;
#   3c a first plugin `demo` (the packaged watch_patterns = ["*"]) installed with
#      `hotreloadctl install demo FILE --wait` runs, and its output is in the journal;
#   4  its output is in `journalctl -u hotreloadd` at info priority, a skipped plugin dir
#      shows up at warning priority, and no message carries a literal <N> prefix;
#   5  `systemctl reload` succeeds and keeps the main pid; with an invalid configuration
#      it fails and the daemon keeps running;
#   5b under the unit's sandbox, a plugin with `user = "nobody"` runs as uid 65534 from
#      its snapshot, writes its runtime.json, and `stop_signal = "SIGINT"` stops it;
#   6  WatchdogSec=3s: after more than twice that, NRestarts=0;
#   6b containment (Delegate=yes): the daemon lives in .../hotreloadd.service/supervisor
#      and each plugin in its own cgroup; a plugin's setsid escapee stays in that cgroup,
#      counts in `tasks`, and is gone after a reload; after `systemctl kill -s KILL
#      hotreloadd` (and with --kill-who=main, the daemon alone) the restarted daemon runs
#      exactly one instance of the plugin; removing the plugin dir leaves no process;
#   7  restarting the socket unit restarts the daemon, which answers on the new socket;
#      stopping the service leaves no plugin process; the socket unit then starts the
#      service on the first connection; stopping both leaves no socket file; with the
#      socket unit masked the daemon binds and on stop removes the socket itself;
#   8  the user unit runs under `lab-user systemctl --user`, answers on
#      $XDG_RUNTIME_DIR/hotreload/control.sock and runs a plugin from
#      ~/.config/hotreload/plugins;
#   9  `dpkg --purge` stops everything and removes every file, directory, unit link and
#      the group.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
LAB=${SYSTEMD_LAB:-$repo/../shared/lab/systemd-lab.sh}
deb=""
keep=()
while [ $# -gt 0 ]; do
  case "$1" in
    --deb) deb=$(realpath "${2:?--deb needs a file}"); shift 2 ;;
    --keep) keep=(--keep); shift ;;
    *) echo "usage: $0 [--deb FILE] [--keep]" >&2; exit 64 ;;
  esac
done

cannot() {
  echo "LAB TEST NOT RUN: $(printf '%s' "$*" | tr '[:lower:]' '[:upper:]')"
  exit 0
}

[ "$(id -u)" = 0 ] || cannot "the systemd lab needs root (systemd-nspawn, overlay mounts)"
[ -x "$LAB" ] || [ -f "$LAB" ] || cannot "no lab script at $LAB"

if [ -z "$deb" ]; then
  deb=$("$here/build-deb.sh" | tail -n 1) || { echo "lab-test: building the .deb failed" >&2; exit 1; }
fi
[ -f "$deb" ] || { echo "lab-test: no package at $deb" >&2; exit 1; }

# Can the lab boot at all? (Builds the cached rootfs on first use, about a minute.)
if ! probe=$(bash "$LAB" run --timeout 120 'systemctl is-system-running' 2>&1); then
  printf '%s\n' "$probe" | tail -n 15
  cannot "the systemd lab could not boot on this machine (see the lab's messages above)"
fi

work=$(mktemp -d /tmp/hotreload-lab-test.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Two builds of a test plugin: POSIX shell, so they pass pre-flight (#! + existing
# interpreter) without compiling anything. Each says which build it is on stdout and on
# stderr, and exits 0 on SIGTERM.
for build in 1 2; do
  cat >"$work/demo_scanner.$build" <<PLUGIN
#!/bin/sh
# hotreload lab test plugin, build $build
echo "demo_scanner build $build running as pid \$\$ from \$HOTRELOAD_PLUGIN_DIR"
echo "demo_scanner build $build writes to stderr" >&2
trap 'echo "demo_scanner build $build stopping"; exit 0' TERM
while :; do sleep 1 & wait \$!; done
PLUGIN
  chmod 755 "$work/demo_scanner.$build"
  # A plugin with an escapee: it leaves the plugin's session and process group (setsid).
  cat >"$work/escape_scanner.$build" <<PLUGIN
#!/bin/sh
# hotreload lab test plugin with an escapee, build $build
setsid sh -c 'echo \$\$ >"\$0"; exec sleep 4242' "\$HOTRELOAD_PLUGIN_DIR/escapee.$build.pid" &
trap 'exit 0' TERM
while :; do sleep 1 & wait \$!; done
PLUGIN
  chmod 755 "$work/escape_scanner.$build"
done
cp "$deb" "$work/hotreload.deb"

cat >"$work/guest.sh" <<'GUEST'
#!/bin/bash
# Runs inside the lab guest as root. One PASS/FAIL line per check; exit status = failures.
set -u
L=/root/lab
SOCK=/run/hotreload/control.sock
PLUGINS=/var/lib/hotreload/plugins
fails=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }
check() { local name=$1; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }
note() { echo "     $*"; }
# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds or the deadline passes.
wait_for() {
  local deadline=$(( $(date +%s%N) + $1 * 1000000000 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s%N)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
prop() { systemctl show -P "$1" "${2:-hotreloadd.service}"; }
# JSON field of a plugin in `hotreloadctl --json list` (or of the user daemon with -u).
plugin_field() {
  local ctl=(hotreloadctl --json list)
  if [ "$1" = -u ]; then ctl=(lab-user hotreloadctl --json list); shift; fi
  "${ctl[@]}" 2>/dev/null | python3 -c '
import json, sys
want, field = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    for p in json.loads(line).get("plugins", []):
        if p.get("id") == want:
            v = p.get(field)
            print("null" if v is None else v)
            sys.exit(0)
sys.exit(1)' "$1" "$2"
}
plugin_running() { [ "$(plugin_field "$@" state)" = running ]; }
# 0 when the answer read from stdin is one JSON object with "status": "success".
json_success() { python3 -c '
import json, sys
lines = [l for l in sys.stdin.read().splitlines() if l.strip()]
sys.exit(0 if lines and json.loads(lines[0]).get("status") == "success" else 1)'; }
socat_status() { echo status | socat -t 5 - "UNIX-CONNECT:$1" | json_success; }
# Processes that are (children of) plugin $1: their environment names the plugin.
plugin_pids() {
  grep -l -s -a "HOTRELOAD_PLUGIN_ID=$1" /proc/[0-9]*/environ 2>/dev/null |
    sed 's|/proc/\([0-9]*\)/environ|\1|' | grep -v "^$$\$" || true
}
no_plugin_processes() { [ -z "$(plugin_pids demo_scanner)" ]; }
holders() { ss -xlpn 2>/dev/null | grep -F " $1 " | grep -o '(("[^"]*"\|("[^"]*"' | tr -d '("' | sort -u | tr '\n' ' '; }
diagnostics() {
  echo "----- diagnostics"
  systemctl status hotreloadd.service hotreloadd.socket --no-pager -l 2>&1 | head -40
  journalctl -u hotreloadd --no-pager -n 60 -o short-monotonic 2>&1
}

echo "== 0 install"
if dpkg -i $L/hotreload.deb >$L/dpkg-i.log 2>&1; then pass "dpkg -i"; else fail "dpkg -i"; cat $L/dpkg-i.log; fi
check "group hotreload created" getent group hotreload
check "hotreloadd.service enabled" sh -c '[ "$(systemctl is-enabled hotreloadd.service)" = enabled ]'
check "hotreloadd.socket enabled" sh -c '[ "$(systemctl is-enabled hotreloadd.socket)" = enabled ]'
check "postinst started hotreloadd.socket" systemctl is-active -q hotreloadd.socket
note "after dpkg -i: service $(systemctl is-active hotreloadd.service), socket $(systemctl is-active hotreloadd.socket)"

echo "== 1 Type=notify: active only through READY=1"
mkdir -p /run/systemd/system/hotreloadd.service.d
cat >/run/systemd/system/hotreloadd.service.d/lab.conf <<'EOF'
[Service]
TimeoutStartSec=20s
WatchdogSec=3s
EOF
systemctl daemon-reload
check "Type=notify" sh -c '[ "$(systemctl show -P Type hotreloadd)" = notify ]'
check "NotifyAccess=main" sh -c '[ "$(systemctl show -P NotifyAccess hotreloadd)" = main ]'
t0=$(date +%s%N)
if systemctl restart hotreloadd.service; then pass "systemctl restart hotreloadd (start job completed)"
else fail "systemctl restart hotreloadd (start job failed: no READY=1 within 20 s?)"; fi
t1=$(date +%s%N)
watchdog_since=$(date +%s)
note "start took $(( (t1 - t0) / 1000000 )) ms; $(systemctl show -p ActiveState -p SubState -p Result -p StatusText hotreloadd | tr '\n' ' ')"
check "active (running)" sh -c '[ "$(systemctl show -P ActiveState hotreloadd)" = active ] && [ "$(systemctl show -P SubState hotreloadd)" = running ]'
check "STATUS= text sent" sh -c '[ -n "$(systemctl show -P StatusText hotreloadd)" ]'
MAINPID=$(prop MainPID)
check "daemon received the control socket (LISTEN_FDNAMES=control)" \
  sh -c "tr '\\0' '\\n' </proc/$MAINPID/environ | grep -qx LISTEN_FDNAMES=control"
note "control.sock held by: $(holders $SOCK)"
check "watchdog armed (WATCHDOG_USEC=3000000)" \
  sh -c "tr '\\0' '\\n' </proc/$MAINPID/environ | grep -qx WATCHDOG_USEC=3000000"

echo "== 2 control socket"
check "hotreloadctl status" sh -c 'out=$(hotreloadctl status) && [ -n "$out" ] && printf "%s\n" "$out" | sed "s/^/     | /"'
check "hotreloadctl --json status: success" sh -c 'hotreloadctl --json status | python3 -c "
import json,sys; sys.exit(0 if json.loads(sys.stdin.readline())[\"status\"] == \"success\" else 1)"'
check "socat status on $SOCK" socat_status $SOCK
check "socket is 0660 root:hotreload" sh -c "[ \"\$(stat -c '%a %U %G' $SOCK)\" = '660 root hotreload' ]"
check "/run/hotreload is 0751 root:root" sh -c "[ \"\$(stat -c '%a %U %G' /run/hotreload)\" = '751 root root' ]"
check "a member of hotreload can connect" \
  setpriv --reuid=labuser --regid=labuser --groups=hotreload bash -c "echo status | socat -t 5 - UNIX-CONNECT:$SOCK | grep -q success"
check "a member of hotreload may disable and enable" \
  setpriv --reuid=labuser --regid=labuser --groups=hotreload bash -c \
    "echo disable | socat -t 5 - UNIX-CONNECT:$SOCK | grep -q '\"enabled\": *false' &&
     echo enable | socat -t 5 - UNIX-CONNECT:$SOCK | grep -q '\"enabled\": *true'"
check "a non-member cannot connect (EACCES)" \
  setpriv --reuid=labuser --regid=labuser --clear-groups bash -c "echo status | socat -t 5 - UNIX-CONNECT:$SOCK 2>&1 | grep -q 'Permission denied'"

echo "== 3 plugin runs and is reloaded by hotreloadctl install --wait"
mkdir -p "$PLUGINS/demo_scanner"
install -m 0755 $L/demo_scanner.1 "$PLUGINS/demo_scanner/demo_scanner"
if wait_for 15 plugin_running demo_scanner; then pass "demo_scanner running"; else fail "demo_scanner running"; fi
pid1=$(plugin_field demo_scanner pid); ver1=$(plugin_field demo_scanner version)
note "build 1: pid $pid1 version $ver1"
check "plugin process alive" sh -c "[ '${pid1:-0}' -gt 1 ] 2>/dev/null && kill -0 '$pid1'"
check "runs from its snapshot /run/hotreload/snapshots/demo_scanner/$ver1" \
  sh -c "tr '\\0' ' ' </proc/$pid1/cmdline | grep -q /run/hotreload/snapshots/demo_scanner/$ver1"
if hotreloadctl install demo_scanner $L/demo_scanner.2 --wait; then pass "hotreloadctl install --wait"
else fail "hotreloadctl install --wait"; fi
pid2=$(plugin_field demo_scanner pid); ver2=$(plugin_field demo_scanner version)
note "build 2: pid $pid2 version $ver2"
check "new version" sh -c "[ -n '$ver2' ] && [ '$ver2' != '$ver1' ] && [ '$ver2' != null ]"
check "new pid, old one gone" sh -c "[ '$pid2' != '$pid1' ] && ! kill -0 $pid1 2>/dev/null"
check "running" plugin_running demo_scanner
check "state file names the new version" \
  grep -q "\"$ver2\"" /var/lib/hotreload/state/plugins/demo_scanner/state.json

echo "== 3b upgrade path (reinstall: postinst restarts service and socket)"
if dpkg -i $L/hotreload.deb >$L/dpkg-i2.log 2>&1; then pass "dpkg -i again"; else fail "dpkg -i again"; cat $L/dpkg-i2.log; fi
check "service active after the restart" wait_for 10 systemctl is-active -q hotreloadd.service
check "socket answers after the restart (daemon has the new socket)" socat_status $SOCK
check "plugin running after the restart" wait_for 15 plugin_running demo_scanner
watchdog_since=$(date +%s)

echo "== 3c first use: hotreloadctl install demo FILE --wait with the packaged configuration"
# Self-contained (issue 13): a user's first plugin, named like nothing in particular, is
# supervised by the shipped watch_patterns = ["*"]; install creates its dir and waits for
# its first start; its output reaches the journal. The plugin is removed again afterwards.
first_use_demo() {
  local build=$L/demo.build
  cat >"$build" <<'PLUGIN'
#!/bin/sh
echo "demo first-use plugin running as pid $$"
trap 'exit 0' TERM
while :; do sleep 1 & wait $!; done
PLUGIN
  chmod 755 "$build"
  if hotreloadctl install demo "$build" --wait; then
    pass "hotreloadctl install demo FILE --wait"
  else
    fail "hotreloadctl install demo FILE --wait"
  fi
  check "demo running" wait_for 15 plugin_running demo
  check "demo's output in journalctl -u hotreloadd" wait_for 10 sh -c \
    'journalctl -u hotreloadd -o cat --no-pager | grep -qF "[demo] demo first-use plugin running as pid"'
  rm -rf "$PLUGINS/demo"
  check "demo gone once its dir is removed" wait_for 10 sh -c '! hotreloadctl plugin demo >/dev/null 2>&1'
}
first_use_demo

echo "== 4 journal"
mkdir -p "$PLUGINS/bad name_scanner"
journal_has() {  # journal_has PRIORITY SUBSTRING...: an entry of the unit with that priority
  journalctl -u hotreloadd -o json --no-pager | python3 -c '
import json, sys
prio, subs = sys.argv[1], sys.argv[2:]
for line in sys.stdin:
    e = json.loads(line)
    m = e.get("MESSAGE")
    if isinstance(m, str) and all(s in m for s in subs) and (prio == "*" or e.get("PRIORITY") == prio):
        sys.exit(0)
sys.exit(1)' "$@"
}
if wait_for 10 journal_has 6 '[demo_scanner]' 'build 1 running as pid'; then
  pass "plugin stdout in journal at priority 6 (info)"
else
  fail "plugin stdout in journal at priority 6 (info)"
fi
check "plugin stderr in journal" journal_has '*' '[demo_scanner]' 'build 1 writes to stderr'
check "build 2 output in journal" journal_has '*' '[demo_scanner]' 'build 2 running as pid'
check "'hot reload completed' at priority 6" journal_has 6 'hot reload completed'
if wait_for 10 journal_has 4 'bad name_scanner'; then pass "skipped plugin dir warned at priority 4 (warning)"
else fail "skipped plugin dir warned at priority 4 (warning)"; fi
check "no literal <N> prefix in messages" sh -c '! journalctl -u hotreloadd -o cat --no-pager | grep -q "^<[0-7]>"'
note "priorities of [demo_scanner] lines: $(journalctl -u hotreloadd -o json --no-pager | python3 -c '
import json,sys,collections
c=collections.Counter(json.loads(l).get("PRIORITY") for l in sys.stdin if "[demo_scanner]" in str(json.loads(l).get("MESSAGE")))
print(dict(c))')"
rmdir "$PLUGINS/bad name_scanner"

echo "== 5 systemctl reload"
pid_before=$(prop MainPID)
check "systemctl reload" systemctl reload hotreloadd
check "same main pid, still active" sh -c "[ \"\$(systemctl show -P MainPID hotreloadd)\" = $pid_before ] && systemctl is-active -q hotreloadd"
cp /etc/hotreload/hotreload.toml $L/hotreload.toml.orig
# A top-level unknown key: invalid wherever the file's tables end.
sed -i '1i no_such_key = 1' /etc/hotreload/hotreload.toml
check "systemctl reload fails for an invalid configuration" \
  sh -c 'systemctl is-active -q hotreloadd && ! systemctl reload hotreloadd'
# --socket: the client does not read the (now invalid) configuration file then.
check "daemon kept running with the old configuration" \
  sh -c "[ \"\$(systemctl show -P MainPID hotreloadd)\" = $pid_before ] && systemctl is-active -q hotreloadd &&
         hotreloadctl --socket $SOCK status >/dev/null"
cp $L/hotreload.toml.orig /etc/hotreload/hotreload.toml
check "systemctl reload after the fix" systemctl reload hotreloadd

echo "== 5b user = nobody, stop_signal, under the sandbox"
cat >>/etc/hotreload/hotreload.toml <<'TOML'

[plugins.nobody_scanner]
user        = "nobody"
stop_signal = "SIGINT"
TOML
check "systemctl reload with user = nobody" systemctl reload hotreloadd
mkdir -p "$PLUGINS/nobody_scanner"
cat >$L/nobody_scanner <<'PLUGIN'
#!/bin/sh
echo '{"as": "'"$(id -un)"'"}' >"$HOTRELOAD_RUNTIME_FILE"
trap 'echo "nobody_scanner got SIGINT"; exit 0' INT
while :; do sleep 1 & wait $!; done
PLUGIN
install -m 0755 $L/nobody_scanner "$PLUGINS/nobody_scanner/nobody_scanner"
if wait_for 15 plugin_running nobody_scanner; then pass "nobody_scanner running"; else fail "nobody_scanner running"; fi
npid=$(plugin_field nobody_scanner pid)
note "nobody_scanner pid $npid: $(grep -E '^(Uid|Gid|Groups):' /proc/$npid/status 2>&1 | tr '\t\n' '  ')"
check "it runs as uid 65534 (real, effective, saved, fs)" \
  sh -c "grep -q '^Uid:[[:space:]]*65534[[:space:]]*65534[[:space:]]*65534[[:space:]]*65534\$' /proc/$npid/status"
check "it wrote its runtime.json as nobody" wait_for 5 \
  sh -c "[ \"\$(stat -c %U /var/lib/hotreload/state/plugins/nobody_scanner/runtime.json)\" = nobody ]"
rm -rf "$PLUGINS/nobody_scanner"
check "its removal stops it with SIGINT" wait_for 10 journal_has '*' '[nobody_scanner]' 'nobody_scanner got SIGINT'
cp $L/hotreload.toml.orig /etc/hotreload/hotreload.toml
check "systemctl reload without it" systemctl reload hotreloadd

echo "== 6 watchdog"
while [ $(( $(date +%s) - watchdog_since )) -lt 8 ]; do sleep 0.5; done
note "$(systemctl show -p WatchdogUSec -p NRestarts -p ActiveState hotreloadd | tr '\n' ' ')"
check "WatchdogSec=3s in effect" sh -c '[ "$(systemctl show -P WatchdogUSec hotreloadd)" = 3s ]'
check "NRestarts=0 after 8 s with a 3 s watchdog" sh -c '[ "$(systemctl show -P NRestarts hotreloadd)" = 0 ] && systemctl is-active -q hotreloadd'
check "no watchdog timeout logged" sh -c '! journalctl -u hotreloadd -o cat --no-pager | grep -q "Watchdog timeout"'

echo "== 6b containment: each plugin in its own cgroup (Delegate=yes)"
UNIT_CG=/system.slice/hotreloadd.service
# Live processes of plugin $1 running `sleep 4242` (the escapee's marker).
escapees() {
  local p n=0
  for p in $(plugin_pids "$1"); do
    [ "$(tr '\0' ' ' </proc/$p/cmdline 2>/dev/null)" = "sleep 4242 " ] && n=$((n + 1))
  done
  echo $n
}
cgroup_of() { sed -n 's/^0:://p' "/proc/$1/cgroup" 2>/dev/null; }
gone() { ! kill -0 "${1:-0}" 2>/dev/null; }
one_escapee() { [ "$(escapees escape_scanner)" = 1 ]; }
in_own_cgroup() { cgroup_of "$1" | grep -qx "$UNIT_CG/plugin-$2-[0-9]*"; }
check "Delegate=yes in effect" sh -c '[ "$(systemctl show -P Delegate hotreloadd)" = yes ]'
note "delegate xattr: $(python3 -c "import os; print(os.getxattr('/sys/fs/cgroup$UNIT_CG', 'trusted.delegate'))" 2>&1)"
check "the daemon moved itself into $UNIT_CG/supervisor" \
  sh -c "[ \"\$(sed -n 's/^0:://p' /proc/$(prop MainPID)/cgroup)\" = $UNIT_CG/supervisor ]"
pid=$(plugin_field demo_scanner pid)
note "demo_scanner pid $pid in cgroup $(cgroup_of "$pid")"
check "demo_scanner runs in its own cgroup" in_own_cgroup "$pid" demo_scanner
mkdir -p "$PLUGINS/escape_scanner"
install -m 0755 $L/escape_scanner.1 "$PLUGINS/escape_scanner/escape_scanner"
if wait_for 15 plugin_running escape_scanner; then pass "escape_scanner running"; else fail "escape_scanner running"; fi
wait_for 10 test -s "$PLUGINS/escape_scanner/escapee.1.pid"
esc1=$(cat "$PLUGINS/escape_scanner/escapee.1.pid" 2>/dev/null)
lead1=$(plugin_field escape_scanner pid)
note "build 1: pid $lead1 in $(cgroup_of "$lead1"), escapee $esc1 in $(cgroup_of "$esc1") (session $(ps -o sid= -p "$esc1" 2>/dev/null))"
check "the escapee left the plugin's session" sh -c "[ \"\$(ps -o sid= -p $esc1 | tr -d ' ')\" != $lead1 ]"
check "the escapee is in the plugin's cgroup" sh -c "[ -n '$(cgroup_of "$lead1")' ] && [ '$(cgroup_of "$esc1")' = '$(cgroup_of "$lead1")' ]"
tasks_are() { [ "$(plugin_field escape_scanner tasks)" = "$1" ]; }
check "list: tasks = 3 (shell, its sleep, the escapee)" wait_for 5 tasks_are 3
note "list figures: tasks=$(plugin_field escape_scanner tasks) memory_bytes=$(plugin_field escape_scanner memory_bytes) cpu_usage_ms=$(plugin_field escape_scanner cpu_usage_ms) (no controllers in the lab: null)"
if hotreloadctl install escape_scanner $L/escape_scanner.2 --wait >/dev/null; then pass "reload escape_scanner"; else fail "reload escape_scanner"; fi
check "the old escapee is gone after the reload" wait_for 10 gone "$esc1"
check "the new build's escapee runs" wait_for 10 test -s "$PLUGINS/escape_scanner/escapee.2.pid"
check "exactly one escapee" one_escapee
for who in all main; do
  main_before=$(prop MainPID)
  esc_before=$(cat "$PLUGINS/escape_scanner/escapee.2.pid" 2>/dev/null)
  rm -f "$PLUGINS/escape_scanner/escapee.2.pid"
  systemctl kill -s KILL --kill-who=$who hotreloadd
  restarted() { systemctl is-active -q hotreloadd && [ "$(prop MainPID)" != "$main_before" ] && [ "$(prop MainPID)" != 0 ]; }
  check "kill -s KILL --kill-who=$who: systemd restarts the daemon" wait_for 20 restarted
  check "... escape_scanner running again" wait_for 15 plugin_running escape_scanner
  check "... the killed daemon's escapee $esc_before is gone" wait_for 10 gone "$esc_before"
  wait_for 10 test -s "$PLUGINS/escape_scanner/escapee.2.pid"
  one_instance() { one_escapee && [ "$(plugin_pids escape_scanner | wc -l)" -le 3 ]; }
  check "... exactly one instance: one escapee, at most 3 plugin processes" wait_for 5 one_instance
  note "plugin processes now: $(plugin_pids escape_scanner | tr '\n' ' ')"
  check "... the new instance runs in its own cgroup" in_own_cgroup "$(plugin_field escape_scanner pid)" escape_scanner
done
systemctl reset-failed hotreloadd.service
esc_last=$(cat "$PLUGINS/escape_scanner/escapee.2.pid" 2>/dev/null)
rm -rf "$PLUGINS/escape_scanner"
check "removing the plugin dir leaves none of its processes (escapee $esc_last included)" \
  wait_for 10 sh -c "[ -z \"\$(grep -l -s -a HOTRELOAD_PLUGIN_ID=escape_scanner /proc/[0-9]*/environ)\" ]"
note "cgroups below the unit: $(cd /sys/fs/cgroup$UNIT_CG && ls -d */ 2>/dev/null | tr '\n' ' ')"
check "plugins are created inside their cgroup (clone3 allowed: no cgroup migration per start)" \
  sh -c '! journalctl -u hotreloadd -o cat --no-pager | grep -q "clone3 is not allowed"'
check "only the daemon's leaf and demo_scanner's cgroup remain" sh -c \
  "[ \$(cd /sys/fs/cgroup$UNIT_CG && ls -d */ | wc -l) = 2 ]"

echo "== 7 stop, socket activation"
pid_before=$(prop MainPID)
check "systemctl restart hotreloadd.socket alone" systemctl restart hotreloadd.socket
check "... restarts the daemon with it (PartOf=)" wait_for 10 \
  sh -c "systemctl is-active -q hotreloadd.service && [ \"\$(systemctl show -P MainPID hotreloadd)\" != $pid_before ]"
check "... and the daemon answers on the new socket" socat_status $SOCK
systemctl stop hotreloadd.service
check "service stopped" sh -c '! systemctl is-active -q hotreloadd.service'
check "no plugin process after stop" wait_for 5 no_plugin_processes
check "socket unit still listening" systemctl is-active -q hotreloadd.socket
check "socket file kept by the socket unit" test -S $SOCK
check "first connection starts the service (socat)" socat_status $SOCK
check "service active after the connection" wait_for 10 systemctl is-active -q hotreloadd.service
check "plugin back" wait_for 15 plugin_running demo_scanner
systemctl stop hotreloadd.socket hotreloadd.service
check "both stopped" sh -c '! systemctl is-active -q hotreloadd.service && ! systemctl is-active -q hotreloadd.socket'
check "no plugin process after stopping both" wait_for 5 no_plugin_processes
check "no socket file after stopping both" test ! -e $SOCK
systemctl mask --runtime -q hotreloadd.socket
systemctl start hotreloadd.service
check "without the socket unit: service active" systemctl is-active -q hotreloadd.service
check "daemon bound $SOCK itself" sh -c "hotreloadctl status >/dev/null && test -S $SOCK"
note "control.sock held by: $(holders $SOCK)"
check "its socket is 0660 root:hotreload ([control] mode, group)" sh -c "[ \"\$(stat -c '%a %U %G' $SOCK)\" = '660 root hotreload' ]"
sock_before=no; [ -S $SOCK ] && sock_before=yes
systemctl stop hotreloadd.service
check "daemon removed its socket on stop" sh -c "[ $sock_before = yes ] && [ ! -e $SOCK ]"
check "no plugin process" wait_for 5 no_plugin_processes
systemctl unmask --runtime -q hotreloadd.socket

echo "== 8 user unit"
check "user unit installed" test -f /usr/lib/systemd/user/hotreloadd.service
lab-user systemctl --user daemon-reload
if lab-user systemctl --user start hotreloadd.service; then pass "systemctl --user start hotreloadd"
else fail "systemctl --user start hotreloadd"; fi
check "user unit active" lab-user systemctl --user is-active -q hotreloadd.service
check "user daemon answers on /run/user/1000/hotreload/control.sock" socat_status /run/user/1000/hotreload/control.sock
check "lab-user hotreloadctl status" sh -c 'out=$(lab-user hotreloadctl status) && [ -n "$out" ]'
check "config dir ~/.config/hotreload created" test -d /home/labuser/.config/hotreload
lab-user mkdir -p /home/labuser/.config/hotreload/plugins/demo_scanner
install -o labuser -g labuser -m 0755 $L/demo_scanner.1 \
  /home/labuser/.config/hotreload/plugins/demo_scanner/demo_scanner
check "user plugin running from ~/.config/hotreload/plugins" wait_for 15 plugin_running -u demo_scanner
upid=$(plugin_field -u demo_scanner pid)
note "user plugin pid $upid in cgroup $(sed -n 's/^0:://p' /proc/$upid/cgroup 2>/dev/null)"
check "user plugin runs in its own cgroup below the user unit's (Delegate=yes)" \
  sh -c "sed -n 's/^0:://p' /proc/$upid/cgroup | grep -q '/hotreloadd.service/plugin-demo_scanner-[0-9]*\$'"
check "user journal has the plugin's output" \
  wait_for 5 sh -c 'journalctl _SYSTEMD_USER_UNIT=hotreloadd.service -o cat --no-pager | grep -q "build 1 running as pid"'
lab-user systemctl --user stop hotreloadd.service
check "user plugin stopped" wait_for 5 no_plugin_processes

echo "== 9 purge"
systemctl start hotreloadd.service
check "running again before purge" sh -c 'systemctl is-active -q hotreloadd.service && systemctl is-active -q hotreloadd.socket'
wait_for 15 plugin_running demo_scanner || note "plugin did not come back before purge"
dpkg --purge hotreload >$L/dpkg-purge.log 2>&1 || { fail "dpkg --purge"; cat $L/dpkg-purge.log; }
systemctl daemon-reload
check "service and socket stopped" sh -c '! systemctl is-active -q hotreloadd.service && ! systemctl is-active -q hotreloadd.socket'
check "no daemon process" sh -c '! pgrep -x hotreloadd'
check "no plugin process" wait_for 5 no_plugin_processes
for p in /usr/bin/hotreloadd /usr/bin/hotreloadctl /etc/hotreload /var/lib/hotreload /run/hotreload \
         /usr/lib/systemd/system/hotreloadd.service /usr/lib/systemd/system/hotreloadd.socket \
         /usr/lib/systemd/user/hotreloadd.service /usr/share/doc/hotreload; do
  check "gone: $p" test ! -e "$p"
done
check "no unit links or deb-systemd-helper state" \
  sh -c '[ -z "$(find /etc/systemd /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked -name "hotreloadd*" 2>/dev/null)" ]'
check "systemd no longer knows the units" sh -c '[ -z "$(systemctl list-unit-files --no-legend "hotreloadd*")" ]'
check "group hotreload removed" sh -c '! getent group hotreload'
check "dpkg forgot the package" sh -c '! dpkg-query -W -f="\${db:Status-Status}" hotreload 2>/dev/null | grep -qv "^not-installed$"'

[ "$fails" -eq 0 ] || diagnostics
echo "fails=$fails"
exit "$fails"
GUEST
chmod 755 "$work/guest.sh"

echo "lab-test: testing $deb in $LAB"
rc=0
bash "$LAB" run ${keep[@]+"${keep[@]}"} --timeout 300 --copy-in "$work:/root/lab" \
  'bash /root/lab/guest.sh' || rc=$?
case "$rc" in
  0)   echo "lab-test: all checks passed" ;;
  125) echo "lab-test: the guest commands did not finish (timeout); see the lab's messages above"; exit 1 ;;
  130) echo "lab-test: interrupted"; exit 130 ;;
  *)   echo "lab-test: $rc check(s) failed"; exit 1 ;;
esac

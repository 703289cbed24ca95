#!/usr/bin/env bash
# The C tests of libshm_nt under Wine (issue 15), run by .ci/windows with its environment:
# the programs of crates/shm-nt/tests/c/ (shm_test.c, eager.c, damaged_heap.c, cpp_test.cpp)
# compiled with mingw against shm_nt.dll's import library and run as real Windows processes,
# several where tests/{c,eager,damage}.rs use several on Linux; where those drive a step from
# Rust, a helper mode of the C program does it here. Each case uses a private shm directory
# and checks that it ends up empty. Every process is bounded by `timeout`.
#
#   ci/windows/c_tests.sh BIN_DIR   (BIN_DIR holds shm_nt.dll and libshm_nt.dll.a)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$1
work=$WINE_TMP/c-tests
rm -rf "$work"
mkdir -p "$work"
cp "$bin/shm_nt.dll" "$work/"
cc() {
    x86_64-w64-mingw32-gcc -std=c11 -Wall -Wextra -Werror -O1 -Icrates/shm-nt/include \
        "crates/shm-nt/tests/c/$1.c" -o "$work/$1.exe" "$bin/libshm_nt.dll.a"
}
cc shm_test
cc eager
cc damaged_heap
exe=$work/shm_test.exe
# A hung process fails its case instead of stalling CI (the slowest, 20 kill rounds, takes ~10 s).
limit=120

fail() {
    echo "c_tests: FAILED: $*" >&2
    exit 1
}

# A private shm directory for one case, as Unix path and as Wine path (Z: is the Unix root).
case_dir() {
    local d=$work/shm-$1
    mkdir -p "$d"
    echo "$d"
}
winpath() { echo "Z:${1//\//\\}"; }

# run CASE MODE [ARG]: runs one process of the case, output in $work/CASE.MODE.out.
run() {
    local c=$1
    shift
    local d
    d=$(case_dir "$c")
    SHMGADGET_DOMAIN=c-$c-$$ SHMGADGET_SHM_DIR=$(winpath "$d") timeout $limit wine "$exe" "$@" >"$work/$c.$1.out" 2>&1
}

# prog CASE PROGRAM ARGS...: one process of another program, in the case's domain, on stdout.
prog() {
    local c=$1 p=$2
    shift 2
    local d
    d=$(case_dir "$c")
    SHMGADGET_DOMAIN=c-$c-$$ SHMGADGET_SHM_DIR=$(winpath "$d") timeout $limit wine "$work/$p.exe" "$@"
}

# The CLI in a case's domain.
case_cli() {
    local c=$1
    shift
    SHMGADGET_SHM_DIR=$(winpath "$(case_dir "$c")") timeout $limit wine "$bin/shmgadget.exe" -d "c-$c-$$" "$@"
}

expect() {
    grep -q "$2" "$work/$1.out" || { cat "$work/$1.out" >&2; fail "$1: no '$2'"; }
}

empty() {
    local left
    left=$(ls -A "$work/shm-$1")
    [[ -z $left ]] || fail "$1: the domain left files: $left"
}

# A list built by one process is walked (by first touch) and freed by another.
run list build || fail "list build"
expect list.build "built 100000 nodes"
run list walk || { cat "$work/list.walk.out"; fail "list walk"; }
expect list.walk "walked 100000 nodes, sum ok, heap consistent"
echo "c_tests: list: built by one process, walked and freed by another"

# Two processes pass 1000 messages through a queue, started with a semaphore.
run queue reader &
reader=$!
run queue writer || { cat "$work/queue.writer.out"; fail "queue writer"; }
wait $reader || { cat "$work/queue.reader.out"; fail "queue reader"; }
expect queue.reader "received 1000 messages, then disconnected"
echo "c_tests: queue: 1000 messages between two processes, then disconnected"

# Every error code reaches a C caller; SHM_ERR_OS with the window occupied in a new process.
run errors errors || { cat "$work/errors.errors.out"; fail "errors"; }
expect errors.errors "errors done"
expect errors.errors "corrupt: .*tag"
grep "^huge:" "$work/errors.errors.out" || true
grep "^permission:" "$work/errors.errors.out" || true
small=$(sed -n 's/^small at //p' "$work/errors.errors.out")
run errors os_error "$small" || { cat "$work/errors.os_error.out"; fail "os_error"; }
echo "c_tests: errors: every code, SHM_ERR_OS with the window occupied"

# A program that deletes what it made and returns from main leaves nothing.
run tidy tidy || { cat "$work/tidy.tidy.out"; fail "tidy"; }
expect tidy.tidy "tidy done"
empty tidy
echo "c_tests: tidy: nothing of the domain remains after main returns"

# Returning from main while another thread uses shared memory exits cleanly (20 rounds).
for round in $(seq 1 20); do
    run busy exit_while_busy || { cat "$work/busy.exit_while_busy.out"; fail "busy round $round"; }
    # As tests/c.rs does: the next round starts from nothing (this one's objects stay).
    rm -rf "${work:?}/shm-busy"
done
echo "c_tests: busy: 20 exits while a thread used shared memory, all clean"

# Sections of the cases that leave them (errors, list, queue) are deleted by the CLI.
for c in list queue errors; do
    d=$work/shm-$c
    SHMGADGET_SHM_DIR=$(winpath "$d") wine "$bin/shmgadget.exe" -d "c-$c-$$" gc >/dev/null 2>&1 || true
done

run fork fork_exit || fail "fork_exit"
cat "$work/fork.fork_exit.out"

# The kill rounds: TerminateProcess from a second C process (what ends a Windows process that
# crashed or was killed; `kill -9` of a Wine process would test wineserver's Unix side instead).
# Names whose creator was terminated mid-create are usable at once by the process that stayed.
run kills kill_rounds 40 || { cat "$work/kills.kill_rounds.out"; fail "kill rounds"; }
cat "$work/kills.kill_rounds.out"
empty kills
# A domain whose first process was terminated while making it is usable at once, then empty.
run firstkill first_kill 15 || { cat "$work/firstkill.first_kill.out"; fail "first kill"; }
cat "$work/firstkill.first_kill.out"
empty firstkill
# A 64 MiB heap whose user was terminated mid-traffic (4 threads): checked clean, 4 MiB allocated
# after each of 20 rounds.
run traffic kill_traffic 20 || { cat "$work/traffic.kill_traffic.out"; fail "kill traffic"; }
cat "$work/traffic.kill_traffic.out"
empty traffic
# wait_line FILE LINE: waits (60 s at most) until the output file $work/FILE has the line LINE.
wait_line() {
    local i
    for i in $(seq 1 600); do
        grep -qx "$2"$'\r\\?' "$work/$1" 2>/dev/null && return 0
        sleep 0.1
    done
    cat "$work/$1" >&2
    fail "$1: no line '$2' within 60 s"
}

# Eager mode (no first-touch handler, as tests/eager.rs): a process attached with
# SHMGADGET_EAGER=1 frees and reallocs blocks of a heap another process created after it.
mkfifo "$work/eager.in"
SHMGADGET_EAGER=1 prog eager eager <"$work/eager.in" >"$work/eager.out" 2>&1 &
eager=$!
exec 7>"$work/eager.in"
wait_line eager.out READY
addrs=$(prog eager eager late 1000) || fail "eager: the late heap"
echo "$addrs" >&7
exec 7>&-
wait $eager || { cat "$work/eager.out"; fail "eager: the eager process failed"; }
expect eager "eager ok"
case_cli eager heap late --check >"$work/eager.check.out" 2>&1 || { cat "$work/eager.check.out"; fail "eager: heap --check"; }
expect eager.check "consistent"
expect eager.check "in 0 blocks"
case_cli eager rm late anchor >/dev/null
empty eager
echo "c_tests: eager: an eager process freed and realloc'd blocks of a heap created after it attached (heap consistent, 0 blocks used)"

# A heap damaged at random (as tests/damage.rs, with its generator): open, check, list,
# allocate and free from C return errors or correct results; never a crash, an internal
# error or a run over 10 s.
seeds=${SHMGADGET_DAMAGE_SEEDS:-12}
errors=0
for seed in $(seq 1 "$seeds"); do
    prog damage damaged_heap build victim 4194304 >/dev/null || fail "damage seed $seed: build"
    obj=$(ls "$work/shm-damage" | grep 'victim$')
    what=$(prog damage damaged_heap damage "$(winpath "$work/shm-damage/$obj")" "$seed") ||
        fail "damage seed $seed: damage"
    rc=0
    limit=10 prog damage damaged_heap victim 4194304 >"$work/damage.out" 2>&1 || rc=$?
    [[ $rc -eq 0 ]] || { cat "$work/damage.out" >&2; fail "damage seed $seed ($what): ended with $rc (124: over 10 s)"; }
    expect damage "^done"
    ! grep -q INTERNAL "$work/damage.out" || { cat "$work/damage.out" >&2; fail "damage seed $seed ($what): internal error"; }
    [[ -n ${SHMGADGET_DAMAGE_VERBOSE:-} ]] && echo "seed $seed ($what): $(tr '\n' ' ' <"$work/damage.out")"
    errors=$((errors + $(grep -c ': ' "$work/damage.out" || true)))
    case_cli damage rm victim >/dev/null
    empty damage
done
[[ $errors -gt 0 ]] || fail "damage: the damage was never noticed in $seeds seeds"
echo "c_tests: damage: $seeds seeds of a damaged heap, $errors errors reported, no crash, no hang"

# The objects heap stays while another process uses its semaphores and goes with its last
# user (tests/c.rs's sem_user, the two processes coordinated through stdout and a fifo).
mkfifo "$work/sem.in"
run sem sem_user first &
first=$!
wait_line sem.sem_user.out READY
d=$(case_dir sem)
SHMGADGET_DOMAIN=c-sem-$$ SHMGADGET_SHM_DIR=$(winpath "$d") timeout $limit wine "$exe" sem_user second \
    <"$work/sem.in" >"$work/sem.second.out" 2>&1 &
second=$!
exec 8>"$work/sem.in"
wait_line sem.second.out WAITING
wait $first || { cat "$work/sem.sem_user.out"; fail "sem_user first"; }
n=$(ls "$d" | grep -c 'shm_nt.objects$' || true)
[[ $n -eq 1 ]] || fail "sem_user: the objects heap went while the second process used it: $(ls "$d")"
echo go >&8
exec 8>&-
wait $second || { cat "$work/sem.second.out"; fail "sem_user second"; }
expect sem.second "sem_user second done"
empty sem
echo "c_tests: sem_user: the objects heap stayed while the second process used it, went with it"

# The header from C++ (mingw g++; libstdc++ linked statically, so no DLL of it is needed).
x86_64-w64-mingw32-g++ -std=c++17 -Wall -Wextra -Werror -O1 -static -Icrates/shm-nt/include \
    crates/shm-nt/tests/c/cpp_test.cpp -o "$work/cpp_test.exe" "$bin/libshm_nt.dll.a"
prog cpp cpp_test >"$work/cpp.out" 2>&1 || { cat "$work/cpp.out"; fail "c++"; }
expect cpp "c++ ok"
empty cpp
echo "c_tests: c++: the header compiled as C++17 and worked (heap, objects, listings)"
echo "c_tests: prefork.c: skipped under Wine (it tests fork(), which Windows does not have)"
rm -rf "$work"
echo "c_tests: ok"

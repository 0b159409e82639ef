#!/bin/bash
# Regenerates build/startup-symbols.txt: the functions of vmd that run in `vmd run`'s own process
# (first) and in its helper (then), from exec to exit after the test guest's reset. build.rs
# hands the list to the linker (--symbol-ordering-file), which places those functions together
# at the start of .text. The kernel maps up to 16 cached pages around every page fault in a file
# mapping, so start-up code scattered over 4.5 MB of text had `vmd run` map 1.7 MB of it for the
# 300 KB it runs (benches/README.md has the figures).
#
# Run it after a change of the start-up path, the dependencies or the toolchain; a stale list
# costs only memory and page faults, never correctness. Needs valgrind and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/startup-symbols.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# valgrind 3.19 does not know pidfd_open, with which `vmd run` watches its helper: a preloaded
# stand-in returns a pipe that becomes readable when the helper exits.
cat >"$work/pidfd.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
struct watch { pid_t pid; int fd; };
static void *wait_for_exit(void *arg) {
    struct watch *watch = arg;
    siginfo_t info;
    waitid(P_PID, watch->pid, &info, WEXITED | WNOWAIT);
    char byte = 1;
    if (write(watch->fd, &byte, 1) != 1) return 0;
    close(watch->fd);
    return 0;
}
long syscall(long number, ...) {
    va_list ap;
    va_start(ap, number);
    long arg[6];
    for (int i = 0; i < 6; i++) arg[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_pidfd_open) {
        static struct watch watch;
        int pipe_fds[2];
        if (pipe2(pipe_fds, O_CLOEXEC)) return -1;
        watch.pid = (pid_t)arg[0];
        watch.fd = pipe_fds[1];
        pthread_t thread;
        pthread_create(&thread, 0, wait_for_exit, &watch);
        return pipe_fds[0];
    }
    long (*next)(long, ...) = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return next(number, arg[0], arg[1], arg[2], arg[3], arg[4], arg[5]);
}
C
cc -O2 -shared -fPIC -o "$work/pidfd.so" "$work/pidfd.c" -ldl -lpthread

# The names of the functions that ran in vmd's own object, from one callgrind output file.
# callgrind names each object and function once (ob=, cob=, fn=, cfn=), then refers to it by
# number.
functions_run() {
    awk -v vmd="$1" '
        match($0, /^c?(ob|fn)=\([0-9]+\)/) {
            kind = ($0 ~ /^c?ob=/) ? "ob" : "fn"
            id = substr($0, index($0, "("), index($0, ")") - index($0, "(") + 1)
            if (length($0) > RLENGTH) name[kind, id] = substr($0, RLENGTH + 2)
            if ($0 ~ /^ob=/) current = name["ob", id]
            if ($0 ~ /^fn=/ && current == vmd) print name["fn", id]
        }
    ' "$2" | grep -v -e '^0x' -e '^(' || true
}

# The front end's functions come first, so that its own pages are few and together; then the
# helper's, from a run without its sandbox (valgrind knows neither landlock nor seccomp, so the
# lock-down's own functions are not in the list).
#
# Symbol names carry hashes of the dependencies' versions and features (and of the toolchain):
# profile the release build (packages, the README's demo) and the one `cargo bench` makes, whose
# dependencies have the dev-dependencies' features too. LTO numbers some local copies
# (name.123), and a number can move when the layout changes: keep the names of every round, and
# rebuild and profile until a round adds none (a run can take a path the one before did not:
# thread timing, hash seeds).
: >"$work/front.all"
: >"$work/helper.all"
for round in 1 2 3 4 5; do
    for build in "build --release --bin vmd" "bench --no-run --bench helper"; do
        # shellcheck disable=SC2086 # two words each
        cargo $build --quiet
        vmd=$(realpath target/release/vmd)
        guest=$(realpath target/release/testguest.elf)
        rm -f "$work"/callgrind.*
        status=0
        LD_PRELOAD="$work/pidfd.so" valgrind --tool=callgrind --demangle=no --trace-children=yes \
            --callgrind-out-file="$work/callgrind.%p" \
            "$vmd" run --no-sandbox --kernel "$guest" --memory 128M --cmdline testguest=reboot \
            >"$work/console" 2>"$work/valgrind.log" || status=$?
        if [ "$status" != 75 ] || ! grep -q "testguest: rebooting" "$work/console"; then
            echo "the profiled run did not end in the guest's reset (status $status):" >&2
            cat "$work/console" "$work/valgrind.log" >&2
            exit 1
        fi
        for profile in "$work"/callgrind.*; do
            case "$(grep -m1 '^cmd:' "$profile")" in
            *" vm "* | *" vm") functions_run "$vmd" "$profile" >>"$work/helper.all" ;;
            *" run "*) functions_run "$vmd" "$profile" >>"$work/front.all" ;;
            esac
        done
    done
    sort -u "$work/front.all" -o "$work/front.all"
    sort -u "$work/helper.all" | comm -23 - "$work/front.all" >"$work/helper.only"
    cat "$work/front.all" "$work/helper.only" >"$work/list"
    if [ "$round" -gt 1 ] && cmp -s "$work/list" "$out"; then
        echo "$out: $(wc -l <"$work/front.all") functions of vmd run, then" \
            "$(wc -l <"$work/helper.only") of its helper; unchanged in round $round"
        exit 0
    fi
    cp "$work/list" "$out"
    echo "$out: $(wc -l <"$out") functions after round $round"
done
echo "$out: still growing after round $round; usable as it is, or run again for more" >&2

//! Which CPU a stopped plugin exits on, and which ones the daemon's copy helpers run on.
//!
//! A stop signal wakes the instance on the CPU of the daemon that sent it (the scheduler's
//! wake-affine choice, even with another CPU idle), and the daemon keeps that CPU busy right
//! after: a stop-start reload writes the new snapshot and state.json while the old instance
//! exits. On a small machine the exit then runs after that work instead of beside it, and a
//! reload waits for both. So before the stop signal the process is allowed every CPU it had
//! but the daemon's current one: it exits on another CPU while the daemon works.
//!
//! Only the exiting leader is moved, and only when it has another CPU to go to (a plugin pinned
//! to the daemon's CPU stays there). A failure changes nothing: the exit is merely slower.
//!
//! The same placement undoes the large snapshot's parallel copy (`snapshot::copy_parallel`): a
//! new thread starts on the busy CPU of the thread that made it, and each wake-up between the
//! copier and the hasher pulls them together again, so the two take turns on one CPU. For the
//! length of that copy the hashing thread stays on its CPU ([`pin_to_this_cpu`]) and the copier
//! moves itself to the others ([`Pinned::others`], [`run_on`]). The thread that writes a staged
//! snapshot while the daemon reads it is moved off the daemon's CPU before it is woken, unless
//! its mask keeps it off already ([`move_thread_off_this_cpu`]); a move costs little while it
//! waits.

use std::io;
use std::mem;

use nix::unistd::Pid;

/// Let `pid` run on any CPU of its mask except the calling thread's current one. Nothing is done
/// when that would leave it no CPU, or when the masks cannot be read or changed (`pid` gone,
/// another user's).
pub fn move_off_this_cpu(pid: Pid) {
    let (Ok(mask), Some(cpu)) = (affinity(pid.as_raw()), current_cpu()) else {
        return;
    };
    if let Some(others) = without(mask, cpu) {
        let _ = set_affinity(pid.as_raw(), &others);
    }
}

/// The mask [`move_thread_off_this_cpu`] last gave a thread: the same move is not made twice
/// (a `sched_setaffinity` on a reload's path, ~15 µs in a VM, for nothing).
#[derive(Default)]
pub struct LastMove(std::cell::Cell<Option<[u8; mem::size_of::<libc::cpu_set_t>()]>>);

/// Let the thread of `handle` (just started by the calling thread, which it would otherwise
/// wait on) run on any CPU of the caller's mask but the caller's current one, unless `last`
/// says it may already. Nothing is done when that would leave it no CPU or the masks cannot be
/// read or set.
pub fn move_thread_off_this_cpu<T>(handle: &std::thread::JoinHandle<T>, last: &LastMove) {
    use std::os::unix::thread::JoinHandleExt;
    let (Ok(mask), Some(cpu)) = (affinity(0), current_cpu()) else {
        return;
    };
    let Some(others) = without(mask, cpu) else {
        return;
    };
    // SAFETY: cpu_set_t is a plain bit array of exactly this size.
    let bits: [u8; mem::size_of::<libc::cpu_set_t>()] = unsafe { mem::transmute(others) };
    if last.0.get() == Some(bits) {
        return;
    }
    // SAFETY: the handle's thread has not been joined, so its pthread_t is valid; the kernel
    // reads size_of::<cpu_set_t>() bytes from `others`.
    let set = unsafe {
        libc::pthread_setaffinity_np(
            handle.as_pthread_t(),
            mem::size_of::<libc::cpu_set_t>(),
            &others,
        )
    };
    last.0.set((set == 0).then_some(bits));
}

/// `set` less `cpu`, or `None` when nothing would be left.
fn without(mut set: libc::cpu_set_t, cpu: usize) -> Option<libc::cpu_set_t> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Some(set);
    }
    // SAFETY: CPU_CLR works on the local set; `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_CLR(cpu, &mut set) };
    (count(&set) > 0).then_some(set)
}

/// The calling thread pinned to the CPU it runs on, until [`Pinned::release`] gives it its mask
/// back.
pub struct Pinned {
    saved: libc::cpu_set_t,
    cpu: usize,
}

/// A set of CPUs to hand to another thread.
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl Pinned {
    /// The pinned thread's own mask but its current CPU: where a helper it starts should run
    /// (the helper inherits the one-CPU mask). `None` when that leaves nothing.
    pub fn others(&self) -> Option<CpuSet> {
        without(self.saved, self.cpu).map(CpuSet)
    }

    /// Give the thread its mask back. Should that fail (the CPUs it may use changed meanwhile,
    /// a cpuset shrunk or a CPU went offline), every CPU is asked for, which the kernel narrows
    /// to the allowed ones: never leave the thread pinned.
    pub fn release(self) {
        if set_affinity(0, &self.saved).is_err() {
            // SAFETY: cpu_set_t is a plain bit array; all ones names every CPU.
            let all: libc::cpu_set_t =
                unsafe { mem::transmute([u8::MAX; mem::size_of::<libc::cpu_set_t>()]) };
            let _ = set_affinity(0, &all);
        }
    }
}

/// Pin the calling thread to its current CPU. `None` (and nothing changed) with a single CPU to
/// run on, or when the masks cannot be read or set.
pub fn pin_to_this_cpu() -> Option<Pinned> {
    let saved = affinity(0).ok()?;
    let cpu = current_cpu()?;
    if count(&saved) < 2 || !contains(&saved, cpu) {
        return None;
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut one: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: CPU_SET writes into the local set; `current_cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    set_affinity(0, &one).ok()?;
    Some(Pinned { saved, cpu })
}

/// Move the calling thread onto `set` (a failure leaves it where it is).
pub fn run_on(set: &CpuSet) {
    let _ = set_affinity(0, &set.0);
}

/// The CPU the calling thread runs on, if the set type can name it.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments.
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
    (cpu < libc::CPU_SETSIZE as usize).then_some(cpu)
}

/// The CPUs `pid` (0: the calling thread) may run on.
pub fn affinity(pid: libc::pid_t) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
    syscall!(sched_getaffinity(
        pid,
        mem::size_of::<libc::cpu_set_t>(),
        &mut set
    ))?;
    Ok(set)
}

/// Restrict `pid` (0: the calling thread) to `set`.
pub fn set_affinity(pid: libc::pid_t, set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: the kernel reads size_of::<cpu_set_t>() bytes from `set`.
    syscall!(sched_setaffinity(
        pid,
        mem::size_of::<libc::cpu_set_t>(),
        set
    ))
    .map(drop)
}

/// Whether `cpu` is in `set`.
pub fn contains(set: &libc::cpu_set_t, cpu: usize) -> bool {
    // SAFETY: CPU_ISSET reads the set; callers pass a CPU below CPU_SETSIZE.
    cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, set) }
}

/// How many CPUs `set` holds.
pub fn count(set: &libc::cpu_set_t) -> usize {
    // SAFETY: CPU_COUNT reads the set it is given.
    usize::try_from(unsafe { libc::CPU_COUNT(set) }).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    struct Sleeper(Child);

    impl Sleeper {
        fn start() -> Sleeper {
            Sleeper(
                Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .expect("spawn sleep"),
            )
        }
        fn pid(&self) -> libc::pid_t {
            self.0.id() as libc::pid_t
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Runs `f` with the calling thread pinned to one CPU, so that "the current CPU" holds
    /// still; the thread's mask is given back after.
    fn pinned_to_one_cpu<T>(f: impl FnOnce(usize) -> T) -> Option<T> {
        let saved = affinity(0).expect("own affinity");
        let cpu = (0..libc::CPU_SETSIZE as usize).find(|&c| contains(&saved, c))?;
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes a CPU below the size.
        let mut one: libc::cpu_set_t = unsafe { mem::zeroed() };
        // SAFETY: see above.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        set_affinity(0, &one).expect("pin the test thread");
        let out = f(cpu);
        set_affinity(0, &saved).expect("unpin the test thread");
        Some(out)
    }

    #[test]
    fn a_stopped_process_may_run_anywhere_but_the_daemons_cpu() {
        let own = affinity(0).expect("own affinity");
        if count(&own) < 2 {
            eprintln!("one CPU: nowhere else to go, nothing to check");
            return;
        }
        let sleeper = Sleeper::start();
        let before = affinity(sleeper.pid()).expect("sleeper's affinity");
        pinned_to_one_cpu(|cpu| {
            move_off_this_cpu(Pid::from_raw(sleeper.pid()));
            let after = affinity(sleeper.pid()).expect("sleeper's affinity");
            assert!(
                !contains(&after, cpu),
                "still allowed on the daemon's CPU {cpu}"
            );
            assert_eq!(
                count(&after),
                count(&before) - 1,
                "only the daemon's CPU is taken away"
            );
        });
    }

    #[test]
    fn a_pinned_thread_and_its_helper_run_apart_and_get_their_masks_back() {
        let own = affinity(0).expect("own affinity");
        let handle = std::thread::spawn(move || {
            let Some(pinned) = pin_to_this_cpu() else {
                assert!(
                    count(&own) < 2,
                    "a thread with several CPUs could not be pinned"
                );
                return;
            };
            let cpu = pinned.cpu;
            let here = affinity(0).expect("pinned affinity");
            assert!(
                count(&here) == 1 && contains(&here, cpu),
                "not pinned to CPU {cpu}"
            );
            let others = pinned.others().expect("another CPU");
            let helper = std::thread::spawn(move || {
                run_on(&others);
                affinity(0).expect("helper's affinity")
            });
            let helpers = helper.join().expect("helper thread");
            assert!(
                !contains(&helpers, cpu),
                "the helper may still run on CPU {cpu}"
            );
            assert!(count(&helpers) > 0, "the helper was left without a CPU");
            pinned.release();
            let after = affinity(0).expect("released affinity");
            assert_eq!(
                count(&after),
                count(&own),
                "the thread's mask did not come back"
            );
        });
        handle.join().expect("test thread");
    }

    /// A thread parked until unparked, and its tid.
    fn parked_thread() -> (std::thread::JoinHandle<()>, libc::pid_t) {
        let (tell, told) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            // SAFETY: gettid takes no arguments and cannot fail.
            let _ = tell.send(unsafe { libc::gettid() });
            std::thread::park();
        });
        let tid = told.recv().expect("the waiter's tid");
        (waiter, tid)
    }

    #[test]
    fn a_waiting_thread_is_moved_off_the_callers_cpu_and_nowhere_else() {
        let own = affinity(0).expect("own affinity");
        let (waiter, tid) = parked_thread();
        move_thread_off_this_cpu(&waiter, &LastMove::default());
        let after = affinity(tid).expect("the waiter's affinity");
        waiter.thread().unpark();
        waiter.join().expect("waiter thread");
        // Which CPU the caller was on may have changed since; how many CPUs the waiter lost
        // may not: one, or none when the caller had only one.
        let expected = if count(&own) > 1 {
            count(&own) - 1
        } else {
            count(&own)
        };
        assert_eq!(count(&after), expected, "the waiter's mask is wrong");
        let lost: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| contains(&own, cpu) != contains(&after, cpu))
            .collect();
        assert!(
            lost.len() <= 1,
            "more than the caller's CPU changed: {lost:?}"
        );
    }

    #[test]
    fn the_same_move_is_not_made_twice() {
        let own = affinity(0).expect("own affinity");
        if count(&own) < 2 {
            eprintln!("one CPU: nowhere else to go, nothing to check");
            return;
        }
        let (waiter, tid) = parked_thread();
        // The caller may change CPUs between two moves (then the second is a new one): try
        // until both were asked from the same CPU.
        let mut checked = false;
        for _ in 0..1000 {
            let last = LastMove::default();
            let cpu = current_cpu();
            move_thread_off_this_cpu(&waiter, &last);
            let moved = affinity(tid).expect("the waiter's affinity");
            set_affinity(tid, &own).expect("the waiter's mask back");
            move_thread_off_this_cpu(&waiter, &last);
            let again = affinity(tid).expect("the waiter's affinity");
            if cpu.is_some() && current_cpu() == cpu {
                assert_eq!(count(&moved), count(&own) - 1, "the first move is made");
                assert_eq!(
                    count(&again),
                    count(&own),
                    "the same move is not made again"
                );
                checked = true;
                break;
            }
        }
        waiter.thread().unpark();
        waiter.join().expect("waiter thread");
        assert!(checked, "never twice on one CPU in 1000 tries");
    }

    #[test]
    fn a_process_pinned_to_the_daemons_cpu_stays_there() {
        let sleeper = Sleeper::start();
        pinned_to_one_cpu(|cpu| {
            let only = affinity(0).expect("own affinity");
            set_affinity(sleeper.pid(), &only).expect("pin the sleeper");
            move_off_this_cpu(Pid::from_raw(sleeper.pid()));
            let after = affinity(sleeper.pid()).expect("sleeper's affinity");
            assert!(
                contains(&after, cpu) && count(&after) == 1,
                "the pinned process was moved"
            );
        });
    }
}

//! The compute thread pool, tuned for per-operation overhead.
//!
//! A 135M model decodes a token in a few milliseconds through ~300 operations, so the
//! fork/join cost of each operation must be a few hundred nanoseconds, not the tens of
//! microseconds a general-purpose pool (or a condvar round trip) costs. Workers
//! therefore spin on an epoch counter between operations and only park after
//! `SPIN_LIMIT` idle iterations (~100 µs), so a busy engine never sleeps and an idle
//! one never burns a core.
//!
//! Work inside an operation is handed out by an atomic task counter (dynamic
//! scheduling): a thread delayed by the OS or a slower core takes fewer tasks.
//!
//! `unsafe` lives here twice: erasing the lifetime of the job closure while workers
//! run it (the caller waits for every worker before returning), and `Disjoint`, the
//! escape hatch for tasks that write non-overlapping parts of one output buffer.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};

const SPIN_LIMIT: u32 = 1 << 16;

type JobRef = &'static (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per published job.
    epoch: AtomicUsize,
    /// Workers that have finished the current job.
    done: AtomicUsize,
    /// Next task index of the current job.
    next_task: AtomicUsize,
    n_tasks: AtomicUsize,
    job: Mutex<Option<JobRef>>,
    sleepers: AtomicUsize,
    stop: AtomicBool,
    workers: Mutex<Vec<Thread>>,
}

pub struct ThreadPool {
    n_threads: usize,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// One job at a time: two Python threads may share a model.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// `n_threads` includes the calling thread.
    pub fn new(n_threads: usize) -> std::io::Result<ThreadPool> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            next_task: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
        });
        let mut handles = Vec::new();
        for i in 1..n_threads {
            let s = Arc::clone(&shared);
            let h = thread::Builder::new().name(format!("edgelm-compute-{i}")).spawn(move || worker(s))?;
            shared.workers.lock().expect("pool lock").push(h.thread().clone());
            handles.push(h);
        }
        Ok(ThreadPool { n_threads, shared, handles, run_lock: Mutex::new(()) })
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Run `f(i)` for every `i in 0..n_tasks`, each exactly once, spread over the
    /// pool; returns when all have finished.
    pub fn for_each(&self, n_tasks: usize, f: impl Fn(usize) + Sync) {
        if n_tasks == 0 {
            return;
        }
        if self.n_threads == 1 || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: the reference is only used by workers between the epoch bump below
        // and the moment they increment `done`; we wait for all of them (and clear
        // the slot) before `f` goes out of scope, so the 'static is never observed.
        let job: JobRef = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), JobRef>(job) };
        *s.job.lock().expect("pool lock") = Some(job);
        s.next_task.store(0, Ordering::Relaxed);
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            for t in s.workers.lock().expect("pool lock").iter() {
                t.unpark();
            }
        }
        run_tasks(s, job);
        let workers = self.n_threads - 1;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < workers {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *s.job.lock().expect("pool lock") = None;
    }

    /// Split `0..n` into about `tasks_per_thread` chunks per thread, each a multiple of
    /// `align` long (the last may be shorter), and run `f(range)` on each.
    pub fn for_ranges(
        &self,
        n: usize,
        align: usize,
        tasks_per_thread: usize,
        f: impl Fn(std::ops::Range<usize>) + Sync,
    ) {
        let align = align.max(1);
        let want = (self.n_threads * tasks_per_thread).max(1);
        let chunk = n.div_ceil(want).div_ceil(align).max(1) * align;
        let n_tasks = n.div_ceil(chunk);
        self.for_each(n_tasks, |i| f(i * chunk..((i + 1) * chunk).min(n)));
    }
}

fn run_tasks(s: &Shared, job: JobRef) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        job(i);
    }
}

fn worker(s: Arc<Shared>) {
    // Epoch 0 is "no job yet"; reading the counter here instead would race with a
    // job published before this thread first runs, and wait for the next one forever.
    let mut seen = 0;
    loop {
        // Wait for a new epoch: spin, then park.
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins < SPIN_LIMIT {
                // Yield now and then: on an oversubscribed machine the thread that
                // would publish the next job may be waiting for this core.
                if spins.is_multiple_of(256) {
                    thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            if s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                thread::park();
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        let job = *s.job.lock().expect("pool lock");
        if let Some(job) = job {
            run_tasks(&s, job);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.shared.workers.lock().expect("pool lock").iter() {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A mutable buffer that parallel tasks write in non-overlapping pieces.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _p: PhantomData<&'a mut [T]>,
}

// SAFETY: access goes through `range_mut`, whose contract makes concurrent callers
// touch disjoint elements; T: Send lets those elements be written from any thread.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(v: &'a mut [T]) -> Self {
        Disjoint { ptr: v.as_mut_ptr(), len: v.len(), _p: PhantomData }
    }

    /// # Safety
    /// No two live slices obtained from the same `Disjoint` may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, r: std::ops::Range<usize>) -> &mut [T] {
        assert!(r.start <= r.end && r.end <= self.len, "range {r:?} out of bounds {}", self.len);
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        for n in [1, 2, 3, 4] {
            let pool = ThreadPool::new(n).unwrap();
            for tasks in [0, 1, 2, 7, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.for_each(tasks, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn ranges_cover_exactly() {
        let pool = ThreadPool::new(3).unwrap();
        for n in [0, 1, 5, 31, 32, 33, 1000] {
            let mut v = vec![0u32; n];
            let d = Disjoint::new(&mut v);
            pool.for_ranges(n, 4, 4, |r| {
                // SAFETY: for_ranges hands out disjoint ranges.
                for x in unsafe { d.range_mut(r) } {
                    *x += 1;
                }
            });
            assert!(v.iter().all(|&x| x == 1), "n={n}");
        }
    }

    #[test]
    fn job_published_before_workers_start_is_not_missed() {
        for _ in 0..200 {
            let pool = ThreadPool::new(4).unwrap();
            let c = AtomicUsize::new(0);
            pool.for_each(16, |_| {
                c.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(c.load(Ordering::Relaxed), 16);
        }
    }

    #[test]
    fn pool_survives_idle_periods_and_concurrent_callers() {
        let pool = Arc::new(ThreadPool::new(2).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50)); // workers park
        let total = AtomicUsize::new(0);
        pool.for_each(10, |_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 10);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let p = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let c = AtomicUsize::new(0);
                    for _ in 0..200 {
                        p.for_each(8, |_| {
                            c.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    c.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 1600);
        }
    }
}

//! Work that fills the cores the foreground leaves idle: a thread pool (one thread per core) whose
//! threads run at the lowest scheduling class the OS has (Linux `SCHED_IDLE`: they run only on a
//! core no ordinary thread wants), so that the next batch of data is prepared while the current
//! one trains, in the gaps of the training loop (its single-threaded Python steps, the ends of
//! its parallel kernels), without slowing the loop down. Elsewhere the threads run at ordinary
//! priority and the work merely overlaps.
//!
//! [`spawn`] starts a job there and returns a [`Pending`] result; [`Pending::wait`] blocks until
//! it is done (a panic in the job comes back as an error, not an abort).

use std::sync::mpsc;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The pool, built on first use (None where the OS refused its threads: jobs then run on a
/// thread of their own).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("autoguide-idle-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .ok()
    })
    .as_ref()
}

/// Puts the calling thread in the idle scheduling class (Linux; a no-op elsewhere or where
/// refused).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system call on the calling thread (pid 0) with a valid parameter.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    }
}

/// The result of a job started by [`spawn`].
#[derive(Debug)]
pub struct Pending<T> {
    rx: mpsc::Receiver<std::thread::Result<T>>,
}

impl<T> Pending<T> {
    /// Blocks until the job is done and returns its result.
    pub fn wait(self) -> Result<T> {
        match self.rx.recv() {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string());
                Err(Error::Background(what))
            }
            Err(_) => Err(Error::Background("the job was dropped".to_string())),
        }
    }
}

/// Runs `job` on the idle pool (parallel iterators inside it use the idle pool too) and returns
/// its pending result.
pub fn spawn<T, F>(job: F) -> Pending<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let run = move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        let _ = tx.send(out); // the receiver may be gone: nobody wants the result
    };
    match pool() {
        Some(p) => p.spawn(run),
        None => {
            std::thread::spawn(run);
        }
    }
    Pending { rx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_return_their_results_and_panics_come_back_as_errors() {
        let jobs: Vec<_> = (0..8u64)
            .map(|i| spawn(move || (0..=1000 * i).sum::<u64>()))
            .collect();
        for (i, job) in jobs.into_iter().enumerate() {
            let n = 1000 * i as u64;
            assert_eq!(job.wait().unwrap(), n * (n + 1) / 2);
        }
        let bad = spawn(|| -> u32 { panic!("bad input 7") });
        match bad.wait() {
            Err(Error::Background(what)) => assert!(what.contains("bad input 7"), "{what}"),
            other => panic!("expected the panic as an error, got {other:?}"),
        }
    }

    #[test]
    fn parallel_iterators_in_a_job_match_the_foreground() {
        use rayon::prelude::*;
        let v: Vec<f64> = (0..100_000).map(|i| (i as f64).sqrt()).collect();
        let want: Vec<f64> = v.par_iter().map(|x| x * 2.0).collect();
        let got = spawn(move || v.par_iter().map(|x| x * 2.0).collect::<Vec<f64>>());
        assert_eq!(got.wait().unwrap(), want);
    }
}

//! When to try a failed load again. A program whose assignment failed to load is
//! retried after 5 s, then 10 s, 20 s, ... up to 5 min, rather than on every
//! reconcile (each try fetches its bytecode again, e.g. a ConfigMap GET). The delay
//! belongs to one assignment of one program, (digest, generation): a changed
//! assignment is tried at once, and a load that succeeds forgets the failures.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The assignment a failure belongs to: its digest (`loader::assignment_digest`,
/// generation excluded) and its generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// `assignment_digest` of the assignment.
    pub digest: String,
    /// Its generation.
    pub generation: i64,
}

#[derive(Clone, Debug)]
struct Failed<T> {
    attempt: Attempt,
    failures: u32,
    next: Instant,
    /// What to report while waiting (the status of the last try).
    last: T,
}

/// Failed loads by program name, with what was reported for them.
#[derive(Clone, Debug)]
pub struct LoadBackoff<T> {
    first: Duration,
    max: Duration,
    failed: HashMap<String, Failed<T>>,
}

impl<T> Default for LoadBackoff<T> {
    fn default() -> Self {
        Self::new(Duration::from_secs(5), Duration::from_secs(300))
    }
}

impl<T> LoadBackoff<T> {
    /// Waits `first` after a first failure, doubling after each further one up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            failed: HashMap::new(),
        }
    }

    /// While `attempt` of `program` waits for its next try: what its last try
    /// reported. None when it is due, has not failed, or is a different assignment.
    pub fn waiting(&self, program: &str, attempt: &Attempt, now: Instant) -> Option<&T> {
        self.failed
            .get(program)
            .filter(|f| f.attempt == *attempt && now < f.next)
            .map(|f| &f.last)
    }

    /// Records a failed try of `attempt` at `now`; returns the delay before the next.
    /// A failure of another assignment of the program starts over from `first`.
    pub fn failed(&mut self, program: &str, attempt: Attempt, now: Instant, last: T) -> Duration {
        let failures = match self.failed.get(program) {
            Some(f) if f.attempt == attempt => f.failures.saturating_add(1),
            _ => 1,
        };
        let delay = self.delay(failures);
        self.failed.insert(
            program.to_string(),
            Failed {
                attempt,
                failures,
                next: now + delay,
                last,
            },
        );
        delay
    }

    /// Forgets the failures of `program` (it loaded, or is no longer assigned).
    pub fn succeeded(&mut self, program: &str) {
        self.failed.remove(program);
    }

    /// Keeps only the programs for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.failed.retain(|program, _| keep(program));
    }

    /// When the earliest waiting program is due, if any program waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.failed.values().map(|f| f.next).min()
    }

    /// The delay after `failures` consecutive failures.
    fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first
            .checked_mul(1 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(digest: &str, generation: i64) -> Attempt {
        Attempt {
            digest: digest.to_string(),
            generation,
        }
    }

    #[test]
    fn delays_double_from_5_s_to_at_most_5_min() {
        let mut b = LoadBackoff::default();
        let t0 = Instant::now();
        let a = attempt("d1", 1);
        let delays: Vec<u64> = (0..10)
            .map(|_| b.failed("p", a.clone(), t0, ()).as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]);
        // Many more failures neither overflow nor exceed the maximum.
        for _ in 0..100 {
            b.failed("p", a.clone(), t0, ());
        }
        assert_eq!(b.failed("p", a, t0, ()), Duration::from_secs(300));
    }

    #[test]
    fn a_failed_assignment_waits_and_then_is_due() {
        let mut b = LoadBackoff::default();
        let t0 = Instant::now();
        let a = attempt("d1", 3);
        assert_eq!(b.waiting("p", &a, t0), None, "never failed: due");
        b.failed("p", a.clone(), t0, "Failed: ConfigMap not found");
        assert_eq!(
            b.waiting("p", &a, t0 + Duration::from_secs(4)),
            Some(&"Failed: ConfigMap not found")
        );
        assert_eq!(b.waiting("p", &a, t0 + Duration::from_secs(5)), None);
        // Failing again at 5 s: the next try is 10 s later.
        b.failed("p", a.clone(), t0 + Duration::from_secs(5), "again");
        assert!(b.waiting("p", &a, t0 + Duration::from_secs(14)).is_some());
        assert!(b.waiting("p", &a, t0 + Duration::from_secs(15)).is_none());
        // Other programs are not affected.
        assert_eq!(b.waiting("q", &a, t0), None);
    }

    #[test]
    fn a_changed_assignment_is_tried_at_once_and_starts_over() {
        let mut b = LoadBackoff::default();
        let t0 = Instant::now();
        let old = attempt("d1", 1);
        for _ in 0..4 {
            b.failed("p", old.clone(), t0, ());
        }
        assert!(b.waiting("p", &old, t0 + Duration::from_secs(30)).is_some());
        // A new generation (same digest) and a new digest are both due now.
        let new_generation = attempt("d1", 2);
        let new_digest = attempt("d2", 1);
        assert_eq!(b.waiting("p", &new_generation, t0), None);
        assert_eq!(b.waiting("p", &new_digest, t0), None);
        // Its failure counts from the start again.
        assert_eq!(
            b.failed("p", new_generation, t0, ()),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn success_and_removal_forget_the_failures() {
        let mut b = LoadBackoff::default();
        let t0 = Instant::now();
        let a = attempt("d1", 1);
        b.failed("p", a.clone(), t0, ());
        b.failed("p", a.clone(), t0, ());
        b.succeeded("p");
        assert_eq!(b.waiting("p", &a, t0), None);
        assert_eq!(b.failed("p", a.clone(), t0, ()), Duration::from_secs(5));

        b.failed("q", a.clone(), t0, ());
        b.retain(|p| p == "q");
        assert_eq!(b.waiting("p", &a, t0), None);
        assert!(b.waiting("q", &a, t0).is_some());
    }

    #[test]
    fn next_due_is_the_earliest_waiting_program() {
        let mut b = LoadBackoff::default();
        let t0 = Instant::now();
        assert_eq!(b.next_due(), None);
        let a = attempt("d", 1);
        b.failed("slow", a.clone(), t0, ());
        b.failed("slow", a.clone(), t0, ());
        b.failed("fast", a, t0 + Duration::from_secs(1), ());
        assert_eq!(b.next_due(), Some(t0 + Duration::from_secs(6)));
        b.succeeded("fast");
        assert_eq!(b.next_due(), Some(t0 + Duration::from_secs(10)));
    }
}

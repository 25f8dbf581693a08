//! What the benchmarks share: the summary of a set of timings and how it
//! is printed. Benches print numbers; nothing here asserts on time.

use std::time::Duration;

use crate::error::{Error, Result};

/// Median and 95th percentile of a set of timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub median: Duration,
    pub p95: Duration,
}

impl Stats {
    pub fn of(mut samples: Vec<Duration>) -> Result<Stats> {
        if samples.is_empty() {
            return Err(Error::Protocol("no samples".into()));
        }
        samples.sort();
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2
        };
        // Nearest rank: the smallest sample with at least 95% at or below it.
        let rank = (n * 95).div_ceil(100).max(1);
        Ok(Stats {
            median,
            p95: samples[rank - 1],
        })
    }
}

/// A duration in milliseconds, right-aligned for tables.
pub fn ms(d: Duration) -> String {
    format!("{:7.1} ms", d.as_secs_f64() * 1e3)
}

/// `a / b`, without dividing by zero.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// How many runs a benchmark makes: `env` when set (a positive number),
/// else `default` under `cargo bench` (`bench_mode`), else `smoke`, the
/// few runs `cargo test --all-targets` gives every bench program.
pub fn count(
    env: &str,
    default: usize,
    smoke: usize,
    bench_mode: bool,
) -> std::result::Result<usize, String> {
    match std::env::var(env) {
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{env}={text:?} is not a positive number")),
        },
        Err(_) if bench_mode => Ok(default),
        Err(_) => Ok(smoke),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_nearest_rank_p95() {
        let ms = |v: u64| Duration::from_millis(v);
        let s = Stats::of((1..=20).rev().map(ms).collect()).expect("stats");
        assert_eq!((s.median, s.p95), (Duration::from_micros(10_500), ms(19)));
        let s = Stats::of(vec![ms(3)]).expect("stats");
        assert_eq!((s.median, s.p95), (ms(3), ms(3)));
        assert!(Stats::of(Vec::new()).is_err());
    }
}

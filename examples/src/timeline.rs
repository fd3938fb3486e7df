//! The storm demo's picture: what happened over time, per bucket of wall time —
//! requests the application completed, 401s the server sent, token-endpoint calls and
//! requests that had to wait for a token — for each approach, one block above the
//! other, with a bar of the token-endpoint calls so the refresh storm (and its absence)
//! shows at a glance.
//!
//! A [`Sampler`] thread reads the cumulative counters every [`SAMPLE_EVERY`] while a
//! phase runs; [`buckets`] turns the samples into per-bucket differences with one bucket
//! width for every phase, so the blocks line up.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Most rows a phase's block has (the bucket width is chosen to fit them).
pub const MAX_ROWS: usize = 12;

/// Width of the token-call bars, in characters (the table stays within 100 columns).
const BAR_WIDTH: usize = 40;

/// The cumulative counters at one moment of a phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Since the phase started.
    pub at: Duration,
    /// Requests the application completed (any outcome).
    pub requests: u64,
    /// 401s the server sent (rejections on the wire, resends included).
    pub wire_401s: u64,
    /// Calls of the token endpoint, as the server counted them.
    pub token_calls: u64,
    /// Requests that waited for a token: tokenflight's observer reports each request
    /// that waited for a refresh before it was sent or resent; the naive client's every
    /// 401 waits for a refresh of its own.
    pub waited: u64,
}

/// One bucket of a phase's timeline: the counters' growth within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Where the bucket starts, since the phase started.
    pub start: Duration,
    /// Requests completed in the bucket.
    pub requests: u64,
    /// 401s sent by the server in the bucket.
    pub wire_401s: u64,
    /// Token-endpoint calls in the bucket.
    pub token_calls: u64,
    /// Requests that waited for a token in the bucket.
    pub waited: u64,
}

impl Bucket {
    fn to_json(self) -> Value {
        json!({
            "t_s": self.start.as_secs_f64(),
            "requests": self.requests,
            "wire_401s": self.wire_401s,
            "token_calls": self.token_calls,
            "waited": self.waited,
        })
    }
}

/// Reads counters on its own thread until [`Sampler::finish`].
#[derive(Debug)]
pub struct Sampler {
    started: Instant,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// Starts sampling `read` (which gives the cumulative counters; `at` is filled in).
    pub fn start(read: impl Fn() -> Sample + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut samples = vec![Sample::default()];
            let sample = |samples: &mut Vec<Sample>| {
                let at = started.elapsed();
                samples.push(Sample { at, ..read() });
            };
            while !stopped.load(Ordering::Acquire) {
                // Pacing a sampler, not synchronising with anything.
                std::thread::sleep(SAMPLE_EVERY);
                sample(&mut samples);
            }
            sample(&mut samples);
            samples
        });
        Sampler {
            started,
            stop,
            thread,
        }
    }

    /// Stops sampling (after one last sample) and returns the samples, oldest first.
    /// Call it when the phase is over: the last sample holds the final counts and is
    /// dated now, not when the sampler thread woke up to take it.
    pub fn finish(self) -> Vec<Sample> {
        let end = self.started.elapsed();
        self.stop.store(true, Ordering::Release);
        let mut samples = self.thread.join().unwrap_or_default();
        for sample in &mut samples {
            sample.at = sample.at.min(end);
        }
        samples
    }
}

/// A bucket width that fits the longest of `walls` into [`MAX_ROWS`] rows: a round
/// number of seconds (or 0.1 / 0.25 / 0.5 s).
pub fn bucket_width(walls: &[Duration]) -> Duration {
    let longest = walls.iter().max().copied().unwrap_or_default();
    const STEPS_MS: [u64; 12] = [
        100, 250, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000,
    ];
    STEPS_MS
        .iter()
        .map(|&ms| Duration::from_millis(ms))
        .find(|width| longest.as_secs_f64() / width.as_secs_f64() <= MAX_ROWS as f64)
        .unwrap_or(Duration::from_secs(600))
}

/// The cumulative sample at `at`: the last one taken at or before it.
fn at_or_before(samples: &[Sample], at: Duration) -> Sample {
    samples
        .iter()
        .take_while(|s| s.at <= at)
        .last()
        .copied()
        .unwrap_or_default()
}

/// `samples` (cumulative, oldest first) as buckets of `width`, up to the last sample.
pub fn buckets(samples: &[Sample], width: Duration) -> Vec<Bucket> {
    let Some(last) = samples.last() else {
        return Vec::new();
    };
    if width.is_zero() {
        return Vec::new();
    }
    let count = (last.at.as_secs_f64() / width.as_secs_f64())
        .ceil()
        .max(1.0) as u32;
    (0..count)
        .map(|i| {
            let start = width * i;
            let from = at_or_before(samples, start);
            // The last bucket takes everything up to the final sample.
            let to = if i + 1 == count {
                *last
            } else {
                at_or_before(samples, width * (i + 1))
            };
            Bucket {
                start,
                requests: to.requests.saturating_sub(from.requests),
                wire_401s: to.wire_401s.saturating_sub(from.wire_401s),
                token_calls: to.token_calls.saturating_sub(from.token_calls),
                waited: to.waited.saturating_sub(from.waited),
            }
        })
        .collect()
}

/// A phase's buckets as a JSON array (`t_s` = the bucket's start in seconds).
pub fn to_json(buckets: &[Bucket]) -> Value {
    Value::Array(buckets.iter().map(|b| b.to_json()).collect())
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 1e-9 {
        format!("{s:.0}")
    } else {
        format!("{s:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

/// The timeline as text, one block per phase (`names` and `series` in the same order),
/// at most 100 columns wide. The bar is the bucket's token-endpoint calls, on one scale
/// for all phases.
pub fn render(width: Duration, names: &[&str], series: &[Vec<Bucket>]) -> String {
    let most = series
        .iter()
        .flatten()
        .map(|b| b.token_calls)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "timeline per {} s: requests done, 401s on the wire, token-endpoint calls, \
         requests that waited",
        secs(width)
    );
    let _ = writeln!(
        out,
        "{:<12}{:>11}{:>9}{:>7}{:>7}{:>7}  token-endpoint calls (bar: max {most})",
        "", "t (s)", "requests", "401s", "token", "waited"
    );
    for (name, buckets) in names.iter().zip(series) {
        for (i, b) in buckets.iter().enumerate() {
            let label = if i == 0 { *name } else { "" };
            let span = format!("{}-{}", secs(b.start), secs(b.start + width));
            let filled = if b.token_calls == 0 {
                0
            } else {
                // At least one character for any call at all.
                ((b.token_calls as f64 / most as f64) * BAR_WIDTH as f64)
                    .round()
                    .max(1.0) as usize
            };
            let _ = writeln!(
                out,
                "{label:<12}{span:>11}{:>9}{:>7}{:>7}{:>7}  |{}",
                b.requests,
                b.wire_401s,
                b.token_calls,
                b.waited,
                "#".repeat(filled.min(BAR_WIDTH))
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ms: u64, n: u64) -> Sample {
        Sample {
            at: Duration::from_millis(ms),
            requests: n,
            wire_401s: n / 2,
            token_calls: n / 10,
            waited: n / 5,
        }
    }

    #[test]
    fn buckets_are_the_growth_within_each_bucket() {
        let samples = [
            Sample::default(),
            sample(400, 10),
            sample(900, 20),
            sample(1_500, 50),
            sample(2_100, 100),
        ];
        let got = buckets(&samples, Duration::from_secs(1));
        assert_eq!(got.len(), 3);
        assert_eq!(
            got.iter().map(|b| b.requests).collect::<Vec<_>>(),
            vec![20, 30, 50]
        );
        assert_eq!(
            got.iter().map(|b| b.token_calls).collect::<Vec<_>>(),
            vec![2, 3, 5]
        );
        // Every count of the run is in exactly one bucket.
        assert_eq!(got.iter().map(|b| b.waited).sum::<u64>(), 20);
        assert_eq!(got.get(2).map(|b| b.start), Some(Duration::from_secs(2)));
    }

    #[test]
    fn the_width_fits_the_longest_phase() {
        let width = bucket_width(&[Duration::from_millis(9_500), Duration::from_secs(30)]);
        assert_eq!(width, Duration::from_secs(5));
        assert_eq!(
            bucket_width(&[Duration::from_millis(900)]),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn rendering_fits_100_columns_and_scales_bars_across_phases() {
        let a = vec![Bucket {
            token_calls: 1,
            requests: 999_999,
            ..Bucket::default()
        }];
        let b = vec![Bucket {
            token_calls: 400,
            ..Bucket::default()
        }];
        let text = render(
            Duration::from_millis(250),
            &["tokenflight", "naive"],
            &[a, b],
        );
        for line in text.lines() {
            assert!(
                line.chars().count() <= 100,
                "{} columns: {line}",
                line.len()
            );
        }
        let bars: Vec<usize> = text
            .lines()
            .skip(2)
            .map(|l| l.rsplit('|').next().map_or(0, |bar| bar.len()))
            .collect();
        assert_eq!(bars, vec![1, BAR_WIDTH]);
    }
}

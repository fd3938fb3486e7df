//! Prints the tables of `BENCHMARKS.md` from the last `cargo bench -p tokenflight-benches`
//! run: criterion's mean times turned into ratios, plus the figures the bench binaries
//! saved (allocations per call, bytes per waiter), and each issue-18 target with its
//! verdict (pass / miss). Missing results print as `n/a`.
//!
//! `cargo run --release -p tokenflight-benches --bin bench-report`

use tokenflight_benches::extras::{Extras, criterion_mean_ns};

/// The mean of benchmark `group/function` (the function is the last part).
fn mean(id: &str) -> Option<f64> {
    let (group, function) = id.rsplit_once('/')?;
    criterion_mean_ns(group, function)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    }
}

fn fixed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

const FAST_PATH: [&str; 6] = [
    "arc_swap_load_full",
    "arc_swap_load_full_checked",
    "tokenflight_valid_token",
    "tokenflight_token_await",
    "std_rwlock",
    "tokio_mutex",
];

const STORM: [&str; 8] = [
    "floor_bare_shared_future",
    "tokenflight",
    "moka_get_with",
    "async_singleflight",
    "mutex_across_refresh",
    "arrow_object_store_cache",
    "smithy_expiring_cache",
    "tokio_rwlock_recheck",
];

/// The storm rows that are peers (not the floor, not tokenflight).
const PEERS: [&str; 6] = [
    "moka_get_with",
    "async_singleflight",
    "mutex_across_refresh",
    "arrow_object_store_cache",
    "smithy_expiring_cache",
    "tokio_rwlock_recheck",
];

const WAITERS: [usize; 4] = [1, 100, 10_000, 100_000];

fn fast_path() {
    let allocations = Extras::load("fast_path");
    println!("### (a) Fast path: a valid token");
    println!();
    println!(
        "Time per call relative to `arc_swap_load_full` on the same thread count (lower is better)."
    );
    println!();
    println!(
        "| contender | 1 thread | 2 threads | tokio Mutex time ÷ this, 2 threads | allocations/call |"
    );
    println!("|---|---|---|---|---|");
    let floor1 = mean("fast_path/1_threads/arc_swap_load_full");
    let floor2 = mean("fast_path/2_threads/arc_swap_load_full");
    let mutex2 = mean("fast_path/2_threads/tokio_mutex");
    for name in FAST_PATH {
        let t1 = mean(&format!("fast_path/1_threads/{name}"));
        let t2 = mean(&format!("fast_path/2_threads/{name}"));
        println!(
            "| {name} | {} | {} | {} | {} |",
            ratio(t1, floor1),
            ratio(t2, floor2),
            ratio(mutex2, t2),
            fixed(
                allocations.get(&format!("fast_path/{name}/allocations_per_call")),
                3
            ),
        );
    }
    println!();
    println!(
        "The same ratios from interleaved rounds (20,000 calls of each, back to back, \
         alternating; median and quartiles), which the machine's drift does not move:"
    );
    println!();
    println!("| contender | 1 thread (q1–q3) | 2 threads (q1–q3) |");
    println!("|---|---|---|");
    for name in ["tokenflight_valid_token", "tokenflight_token_await"] {
        let cell = |threads: u32| {
            let key = format!("fast_path/{threads}_threads/{name}/interleaved");
            format!(
                "{} ({}–{})",
                fixed(allocations.get(&key), 2),
                fixed(allocations.get(&format!("{key}_q1")), 2),
                fixed(allocations.get(&format!("{key}_q3")), 2),
            )
        };
        println!("| {name} | {} | {} |", cell(1), cell(2));
    }
    println!();
}

fn storm() {
    let extras = Extras::load("storm");
    println!("### (b, c) Storm: N waiters on an expired token, one refresh");
    println!();
    println!(
        "Release time (refresh done → last waiter resumed) relative to tokenflight's at the \
         same N (lower is better); tokenflight's own row is relative to the bare-`Shared` floor."
    );
    println!();
    print!("| contender |");
    for n in WAITERS {
        print!(" N={n} |");
    }
    println!(" bytes/waiter (N=100k) | allocs/waiter (N=100k) | source calls |");
    print!("|---|");
    for _ in WAITERS {
        print!("---|");
    }
    println!("---|---|---|");
    for name in STORM {
        print!("| {name} |");
        for n in WAITERS {
            let me = mean(&format!("storm/{n}/{name}"));
            let reference = if name == "tokenflight" {
                mean(&format!("storm/{n}/floor_bare_shared_future"))
            } else {
                mean(&format!("storm/{n}/tokenflight"))
            };
            print!(" {} |", ratio(me, reference));
        }
        let key = format!("storm/100000/{name}");
        println!(
            " {} | {} | {} |",
            fixed(extras.get(&format!("{key}/bytes_per_waiter")), 0),
            fixed(extras.get(&format!("{key}/allocations_per_waiter")), 2),
            fixed(extras.get(&format!("{key}/source_calls")), 0),
        );
    }
    println!();
    println!(
        "The same ratios at N = 10,000 and 100,000 from interleaved rounds (every contender \
         once per round, the order reversed every other round; median of the per-round \
         ratios), which the machine's drift does not move. `floor_shared_with_handle` is the \
         floor plus one `Arc` handle per waiter, dropped as it resumes (as every contender's \
         waiter holds its coordinator's): at or above 1.00, tokenflight's gap to the bare \
         floor is that handle:"
    );
    println!();
    println!("| contender | N=10000 | N=100000 |");
    println!("|---|---|---|");
    for name in std::iter::once("floor_bare_shared_future")
        .chain(std::iter::once("tokenflight"))
        .chain(PEERS)
        .chain(std::iter::once("floor_shared_with_handle"))
    {
        println!(
            "| {name} | {} | {} |",
            fixed(extras.get(&format!("storm/10000/{name}/interleaved")), 2),
            fixed(extras.get(&format!("storm/100000/{name}/interleaved")), 2),
        );
    }
    println!();
    println!("Absolute release times of this run (for the 50 ms target only):");
    println!();
    for name in ["floor_bare_shared_future", "tokenflight"] {
        let ms = mean(&format!("storm/100000/{name}")).map(|ns| ns / 1e6);
        println!("- {name}, N=100k: {} ms", fixed(ms, 1));
    }
    println!();
}

/// The end-to-end pairs: (label in the tables, bare bench, tokenflight bench, key of the
/// interleaved figures, what the bare side is called).
const CLIENTS: [(&str, &str, &str, &str, &str); 3] = [
    (
        "reqwest",
        "bare_reqwest",
        "reqwest_tokenflight",
        "reqwest",
        "bare reqwest",
    ),
    (
        "tower",
        "bare_hyper",
        "tower_tokenflight",
        "tower",
        "bare hyper-util",
    ),
    ("surf", "bare_surf", "surf_tokenflight", "surf", "bare surf"),
];

/// One row of the end-to-end table: `key`'s interleaved figures in `mode`.
fn end_to_end_row(
    extras: &Extras,
    mode: &str,
    label: &str,
    key: &str,
    criterion: String,
) -> String {
    let get = |name: String| extras.get(&name);
    let k = format!("{mode}_{key}");
    format!(
        "| {mode} | {label} | {criterion} | {} ({}–{}) | {} → {} | {} → {} | {} → {} |",
        fixed(get(format!("interleaved_{k}")), 2),
        fixed(get(format!("interleaved_{k}_q1")), 2),
        fixed(get(format!("interleaved_{k}_q3")), 2),
        fixed(get(format!("cpu_{k}_bare_us")), 1),
        fixed(get(format!("cpu_{k}_tokenflight_us")), 1),
        fixed(get(format!("client_cpu_{k}_bare_us")), 2),
        fixed(get(format!("client_cpu_{k}_tokenflight_us")), 2),
        fixed(get(format!("allocs_{k}_bare")), 1),
        fixed(get(format!("allocs_{k}_tokenflight")), 1),
    )
}

fn end_to_end() {
    println!("### (d) End to end on the testkit server");
    println!();
    println!(
        "Throughput with tokenflight relative to the same client without it, in one run \
         (higher is better; 1.00 = same): reqwest + middleware vs bare reqwest, \
         hyper-util + the tower `TokenLayer` vs bare hyper-util, surf + middleware vs \
         bare surf. \"criterion\" = the ratio of criterion's means (one contender after \
         the other); \"interleaved\" = the median (and quartiles) of short rounds that \
         time both back to back."
    );
    println!();
    println!(
        "| mode | client | criterion | interleaved (q1–q3) | CPU µs/request, bare → tokenflight | client thread CPU µs/request, bare → tokenflight | allocations/request, bare → tokenflight |"
    );
    println!("|---|---|---|---|---|---|---|");
    let extras = Extras::load("end_to_end");
    for mode in ["sequential", "concurrent_32"] {
        for (label, bare, layered, key, _) in CLIENTS {
            let bare_time = mean(&format!("end_to_end/{mode}/{bare}"));
            let layered_time = mean(&format!("end_to_end/{mode}/{layered}"));
            let criterion = ratio(bare_time, layered_time);
            println!("{}", end_to_end_row(&extras, mode, label, key, criterion));
        }
        let controls = [
            (
                "control: reqwest-middleware, no middleware",
                "reqwest_middleware_only",
                "bare_reqwest",
            ),
            (
                "control: tower layer that clones the service and boxes its future",
                "tower_clone_and_box_only",
                "bare_hyper",
            ),
            (
                "control: surf middleware that only passes the request on",
                "surf_pass_through_only",
                "bare_surf",
            ),
        ];
        for (label, key, bare) in controls {
            let criterion = ratio(
                mean(&format!("end_to_end/{mode}/{bare}")),
                mean(&format!("end_to_end/{mode}/{key}")),
            );
            println!("{}", end_to_end_row(&extras, mode, label, key, criterion));
        }
    }
    println!();
    println!(
        "CPU is the whole process's (client and the loopback server) per request, the \
         median over the interleaved rounds; allocations likewise (the server's are the \
         same on both sides, so the difference is the middleware's). The control row is \
         reqwest-middleware's client with no middleware against bare reqwest: the stack's \
         own cost, which any reqwest middleware pays; the tower control is a layer that \
         does only what any tower middleware that may send a request again must (clone \
         the inner service per call, box its future); the surf control is one surf \
         middleware that only passes the request on (surf then clones the client's \
         middleware list per request and boxes each middleware's future). The client \
         thread is the one that \
         polls the requests, where the middleware runs (the connections and the server \
         run on others): the middleware's own cost in situ, caches as a round trip \
         leaves them."
    );
    println!();
    println!(
        "Each adapter's own cost per request without a network (`middleware_overhead`: \
         whatever sends answers 200 at once; bare = the same stack with the header set by \
         hand):"
    );
    println!();
    let overhead = Extras::load("middleware_overhead");
    println!(
        "| adapter | bare µs | with tokenflight µs | added µs | allocations, bare → tokenflight |"
    );
    println!("|---|---|---|---|---|");
    for adapter in ["reqwest", "tower", "surf"] {
        let bare = mean(&format!("{adapter}_overhead/bare"));
        let layered = mean(&format!("{adapter}_overhead/layered"));
        let added = bare
            .zip(layered)
            .map(|(bare, layered)| (layered - bare) / 1000.0);
        println!(
            "| {adapter} | {} | {} | {} | {} → {} |",
            fixed(bare.map(|ns| ns / 1000.0), 2),
            fixed(layered.map(|ns| ns / 1000.0), 2),
            fixed(added, 2),
            fixed(overhead.get(&format!("{adapter}/allocs_bare")), 1),
            fixed(overhead.get(&format!("{adapter}/allocs_layered")), 1),
        );
    }
    println!();
}

/// One issue-18 target: its figure, the bound, and whether the figure is within it.
fn verdict(target: &str, figure: Option<f64>, bound: f64, at_most: bool) {
    let (shown, verdict) = match figure {
        None => ("n/a".to_owned(), "not measured"),
        Some(value) => {
            let pass = if at_most {
                value <= bound
            } else {
                value >= bound
            };
            (
                format!("{value:.2}"),
                if pass { "pass" } else { "**miss**" },
            )
        }
    };
    let sign = if at_most { "≤" } else { "≥" };
    println!("| {target} | {shown} | {sign} {bound} | {verdict} |");
}

fn targets() {
    println!("### Issue 18 targets (ratios within this run)");
    println!();
    println!("| target | figure | bound | verdict |");
    println!("|---|---|---|---|");
    let of = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for threads in [1, 2] {
        let floor = mean(&format!("fast_path/{threads}_threads/arc_swap_load_full"));
        let interleaved = Extras::load("fast_path");
        for (name, bound) in [
            ("tokenflight_valid_token", 1.5),
            ("tokenflight_token_await", 2.0),
        ] {
            let me = mean(&format!("fast_path/{threads}_threads/{name}"));
            verdict(
                &format!("{name} ÷ arc_swap_load_full, {threads} thread(s)"),
                of(me, floor),
                bound,
                true,
            );
            verdict(
                &format!(
                    "{name}, {threads} thread(s), interleaved median (same ratio, drift-robust)"
                ),
                interleaved.get(&format!("fast_path/{threads}_threads/{name}/interleaved")),
                bound,
                true,
            );
        }
    }
    let allocations = Extras::load("fast_path");
    for name in ["tokenflight_valid_token", "tokenflight_token_await"] {
        verdict(
            &format!("{name}: allocations per call"),
            allocations.get(&format!("fast_path/{name}/allocations_per_call")),
            0.0,
            true,
        );
    }
    let e2e = Extras::load("end_to_end");
    for mode in ["sequential", "concurrent_32"] {
        for (label, bare, layered, key, bare_name) in CLIENTS {
            verdict(
                &format!("end to end, {mode}: {label} + tokenflight throughput ÷ {bare_name}"),
                of(
                    mean(&format!("end_to_end/{mode}/{bare}")),
                    mean(&format!("end_to_end/{mode}/{layered}")),
                ),
                0.97,
                false,
            );
            verdict(
                &format!(
                    "end to end, {mode}: {label}, interleaved median (same ratio, load-robust)"
                ),
                e2e.get(&format!("interleaved_{mode}_{key}")),
                0.97,
                false,
            );
        }
    }
    let storm = Extras::load("storm");
    verdict(
        "100k waiters: release time ÷ bare `Shared` floor",
        of(
            mean("storm/100000/tokenflight"),
            mean("storm/100000/floor_bare_shared_future"),
        ),
        1.1,
        true,
    );
    verdict(
        "100k waiters: release time ÷ floor, interleaved median (drift-robust)",
        storm.get("storm/100000/tokenflight/interleaved"),
        1.1,
        true,
    );
    verdict(
        "100k waiters: bytes per waiter",
        storm.get("storm/100000/tokenflight/bytes_per_waiter"),
        256.0,
        true,
    );
    for n in [10_000, 100_000] {
        for peer in PEERS {
            verdict(
                &format!("N={n}: {peer} release time ÷ tokenflight's (ahead if ≥ 1)"),
                of(
                    mean(&format!("storm/{n}/{peer}")),
                    mean(&format!("storm/{n}/tokenflight")),
                ),
                1.0,
                false,
            );
            verdict(
                &format!("N={n}: {peer}, interleaved median (drift-robust)"),
                storm.get(&format!("storm/{n}/{peer}/interleaved")),
                1.0,
                false,
            );
        }
    }
    println!();
}

fn main() {
    fast_path();
    storm();
    end_to_end();
    targets();
}

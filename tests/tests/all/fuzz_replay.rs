//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`) and every regression
//! input (`fuzz/regressions/<target>/*`) through the fuzz target bodies on stable, so
//! what the fuzzer once found stays fixed without a nightly toolchain (C13; C1–C6 and
//! C9 for `flight_ops`).

use std::fs;
use std::path::{Path, PathBuf};

use tokenflight_tests::fuzz_targets::{self, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files directly in `dir`, sorted; none if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn replay(target: &str, files: &[PathBuf]) {
    for file in files {
        let data = fs::read(file).unwrap();
        let outcome = std::panic::catch_unwind(|| assert!(fuzz_targets::run(target, &data)));
        assert!(outcome.is_ok(), "{target} fails on {}", file.display());
    }
}

#[test]
fn c13_every_target_replays_its_committed_corpus() {
    for target in TARGETS {
        let files = inputs(&fuzz_dir().join("corpus").join(target));
        assert!(!files.is_empty(), "no committed corpus for {target}");
        replay(target, &files);
    }
}

#[test]
fn c13_every_regression_input_stays_fixed() {
    let regressions = fuzz_dir().join("regressions");
    for target in TARGETS {
        replay(target, &inputs(&regressions.join(target)));
    }
    // Every regression directory belongs to a known target (no silently skipped inputs).
    for dir in fs::read_dir(&regressions).into_iter().flatten() {
        let name = dir.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name.starts_with('.') || name == "README.md" || TARGETS.contains(&name.as_str()),
            "fuzz/regressions/{name} is not a fuzz target"
        );
    }
}

#[test]
fn unknown_targets_are_refused() {
    assert!(!fuzz_targets::run("no_such_target", b""));
}

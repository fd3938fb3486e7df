//! Figures criterion does not record (source calls, bytes per waiter, allocations per
//! call) are written next to criterion's own results, as one flat JSON object per
//! bench binary, so `bench-report` can put everything of one run into one table.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

/// Where criterion keeps its results; the same rule criterion 0.5 follows:
/// `$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else the target directory
/// `cargo metadata` reports, else `target/criterion`.
pub fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    cargo_target_dir()
        .map(|dir| dir.join("criterion"))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

fn cargo_target_dir() -> Option<PathBuf> {
    let cargo = std::env::var_os("CARGO")?;
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .ok()?;
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    metadata
        .get("target_directory")?
        .as_str()
        .map(PathBuf::from)
}

/// The figures of one bench binary, saved under `<criterion dir>/extras/<name>.json`.
#[derive(Debug, Default)]
pub struct Extras {
    figures: BTreeMap<String, f64>,
}

impl Extras {
    /// An empty set of figures.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `value` under `key` and prints it, so a plain `cargo bench` shows it too.
    pub fn record(&mut self, key: &str, value: f64) {
        println!("extra: {key} = {value}");
        self.figures.insert(key.to_owned(), value);
    }

    /// Writes the figures; a failure is reported on stderr and does not stop the run.
    pub fn save(&self, name: &str) {
        let dir = criterion_dir().join("extras");
        let path = dir.join(format!("{name}.json"));
        let json = serde_json::to_string_pretty(&self.figures).unwrap_or_default();
        if let Err(error) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, json))
        {
            eprintln!("could not write {}: {error}", path.display());
        }
    }

    /// Reads the figures a bench binary saved under `name` (empty if it has not run).
    pub fn load(name: &str) -> Self {
        let path = criterion_dir().join("extras").join(format!("{name}.json"));
        let figures = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Extras { figures }
    }

    /// A recorded figure.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.get(key).copied()
    }
}

/// Criterion's headline estimate of the time per iteration, in nanoseconds, for the
/// benchmark `function` of group `group` (criterion keeps it under
/// `<group with '/' as '_'>/<function>/new/`).
pub fn criterion_mean_ns(group: &str, function: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group.replace('/', "_"))
        .join(function)
        .join("new")
        .join("estimates.json");
    let bytes = std::fs::read(path).ok()?;
    let estimates: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    // The slope (linear sampling) is what criterion reports as its headline figure;
    // flat sampling has none, and then the mean is.
    ["slope", "mean"]
        .iter()
        .find_map(|key| estimates.get(key)?.get("point_estimate")?.as_f64())
}

//! C14: the core's normal dependency tree contains no async runtime.

use std::process::Command;

const RUNTIMES: [&str; 4] = ["tokio", "async-std", "smol", "async-global-executor"];

fn normal_tree(extra: &[&str]) -> String {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let output = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--manifest-path",
            manifest,
            "-p",
            "tokenflight",
            "-e",
            "normal",
        ])
        .args(["--prefix", "none", "--format", "{p}"])
        .args(extra)
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

fn runtimes_in(tree: &str) -> Vec<String> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            RUNTIMES
                .iter()
                .any(|rt| *name == *rt || name.starts_with(&format!("{rt}-")))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn c14_core_has_no_runtime_in_its_dependency_tree() {
    for features in [
        &[][..],
        &["--features", EVERY_FEATURE_BUT_TOKIO][..],
        &["--no-default-features"][..],
    ] {
        let tree = normal_tree(features);
        assert!(
            tree.lines().any(|l| l.starts_with("tokenflight ")),
            "{tree}"
        );
        let found = runtimes_in(&tree);
        assert!(
            found.is_empty(),
            "runtime crates in the core ({features:?}): {found:?}"
        );
    }
}

/// Every feature of the core except `tokio`, the one that brings a runtime's pieces
/// (a spawner and a timer) for adapters that ask for it.
const EVERY_FEATURE_BUT_TOKIO: &str =
    "futures-timer,metrics,oauth2,private-key-jwt,dpop,file-store,store-record,test-util,http-body";

#[test]
fn c14_only_the_tokio_feature_brings_tokio_and_nothing_else() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("the manifest");
    let features = manifest
        .split("[features]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a [features] table");
    let named: Vec<&str> = features
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(" = ").map(|(name, _)| name.trim()))
        .filter(|name| *name != "default" && *name != "tokio")
        .collect();
    let mut listed: Vec<&str> = EVERY_FEATURE_BUT_TOKIO.split(',').collect();
    let mut named_sorted = named.clone();
    listed.sort_unstable();
    named_sorted.sort_unstable();
    assert_eq!(
        listed, named_sorted,
        "the list above names every other feature"
    );
    let found = runtimes_in(&normal_tree(&["--features", "tokio"]));
    assert_eq!(found, vec!["tokio"], "tokio alone, no other runtime");
}

#[test]
fn c14_the_check_itself_can_fail() {
    // Guards the matcher above against silently matching nothing.
    let found = runtimes_in(
        "tokenflight v0.1.0\ntokio v1.0.0\ntokio-util v0.7.0\nsmol v2.0.0\nfutures v0.3\n",
    );
    assert_eq!(found, vec!["tokio", "tokio-util", "smol"]);
}

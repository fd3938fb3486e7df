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
        &["--all-features"][..],
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

#[test]
fn c14_the_check_itself_can_fail() {
    // Guards the matcher above against silently matching nothing.
    let found = runtimes_in(
        "tokenflight v0.1.0\ntokio v1.0.0\ntokio-util v0.7.0\nsmol v2.0.0\nfutures v0.3\n",
    );
    assert_eq!(found, vec!["tokio", "tokio-util", "smol"]);
}

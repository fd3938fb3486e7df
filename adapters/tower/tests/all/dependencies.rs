//! The adapter's normal dependency tree: no reqwest and no surf (the bare transport is
//! hyper-util's), and the core below it still free of runtimes (C14).
//! Dev-dependencies, such as the testkit (which uses the reqwest adapter), do not count.

use std::process::Command;

/// `cargo tree -e normal` for `package` with `args`, or `None` (with the reason printed)
/// when cargo cannot be run here at all.
fn cargo_tree(package: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--offline", "-p", package, "-e", "normal"])
        .args(args)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => {
            println!("skipped: cannot run cargo ({e})");
            return None;
        }
    };
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8(output.stdout).unwrap())
}

fn lines_naming<'a>(tree: &'a str, name: &str) -> Vec<&'a str> {
    tree.lines()
        .filter(|line| {
            line.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
                .split(' ')
                .next()
                .is_some_and(|crate_name| crate_name.starts_with(name))
        })
        .collect()
}

#[test]
fn normal_dependency_tree_has_no_reqwest_and_no_surf() {
    // All features: the optional tonic support must not bring them either.
    let Some(tree) = cargo_tree("tokenflight-tower", &["--all-features"]) else {
        return;
    };
    assert!(
        tree.contains("tokenflight-tower"),
        "unexpected output: {tree}"
    );
    assert!(
        tree.contains("hyper-util"),
        "hyper-util missing from: {tree}"
    );
    assert!(
        tree.contains("tonic"),
        "tonic (feature) missing from: {tree}"
    );
    assert_eq!(lines_naming(&tree, "reqwest"), Vec::<&str>::new());
    assert_eq!(lines_naming(&tree, "surf"), Vec::<&str>::new());
    assert!(
        lines_naming(&tree, "tokenflight-reqwest").is_empty(),
        "the reqwest adapter in the tree"
    );
}

#[test]
fn the_core_under_this_adapter_has_no_runtime() {
    let Some(tree) = cargo_tree("tokenflight", &["--features", "oauth2"]) else {
        return;
    };
    assert!(tree.contains("tokenflight"), "unexpected output: {tree}");
    for runtime in ["tokio", "async-std", "smol", "hyper"] {
        assert_eq!(
            lines_naming(&tree, runtime),
            Vec::<&str>::new(),
            "{runtime}"
        );
    }
}

//! C14 for this adapter: nothing in `tokenflight-surf`'s normal dependency tree is tokio
//! (dev-dependencies, such as the testkit server, do not count).

use std::process::Command;

/// `cargo tree` for this package with `args`, or `None` (with the reason printed) when
/// cargo cannot be run here at all.
fn cargo_tree(args: &[&str]) -> Option<String> {
    let output = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--offline",
            "-p",
            "tokenflight-surf",
            "-e",
            "normal",
        ])
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

#[test]
fn c14_normal_dependency_tree_has_no_tokio() {
    let Some(tree) = cargo_tree(&[]) else { return };
    assert!(
        tree.contains("tokenflight-surf"),
        "unexpected output: {tree}"
    );
    assert!(tree.contains("surf v2.3"), "surf missing from: {tree}");
    assert!(tree.contains("async-std"), "async-std missing from: {tree}");
    let tokio: Vec<&str> = tree
        .lines()
        .filter(|line| line.to_ascii_lowercase().contains("tokio"))
        .collect();
    assert!(tokio.is_empty(), "tokio in the normal tree: {tokio:?}");
}

#[test]
fn h1_backend_brings_tokio_only_as_a_pool_library_without_a_runtime() {
    // surf's h1 backend pools connections with deadpool 0.7, which needs tokio's `sync`
    // and `time`. No runtime feature may come in: async-std runs everything.
    let Some(tree) = cargo_tree(&[
        "--features",
        "h1-client-rustls",
        "-e",
        "features",
        "-i",
        "tokio",
    ]) else {
        return;
    };
    assert!(tree.contains("deadpool"), "unexpected output: {tree}");
    for runtime_feature in ["\"rt\"", "\"rt-multi-thread\"", "\"net\"", "\"macros\""] {
        assert!(
            !tree.contains(&format!("tokio feature {runtime_feature}")),
            "tokio runtime feature {runtime_feature} enabled:\n{tree}"
        );
    }
}

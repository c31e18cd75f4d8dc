//! Finding the workspace's binaries next to the running executable, like assert_cmd's
//! `cargo_bin`: a test runs as `target/<profile>/deps/<test>-<hash>`, a binary such as the demo
//! as `target/<profile>/<bin>`; the binaries are in `target/<profile>/`.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// Every binary a system runs.
pub const BINARIES: [&str; 5] = [
    "orchestrator",
    "orders",
    "inventory",
    "payments",
    "shipping",
];

/// The directory holding the binaries: `SAGA_BIN_DIR` when set, otherwise the current
/// executable's directory (its parent when that is `deps`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SAGA_BIN_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot tell where the running executable is")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of binary `name`, or an error saying how to build it.
pub fn find(name: &str) -> anyhow::Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        bail!(
            "the `{name}` binary is not at {}: run `cargo build{release} --bins` first (or \
             `cargo test --workspace`, which builds them)",
            path.display()
        );
    }
    Ok(path)
}

/// Checks that every binary a system needs is there, so a missing one fails at once with the
/// command that builds it.
pub fn check_all() -> anyhow::Result<()> {
    let missing: Vec<String> = BINARIES
        .iter()
        .filter_map(|name| find(name).err().map(|_| (*name).to_owned()))
        .collect();
    if !missing.is_empty() {
        let dir = bin_dir()?;
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        bail!(
            "missing binaries in {}: {}. Run `cargo build{release} --bins` first (or `cargo \
             test --workspace`, which builds them)",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// The program `name` on the `PATH`, if one is there (for the tools some tests drive: the
/// browser, promtool), so a test can fail saying how to install it rather than skip.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

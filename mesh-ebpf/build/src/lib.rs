//! The one place that knows how to turn `mesh-ebpf/programs` into a BPF object.
//!
//! mesh-node's build script calls [`build`] so that a mesh-node binary always embeds an object
//! built from the sources it was compiled with; `cargo xtask build-ebpf` calls the same function.
//! Freshness is cargo's own: the nested build is incremental and a no-op when nothing changed.

use std::{
    env, fmt, io,
    path::{Path, PathBuf},
    process::Command,
};

/// Target triple of the kernel programs.
pub const TARGET: &str = "bpfel-unknown-none";
/// Name of the binary target in `mesh-ebpf/programs/Cargo.toml`.
const BIN: &str = "mesh-ebpf";

#[derive(Debug)]
pub enum BuildError {
    /// The nested cargo could not be started at all.
    Spawn(io::Error),
    /// The nested cargo ran and failed; its own output already says why.
    Failed(Option<i32>),
    /// A prerequisite is missing; the message names it.
    Missing(String),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Spawn(e) => write!(f, "cannot run `cargo +nightly`: {e}"),
            BuildError::Failed(code) => write!(
                f,
                "building the eBPF programs failed (exit {code:?}); see the compiler output above"
            ),
            BuildError::Missing(what) => write!(f, "{what} is missing"),
        }?;
        write!(
            f,
            "; run `cargo xtask build-ebpf`, which installs missing prerequisites"
        )
    }
}

impl std::error::Error for BuildError {}

/// Source directories whose changes must trigger a rebuild.
pub fn source_dirs(workspace_root: &Path) -> [PathBuf; 2] {
    [
        workspace_root.join("mesh-ebpf/programs"),
        workspace_root.join("mesh-ebpf/common"),
    ]
}

/// Where the object lands for a given workspace target directory.
pub fn object_path(target_dir: &Path) -> PathBuf {
    target_dir
        .join("bpf")
        .join(TARGET)
        .join("release")
        .join(BIN)
}

/// The workspace's target directory as cargo resolves it when only the environment is known.
pub fn default_target_dir(workspace_root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root.join(p)
            }
        })
        .unwrap_or_else(|| workspace_root.join("target"))
}

/// Builds the eBPF object with nightly and bpf-linker and returns its path.
pub fn build(workspace_root: &Path, target_dir: &Path) -> Result<PathBuf, BuildError> {
    if !on_path("bpf-linker") {
        return Err(BuildError::Missing("bpf-linker".into()));
    }
    let programs = workspace_root.join("mesh-ebpf/programs");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&programs)
        .args([
            "+nightly",
            "build",
            "--release",
            "--bin",
            BIN,
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(target_dir.join("bpf"));
    // A build script inherits the outer cargo's compiler, wrappers and flags (clippy-driver,
    // host RUSTFLAGS); none of them apply to a nightly BPF build.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let inherited_build_setting = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
            || key == "RUSTUP_TOOLCHAIN";
        if inherited_build_setting {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().map_err(BuildError::Spawn)?;
    if !status.success() {
        return Err(BuildError::Failed(status.code()));
    }
    Ok(object_path(target_dir))
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

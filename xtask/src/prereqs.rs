//! Installs what the build and the tests need, once, with one line per step.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// Debian packages the end-to-end tests use: iproute2 (ip), bpftool, python3 (the test app),
/// coreutils (sha256sum), tcpdump and tshark (what crosses the link between nodes),
/// prometheus (promtool checks the metrics; the server scrapes the nodes), chromium (the
/// dashboard rendered in a real browser, headless), etcd-server (mesh-cp replicas that keep
/// the mesh in etcd).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "python3",
    "coreutils",
    "tcpdump",
    "tshark",
    "prometheus",
    "chromium",
    "etcd-server",
];
/// The manifest checks: `kubectl kustomize` renders `deploy/` (Debian's kubectl renders it the
/// same as current ones), `kubernetes-validate` (PyPI) checks the result against the API's
/// schemas.
const KUBECTL_PACKAGE: &str = "kubernetes-client";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// What `cargo install bpf-linker --features llvm-22` links against.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

fn missing_debs(pkgs: &[&'static str]) -> Vec<&'static str> {
    pkgs.iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect()
}

fn install_debs(pkgs: &[&'static str], why: &str) -> anyhow::Result<()> {
    let missing = missing_debs(pkgs);
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "xtask: installing Debian packages {} ({why}) with apt-get",
        missing.join(" ")
    );
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version")).contains(BPF_LINKER_VERSION)
}

/// For `build-ebpf`: nightly with rust-src, and bpf-linker built against LLVM 22.
pub fn ensure_build() -> anyhow::Result<()> {
    if !quiet(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!("the nightly toolchain is not installed (rustup toolchain install nightly); it cannot be fetched by this tool");
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("xtask: installing rust-src for nightly (needed by -Z build-std=core)");
        run(
            "rustup component add",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    }
    if !bpf_linker_ok() {
        install_debs(LLVM_PACKAGES, "LLVM 22 for bpf-linker")?;
        println!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (cargo install, about 6 minutes, once)");
        // bpf-linker's build script takes the first llvm-config on PATH (LLVM 14 on Debian 12)
        // unless told where LLVM 22 is; llvm-sys reads its own variable.
        run(
            "cargo install bpf-linker",
            Command::new("cargo")
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
        )?;
        if !bpf_linker_ok() {
            bail!("bpf-linker {BPF_LINKER_VERSION} is still not on PATH after installing it (is ~/.cargo/bin on PATH?)");
        }
    }
    Ok(())
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// For `fuzz` (and `test`, which runs the fuzz targets over their seeds): cargo-fuzz.
pub fn ensure_fuzz() -> anyhow::Result<()> {
    ensure_build()?;
    if !output(Command::new("cargo").args(["fuzz", "--version"])).contains(CARGO_FUZZ_VERSION) {
        println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install, about a minute, once)");
        run(
            "cargo install cargo-fuzz",
            Command::new("cargo").args([
                "install",
                "--locked",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            ]),
        )?;
    }
    Ok(())
}

/// For `test` and `up`: the build prerequisites plus the tools the tests drive.
pub fn ensure_all() -> anyhow::Result<()> {
    ensure_disk_space(&crate::target_dir())?;
    ensure_fuzz()?;
    install_debs(TEST_PACKAGES, "used by the end-to-end tests")?;
    ensure_manifest_tools()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the tests and the sandbox create network namespaces, cgroups and eBPF programs: run as root");
    }
    println!(
        "xtask: prerequisites present (nightly rust-src, bpf-linker {BPF_LINKER_VERSION}, cargo-fuzz {CARGO_FUZZ_VERSION}, {}, kubectl, {KUBERNETES_VALIDATE})",
        TEST_PACKAGES.join(", ")
    );
    Ok(())
}

/// Below this much free space a build is likely to stop half-way with an I/O error from the
/// linker (a cold `cargo xtask test` writes about 8.5 GiB: 5.2 debug, 2.9 fuzz, 0.4 eBPF).
const MIN_FREE_GIB: f64 = 4.0;

/// Refuses to start a build that would fill the disk: the linker's "Bus error" or LLVM's "IO
/// failure on output stream" says nothing of the cause, and a filled disk also breaks whatever
/// else shares it.
fn ensure_disk_space(target: &std::path::Path) -> anyhow::Result<()> {
    // The target dir may not exist yet; its filesystem is that of its nearest ancestor that does.
    let Some(existing) = target.ancestors().find(|p| p.exists()) else {
        return Ok(());
    };
    let free = free_gib(existing)
        .with_context(|| format!("cannot read the free space of {}", existing.display()))?;
    if free < MIN_FREE_GIB {
        bail!(
            "only {free:.1} GiB free where the builds go ({}), and a build needs at least {MIN_FREE_GIB} GiB: free some space (`cargo clean` drops every build) and run again",
            target.display()
        );
    }
    Ok(())
}

fn free_gib(path: &std::path::Path) -> anyhow::Result<f64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs is all zeroes-valid plain data, and the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(stat.f_bavail as f64 * stat.f_frsize as f64 / (1u64 << 30) as f64)
}

/// kubectl and kubernetes-validate, for the checks of the Kubernetes manifests.
fn ensure_manifest_tools() -> anyhow::Result<()> {
    if !quiet(Command::new("kubectl").args(["version", "--client"])) {
        install_debs(&[KUBECTL_PACKAGE], "kubectl renders deploy/ with kustomize")?;
    }
    let (_, version) = KUBERNETES_VALIDATE.split_once("==").unwrap_or_default();
    let installed =
        output(Command::new("python3").args(["-m", "kubernetes_validate", "--version"]));
    if installed.trim() != version {
        println!(
            "xtask: installing {KUBERNETES_VALIDATE} with pip (checks the Kubernetes manifests)"
        );
        run(
            "pip install",
            Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                KUBERNETES_VALIDATE,
            ]),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_free_space_and_refuses_what_it_cannot_read() {
        let free = free_gib(std::path::Path::new("/")).unwrap();
        assert!(free > 0.0, "{free}");
        assert!(free_gib(std::path::Path::new("/no/such/dir")).is_err());
    }
}

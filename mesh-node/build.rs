//! Builds the eBPF object from `mesh-ebpf/programs` and hands its path to the crate, so a
//! mesh-node binary can never embed a stale or missing object.
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("mesh-node lives in the workspace root")
        .to_path_buf();
    let target_dir = mesh_ebpf_build::default_target_dir(&root);
    for dir in mesh_ebpf_build::source_dirs(&root) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    match mesh_ebpf_build::build(&root, &target_dir) {
        Ok(object) => {
            println!("cargo:rerun-if-changed={}", object.display());
            println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

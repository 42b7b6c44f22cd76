//! Writes the CRDs generated from the Rust types into a directory (`cargo xtask crds` runs this
//! with `deploy/crds`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: crds OUT_DIR")?
        .into();
    std::fs::create_dir_all(&dir)?;
    for (file, crd) in mesh_model::crd::definitions() {
        let path = dir.join(file);
        std::fs::write(&path, mesh_model::crd::render(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

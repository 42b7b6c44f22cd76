//! Files mesh-cp keeps in its data dir, replaced whole: written to a temporary file beside
//! them, synced, then renamed over them, so that a crash leaves the old contents or the new,
//! never part of either.

use std::{
    fs::File,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// Replaces `path` with `bytes`, by way of `tmp` (created with `mode`, or emptied). On error,
/// which of the two files it was about.
pub fn replace(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), (PathBuf, io::Error)> {
    fn at(p: &Path) -> impl FnOnce(io::Error) -> (PathBuf, io::Error) + '_ {
        move |e| (p.to_path_buf(), e)
    }
    let mut f = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(tmp)
        .map_err(at(tmp))?;
    f.write_all(bytes).map_err(at(tmp))?;
    f.sync_all().map_err(at(tmp))?;
    std::fs::rename(tmp, path).map_err(at(path))
}

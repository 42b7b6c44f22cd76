//! Relay buffers, shared by every connection of the process: an idle connection holds
//! none, a busy one borrows one per direction while bytes move.

use std::sync::Mutex;

use crate::tunnel::record::FULL_RECORD;

/// Records per buffer: 16 full records, about 256 KiB, the most one read or write moves.
pub const SLOTS: usize = 16;
const SIZE: usize = SLOTS * FULL_RECORD;
/// Buffers kept for reuse after a burst; more are freed.
const KEEP: usize = 32;

static FREE: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// A buffer on loan; goes back to the pool when dropped.
pub struct Buf(Option<Box<[u8]>>);

pub fn take() -> Buf {
    let reused = FREE.lock().unwrap_or_else(|p| p.into_inner()).pop();
    Buf(Some(
        reused.unwrap_or_else(|| vec![0u8; SIZE].into_boxed_slice()),
    ))
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
            if free.len() < KEEP {
                free.push(b);
            }
        }
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

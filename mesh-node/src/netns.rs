//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the netns of the thread that created it, for its whole life. Each
//! enrolled pod gets one dedicated thread that entered the pod's netns once; the proxy asks it to
//! create sockets (listeners, upstream connections) and then drives them from the tokio runtime
//! like any other socket. The rest of the daemon never changes namespace.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open netns {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace: {source}")]
    NotNetns { path: PathBuf, source: io::Error },
    #[error("netns worker for {0} has stopped")]
    WorkerGone(PathBuf),
}

/// A handle to a thread living in one network namespace. Dropping the last handle stops it.
#[derive(Clone)]
pub struct NetnsWorker {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl NetnsWorker {
    /// Opens the netns at `path` and starts a thread inside it. Fails at once, with the path in
    /// the error, when the file is missing or is not a network namespace.
    pub fn spawn(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let name = format!(
            "netns-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                // SAFETY: setns on an fd we own; CLONE_NEWNET only affects this thread.
                let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let result = if entered == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = result.is_ok();
                let _ = ready_tx.send(result);
                drop(file);
                if ok {
                    for job in job_rx {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                path: path.to_path_buf(),
                jobs,
            }),
            Ok(Err(source)) => Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
                source,
            }),
            Err(_) => Err(NetnsError::WorkerGone(path.to_path_buf())),
        }
    }

    /// Runs `f` on the netns thread and waits for its result without blocking the runtime.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))?;
        rx.await
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))
    }
}

/// A non-blocking TCP socket for `addr`'s family, in the calling thread's netns.
pub fn tcp_socket(addr: std::net::SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The kernel's cookie for the netns a socket lives in (`SO_NETNS_COOKIE`, Linux 5.14+); the
/// eBPF programs see the same value from `bpf_get_netns_cookie`.
/// The cookie of the calling thread's netns (read from a socket made there for the purpose).
pub fn current_netns_cookie() -> io::Result<u64> {
    let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    socket_netns_cookie(&probe)
}

pub fn socket_netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

//! The inbound program on every interface of a pod, including those that appear after it
//! was enrolled: a CNI adding a second network, or an application with CAP_NET_ADMIN making
//! a veth, a macvlan or a tunnel to receive on. Without the program such an interface would
//! take plaintext that STRICT forbids.
//!
//! The watcher learns of new interfaces from the pod netns's link notifications
//! (`RTMGRP_LINK`) and also looks again every [`RESCAN`], in case a notification was lost
//! (a full socket buffer). Each look asks the kernel which interfaces run the program (so a
//! device deleted and made again under the same index is seen), and an interface the program
//! cannot be attached to (an error) is set down. The links are pinned; the pins of interfaces
//! that went are removed as they are noticed. An interface
//! is unprotected from its creation until the watcher has attached to it, typically well
//! under a millisecond; it cannot take packets before it is up, which is a second step for
//! whoever makes it.

use std::{
    collections::HashSet,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::Capture;
use crate::{netns::NetnsWorker, workloads::WorkloadId};

/// How often the watcher looks at the interfaces without a notification.
pub const RESCAN: Duration = Duration::from_secs(5);

/// Attaches the inbound program to interfaces that appear in `worker`'s netns (that of the
/// pod `netns_cookie`) until `shutdown` fires.
pub async fn watch(
    workload: WorkloadId,
    worker: NetnsWorker,
    capture: Arc<Capture>,
    netns_cookie: u64,
    shutdown: CancellationToken,
) {
    let notifications = match worker.run(link_notifications).await {
        // SAFETY: the AsyncFd owns the fd, so the fd outlives the registration.
        Ok(Ok(fd)) => {
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
        }
        Ok(Err(e)) => {
            tracing::warn!(%workload, error = %e, "cannot follow the pod's interfaces; looking every {RESCAN:?} instead");
            None
        }
        Err(_) => return,
    };
    let mut rescan = tokio::time::interval(RESCAN);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let notified = async {
            match &notifications {
                Some(fd) => match fd.readable().await {
                    Ok(mut ready) => {
                        drain(fd.get_ref());
                        ready.clear_ready();
                    }
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = notified => {}
            _ = rescan.tick() => {}
        }
        let on_thread = capture.clone();
        let found = worker
            .run(move || {
                let attached = on_thread.attach_inbound(netns_cookie);
                // Listed after the attach: an interface made in between has its new pin kept
                // (listed before, it would have been taken for gone and unpinned).
                let present = present_interfaces();
                // What cannot be policed takes no traffic.
                let failed: Vec<(String, String, bool)> = attached
                    .as_ref()
                    .map(|a| {
                        a.failed
                            .iter()
                            .map(|(name, why)| {
                                let down = super::set_down(name);
                                (
                                    String::from_utf8_lossy(name).into_owned(),
                                    why.clone(),
                                    down,
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                attached.map(|a| (a.links, failed, present))
            })
            .await;
        match found {
            Ok(Ok((new, failed, present))) => {
                for (interface, reason, down) in failed {
                    tracing::error!(
                        %workload, %interface, %reason, set_down = down,
                        "cannot attach the inbound program to an interface of the pod; it is set down so that nothing reaches the pod through it unpoliced"
                    );
                }
                // Interfaces that went took their attachment with them; their pins go too. When
                // the list cannot be read, nothing is let go.
                if let Some(present) = present {
                    capture.forget_interfaces(netns_cookie, &present);
                }
                // The pod left while this pass ran: what it attached goes with it.
                if shutdown.is_cancelled() {
                    let attached: Vec<u32> = new.iter().map(|l| l.ifindex).collect();
                    capture.detach_inbound(netns_cookie, &attached);
                    return;
                }
                for l in new {
                    tracing::info!(%workload, interface = %l.name, "inbound program attached to a new interface of the pod");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(%workload, error = %e, "cannot attach the inbound program to a new interface of the pod; plaintext to it is not policed");
            }
            Err(_) => return,
        }
    }
}

/// Interface indexes of the calling thread's netns, if they can be listed.
fn present_interfaces() -> Option<HashSet<u32>> {
    nix::net::if_::if_nameindex()
        .ok()
        .map(|list| list.iter().map(|i| i.index()).collect())
}

/// A non-blocking rtnetlink socket of the calling thread's netns, subscribed to link changes.
fn link_notifications() -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{
        bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    const RTMGRP_LINK: u32 = 1;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))?;
    Ok(fd)
}

/// Reads every pending notification; what they say does not matter, only that something
/// changed (the interfaces are listed again).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8192];
    // Bounded: a flood of notifications cannot keep this loop here.
    for _ in 0..64 {
        match nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        ) {
            Ok(0) => return,
            Ok(_) => continue,
            // ENOBUFS: notifications were lost; the caller lists the interfaces anyway.
            Err(nix::errno::Errno::ENOBUFS) => continue,
            Err(_) => return,
        }
    }
}

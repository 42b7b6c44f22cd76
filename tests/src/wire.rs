//! What crossed a link: tcpdump records an interface of a topology namespace into a pcap file,
//! tshark reads it back.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::topology::spawn_in;

/// A running tcpdump; stopped (and its file flushed) by [`Tcpdump::finish`] or on drop.
pub struct Tcpdump {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Tcpdump {
    /// Starts capturing TCP and UDP on `interface` in the netns at `netns`, and waits until it
    /// listens.
    pub fn start(netns: &Path, interface: &str, file: &Path) -> io::Result<Self> {
        Self::launch(netns, interface, file, None)
    }

    /// [`Tcpdump::start`], keeping only each packet's first 128 bytes (the headers): for
    /// captures that look at flags under bulk load, which would otherwise write every byte
    /// relayed (tens of GB in the upgrade test).
    pub fn start_headers(netns: &Path, interface: &str, file: &Path) -> io::Result<Self> {
        Self::launch(netns, interface, file, Some(128))
    }

    fn launch(
        netns: &Path,
        interface: &str,
        file: &Path,
        snaplen: Option<u32>,
    ) -> io::Result<Self> {
        let log = file.with_extension("log");
        let mut cmd = Command::new("tcpdump");
        if let Some(n) = snaplen {
            cmd.args(["-s", &n.to_string()]);
        }
        // Immediate mode: without it packets wait in a ring-buffer block that SIGINT discards.
        // A 128 MiB buffer keeps up with 10 MB bursts of 64 KiB GRO frames.
        cmd.args([
            "-i",
            interface,
            "-n",
            "--immediate-mode",
            "-B",
            "131072",
            "-U",
            "-w",
        ])
        .arg(file)
        .args(["tcp", "or", "udp"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?);
        let mut child = spawn_in(Some(netns), None, &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let said = fs::read_to_string(&log).unwrap_or_default();
            if said.contains("listening on") {
                break;
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!("tcpdump did not start: {said:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child: Some(child),
            file: file.to_path_buf(),
        })
    }

    /// Stops the capture and returns the pcap file.
    pub fn finish(mut self) -> io::Result<PathBuf> {
        self.stop()?;
        Ok(self.file.clone())
    }

    fn stop(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SIGINT makes tcpdump write out what it buffered and exit.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `tshark -r FILE ARGS`, its stdout; port 15008 is decoded as TLS over TCP and as QUIC over
/// UDP.
pub fn tshark(file: &Path, args: &[&str]) -> io::Result<String> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(["-d", "tcp.port==15008,tls", "-d", "udp.port==15008,quic"])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "tshark {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The TCP payloads of the packets matching `filter`, one per packet.
pub fn payloads(file: &Path, filter: &str) -> io::Result<Vec<Vec<u8>>> {
    let filter = format!("({filter}) && tcp.len > 0");
    fields(file, &filter, "tcp.payload")
}

/// The UDP payloads of the packets matching `filter`, one per packet.
pub fn udp_payloads(file: &Path, filter: &str) -> io::Result<Vec<Vec<u8>>> {
    let filter = format!("({filter}) && udp.length > 8");
    fields(file, &filter, "udp.payload")
}

fn fields(file: &Path, filter: &str, field: &str) -> io::Result<Vec<Vec<u8>>> {
    let text = tshark(file, &["-Y", filter, "-T", "fields", "-e", field])?;
    Ok(text
        .lines()
        .map(|l| decode_hex(&l.replace(':', "")))
        .collect())
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Whether any payload contains `needle`.
pub fn contains(payloads: &[Vec<u8>], needle: &[u8]) -> bool {
    payloads
        .iter()
        .any(|p| p.windows(needle.len()).any(|w| w == needle))
}

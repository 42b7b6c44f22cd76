//! How a daemon reports the error that stops it: one line on stderr, exit status 1.

/// Prints `<binary>: error: <causes>` and exits 1 if `result` failed; returns otherwise.
pub fn on_error(binary: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("{binary}: error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each once: many errors here already end with their
/// source's text, which `{:#}` would print again.
pub fn one_line(e: &anyhow::Error) -> String {
    join_causes(e.chain().map(|c| c.to_string()))
}

/// Causes, outermost first, joined by ": " with each said once. A library's pointer to its
/// manual at the end of a cause (rustls ends some errors with ": https://docs.rs/…") is left
/// out: it says nothing of what happened here.
pub fn join_causes(causes: impl IntoIterator<Item = String>) -> String {
    let mut out = String::new();
    for cause in causes {
        let text = match cause.rfind(": https://") {
            Some(at) if !cause[at + 2..].contains(char::is_whitespace) => cause[..at].to_owned(),
            _ => cause,
        };
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let inner = anyhow::Error::new(io).context(format!("cannot read /x: {text}"));
        assert_eq!(
            one_line(&inner.context("cannot start")),
            format!("cannot start: cannot read /x: {text}")
        );
    }

    #[test]
    fn repeated_causes_and_manual_urls_are_left_out() {
        let chain = [
            "Unavailable: tcp connect error",
            "transport error",
            "tcp connect error",
            "tcp connect error",
            "Connection refused (os error 111)",
        ]
        .map(String::from);
        assert_eq!(
            join_causes(chain),
            "Unavailable: tcp connect error: transport error: Connection refused (os error 111)"
        );
        let rustls = [
            "Unknown: h2 protocol error: error reading a body from connection",
            "error reading a body from connection",
            "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof",
        ]
        .map(String::from);
        assert_eq!(
            join_causes(rustls),
            "Unknown: h2 protocol error: error reading a body from connection: peer closed connection without sending TLS close_notify"
        );
        // A URL that is the message, or inside it, stays.
        let named = ["cannot reach https://cp.example:15012 now".to_owned()];
        assert_eq!(join_causes(named.clone()), named[0]);
    }

    #[test]
    fn causes_are_joined_in_order() {
        let e = anyhow::anyhow!("the root")
            .context("the middle")
            .context("the top");
        assert_eq!(one_line(&e), "the top: the middle: the root");
    }
}

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
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
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
    fn causes_are_joined_in_order() {
        let e = anyhow::anyhow!("the root")
            .context("the middle")
            .context("the top");
        assert_eq!(one_line(&e), "the top: the middle: the root");
    }
}

//! How an answer is printed: for people (tables and lines), or as JSON for scripts.

use std::io::Write as _;

use serde::Serialize;

/// `text` with every control character but newline and tab shown as `?`: what is printed
/// comes partly from others (a node's rejection message, a config error), and an escape
/// sequence in it must not drive the terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

impl Output {
    /// Prints `value` as `render` has it for people, or as pretty JSON.
    pub fn print<T: Serialize + ?Sized>(
        self,
        value: &T,
        render: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        let text = match self {
            Output::Text => printable(&render(value)),
            Output::Json => serde_json::to_string_pretty(value)? + "\n",
        };
        // A closed pipe (`mycel status | head`) is not an error worth a message.
        match std::io::stdout().write_all(text.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_do_not_reach_the_terminal() {
        assert_eq!(printable("ok\n\x1b[2Jbad\r\tx"), "ok\n?[2Jbad?\tx");
    }
}

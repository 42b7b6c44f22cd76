//! How an answer is printed: for people (tables and lines), or as JSON for scripts.

use std::io::Write as _;

use serde::Serialize;

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
            Output::Text => render(value),
            Output::Json => serde_json::to_string_pretty(value)? + "\n",
        };
        // A closed pipe (`mycel status | head`) is not an error worth a message.
        match std::io::stdout().write_all(text.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => Ok(other?),
        }
    }
}

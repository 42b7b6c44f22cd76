//! Command-line pieces both daemons take.

use clap::{Args, FromArgMatches, Subcommand, ValueEnum};

/// A daemon's command line: what every daemon takes (`--log-format`), and its own
/// subcommands `C`. Not a `clap::Parser`: a command line is always a binary's, so the only
/// way in is [`Cli::parse_for`] (or [`Cli::command_for`]), which names it.
#[derive(Args)]
pub struct Cli<C: Subcommand> {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: C,
}

/// Who a binary is, for its `--help` and `--version`.
#[derive(Clone, Copy)]
pub struct Binary {
    pub name: &'static str,
    pub version: &'static str,
    pub about: &'static str,
}

impl<C: Subcommand> Cli<C> {
    /// The command line of `binary`, as `--help` shows it.
    pub fn command_for(binary: Binary) -> clap::Command {
        // After augment_args, which would set this struct's doc comment as the about text.
        <Self as Args>::augment_args(clap::Command::new(binary.name))
            .bin_name(binary.name)
            .version(binary.version)
            .about(binary.about)
            .long_about(None)
    }

    /// Parses this process's arguments; a bad command line exits with clap's message and
    /// status, as `Parser::parse` does.
    pub fn parse_for(binary: Binary) -> Self {
        let mut matches = Self::command_for(binary).get_matches();
        Self::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit())
    }
}

/// The `--log-format` flag, flattened into each daemon's top-level `Cli`.
#[derive(clap::Args)]
pub struct LogArgs {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// One day: the most a node's timeouts and intervals may be.
pub const DAY: u32 = 86_400;
/// One hour: the most mesh-cp's reload interval may be.
pub const HOUR: u32 = 3_600;

/// A clap value parser for a positive, finite number of seconds of at most `max`: each flag
/// names its own bound, so two flags of one meaning cannot drift apart unseen.
pub fn seconds(max: u32) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s| parse_seconds(s, max)
}

fn parse_seconds(s: &str, max: u32) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v <= f64::from(max)) {
        return Err(format!("{s} must be between 0 and {max} seconds"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_positive_finite_and_bounded() {
        let day = seconds(DAY);
        assert_eq!(day("0.5"), Ok(0.5));
        assert_eq!(day("86400"), Ok(86_400.0));
        for bad in ["0", "-1", "NaN", "inf", "86400.5"] {
            assert_eq!(
                day(bad),
                Err(format!("{bad} must be between 0 and 86400 seconds"))
            );
        }
        assert_eq!(
            day("soon"),
            Err("\"soon\" is not a number of seconds".to_owned())
        );
        let hour = seconds(HOUR);
        assert_eq!(hour("3600"), Ok(3_600.0));
        assert_eq!(
            hour("3601"),
            Err("3601 must be between 0 and 3600 seconds".to_owned())
        );
    }

    #[test]
    fn log_args_flatten_into_a_cli() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            log: LogArgs,
        }
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["x", "--log-format", "json"]).map_err(|e| e.to_string());
        assert_eq!(cli.map(|c| c.log.log_format), Ok(LogFormat::Json));
    }
}

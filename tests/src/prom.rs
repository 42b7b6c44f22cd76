//! Reading Prometheus expositions in tests: samples by name and labels, and `promtool`'s
//! checks.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    process::{Command, Stdio},
};

/// One sample: its labels, sorted by name.
pub type Labels = BTreeMap<String, String>;

/// Samples of one exposition by metric name.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: BTreeMap<String, Vec<(Labels, f64)>>,
    /// `# TYPE` lines seen, by family name, in order (a family listed twice shows twice).
    pub families: Vec<String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Exposition::default();
        for (i, line) in text.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    out.families.push(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (name, labels, rest) = parse_sample(line)
                .ok_or_else(|| format!("line {}: cannot parse {line:?}", i + 1))?;
            let value: f64 = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("line {}: no value in {line:?}", i + 1))?;
            out.samples.entry(name).or_default().push((labels, value));
        }
        Ok(out)
    }

    /// The sum over the samples of `name` whose labels include all of `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).map(|(_, v)| v).sum()
    }

    /// The samples of `name` whose labels include all of `want`.
    pub fn matching<'a>(
        &'a self,
        name: &str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a Labels, f64)> + 'a {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |(labels, _)| {
                want.iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(l, v)| (l, *v))
    }
}

/// `name{a="b",...} rest` or `name rest`.
fn parse_sample(line: &str) -> Option<(String, Labels, &str)> {
    let end = line.find(['{', ' '])?;
    let name = line[..end].to_owned();
    let mut labels = Labels::new();
    let bytes = line.as_bytes();
    let mut i = end;
    if bytes[i] == b'{' {
        i += 1;
        loop {
            while matches!(bytes.get(i), Some(b',' | b' ')) {
                i += 1;
            }
            if *bytes.get(i)? == b'}' {
                i += 1;
                break;
            }
            let eq = line[i..].find('=')? + i;
            let key = line[i..eq].to_owned();
            if bytes.get(eq + 1) != Some(&b'"') {
                return None;
            }
            i = eq + 2;
            let mut value = String::new();
            let mut chars = line[i..].char_indices();
            loop {
                match chars.next()? {
                    (_, '\\') => {
                        let (_, n) = chars.next()?;
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                    (off, '"') => {
                        i += off + 1;
                        break;
                    }
                    (_, c) => value.push(c),
                }
            }
            labels.insert(key, value);
        }
    }
    Some((name, labels, &line[i..]))
}

/// `promtool check metrics` on `text`: Ok, or what promtool said.
pub fn promtool_check(text: &str) -> io::Result<Result<(), String>> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::other(format!(
                "cannot run promtool (apt-get install prometheus): {e}"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_plain_samples() {
        let text = "# TYPE a counter\na_total{x=\"1\",y=\"q\\\"uote,d\"} 3\nb 2.5\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.families, ["a"]);
        assert_eq!(e.sum("a_total", &[("y", "q\"uote,d")]), 3.0);
        assert_eq!(e.sum("b", &[]), 2.5);
        assert_eq!(e.sum("a_total", &[("x", "2")]), 0.0);
    }
}

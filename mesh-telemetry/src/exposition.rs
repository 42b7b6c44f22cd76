//! The Prometheus text format, read: what `mycel stat` scrapes from nodes' `/metrics` (and
//! what the tests check expositions with). Samples by name and labels; `# TYPE` lines kept in
//! order; anything else that starts with `#` skipped. A line that does not parse is an error
//! naming it, never a panic: the text comes from an address the user typed.

use std::collections::BTreeMap;

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

    #[test]
    fn a_line_that_does_not_parse_is_named() {
        for bad in [
            "a{x=1} 2",
            "a{x=\"1} 2",
            "a{x",
            "a 2\nb{",
            "a_total{x=\"1\"} nope",
        ] {
            let e = Exposition::parse(bad).unwrap_err();
            assert!(e.starts_with("line "), "{bad:?}: {e}");
        }
    }
}

//! One YAML file's documents, parsed again only where its text changed.
//!
//! A config dir may keep thousands of objects in one file, and an operator edits one of them:
//! parsing the whole file again would make that edit cost as much as the file. So a file is
//! cut at its document markers (a line that starts with `---`), and a piece whose text the
//! last version of the file also had keeps the documents parsed from it then.
//!
//! A piece parsed alone yields what it yields inside the whole text, with two exceptions that
//! are handled: text before the first marker that holds only comments and blank lines is no
//! document when a marker follows (alone, it is an empty one); and anything that fails to
//! parse is parsed again whole, so that an error names the line and document it names when
//! the file is parsed in one go.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    ops::Range,
    path::Path,
    sync::Arc,
};

use serde::Deserialize;

use crate::{
    config::ConfigError,
    resource::{self, Resource},
    validate,
};

/// A file's text and its documents, each with its number (from 1), checked alone: what holds
/// across documents and files is checked when they are put together.
#[derive(Debug)]
pub(crate) struct Documents {
    pub text: String,
    /// The pieces in order: the number of the piece's first document, and what it yielded.
    /// A piece equal to one of the last text's is that piece (the same allocation), which
    /// tells the parser which documents stayed without comparing them.
    order: Vec<(usize, Yielded)>,
    /// Each piece of `text` (its place in `order` and in the text), by the hash of its text.
    pieces: HashMap<u64, Vec<(usize, Range<usize>)>>,
}

/// Below this many bytes per piece on average, a file is parsed whole.
const MIN_AVERAGE_PIECE: usize = 32;

/// What one piece yielded, document by document (`None`: an empty one).
type Yielded = Arc<[Option<Resource>]>;

impl Documents {
    /// Parses `text`, reusing what `last` (the file's previous text) parsed of equal pieces.
    pub fn parse(file: &Path, text: &str, last: Option<&Documents>) -> Result<Self, ConfigError> {
        match Self::by_piece(text, last) {
            Some(parsed) => Ok(parsed),
            // Parsed whole for the error it gives there.
            None => {
                let mut yielded = Vec::new();
                for (number, resource) in parse_whole(file, text)? {
                    yielded.resize(number - 1, None);
                    yielded.push(Some(resource));
                }
                Ok(Self {
                    text: text.to_owned(),
                    order: vec![(1, yielded.into())],
                    pieces: HashMap::new(),
                })
            }
        }
    }

    /// Every document, with its number.
    pub fn docs(&self) -> impl Iterator<Item = (usize, &Resource)> + '_ {
        self.order.iter().flat_map(|(first, yielded)| {
            yielded
                .iter()
                .enumerate()
                .filter_map(move |(i, r)| r.as_ref().map(|r| (first + i, r)))
        })
    }

    /// The documents of the pieces that `other` does not share with `self`, counted: a
    /// piece that `self` has twice and `other` once is once in the result.
    pub fn not_in<'a>(&'a self, other: &Documents) -> impl Iterator<Item = &'a Resource> + 'a {
        let mut theirs: HashMap<*const Option<Resource>, usize> = HashMap::new();
        for (_, y) in &other.order {
            *theirs.entry(y.as_ptr()).or_default() += 1;
        }
        self.order
            .iter()
            .filter(move |(_, y)| match theirs.get_mut(&y.as_ptr()) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            })
            .flat_map(|(_, y)| y.iter().flatten())
    }

    /// `None` where parsing by piece could differ from parsing whole: a piece that does not
    /// parse, a header whose emptiness only libyaml could judge, or pieces too small to be
    /// worth keeping.
    fn by_piece(text: &str, last: Option<&Documents>) -> Option<Self> {
        let ranges = pieces(text);
        // A real document is longer than this on average; a file of bare markers (millions
        // of empty documents) would cost far more kept piece by piece than parsed whole.
        if ranges.len() > 1 && ranges.len() > text.len() / MIN_AVERAGE_PIECE {
            return None;
        }
        let mut order = Vec::with_capacity(ranges.len());
        let mut index: HashMap<u64, Vec<(usize, Range<usize>)>> =
            HashMap::with_capacity(ranges.len());
        let mut number = 0;
        for (i, range) in ranges.iter().enumerate() {
            let piece = &text[range.clone()];
            let header = i == 0 && ranges.len() > 1 && !piece.starts_with("---");
            if header && is_blank(piece) {
                continue; // no document before the first marker
            }
            let hash = hash_of(piece);
            let known = last.and_then(|l| l.known(hash, piece));
            let yielded = match known {
                Some(y) => y,
                None => parse_piece(piece)?,
            };
            // Alone, a header libyaml reads as nothing is an empty document; in the whole
            // text it may be none. Only the whole text tells.
            if header && yielded.len() == 1 && yielded[0].is_none() {
                return None;
            }
            index
                .entry(hash)
                .or_default()
                .push((order.len(), range.clone()));
            let count = yielded.len();
            order.push((number + 1, yielded));
            number += count;
        }
        Some(Self {
            text: text.to_owned(),
            order,
            pieces: index,
        })
    }

    /// What `piece` yielded when it was part of this text.
    fn known(&self, hash: u64, piece: &str) -> Option<Yielded> {
        self.pieces
            .get(&hash)?
            .iter()
            .find(|(_, range)| &self.text[range.clone()] == piece)
            .map(|(at, _)| self.order[*at].1.clone())
    }
}

/// Where `text` is cut: before each line that starts a document with `---` (but the first).
fn pieces(text: &str) -> Vec<Range<usize>> {
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if marker && at > 0 {
            starts.push(at);
        }
        at += line.len();
    }
    let mut ranges: Vec<Range<usize>> = starts.windows(2).map(|w| w[0]..w[1]).collect();
    ranges.push(starts[starts.len() - 1]..text.len());
    ranges
}

/// Only blank lines and comments, after an optional byte-order mark, with `\n` or `\r\n` line
/// ends: text that is no document to libyaml before a marker. Judged narrowly on purpose:
/// libyaml ends a comment at a lone `\r` (or NEL, LS, PS) and refuses control characters,
/// so a header holding any of those is left for the parse to judge.
fn is_blank(piece: &str) -> bool {
    let piece = piece.strip_prefix('\u{feff}').unwrap_or(piece);
    piece.split('\n').all(|line| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.trim_start_matches(' ');
        match line.strip_prefix('#') {
            Some(comment) => comment.chars().all(in_comment),
            None => line.is_empty(),
        }
    })
}

/// YAML's printable characters, less the line breaks and the byte-order mark.
fn in_comment(c: char) -> bool {
    matches!(c,
        '\t' | '\u{20}'..='\u{7e}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}'
        | '\u{10000}'..='\u{10ffff}')
        && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

fn hash_of(piece: &str) -> u64 {
    let mut h = DefaultHasher::new();
    piece.hash(&mut h);
    h.finish()
}

/// The documents of one piece, or `None` if any of them fails.
fn parse_piece(piece: &str) -> Option<Yielded> {
    let mut out = Vec::new();
    for de in serde_yaml::Deserializer::from_str(piece) {
        let value = serde_yaml::Value::deserialize(de).ok()?;
        if value.is_null() {
            out.push(None);
            continue;
        }
        out.push(Some(resource::parse_document(value).ok()?));
    }
    Some(out.into())
}

/// The whole text in one go.
pub(crate) fn parse_whole(file: &Path, text: &str) -> Result<Vec<(usize, Resource)>, ConfigError> {
    let mut out = Vec::new();
    for document in yaml_documents(file, text) {
        let (doc, value) = document?;
        let resource = resource::parse_document(value).map_err(|message| ConfigError::Invalid {
            file: file.to_path_buf(),
            doc,
            message,
        })?;
        out.push((doc, resource));
    }
    Ok(out)
}

/// Each document of `text` as YAML, with its number (from 1); empty ones (e.g. after a
/// trailing `---`) are left out. One that is not YAML is an error that names it.
pub fn yaml_documents<'a>(
    file: &'a Path,
    text: &'a str,
) -> impl Iterator<Item = Result<(usize, serde_yaml::Value), ConfigError>> + 'a {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .filter_map(move |(index, de)| {
            let doc = index + 1;
            match serde_yaml::Value::deserialize(de) {
                Ok(value) if value.is_null() => None,
                Ok(value) => Some(Ok((doc, value))),
                Err(e) => Some(Err(ConfigError::Invalid {
                    file: file.to_path_buf(),
                    doc,
                    message: validate::one_line(&e),
                })),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: NAME}\nspec: {node: n1, netns: /run/netns/NAME, addresses: [10.0.0.1]}\n";

    /// Texts made of documents, comments, blank lines, markers with and without content on
    /// their line, document ends and bad documents: parsed by piece (afresh, and reusing the
    /// last text's pieces) they give what parsing them whole gives, documents and numbers, or
    /// the same error.
    #[test]
    fn parsing_by_piece_agrees_with_parsing_whole() {
        let bits: Vec<String> = vec![
            W.replace("NAME", "a"),
            W.replace("NAME", "b"),
            "---\n".into(),
            "--- \n".into(),
            format!("--- {}", "{apiVersion: mycel.dev/v1alpha1, kind: AccessPolicy, metadata: {name: p}, spec: {action: Deny}}\n"),
            "# a comment\n".into(),
            "\n".into(),
            "...\n".into(),
            "kind: [unclosed\n".into(),
            "kind: Nonsense\n".into(),
            "a: |\n  ---x\n".into(),
            "----\n".into(),
            "# header\r{apiVersion: mycel.dev/v1alpha1, kind: AccessPolicy, metadata: {name: hidden}, spec: {action: Deny}}\n".into(),
            "\u{feff}# bom\n".into(),
            "\t# tab\n".into(),
            "# \u{7}bell\n".into(),
            "\u{a0}# nbsp\n".into(),
            "   \n".into(),
            "# crlf\r\n".into(),
            "# Généré — ne pas éditer ©\n".into(),
            "  # indented\n".into(),
            "# line\u{2028}{apiVersion: mycel.dev/v1alpha1, kind: AccessPolicy, metadata: {name: ls}, spec: {action: Deny}}\n".into(),
            "# next\u{85}line\n".into(),
        ];
        let mut rng = fastrand::Rng::with_seed(0x853c_49e6_748f_ea9bu64);
        let mut next = move || rng.u64(..);
        let file = Path::new("f.yaml");
        let mut last: Option<Documents> = None;
        let (mut oks, mut errs) = (0, 0);
        for _ in 0..3000 {
            let text: String = (0..next() % 7)
                .map(|_| bits[(next() % bits.len() as u64) as usize].as_str())
                .collect();
            let whole = parse_whole(file, &text).map_err(|e| e.to_string());
            let fresh = Documents::parse(file, &text, None);
            let reused = Documents::parse(file, &text, last.as_ref());
            for by_piece in [&fresh, &reused] {
                let got = by_piece
                    .as_ref()
                    .map(|d| d.docs().map(|(n, r)| (n, r.clone())).collect::<Vec<_>>())
                    .map_err(|e| e.to_string());
                assert_eq!(got, whole, "{text:?}");
            }
            if whole.is_ok() {
                oks += 1
            } else {
                errs += 1
            }
            if let Ok(d) = reused {
                last = Some(d);
            }
        }
        assert!(oks > 500 && errs > 500, "{oks} parsed, {errs} refused");
    }

    /// Headers people write (not plain ASCII, indented) keep a file parsed by piece.
    #[test]
    fn a_commented_header_is_no_document() {
        for header in [
            "# Généré — ne pas éditer © 2026\n",
            "  # indented\n\n",
            "\u{feff}# bom\r\n",
        ] {
            let text = format!("{header}---\n{}", W.replace("NAME", "a"));
            let d = Documents::parse(Path::new("f"), &text, None).unwrap();
            assert_eq!(d.order.len(), 1, "{header:?} parsed by piece");
            assert_eq!(d.docs().next().map(|(n, _)| n), Some(1));
        }
    }

    #[test]
    fn an_edited_document_is_the_only_one_parsed_again() {
        let text: String = (0..50)
            .map(|i| format!("---\n{}", W.replace("NAME", &format!("w{i}"))))
            .collect();
        let first = Documents::parse(Path::new("f"), &text, None).unwrap();
        let edited = text.replace("name: w7}", "name: w7, labels: {a: b}}");
        let pieces = pieces(&edited);
        let reused = pieces
            .iter()
            .filter(|r| {
                first
                    .known(hash_of(&edited[(*r).clone()]), &edited[(*r).clone()])
                    .is_some()
            })
            .count();
        assert_eq!((pieces.len(), reused), (50, 49));
        let second = Documents::parse(Path::new("f"), &edited, Some(&first)).unwrap();
        let docs: Vec<_> = second.docs().map(|(n, r)| (n, r.clone())).collect();
        assert_eq!(docs, parse_whole(Path::new("f"), &edited).unwrap());
        assert_eq!(second.not_in(&first).count(), 1);
        assert_eq!(first.not_in(&second).count(), 1);
    }
}

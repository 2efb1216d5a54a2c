//! `document.omit`: the fields left out of a finished document, filtered from its bytes.
//!
//! Why on the bytes: the writer (document.rs) puts fields in several places (the head,
//! the tail, GeoIP fragments from the cache), and a check at each would spread one
//! rule over all of them. The document is compact JSON we wrote ourselves (no
//! whitespace, keys unescaped), so one left-to-right pass copies what stays: objects
//! named in the tree are filtered recursively and dropped when nothing is left in
//! them, as `pipeline.omit.apply` does on the Python path. Cost: one pass over the
//! document, only when something is left out.

use crate::json::find_special;

pub enum Omit {
    All,
    Below(Node),
}

/// key -> what to leave out of its value.
pub struct Node(Vec<(Vec<u8>, Omit)>);

impl Node {
    /// The tree of dotted paths (`a.b`, `a.c.d`); a path under one left out whole adds
    /// nothing (`pipeline.omit.tree`).
    pub fn from_paths(paths: &[String]) -> Node {
        let mut root = Node(Vec::new());
        for path in paths {
            let parts: Vec<&str> = if path == "@timestamp" { vec![path] } else { path.split('.').collect() };
            root.insert(&parts);
        }
        root
    }

    fn insert(&mut self, parts: &[&str]) {
        let Some((first, rest)) = parts.split_first() else { return };
        let i = match self.0.iter().position(|(k, _)| k == first.as_bytes()) {
            Some(i) => i,
            None => {
                let fresh = if rest.is_empty() { Omit::All } else { Omit::Below(Node(Vec::new())) };
                self.0.push((first.as_bytes().to_vec(), fresh));
                self.0.len() - 1
            }
        };
        if rest.is_empty() {
            self.0[i].1 = Omit::All;
        } else if let Omit::Below(child) = &mut self.0[i].1 {
            child.insert(rest);
        } // else: already left out whole
    }

    fn get(&self, key: &[u8]) -> Option<&Omit> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, o)| o)
    }
}

/// Index just past the string starting at `i` (its opening quote).
fn skip_string(b: &[u8], mut i: usize) -> usize {
    i += 1;
    loop {
        i = find_special(b, i);
        match b.get(i) {
            Some(b'"') => return i + 1,
            Some(b'\\') => i += 2,
            Some(_) => i += 1, // a control byte (never written unescaped; tolerated)
            None => return b.len(),
        }
    }
}

/// Index just past the value starting at `i`.
fn skip_value(b: &[u8], mut i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => skip_string(b, i),
        Some(b'{') | Some(b'[') => {
            let mut depth = 0usize;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = skip_string(b, i);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            i
        }
        _ => {
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']') {
                i += 1;
            }
            i
        }
    }
}

/// Copy the object starting at `src[i]` into `out` without `node`'s fields; returns the
/// index past it. Malformed input (never produced by document.rs) is copied as far as
/// it can be read, never panics.
pub fn filter_object(src: &[u8], mut i: usize, node: &Node, out: &mut Vec<u8>) -> usize {
    out.push(b'{');
    let first = out.len();
    i += 1;
    while i < src.len() && src[i] != b'}' {
        if src[i] != b'"' {
            break; // not our JSON: stop filtering here
        }
        let key_start = i;
        let key_end = skip_string(src, i); // past the closing quote
        let key = &src[key_start + 1..key_end.saturating_sub(1).max(key_start + 1)];
        let value_start = key_end + 1; // past ':'
        match node.get(key) {
            Some(Omit::All) => i = skip_value(src, value_start),
            Some(Omit::Below(child)) if src.get(value_start) == Some(&b'{') => {
                let mark = out.len();
                if out.len() > first {
                    out.push(b',');
                }
                out.extend_from_slice(&src[key_start..value_start]);
                let inner = out.len();
                i = filter_object(src, value_start, child, out);
                if out.len() == inner + 2 {
                    out.truncate(mark); // nothing left in it: `{}` is not written
                }
            }
            _ => {
                let end = skip_value(src, value_start);
                if out.len() > first {
                    out.push(b',');
                }
                out.extend_from_slice(&src[key_start..end.min(src.len())]);
                i = end;
            }
        }
        if src.get(i) == Some(&b',') {
            i += 1;
        }
    }
    out.push(b'}');
    i + 1
}

/// The document `parts` (head, tail: one JSON object split in two) into `out`
/// (cleared first) without the tree's fields.
pub fn filter_document(parts: &[&[u8]], node: &Node, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    scratch.clear();
    for p in parts {
        scratch.extend_from_slice(p);
    }
    out.clear();
    filter_object(scratch, 0, node, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(doc: &str, paths: &[&str]) -> String {
        let node = Node::from_paths(&paths.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        filter_document(&[doc.as_bytes()], &node, &mut scratch, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn leaves_out_fields_and_emptied_objects() {
        let doc = r#"{"a":1,"k":{"x":"q\"}","y":[1,{"z":2}]},"g":{"c":"d","e":{"f":1}},"t":["u"]}"#;
        assert_eq!(run(doc, &["k"]), r#"{"a":1,"g":{"c":"d","e":{"f":1}},"t":["u"]}"#);
        assert_eq!(run(doc, &["k.x", "k.y"]), r#"{"a":1,"g":{"c":"d","e":{"f":1}},"t":["u"]}"#);
        assert_eq!(run(doc, &["a", "g.e.f"]), r#"{"k":{"x":"q\"}","y":[1,{"z":2}]},"g":{"c":"d"},"t":["u"]}"#);
        assert_eq!(run(doc, &["t", "g.c", "g.e"]), r#"{"a":1,"k":{"x":"q\"}","y":[1,{"z":2}]}}"#);
        assert_eq!(run(doc, &["nope.deeper", "a.b"]), doc);
        assert_eq!(run(doc, &["k", "k.x"]), run(doc, &["k"]));
    }
}

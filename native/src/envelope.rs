//! The collector envelopes the fast path takes (Fluent Bit, Fluentd, bare lines), with
//! `pipeline.decode.envelope` as the reference: every decision mirrors `_decode` and
//! `_from_json`, and anything outside the common case is handed back to it.
//!
//! Fluent Bit's `format msgpack` records are read by `crate::msgpack` into the same
//! members as JSON; its `iso8601`/`iso8601_ns` stamps and `format raw` lines run here too.
//!
//! Records of the container runtime's own formats (CRI lines, Docker json-file) are
//! always Python's: only its partial-line joiner may decide whether they continue a
//! split line. A bare line that merely starts with a digit (a custom format beginning
//! with `%START_TIME%` or an address) is not one of them and runs here.
//!
//! Hot path: the record is scanned once by a small strict reader (`Scan`) that keeps
//! only the few members that matter, borrowed where possible (no map, no tree). Kubernetes metadata repeats per pod,
//! so its rendering is cached by its raw text.

use std::borrow::Cow;
use std::sync::Arc;

use ahash::AHashMap;
use serde_json::Value;

use crate::json;
use crate::scan::is_py_space;

pub struct Env {
    pub kind: &'static str,
    pub payload: String,
    pub stream: Option<String>,
    pub ts: Option<f64>,
    pub kubernetes: Option<Arc<Vec<u8>>>,
}

pub enum Decoded {
    Ok(Env),
    /// The Python path handles this record (invalid input, ISO stamps, Envoy JSON, a
    /// CRI or Docker json-file envelope, which may be one piece of a split line...).
    Fallback,
}

/// Whether an ASCII line is a CRI record: `_CRI.fullmatch` of `pipeline.decode.envelope`,
/// `(\d{4}-\d\d-\d\dT\S+) (stdout|stderr) ([FP])(?: (.*))?` (DOTALL).
///
/// On ASCII the regex has one reading: `\S+` ends at the first space-like byte, which
/// must be the single space before the stream. Callers hand non-ASCII lines (Unicode
/// `\d` and `\s`) to Python without asking. No allocation: this runs for every line
/// that starts with a digit.
fn is_cri(line: &[u8]) -> bool {
    const STAMP: &[u8; 11] = b"dddd-dd-ddT"; // d: an ASCII digit
    if line.len() < 11 || !STAMP.iter().zip(line).all(|(&p, &c)| if p == b'd' { c.is_ascii_digit() } else { c == p }) {
        return false;
    }
    let token = line[11..].iter().take_while(|&&c| !is_py_space(c)).count();
    if token == 0 {
        return false;
    }
    let rest = &line[11 + token..];
    let Some(tail) = rest.strip_prefix(b" stdout ").or_else(|| rest.strip_prefix(b" stderr ")) else {
        return false;
    };
    matches!(tail, [b'F' | b'P'] | [b'F' | b'P', b' ', ..])
}

/// Rendered Kubernetes metadata by raw JSON text; None: not renderable here (floats).
/// Also the core's envelope setting, since every decode already receives it.
#[derive(Default)]
pub struct KubeCache {
    map: AHashMap<Box<str>, Option<Arc<Vec<u8>>>>,
    /// `parse.envelope: raw` (`ENVELOPE_RAW` in Python): no detection, every record
    /// is the access-log line itself.
    pub raw_envelope: bool,
}

impl KubeCache {
    fn render(&mut self, raw: &str) -> Option<Arc<Vec<u8>>> {
        if let Some(hit) = self.map.get(raw) {
            return hit.clone();
        }
        let rendered = serde_json::from_str::<Value>(raw).ok().and_then(|v| {
            let mut buf = Vec::with_capacity(raw.len());
            json::write_value(&mut buf, &v).ok().map(|()| Arc::new(buf))
        });
        if self.map.len() >= 1024 {
            self.map.clear(); // bounded: one entry per pod in practice
        }
        self.map.insert(raw.into(), rendered.clone());
        rendered
    }
}

/// A strict, allocation-light reader for the top level of a collector record.
///
/// It accepts a subset of JSON (no `\u` escapes of surrogates, nesting up to 64
/// levels, no raw control characters) and says None for anything else, which sends
/// the record to the Python path; so whatever it accepts, orjson accepts and reads the
/// same way. Values of keys that are not needed are only skipped, never built.
struct Scan<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    /// The string at the cursor, decoded (borrowed when it has no escapes).
    fn string(&mut self) -> Option<Cow<'a, str>> {
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        let start = self.i;
        // Fast path: up to the closing quote with nothing to decode, 8 bytes a step.
        self.i = crate::json::find_special(self.b, self.i);
        match self.b.get(self.i) {
            Some(b'"') => {
                self.i += 1;
                return Some(Cow::Borrowed(&self.s[start..self.i - 1]));
            }
            Some(b'\\') => {}
            _ => return None, // raw control character (not JSON) or unterminated
        }
        let mut out = String::with_capacity(self.i - start + 64);
        out.push_str(&self.s[start..self.i]);
        let mut run = self.i;
        while self.i < self.b.len() {
            match self.b[self.i] {
                b'"' => {
                    out.push_str(&self.s[run..self.i]);
                    self.i += 1;
                    return Some(Cow::Owned(out));
                }
                b'\\' => {
                    out.push_str(&self.s[run..self.i]);
                    let e = *self.b.get(self.i + 1)?;
                    self.i += 2;
                    out.push(match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4)?;
                            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                                return None;
                            }
                            self.i += 4;
                            // None for surrogates (paired or lone): Python decides.
                            char::from_u32(u32::from_str_radix(hex, 16).ok()?)?
                        }
                        _ => return None,
                    });
                    run = self.i;
                }
                c if c < 0x20 => return None,
                _ => self.i = crate::json::find_special(self.b, self.i),
            }
        }
        None
    }

    fn digits(&mut self) -> bool {
        let start = self.i;
        while self.i < self.b.len() && self.b[self.i].is_ascii_digit() {
            self.i += 1;
        }
        self.i > start
    }

    fn number(&mut self) -> Option<()> {
        let start = self.i;
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !self.digits() {
                return None;
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !self.digits() {
                return None;
            }
        }
        // orjson refuses numbers that overflow a double ("1e400"); so does this, and
        // very long ones are left to it altogether.
        let text = &self.s[start..self.i];
        if text.len() > 64 || !text.parse::<f64>().ok()?.is_finite() {
            return None;
        }
        Some(())
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.b[self.i..].starts_with(word.as_bytes()).then(|| self.i += word.len())
    }

    /// Reads past one value; returns its text.
    fn value(&mut self, depth: usize) -> Option<&'a str> {
        self.ws();
        let start = self.i;
        match *self.b.get(self.i)? {
            b'"' => {
                self.string()?;
            }
            b'{' => {
                if depth > 64 {
                    return None;
                }
                self.i += 1;
                if self.eat(b'}').is_none() {
                    loop {
                        self.ws();
                        self.string()?;
                        self.eat(b':')?;
                        self.value(depth + 1)?;
                        if self.eat(b',').is_none() {
                            self.eat(b'}')?;
                            break;
                        }
                    }
                }
            }
            b'[' => {
                if depth > 64 {
                    return None;
                }
                self.i += 1;
                if self.eat(b']').is_none() {
                    loop {
                        self.value(depth + 1)?;
                        if self.eat(b',').is_none() {
                            self.eat(b']')?;
                            break;
                        }
                    }
                }
            }
            b't' => self.literal("true")?,
            b'f' => self.literal("false")?,
            b'n' => self.literal("null")?,
            _ => self.number()?,
        }
        Some(&self.s[start..self.i])
    }

    /// A string value as text, or None inside Some for any other value.
    fn text(&mut self) -> Option<Option<Cow<'a, str>>> {
        self.ws();
        if self.b.get(self.i) == Some(&b'"') {
            Some(Some(self.string()?))
        } else {
            self.value(1)?;
            Some(None)
        }
    }
}

/// The members of a collector record that decide its envelope (from JSON text, or
/// from a msgpack map by `crate::msgpack`).
#[derive(Default)]
pub(crate) struct Top<'a> {
    pub log: Option<Option<Cow<'a, str>>>, // Some(None): present but not a string
    pub message: Option<Option<Cow<'a, str>>>,
    pub stream: Option<Option<Cow<'a, str>>>,
    pub at_timestamp: Option<Cow<'a, str>>, // JSON text of the value
    pub time: Option<Cow<'a, str>>,
    pub timestamp: Option<Cow<'a, str>>,
    pub kubernetes: Option<Cow<'a, str>>,
    /// A key Docker's json-file driver never writes.
    pub not_docker: bool,
}

fn parse_top(line: &str) -> Option<Top<'_>> {
    let mut sc = Scan { s: line, b: line.as_bytes(), i: 0 };
    let mut top = Top::default();
    sc.eat(b'{')?;
    if sc.eat(b'}').is_none() {
        loop {
            sc.ws();
            let key = sc.string()?;
            sc.eat(b':')?;
            // Later duplicates win, as in a Python dict built from the same text.
            match key.as_ref() {
                "log" => top.log = Some(sc.text()?),
                "message" => top.message = Some(sc.text()?),
                "stream" => top.stream = Some(sc.text()?),
                "@timestamp" => top.at_timestamp = Some(Cow::Borrowed(sc.value(1)?)),
                "time" => top.time = Some(Cow::Borrowed(sc.value(1)?)),
                "timestamp" => top.timestamp = Some(Cow::Borrowed(sc.value(1)?)),
                "kubernetes" => top.kubernetes = Some(Cow::Borrowed(sc.value(1)?)),
                _ => {
                    sc.value(1)?;
                }
            }
            if !matches!(key.as_ref(), "log" | "stream" | "time" | "attrs") {
                top.not_docker = true;
            }
            if sc.eat(b',').is_none() {
                sc.eat(b'}')?;
                break;
            }
        }
    }
    sc.ws();
    (sc.i == sc.b.len()).then_some(top)
}

/// parse_epoch_or_iso for what JSON can hold; Err: only Python can say (strings
/// other than the RFC 3339 UTC form Fluent Bit writes).
fn epoch(v: Option<&str>) -> Result<Option<f64>, ()> {
    let Some(raw) = v else { return Ok(None) };
    match raw.as_bytes()[0] {
        // Fluent Bit's `timestamp_format iso8601` / `iso8601_ns`; any other text: Python.
        b'"' => crate::timefmt::rfc3339_utc(&raw[1..raw.len() - 1]).map(Some).ok_or(()),
        b'-' | b'0'..=b'9' => {
            let f: f64 = raw.parse().map_err(|_| ())?;
            let f = if f > 1e11 { f / 1000.0 } else { f };
            // timeparse.MIN_EPOCH..MAX_EPOCH; outside it the time is unknown
            Ok((0.0..253_402_300_800.0).contains(&f).then_some(f))
        }
        _ => Ok(None), // null, booleans, objects, arrays
    }
}

fn strip_line_end(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

pub fn decode(data: &[u8], kube_cache: &mut KubeCache) -> Decoded {
    if matches!(data.first(), Some(0x80..=0x8f | 0xde | 0xdf)) && !kube_cache.raw_envelope {
        // Fluent Bit's `format msgpack` (see `pipeline.decode.envelope`): not UTF-8 text.
        return match crate::msgpack::parse_top(data) {
            Some(top) => from_top(top, kube_cache),
            None => Decoded::Fallback,
        };
    }
    let Ok(text) = std::str::from_utf8(data) else { return Decoded::Fallback };
    let line = strip_line_end(text);
    let Some(&first) = line.as_bytes().first() else { return Decoded::Fallback };
    if line.bytes().all(is_py_space) || !first.is_ascii() {
        return Decoded::Fallback;
    }
    if kube_cache.raw_envelope {
        return Decoded::Ok(Env { kind: "bare", payload: line.to_owned(), stream: None, ts: None,
                                 kubernetes: None });
    }
    if first.is_ascii_digit() && (!line.is_ascii() || is_cri(line.as_bytes())) {
        return Decoded::Fallback; // CRI (or maybe, with Unicode digits): the joiner's
    }
    if first != b'{' {
        return Decoded::Ok(Env { kind: "bare", payload: line.to_owned(), stream: None, ts: None,
                                 kubernetes: None });
    }
    let Some(top) = parse_top(line) else { return Decoded::Fallback };
    from_top(top, kube_cache)
}

/// The envelope of a collector record, whichever form it came in.
fn from_top(top: Top<'_>, kube_cache: &mut KubeCache) -> Decoded {
    let (payload, from_log) = match (top.log, top.message) {
        (Some(Some(p)), _) => (p, true),
        (_, Some(Some(p))) => (p, false),
        _ => return Decoded::Fallback, // Merge_Log, or an Envoy JSON line itself
    };
    let kube_raw = top.kubernetes.as_deref().filter(|k| k.starts_with('{'));
    let has_stamp = top.at_timestamp.is_some();
    if from_log && !has_stamp && kube_raw.is_none() && !top.not_docker {
        return Decoded::Fallback; // Docker json-file: lines may be split, the joiner's
    }
    let kind = if has_stamp { "fluent-bit" } else { "fluentd" };
    let stamp = match top.at_timestamp.as_deref() {
        Some(v) if v != "null" => Some(v),
        _ => top.time.as_deref().or(top.timestamp.as_deref()),
    };
    let Ok(ts) = epoch(stamp) else { return Decoded::Fallback };
    let kubernetes = match kube_raw {
        Some(raw) => match kube_cache.render(raw) {
            Some(k) => Some(k),
            None => return Decoded::Fallback,
        },
        None => None,
    };
    let stream = top.stream.flatten().map(Cow::into_owned);
    let inner = strip_line_end(&payload);
    match inner.as_bytes().first() {
        // The CRI line itself, forwarded by a collector without a CRI parser: Python
        // unwraps it (and joins its pieces); a line merely starting with a digit is ours.
        Some(c) if c.is_ascii_digit() && (!inner.is_ascii() || is_cri(inner.as_bytes())) => {
            return Decoded::Fallback
        }
        Some(c) if !c.is_ascii() => return Decoded::Fallback,
        _ => {}
    }
    let payload = if inner.len() == payload.len() { payload.into_owned() } else { inner.to_owned() };
    Decoded::Ok(Env { kind, payload, stream, ts, kubernetes })
}

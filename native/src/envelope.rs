//! The collector envelopes the fast path takes (Fluent Bit, Fluentd, bare lines), with
//! `pipeline.decode.envelope` as the reference: every decision mirrors `_decode` and
//! `_from_json`, and anything outside the common case is handed back to it.
//!
//! Hot path: the record is scanned once into borrowed raw values of the few keys that
//! matter (no map, no tree); only those are parsed. Kubernetes metadata repeats per pod,
//! so its rendering is cached by its raw text.

use std::borrow::Cow;
use std::fmt;
use std::rc::Rc;

use ahash::AHashMap;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::json;
use crate::scan::is_py_space;

pub struct Env {
    pub kind: &'static str,
    pub payload: String,
    pub stream: Option<String>,
    pub ts: Option<f64>,
    pub kubernetes: Option<Rc<Vec<u8>>>,
}

pub enum Decoded {
    Ok(Env),
    /// The Python path handles this record (invalid input, ISO stamps, Envoy JSON...).
    Fallback,
    /// A record that may be one piece of a split line (CRI, Docker json-file): partial
    /// joining is stateful across records, so the whole batch takes the Python path.
    PartialRisk,
}

/// Rendered Kubernetes metadata by raw JSON text; None: not renderable here (floats).
#[derive(Default)]
pub struct KubeCache {
    map: AHashMap<Box<str>, Option<Rc<Vec<u8>>>>,
}

impl KubeCache {
    fn render(&mut self, raw: &str) -> Option<Rc<Vec<u8>>> {
        if let Some(hit) = self.map.get(raw) {
            return hit.clone();
        }
        let rendered = serde_json::from_str::<Value>(raw).ok().and_then(|v| {
            let mut buf = Vec::with_capacity(raw.len());
            json::write_value(&mut buf, &v).ok().map(|()| Rc::new(buf))
        });
        if self.map.len() >= 1024 {
            self.map.clear(); // bounded: one entry per pod in practice
        }
        self.map.insert(raw.into(), rendered.clone());
        rendered
    }
}

/// A value read as a string when it is one, skipped otherwise: the access-log line is
/// read once, not scanned as raw JSON and then parsed again.
enum Text<'a> {
    Str(Cow<'a, str>),
    Other,
}

impl<'de> serde::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_unit<E>(self) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Text<'de>, A::Error> {
                while a.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Text::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Text<'de>, A::Error> {
                while a.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Text::Other)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Default)]
struct Top<'a> {
    log: Option<Text<'a>>,
    message: Option<Text<'a>>,
    at_timestamp: Option<&'a RawValue>,
    time: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    kubernetes: Option<&'a RawValue>,
    /// A key Docker's json-file driver never writes.
    not_docker: bool,
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
        let mut top = Top::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            // Later duplicates win, as in a Python dict built from the same text.
            match key.as_ref() {
                "log" => top.log = Some(map.next_value()?),
                "message" => top.message = Some(map.next_value()?),
                "@timestamp" => top.at_timestamp = Some(map.next_value()?),
                "time" => top.time = Some(map.next_value()?),
                "timestamp" => top.timestamp = Some(map.next_value()?),
                "stream" => top.stream = Some(map.next_value()?),
                "kubernetes" => top.kubernetes = Some(map.next_value()?),
                _ => {
                    map.next_value::<&RawValue>()?; // validated, not kept
                }
            }
            if !matches!(key.as_ref(), "log" | "stream" | "time" | "attrs") {
                top.not_docker = true;
            }
        }
        Ok(top)
    }
}

/// A `\uD800`-`\uDFFF` escape anywhere: orjson refuses lone surrogates even in values
/// this scan only skips (serde_json does not check those), so such records go to
/// Python. Over-approximate on purpose (paired surrogates, an escaped backslash
/// before `u`): a false positive only costs the slower path.
fn has_surrogate_escape(line: &str) -> bool {
    let b = line.as_bytes();
    let mut i = 0;
    while let Some(p) = b[i..].iter().position(|&c| c == b'\\') {
        let at = i + p;
        if b.get(at + 1) == Some(&b'u')
            && matches!(b.get(at + 2), Some(b'd' | b'D'))
            && matches!(b.get(at + 3), Some(b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F'))
        {
            return true;
        }
        i = at + 2; // skip the escaped character (an escaped backslash included)
        if i >= b.len() {
            return false;
        }
    }
    false
}

fn parse_top(line: &str) -> Option<Top<'_>> {
    if has_surrogate_escape(line) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(line);
    let top = (&mut de).deserialize_map(TopVisitor).ok()?;
    de.end().ok()?;
    Some(top)
}

fn as_str(v: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let raw = v?.get();
    if !raw.starts_with('"') {
        return None;
    }
    serde_json::from_str::<Cow<str>>(raw).ok()
}

fn is_null(v: &RawValue) -> bool {
    v.get() == "null"
}

/// parse_epoch_or_iso for what JSON can hold; Err: only Python can say (strings).
fn epoch(v: Option<&RawValue>) -> Result<Option<f64>, ()> {
    let Some(v) = v else { return Ok(None) };
    let raw = v.get();
    match raw.as_bytes()[0] {
        b'"' => Err(()),
        b'-' | b'0'..=b'9' => {
            let f: f64 = serde_json::from_str(raw).map_err(|_| ())?;
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
    let Ok(text) = std::str::from_utf8(data) else { return Decoded::Fallback };
    let line = strip_line_end(text);
    let Some(&first) = line.as_bytes().first() else { return Decoded::Fallback };
    if line.bytes().all(is_py_space) || !first.is_ascii() {
        return Decoded::Fallback;
    }
    if first.is_ascii_digit() {
        return Decoded::PartialRisk; // possibly CRI
    }
    if first != b'{' {
        return Decoded::Ok(Env { kind: "bare", payload: line.to_owned(), stream: None, ts: None,
                                 kubernetes: None });
    }
    let Some(top) = parse_top(line) else { return Decoded::Fallback };
    let (payload, from_log) = match (top.log, top.message) {
        (Some(Text::Str(p)), _) => (p, true),
        (_, Some(Text::Str(p))) => (p, false),
        _ => return Decoded::Fallback, // Merge_Log, or an Envoy JSON line itself
    };
    let kube_raw = top.kubernetes.map(RawValue::get).filter(|k| k.starts_with('{'));
    let has_stamp = top.at_timestamp.is_some();
    if from_log && !has_stamp && kube_raw.is_none() && !top.not_docker {
        return Decoded::PartialRisk; // Docker json-file: lines may be split
    }
    let kind = if has_stamp { "fluent-bit" } else { "fluentd" };
    let stamp = match top.at_timestamp {
        Some(v) if !is_null(v) => Some(v),
        _ => top.time.or(top.timestamp),
    };
    let Ok(ts) = epoch(stamp) else { return Decoded::Fallback };
    let kubernetes = match kube_raw {
        Some(raw) => match kube_cache.render(raw) {
            Some(k) => Some(k),
            None => return Decoded::Fallback,
        },
        None => None,
    };
    let stream = as_str(top.stream).map(Cow::into_owned);
    let inner = strip_line_end(&payload);
    match inner.as_bytes().first() {
        Some(c) if c.is_ascii_digit() => return Decoded::PartialRisk, // CRI inside
        Some(c) if !c.is_ascii() => return Decoded::Fallback,
        _ => {}
    }
    let payload = if inner.len() == payload.len() { payload.into_owned() } else { inner.to_owned() };
    Decoded::Ok(Env { kind, payload, stream, ts, kubernetes })
}

//! Fluent Bit's kafka `format msgpack` record (one map: `@timestamp` float64, then the
//! record's keys, strings as msgpack str) read into the same `Top` the JSON reader
//! fills, so both forms take one set of envelope decisions (`envelope::from_top`).
//!
//! Strict on purpose, like `envelope::Scan`: whatever msgpack-python (`raw=False`)
//! would refuse or read differently is None here and goes to the Python path, which
//! reports it (malformed bytes) or decodes it (bin, ext and Timestamp values, non-str
//! keys, floats in `kubernetes`...). Strings are borrowed from the record; only the
//! `kubernetes` map is rebuilt, as JSON text, for the shared render cache.

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

use crate::envelope::Top;

/// Nesting past this is left to the Python path (both readers share the bound).
pub(crate) const MAX_DEPTH: usize = 64;

/// A top-level value as `Top` keeps it.
enum Scalar<'a> {
    Str(&'a str),
    /// The JSON text `envelope::epoch` reads (numbers, null, booleans; `{}` for maps).
    Text(Cow<'a, str>),
}

/// The msgpack primitives both readers (this one and `crate::forward`'s relay) walk with:
/// a cursor over borrowed bytes; every method is None past the end.
pub(crate) struct Reader<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) i: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.i..self.i.checked_add(n)?)?;
        self.i += n;
        Some(s)
    }

    #[inline]
    pub(crate) fn byte(&mut self) -> Option<u8> {
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(c)
    }

    #[inline]
    pub(crate) fn be(&mut self, n: usize) -> Option<u64> {
        Some(self.take(n)?.iter().fold(0u64, |v, &c| (v << 8) | u64::from(c)))
    }

    /// The length of a str whose marker is `m`; None when `m` is not one.
    #[inline]
    pub(crate) fn str_len(&mut self, m: u8) -> Option<Option<usize>> {
        Some(Some(match m {
            0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return Some(None),
        }))
    }

    #[inline]
    pub(crate) fn map_len(&mut self, m: u8) -> Option<Option<usize>> {
        Some(Some(match m {
            0x80..=0x8f => usize::from(m & 0x0f),
            0xde => self.be(2)? as usize,
            0xdf => self.be(4)? as usize,
            _ => return Some(None),
        }))
    }

    #[inline]
    pub(crate) fn array_len(&mut self, m: u8) -> Option<Option<usize>> {
        Some(Some(match m {
            0x90..=0x9f => usize::from(m & 0x0f),
            0xdc => self.be(2)? as usize,
            0xdd => self.be(4)? as usize,
            _ => return Some(None),
        }))
    }
}

impl<'a> Reader<'a> {
    fn str_body(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok() // msgpack-python refuses non-UTF-8 str
    }

    /// Any value as JSON; None for what JSON cannot say alike (bin, ext, NaN, non-str keys).
    fn json(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        let m = self.byte()?;
        if let Some(n) = self.str_len(m)? {
            return Some(Value::String(self.str_body(n)?.to_owned()));
        }
        if let Some(n) = self.map_len(m)? {
            let mut map = Map::new();
            for _ in 0..n {
                let km = self.byte()?;
                let kn = self.str_len(km)??;
                let k = self.str_body(kn)?;
                let v = self.json(depth + 1)?;
                map.insert(k.to_owned(), v); // a later duplicate wins, as in a dict
            }
            return Some(Value::Object(map));
        }
        if let Some(n) = self.array_len(m)? {
            let mut out = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                out.push(self.json(depth + 1)?);
            }
            return Some(Value::Array(out));
        }
        Some(match m {
            0x00..=0x7f => Value::from(m),
            0xe0..=0xff => Value::from(i64::from(m as i8)),
            0xc0 => Value::Null,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xcc => Value::from(self.be(1)?),
            0xcd => Value::from(self.be(2)?),
            0xce => Value::from(self.be(4)?),
            0xcf => Value::from(self.be(8)?),
            0xd0 => Value::from(i64::from(self.be(1)? as u8 as i8)),
            0xd1 => Value::from(i64::from(self.be(2)? as u16 as i16)),
            0xd2 => Value::from(i64::from(self.be(4)? as u32 as i32)),
            0xd3 => Value::from(self.be(8)? as i64),
            0xca => Value::Number(Number::from_f64(f64::from(f32::from_bits(self.be(4)? as u32)))?),
            0xcb => Value::Number(Number::from_f64(f64::from_bits(self.be(8)?))?),
            _ => return None, // bin, ext (Timestamp among them), 0xc1
        })
    }

    /// A top-level value: strings borrowed, numbers and the rest as JSON text.
    fn scalar(&mut self) -> Option<Scalar<'a>> {
        let start = self.i;
        let m = self.byte()?;
        if let Some(n) = self.str_len(m)? {
            return Some(Scalar::Str(self.str_body(n)?));
        }
        self.i = start; // `json` reads the marker itself
        Some(Scalar::Text(Cow::Owned(match m {
            0xca | 0xcb => {
                let Value::Number(f) = self.json(1)? else { return None };
                // Shortest text that parses back to the same double.
                format!("{:?}", f.as_f64()?)
            }
            0x80..=0x8f | 0xde | 0xdf => serde_json::to_string(&self.json(1)?).ok()?,
            _ => self.json(1)?.to_string(),
        })))
    }
}

fn as_text(v: Scalar<'_>) -> Option<Cow<'_, str>> {
    match v {
        Scalar::Str(s) => Some(Cow::Borrowed(s)),
        Scalar::Text(_) => None,
    }
}

fn as_json(v: Scalar<'_>) -> Cow<'_, str> {
    match v {
        Scalar::Str(s) => Cow::Owned(format!("\"{s}\"")), // epoch: RFC 3339 or Python's
        Scalar::Text(t) => t,
    }
}

/// The members of a `format msgpack` record that decide its envelope; None: Python's.
pub fn parse_top(data: &[u8]) -> Option<Top<'_>> {
    let mut r = Reader { b: data, i: 0 };
    let m = r.byte()?;
    let n = r.map_len(m)??;
    let mut top = Top::default();
    for _ in 0..n {
        let km = r.byte()?;
        let kn = r.str_len(km)??;
        let key = r.str_body(kn)?;
        let v = r.scalar()?;
        match key {
            "log" => top.log = Some(as_text(v)),
            "message" => top.message = Some(as_text(v)),
            "stream" => top.stream = Some(as_text(v)),
            "@timestamp" => top.at_timestamp = Some(as_json(v)),
            "time" => top.time = Some(as_json(v)),
            "timestamp" => top.timestamp = Some(as_json(v)),
            "kubernetes" => top.kubernetes = Some(as_json(v)),
            _ => {}
        }
        if !matches!(key, "log" | "stream" | "time" | "attrs") {
            top.not_docker = true;
        }
    }
    (r.i == data.len()).then_some(top) // trailing bytes: malformed, Python says so
}

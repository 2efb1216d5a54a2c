//! JSON output written byte-for-byte as `orjson.dumps` writes it, so a document from
//! the native path is identical to the one the Python path serialises.

use serde_json::Value;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether any of the 8 bytes is `"`, `\\` or below 0x20 (SWAR: exact for "any").
#[inline]
pub fn needs_escape(w: u64) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(LO) & !x & HI;
    (w.wrapping_sub(LO * 0x20) & !w & HI) | zero_byte(w ^ (LO * b'"' as u64))
        | zero_byte(w ^ (LO * b'\\' as u64)) != 0
}

/// Index of the first byte at or after `i` that is `"`, `\\` or a control character
/// (the bytes a JSON string reader or writer must stop at), or `b.len()`.
#[inline]
pub fn find_special(b: &[u8], mut i: usize) -> usize {
    while i + 8 <= b.len() {
        let w = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if needs_escape(w) {
            break;
        }
        i += 8;
    }
    while i < b.len() && b[i] >= 0x20 && b[i] != b'"' && b[i] != b'\\' {
        i += 1;
    }
    i
}

/// A JSON string: orjson escapes `"`, `\` and the C0 controls (short forms where JSON
/// has them, `\u00xx` in lowercase otherwise) and writes everything else as UTF-8.
///
/// Hot path (every value of every document): clean 8-byte words are skipped in one
/// test each and copied in bulk; only a word with something to escape is walked.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if i + 8 <= bytes.len() {
            let w = u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
            if !needs_escape(w) {
                i += 8;
                continue;
            }
        }
        let end = (i + 8).min(bytes.len());
        while i < end {
            let b = bytes[i];
            if b >= 0x20 && b != b'"' && b != b'\\' {
                i += 1;
                continue;
            }
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                0x0c => out.extend_from_slice(b"\\f"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => {
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[(b >> 4) as usize]);
                    out.push(HEX[(b & 15) as usize]);
                }
            }
            i += 1;
            start = i;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Decimal digits without an intermediate String (every document has several ints).
pub fn write_uint(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

pub fn write_int(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    write_uint(out, v.unsigned_abs());
}

/// `,"key":` (or `"key":` right after an opening brace) for the document's own keys,
/// which are plain ASCII names: written as they are, without an escape scan.
/// Takes the key already quoted with its colon (`"name":`, see the `key!` macro), so
/// a literal's length is known at compile time and the copy is inlined.
#[inline(always)]
pub fn key_quoted(out: &mut Vec<u8>, quoted: &[u8]) {
    if !matches!(out.last(), Some(b'{') | None) {
        out.push(b',');
    }
    out.extend_from_slice(quoted);
}

/// `key!(out, "name")` writes `,"name":` (no comma right after `{`).
#[macro_export]
macro_rules! key {
    ($out:expr, $name:literal) => {
        $crate::json::key_quoted($out, concat!("\"", $name, "\":").as_bytes())
    };
}

/// `key` for names that come from input (format commands): escaped.
pub fn key_escaped(out: &mut Vec<u8>, k: &str) {
    if !matches!(out.last(), Some(b'{') | None) {
        out.push(b',');
    }
    write_str(out, k);
    out.push(b':');
}

/// A parsed JSON value; `Err` for floats, whose text orjson and Rust format differently
/// (the caller hands such records to the Python path instead).
pub fn write_value(out: &mut Vec<u8>, v: &Value) -> Result<(), ()> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                write_int(out, i)
            } else if let Some(u) = n.as_u64() {
                write_uint(out, u)
            } else {
                return Err(());
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_value(out, item)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

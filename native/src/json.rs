//! JSON output written byte-for-byte as `orjson.dumps` writes it, so a document from
//! the native path is identical to the one the Python path serialises.

use serde_json::Value;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A JSON string: orjson escapes `"`, `\` and the C0 controls (short forms where JSON
/// has them, `\u00xx` in lowercase otherwise) and writes everything else as UTF-8.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
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
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

pub fn write_int(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(v.to_string().as_bytes());
}

pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(v.to_string().as_bytes());
}

/// `,"key":` (or `"key":` right after an opening brace).
pub fn key(out: &mut Vec<u8>, k: &str) {
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

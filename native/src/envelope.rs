//! The collector envelopes the fast path takes (Fluent Bit, Fluentd, bare lines), with
//! `pipeline.decode.envelope` as the reference: every decision mirrors `_decode` and
//! `_from_json`, and anything outside the common case is handed back to it.

use serde_json::Value;

use crate::json;
use crate::scan::is_py_space;

pub struct Env {
    pub kind: &'static str,
    pub payload: String,
    pub stream: Option<String>,
    pub ts: Option<f64>,
    pub kubernetes: Option<Vec<u8>>,
}

pub enum Decoded {
    Ok(Env),
    /// The Python path handles this record (invalid input, ISO stamps, Envoy JSON...).
    Fallback,
    /// A record that may be one piece of a split line (CRI, Docker json-file): partial
    /// joining is stateful across records, so the whole batch takes the Python path.
    PartialRisk,
}

fn strip_line_end(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn epoch(v: Option<&Value>) -> Result<Option<f64>, ()> {
    // parse_epoch_or_iso for what JSON can hold; strings (ISO 8601) go to Python.
    Ok(match v {
        None | Some(Value::Null) | Some(Value::Bool(_)) => None,
        Some(Value::Number(n)) => {
            let f = n.as_f64().ok_or(())?;
            let f = if f > 1e11 { f / 1000.0 } else { f };
            // timeparse.MIN_EPOCH..MAX_EPOCH; outside it the time is unknown
            (0.0..253_402_300_800.0).contains(&f).then_some(f)
        }
        Some(Value::String(_)) => return Err(()),
        Some(_) => None,
    })
}

pub fn decode(data: &[u8]) -> Decoded {
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
        return Decoded::Ok(Env {
            kind: "bare",
            payload: line.to_owned(),
            stream: None,
            ts: None,
            kubernetes: None,
        });
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(line) else {
        return Decoded::Fallback;
    };
    let from_log = matches!(obj.get("log"), Some(Value::String(_)));
    let payload = if from_log {
        obj.remove("log")
    } else if matches!(obj.get("message"), Some(Value::String(_))) {
        obj.remove("message")
    } else {
        return Decoded::Fallback; // Merge_Log, or an Envoy JSON line itself
    };
    let Some(Value::String(payload)) = payload else { return Decoded::Fallback };
    let has_stamp = obj.contains_key("@timestamp");
    let kube = match obj.get("kubernetes") {
        Some(k @ Value::Object(_)) => Some(k),
        _ => None,
    };
    if from_log && !has_stamp && kube.is_none() {
        // Docker's json-file keys only (log was removed above): partial-capable.
        if obj.keys().all(|k| matches!(k.as_str(), "stream" | "time" | "attrs")) {
            return Decoded::PartialRisk;
        }
    }
    let kind = if has_stamp { "fluent-bit" } else { "fluentd" };
    let stamp = match obj.get("@timestamp") {
        Some(v) if !v.is_null() => Some(v),
        _ => obj.get("time").or_else(|| obj.get("timestamp")),
    };
    let Ok(ts) = epoch(stamp) else { return Decoded::Fallback };
    let kubernetes = match kube {
        Some(k) => {
            let mut buf = Vec::with_capacity(256);
            if json::write_value(&mut buf, k).is_err() {
                return Decoded::Fallback;
            }
            Some(buf)
        }
        None => None,
    };
    let stream = match obj.get("stream") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let inner = strip_line_end(&payload);
    match inner.as_bytes().first() {
        Some(c) if c.is_ascii_digit() => return Decoded::PartialRisk, // CRI inside
        Some(c) if !c.is_ascii() => return Decoded::Fallback,
        _ => {}
    }
    let payload = if inner.len() == payload.len() { payload } else { inner.to_owned() };
    Decoded::Ok(Env { kind, payload, stream, ts, kubernetes })
}

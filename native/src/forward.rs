//! `envoygeo forward`'s relay hot path: the entries of a PackedForward payload (back-to-back
//! `[time, record]` msgpack arrays, already gunzipped) turned into the Kafka values the
//! worker reads, without building a Python object per event.
//!
//! Each value is Fluent Bit's kafka `format msgpack` record: a map header one larger than
//! the record's, `"@timestamp"` as float64 (epoch seconds), then the record's own
//! key/value bytes sliced from the payload unchanged. Why msgpack rather than the JSON of
//! `format json` (the Python path's value): slicing costs no decoding or encoding at all
//! (~0.3 µs a record with the bytes objects, against 4-9 µs for msgpack-python + orjson
//! on this machine), and the worker's compiled core reads a msgpack record at the cost
//! of a JSON one (`crate::msgpack`; `envoygeo bench core --fluent-bit-formats`).
//!
//! Strict on purpose: anything the worker's compiled msgpack reader would hand to its
//! Python path, or that the Python relay encodes differently from the bytes as sent
//! (a str that is not UTF-8, bin, ext values, non-str keys, nesting past 64 levels, a
//! `@timestamp` key of the record's own, a msgpack Timestamp as the event time, NaN or
//! an infinity, which JSON writes as null), or a malformed payload, makes the whole
//! payload None: the Python path relays it as JSON (or reports it), exactly as before.
//! So a chunk is relayed one way or the other, never half and half.

use crate::msgpack::{Reader, MAX_DEPTH};

impl<'a> Reader<'a> {
    /// A UTF-8 str (the only key type taken); None for anything else.
    #[inline]
    fn key(&mut self) -> Option<&'a [u8]> {
        let m = self.byte()?;
        let n = self.str_len(m)??;
        let s = self.take(n)?;
        std::str::from_utf8(s).ok()?;
        Some(s)
    }

    /// Skip one value that the worker's compiled reader takes as the Python relay's JSON
    /// would say it: str (UTF-8), integers, finite floats, nil, booleans, arrays, maps
    /// with str keys.
    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let m = self.byte()?;
        if let Some(n) = self.str_len(m)? {
            std::str::from_utf8(self.take(n)?).ok()?;
            return Some(());
        }
        if let Some(n) = self.map_len(m)? {
            for _ in 0..n {
                self.key()?;
                self.value(depth + 1)?;
            }
            return Some(());
        }
        if let Some(n) = self.array_len(m)? {
            for _ in 0..n {
                self.value(depth + 1)?;
            }
            return Some(());
        }
        let skip = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xce | 0xd2 => 4,
            0xcf | 0xd3 => 8,
            // NaN and infinities: JSON has none (the Python relay writes null)
            0xca => return f32::from_bits(self.be(4)? as u32).is_finite().then_some(()),
            0xcb => return f64::from_bits(self.be(8)?).is_finite().then_some(()),
            _ => return None, // bin, ext, 0xc1
        };
        self.take(skip)?;
        Some(())
    }

    /// The event time as the Python relay's `@timestamp` double: EventTime (ext 0),
    /// an integer or a float.
    fn time(&mut self) -> Option<f64> {
        let m = self.byte()?;
        Some(match m {
            0xd7 => {
                if self.byte()? != 0 {
                    return None; // a msgpack Timestamp (-1) or another ext: Python's
                }
                let sec = self.be(4)? as f64;
                let nsec = self.be(4)? as f64;
                sec + nsec / 1e9 // EventTime.timestamp: sec + nsec / 1e9
            }
            0xc7 => {
                // ext8 holding an 8-byte EventTime (some clients use it)
                if self.be(1)? != 8 || self.byte()? != 0 {
                    return None;
                }
                let sec = self.be(4)? as f64;
                let nsec = self.be(4)? as f64;
                sec + nsec / 1e9
            }
            0x00..=0x7f => f64::from(m),
            0xe0..=0xff => f64::from(m as i8),
            0xcc => self.be(1)? as f64,
            0xcd => self.be(2)? as f64,
            0xce => self.be(4)? as f64,
            0xcf => self.be(8)? as f64,
            0xd0 => f64::from(self.be(1)? as u8 as i8),
            0xd1 => f64::from(self.be(2)? as u16 as i16),
            0xd2 => f64::from(self.be(4)? as u32 as i32),
            0xd3 => self.be(8)? as i64 as f64,
            0xca => f64::from(f32::from_bits(self.be(4)? as u32)),
            0xcb => f64::from_bits(self.be(8)?),
            _ => return None,
        })
    }
}

/// One event as the fast path relays it: its time and where its record's key/value
/// bytes are in the payload (after the record's own map header).
pub struct Event {
    ts: f64,
    keys: usize,
    body: std::ops::Range<usize>,
}

impl Event {
    /// The map header (one more key than the record) and `"@timestamp": <float64>`.
    fn header(&self) -> ([u8; 26], usize) {
        let mut h = [0u8; 26];
        let total = self.keys + 1;
        let n = if total <= 15 {
            h[0] = 0x80 | total as u8;
            1
        } else if total <= 0xffff {
            h[0] = 0xde;
            h[1..3].copy_from_slice(&(total as u16).to_be_bytes());
            3
        } else {
            h[0] = 0xdf;
            h[1..5].copy_from_slice(&(total as u32).to_be_bytes());
            5
        };
        h[n..n + 12].copy_from_slice(b"\xaa@timestamp\xcb");
        h[n + 12..n + 20].copy_from_slice(&self.ts.to_bits().to_be_bytes());
        (h, n + 20)
    }

    /// The Kafka value written into `out`, which is exactly `len()` bytes.
    pub fn write(&self, payload: &[u8], out: &mut [u8]) {
        let (h, n) = self.header();
        out[..n].copy_from_slice(&h[..n]);
        out[n..].copy_from_slice(&payload[self.body.clone()]);
    }

    pub fn len(&self) -> usize {
        self.header().1 + self.body.len()
    }
}

/// One entry `[time, record]` or `[[time, metadata], record]`; None when the entry is
/// not one the fast path takes.
fn entry(r: &mut Reader<'_>) -> Option<Event> {
    let m = r.byte()?;
    if r.array_len(m)?? != 2 {
        return None;
    }
    let head = r.b.get(r.i).copied()?;
    let ts = if matches!(head, 0x90..=0x9f | 0xdc | 0xdd) {
        // Fluent Bit 2+: [[time, metadata], record]; metadata must be a map.
        let hm = r.byte()?;
        if r.array_len(hm)?? != 2 {
            return None;
        }
        let ts = r.time()?;
        let mm = r.byte()?;
        let n = r.map_len(mm)??;
        for _ in 0..n {
            r.key()?;
            r.value(1)?;
        }
        ts
    } else {
        r.time()?
    };
    if !ts.is_finite() {
        return None; // the Python relay's JSON says null
    }
    let rm = r.byte()?;
    let keys = r.map_len(rm)??;
    if keys >= u32::MAX as usize {
        return None;
    }
    let body = r.i;
    for _ in 0..keys {
        if r.key()? == b"@timestamp" {
            return None; // the record's own @timestamp: the Python relay's JSON decides
        }
        r.value(1)?;
    }
    Some(Event { ts, keys, body: body..r.i })
}

/// The events of a PackedForward payload, in order; None: the Python path relays (or
/// reports) this payload.
pub fn relay_events(payload: &[u8]) -> Option<Vec<Event>> {
    let mut r = Reader { b: payload, i: 0 };
    let mut events = Vec::with_capacity(payload.len() / 256 + 1);
    while r.i < payload.len() {
        events.push(entry(&mut r)?);
    }
    Some(events)
}

/// `pipeline._native.forward_relay_values(payload)`: the payload's Kafka values as a list
/// of bytes, or None (see `relay_events`). Each value is written straight into its bytes
/// object (no intermediate buffer).
#[pyo3::pyfunction]
pub fn forward_relay_values<'py>(
    py: pyo3::Python<'py>,
    payload: &[u8],
) -> pyo3::PyResult<Option<pyo3::Bound<'py, pyo3::types::PyList>>> {
    let Some(events) = py.allow_threads(|| relay_events(payload)) else {
        return Ok(None);
    };
    let mut values = Vec::with_capacity(events.len());
    for e in &events {
        values.push(pyo3::types::PyBytes::new_with(py, e.len(), |out| {
            e.write(payload, out);
            Ok(())
        })?);
    }
    pyo3::types::PyList::new(py, values).map(Some)
}

/// Why a scan stopped before the end of an object: `Need(n)`, the buffer must hold at
/// least `n` bytes before scanning again can get further; `Foreign`, bytes that are not
/// msgpack (0xc1) or nest deeper than `MAX_DEPTH`, which the caller leaves to
/// msgpack-python (it reports or decodes them as it always has).
enum Stop {
    Need(usize),
    Foreign,
}

/// `n` big-endian bytes at `at`, or how much the buffer lacks.
#[inline]
fn be_at(b: &[u8], at: usize, n: usize) -> Result<usize, Stop> {
    let end = at.saturating_add(n);
    let s = b.get(at..end).ok_or(Stop::Need(end))?;
    Ok(s.iter().fold(0usize, |v, &c| (v << 8) | usize::from(c)))
}

/// Moves `*i` past the msgpack object that starts there, without decoding it.
fn skip(b: &[u8], i: &mut usize, depth: usize) -> Result<(), Stop> {
    if depth > MAX_DEPTH {
        return Err(Stop::Foreign);
    }
    let at = *i;
    let m = *b.get(at).ok_or(Stop::Need(at + 1))?;
    // (bytes before the body, body bytes, objects that follow as members)
    let (head, body, members): (usize, usize, usize) = match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0, 0),
        0x80..=0x8f => (1, 0, 2 * usize::from(m & 0x0f)),
        0x90..=0x9f => (1, 0, usize::from(m & 0x0f)),
        0xa0..=0xbf => (1, usize::from(m & 0x1f), 0),
        0xc4 | 0xd9 => (2, be_at(b, at + 1, 1)?, 0),
        0xc5 | 0xda => (3, be_at(b, at + 1, 2)?, 0),
        0xc6 | 0xdb => (5, be_at(b, at + 1, 4)?, 0),
        0xc7 => (3, be_at(b, at + 1, 1)?, 0), // ext 8: length, type, data
        0xc8 => (4, be_at(b, at + 1, 2)?, 0),
        0xc9 => (6, be_at(b, at + 1, 4)?, 0),
        0xca | 0xce | 0xd2 => (1, 4, 0),
        0xcb | 0xcf | 0xd3 => (1, 8, 0),
        0xcc | 0xd0 => (1, 1, 0),
        0xcd | 0xd1 => (1, 2, 0),
        0xd4 => (2, 1, 0), // fixext: type, data
        0xd5 => (2, 2, 0),
        0xd6 => (2, 4, 0),
        0xd7 => (2, 8, 0),
        0xd8 => (2, 16, 0),
        0xdc => (3, 0, be_at(b, at + 1, 2)?),
        0xdd => (5, 0, be_at(b, at + 1, 4)?),
        0xde => (3, 0, 2 * be_at(b, at + 1, 2)?),
        0xdf => (5, 0, 2 * be_at(b, at + 1, 4)?),
        0xc1 => return Err(Stop::Foreign),
    };
    let end = at.saturating_add(head).saturating_add(body);
    if end > b.len() {
        return Err(Stop::Need(end));
    }
    *i = end;
    for _ in 0..members {
        skip(b, i, depth + 1)?;
    }
    Ok(())
}

/// `pipeline._native.forward_frame_scan(buf, off, pos, left, estart)`: where the frame
/// starting at `buf[off]` ends (positions below are relative to `off`), so that a Forward-mode frame (Fluent Bit's default: `[tag,
/// [entry, ...], option]`) can be relayed from its bytes like a packed payload (its entries
/// back to back are exactly one) instead of being decoded into Python objects first.
///
/// Returns `(status, a, b, c, d)`:
/// - `(0, pos, left, estart, need)`: incomplete; call again with `pos, left, estart` once
///   the buffer holds `need` bytes. Inside a Forward frame's entries `pos` is where the
///   last whole entry ended and `left` how many are still to come, so a large frame
///   arriving in many reads is scanned once, not once a read.
/// - `(1, end, 0, 0, 0)`: one whole object that is not a Forward frame (PackedForward,
///   Message, a handshake message): the caller decodes `buf[:end]`.
/// - `(2, end, 0, estart, eend)`: a whole Forward frame, its entries at `buf[estart:eend]`.
/// - `(-1, 0, 0, 0, 0)`: not msgpack, or nested past `MAX_DEPTH`: the caller hands the
///   stream to msgpack-python.
///
/// Takes the bytearray itself (no copy per read); the GIL is held, so it cannot change
/// underneath.
#[pyo3::pyfunction]
pub fn forward_frame_scan(
    buf: &pyo3::Bound<'_, pyo3::types::PyByteArray>,
    off: usize,
    pos: usize,
    left: usize,
    estart: usize,
) -> (i8, usize, usize, usize, usize) {
    use pyo3::types::PyByteArrayMethods;
    // SAFETY: no Python code runs while the slice is in use, so nothing can resize it.
    let b = unsafe { buf.as_bytes() }.get(off..).unwrap_or_default();
    match scan_frame(b, pos, left, estart) {
        Ok(Scanned::Other(end)) => (1, end, 0, 0, 0),
        Ok(Scanned::Forward { end, estart, eend }) => (2, end, 0, estart, eend),
        Err((Stop::Need(need), pos, left, estart)) => (0, pos, left, estart, need),
        Err((Stop::Foreign, ..)) => (-1, 0, 0, 0, 0),
    }
}

enum Scanned {
    Other(usize),
    Forward { end: usize, estart: usize, eend: usize },
}

type Resume = (Stop, usize, usize, usize);

fn scan_frame(b: &[u8], pos: usize, left: usize, estart: usize) -> Result<Scanned, Resume> {
    let fresh = |s: Stop| (s, 0, 0, 0);
    let (mut i, mut left, estart) = if pos == 0 {
        // A Forward frame: a 2- or 3-array, a str tag, then an array of entries.
        let first = *b.first().ok_or(fresh(Stop::Need(1)))?;
        let mut i = 1;
        let forward = matches!(first, 0x92 | 0x93)
            && matches!(b.get(1), Some(0xa0..=0xbf | 0xd9..=0xdb))
            && skip(b, &mut i, 1).map_err(fresh).is_ok()
            && matches!(b.get(i), Some(0x90..=0x9f | 0xdc | 0xdd));
        if !forward {
            let mut end = 0;
            skip(b, &mut end, 0).map_err(fresh)?;
            return Ok(Scanned::Other(end));
        }
        let m = b[i];
        let (head, n) = match m {
            0xdc => (3, be_at(b, i + 1, 2).map_err(fresh)?),
            0xdd => (5, be_at(b, i + 1, 4).map_err(fresh)?),
            _ => (1, usize::from(m & 0x0f)),
        };
        (i + head, n, i + head)
    } else {
        (pos, left, estart)
    };
    while left > 0 {
        let at = i;
        skip(b, &mut i, 2).map_err(|s| (s, at, left, estart))?;
        left -= 1;
    }
    let eend = i;
    if b[0] == 0x93 {
        skip(b, &mut i, 1).map_err(|s| (s, eend, 0, estart))?;
    }
    Ok(Scanned::Forward { end: i, estart, eend })
}

//! Matching a line against the strict pattern of a compiled Envoy format.
//!
//! The plan comes from `pipeline.decode.envoy_format.CompiledFormat` (one compiler,
//! two executors): every value pattern there either stops at a delimiter it cannot
//! contain or runs to the end of the line, so a left-to-right scan gives the same
//! groups as the regex. Formats where that does not hold (two adjacent commands, a
//! number followed by a digit...) are refused when the plan is built, in Python.

pub const SLOTS: usize = 25; // AccessLog's canonical fields, in constructor order

const fn space_table() -> [bool; 256] {
    let mut t = [false; 256];
    let spaces = [b' ', b'\t', b'\n', b'\r', 0x0b, 0x0c, 0x1c, 0x1d, 0x1e, 0x1f];
    let mut i = 0;
    while i < spaces.len() {
        t[spaces[i] as usize] = true;
        i += 1;
    }
    t
}

static SPACE: [bool; 256] = space_table();

/// `str.isspace()` / regex `\s` on ASCII, which includes the separators 0x1c-0x1f.
#[inline(always)]
pub fn is_py_space(b: u8) -> bool {
    SPACE[b as usize]
}

/// Length of the run at the start of `s` of bytes that are neither `stop` nor space.
#[inline(always)]
fn token_len(s: &[u8], stop: u8) -> usize {
    let mut i = 0;
    while i < s.len() && s[i] != stop && !SPACE[s[i] as usize] {
        i += 1;
    }
    i
}

#[derive(Clone, Copy)]
pub enum Kind {
    Time,
    Num,
    TokenExcl(u8),
    TokenWs,
    TextExcl(u8),
    TextEnd,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Conv {
    Str,
    Int,
    ToInt,
    Time,
}

pub struct Field {
    pub kind: Kind,
    /// First byte of the literal that follows, if one does (set by `Format::new`).
    pub next: Option<u8>,
    pub conv: Conv,
    pub slot: Option<usize>,
    pub extra_key: String,
}

pub enum Seg {
    Lit(Vec<u8>),
    Field(Field),
}

pub struct Format {
    pub name: String,
    pub segs: Vec<Seg>,
}

#[derive(Clone, Copy)]
pub enum Val {
    Absent,
    Str(usize, usize),
    Int(i64),
    Time(f64),
}

pub struct Parsed {
    pub slots: [Val; SLOTS],
    pub extras: Vec<(usize, Val)>, // (field index into the format, value)
}

pub enum Outcome {
    NoMatch,
    Fallback,
    Ok(Parsed),
}

fn time_shape(v: &[u8]) -> bool {
    // `\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:?\d\d)?`
    if v.len() < 12 {
        return false;
    }
    let d = |i: usize| v[i].is_ascii_digit();
    if !(d(0) && d(1) && d(2) && d(3) && v[4] == b'-' && d(5) && d(6) && v[7] == b'-'
        && d(8) && d(9) && v[10] == b'T')
    {
        return false;
    }
    let rest = &v[11..];
    let (body, tz): (&[u8], &[u8]) = if rest.last() == Some(&b'Z') {
        (&rest[..rest.len() - 1], b"")
    } else if let Some(p) = rest.iter().position(|&c| c == b'+' || c == b'-') {
        (&rest[..p], &rest[p..])
    } else {
        (rest, b"")
    };
    if body.is_empty() || !body.iter().all(|&c| c.is_ascii_digit() || c == b':' || c == b'.') {
        return false;
    }
    match tz.len() {
        0 => true,
        5 => tz[1..].iter().all(u8::is_ascii_digit),
        6 => tz[1].is_ascii_digit() && tz[2].is_ascii_digit() && tz[3] == b':'
            && tz[4].is_ascii_digit() && tz[5].is_ascii_digit(),
        _ => false,
    }
}

impl Format {
    pub fn new(name: String, mut segs: Vec<Seg>) -> Format {
        let firsts: Vec<Option<u8>> = segs
            .iter()
            .map(|s| if let Seg::Lit(l) = s { Some(l[0]) } else { None })
            .collect();
        for (i, seg) in segs.iter_mut().enumerate() {
            if let Seg::Field(f) = seg {
                f.next = firsts.get(i + 1).copied().flatten();
            }
        }
        Format { name, segs }
    }

    /// Value spans of every field, or None when the strict pattern does not match.
    fn spans(&self, line: &[u8], out: &mut Vec<(usize, usize)>) -> bool {
        out.clear();
        let n = line.len();
        let mut pos = 0;
        for seg in &self.segs {
            match seg {
                Seg::Lit(l) => {
                    if !line[pos..].starts_with(l) {
                        return false;
                    }
                    pos += l.len();
                }
                Seg::Field(f) => {
                    let rest = &line[pos..];
                    let len = match f.kind {
                        Kind::Time => {
                            let len = match f.next {
                                Some(c) => match rest.iter().position(|&b| b == c) {
                                    Some(p) => p,
                                    None => return false,
                                },
                                None => rest.len(),
                            };
                            let v = &rest[..len];
                            if v != b"-" && !time_shape(v) {
                                return false;
                            }
                            len
                        }
                        Kind::Num => {
                            let len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                            if len > 0 {
                                len
                            } else if rest.first() == Some(&b'-') {
                                1
                            } else {
                                return false;
                            }
                        }
                        Kind::TokenExcl(c) => match token_len(rest, c) {
                            0 => return false,
                            len => len,
                        },
                        Kind::TokenWs => match token_len(rest, b' ') {
                            0 => return false,
                            len => len,
                        },
                        Kind::TextExcl(c) => rest.iter().position(|&b| b == c).unwrap_or(rest.len()),
                        Kind::TextEnd => rest.len(),
                    };
                    out.push((pos, pos + len));
                    pos += len;
                }
            }
        }
        pos == n
    }

    pub fn parse(&self, line: &str, spans: &mut Vec<(usize, usize)>) -> Outcome {
        let b = line.as_bytes();
        if !self.spans(b, spans) {
            return Outcome::NoMatch;
        }
        let mut parsed = Parsed { slots: [Val::Absent; SLOTS], extras: Vec::new() };
        let mut fi = 0;
        for seg in &self.segs {
            let Seg::Field(f) = seg else { continue };
            let (s, e) = spans[fi];
            let raw = &line[s..e];
            let val = if raw.is_empty() || raw == "-" {
                Val::Absent
            } else {
                match f.conv {
                    Conv::Str => Val::Str(s, e),
                    Conv::Int | Conv::ToInt => {
                        if !raw.bytes().all(|c| c.is_ascii_digit()) {
                            return Outcome::Fallback; // to_int's float/None cases
                        }
                        match raw.parse::<i64>() {
                            Ok(v) => Val::Int(v),
                            Err(_) => return Outcome::Fallback,
                        }
                    }
                    Conv::Time => match crate::timefmt::envoy_time(raw) {
                        Some(t) => Val::Time(t),
                        None => return Outcome::Fallback,
                    },
                }
            };
            match f.slot {
                Some(slot) => parsed.slots[slot] = val,
                None => {
                    if !matches!(val, Val::Absent) {
                        parsed.extras.push((fi, val));
                    }
                }
            }
            fi += 1;
        }
        Outcome::Ok(parsed)
    }

    pub fn field(&self, index: usize) -> &Field {
        self.segs
            .iter()
            .filter_map(|s| if let Seg::Field(f) = s { Some(f) } else { None })
            .nth(index)
            .expect("field index from this format")
    }
}

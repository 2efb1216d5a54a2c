//! Calendar arithmetic for Envoy's default START_TIME and the `@timestamp` text, with
//! the same float operations as the Python path so both give the same instant.

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn digits(b: &[u8]) -> Option<i64> {
    let mut v = 0i64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(c - b'0');
    }
    Some(v)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `2026-11-29T01:13:00.665Z` -> epoch seconds, as `envoy_time` computes it
/// (`timegm(prefix) + int(millis) / 1000.0`). None for anything else, including
/// values strptime would normalise (leap seconds): those take the Python path.
pub fn envoy_time(v: &str) -> Option<f64> {
    let b = v.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':'
        || b[16] != b':' || b[19] != b'.' || b[23] != b'Z'
    {
        return None;
    }
    let (y, mo, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (h, mi, s) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    let ms = digits(&b[20..23])?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || d < 1
        || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 59
    {
        return None;
    }
    let base = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s;
    Some(base as f64 + ms as f64 / 1000.0)
}

/// (whole seconds, milliseconds) of an epoch time, the milliseconds rounded half up
/// exactly as `document.iso_timestamp` computes them; None outside years 1970..9999.
fn seconds_millis(epoch: f64) -> Option<(i64, i64)> {
    if !epoch.is_finite() {
        return None;
    }
    let mut sec = epoch.floor();
    let mut ms = ((epoch - sec) * 1000.0 + 0.5) as i64;
    if ms >= 1000 {
        sec += 1.0;
        ms = 0;
    }
    (0.0..253_402_300_800.0).contains(&sec).then_some((sec as i64, ms))
}

/// `iso_timestamp`: epoch seconds -> `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso_timestamp(epoch: f64) -> Option<String> {
    let (sec, ms) = seconds_millis(epoch)?;
    let (y, m, d) = civil_from_days(sec.div_euclid(86400));
    let rem = sec.rem_euclid(86400);
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// `iso_timestamp` for a stream of nearby instants: the calendar text of the current
/// second is kept, so most records only format their milliseconds (as the Python
/// path caches per second).
#[derive(Default)]
pub struct IsoClock {
    second: i64,
    prefix: Vec<u8>, // "YYYY-MM-DDTHH:MM:SS."; empty until first use
}

impl IsoClock {
    /// Appends the text (without quotes); false outside years 1970..9999.
    pub fn write(&mut self, out: &mut Vec<u8>, epoch: f64) -> bool {
        let Some((sec, ms)) = seconds_millis(epoch) else { return false };
        if self.prefix.is_empty() || sec != self.second {
            let Some(text) = iso_timestamp(sec as f64) else { return false };
            self.prefix.clear();
            self.prefix.extend_from_slice(&text.as_bytes()[..20]);
            self.second = sec;
        }
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&[b'0' + (ms / 100) as u8, b'0' + (ms / 10 % 10) as u8,
                                b'0' + (ms % 10) as u8, b'Z']);
        true
    }
}

/// A collector's `@timestamp` text, `YYYY-MM-DDTHH:MM:SS.fffffffffZ` (Fluent Bit's
/// `iso8601` and `iso8601_ns`; 1 to any number of fraction digits), -> epoch seconds
/// exactly as `timeparse.parse_iso8601` computes them: the fraction cut to
/// microseconds, then `datetime.timestamp()`, which divides whole microseconds by 10^6
/// (one correctly rounded division, as here). None for every other form (offsets, no
/// fraction, a space for `T`, ...) and outside 1970..2255: the Python path decides those.
pub fn rfc3339_utc(v: &str) -> Option<f64> {
    let b = v.as_bytes();
    if b.len() < 22 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':'
        || b[16] != b':' || b[19] != b'.' || b[b.len() - 1] != b'Z'
    {
        return None;
    }
    let frac = &b[20..b.len() - 1];
    let (y, mo, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (h, mi, s) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    if frac.is_empty() || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let kept = &frac[..frac.len().min(6)];
    let us = digits(kept)? * 10i64.pow(6 - kept.len() as u32);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || d < 1
        || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 59
    {
        return None;
    }
    let total = (days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s) * 1_000_000 + us;
    // Exact as a double only below 2^53 µs (year 2255); later instants take Python's path.
    (total < 1i64 << 53).then(|| total as f64 / 1e6)
}

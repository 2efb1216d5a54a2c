//! GeoIP lookups for the fast path, as `GeoIP._resolve` + `source_fragment` do them,
//! for databases in the GeoIP2 layout (MaxMind GeoIP2/GeoLite2, DB-IP Lite).
//!
//! The Python side stays in charge of the files: it validates a database before
//! swapping to it and hands this module the path *and* the signature it accepted; a
//! file that no longer matches is not used. Records this module cannot render exactly
//! (the flat ip-location-db layout, values of unexpected types, tiny coordinates that
//! print in exponent form) return `Err` and are looked up by Python instead.

use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;

use maxminddb::Reader;
use memmap2::Mmap;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::json::{write_str, write_uint};

pub struct Db {
    reader: Reader<Mmap>,
}

impl Db {
    /// Opens `path` only if it is still the file Python validated (inode, mtime, size).
    pub fn open(path: &str, signature: (u64, i64, u64)) -> Result<Db, String> {
        let file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
        let found = (meta.ino(), meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), meta.size());
        if found != signature {
            return Err(format!("{path}: replaced since it was validated"));
        }
        // SAFETY: database updates replace the file by rename (a new inode); the old
        // mapping stays valid. Python's reader maps the same file the same way.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| format!("{path}: {e}"))?;
        let reader = Reader::from_source(mmap).map_err(|e| format!("{path}: {e}"))?;
        Ok(Db { reader })
    }
}

pub struct Databases {
    pub city: Option<Db>,
    pub country: Option<Db>,
    pub asn: Option<Db>,
    pub locale: String,
    /// `geoip._V4_STARTS/_V4_ENDS` and the IPv6 pair: non-global ranges.
    pub v4: (Vec<u128>, Vec<u128>),
    pub v6: (Vec<u128>, Vec<u128>),
}

/// A number of whatever width the database stores it in (the decoder's typed methods
/// insist on one exact MMDB type; Python takes any).
struct Num(f64, Option<u64>);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v as f64, Some(v)))
            }
            fn visit_u32<E>(self, v: u32) -> Result<Num, E> {
                Ok(Num(v as f64, Some(u64::from(v))))
            }
            fn visit_u16<E>(self, v: u16) -> Result<Num, E> {
                Ok(Num(v as f64, Some(u64::from(v))))
            }
            fn visit_u8<E>(self, v: u8) -> Result<Num, E> {
                Ok(Num(v as f64, Some(u64::from(v))))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Num, E> {
                Ok(Num(v, None))
            }
            fn visit_f32<E>(self, v: f32) -> Result<Num, E> {
                Ok(Num(f64::from(v), None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A names map, kept as pairs (no hashing: a handful of languages).
#[derive(Default)]
struct Names<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Names<'a> {
    /// `_name`: the locale's name, else English; None for an empty map.
    fn pick(&self, locale: &str) -> Option<&'a str> {
        let get = |k: &str| self.0.iter().rev().find(|(key, _)| *key == k).map(|(_, v)| *v);
        if self.0.is_empty() {
            return None;
        }
        get(locale).filter(|s| !s.is_empty()).or_else(|| get("en"))
    }
}

impl<'de> Deserialize<'de> for Names<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Names<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a names map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Names<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<&'de str, &'de str>()? {
                    out.push((k, v));
                }
                Ok(Names(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Any of the record's sub-objects (country, continent, city, subdivision, postal,
/// location, or an ASN record): the members the Python code reads, and how many
/// members there were (an empty map is falsy there).
#[derive(Default)]
struct Obj<'a> {
    n: usize,
    iso_code: Option<&'a str>,
    code: Option<&'a str>,
    names: Option<Names<'a>>,
    time_zone: Option<&'a str>,
    latitude: Option<f64>,
    longitude: Option<f64>,
    as_number: Option<u64>,
    as_org: Option<&'a str>,
}

impl<'de> Deserialize<'de> for Obj<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Obj<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Obj<'de>, A::Error> {
                let mut o = Obj::default();
                while let Some(k) = m.next_key::<&'de str>()? {
                    o.n += 1;
                    match k {
                        "iso_code" => o.iso_code = Some(m.next_value()?),
                        "code" => o.code = Some(m.next_value()?),
                        "names" => o.names = Some(m.next_value()?),
                        "time_zone" => o.time_zone = Some(m.next_value()?),
                        "latitude" => o.latitude = Some(m.next_value::<Num>()?.0),
                        "longitude" => o.longitude = Some(m.next_value::<Num>()?.0),
                        "autonomous_system_number" => {
                            // An integer, or Python would write a float: let it.
                            let n = m.next_value::<Num>()?;
                            o.as_number = Some(n.1.ok_or_else(|| de::Error::custom("float"))?);
                        }
                        "autonomous_system_organization" => o.as_org = Some(m.next_value()?),
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(o)
            }
        }
        d.deserialize_map(V)
    }
}

/// A City or Country record in the GeoIP2 layout.
#[derive(Default)]
struct Rec<'a> {
    n: usize,
    flat: bool,
    country: Option<Obj<'a>>,
    registered_country: Option<Obj<'a>>,
    continent: Option<Obj<'a>>,
    subdivisions: Option<Vec<Obj<'a>>>,
    city: Option<Obj<'a>>,
    postal: Option<Obj<'a>>,
    location: Option<Obj<'a>>,
}

impl<'de> Deserialize<'de> for Rec<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Rec<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Rec<'de>, A::Error> {
                let mut r = Rec::default();
                while let Some(k) = m.next_key::<&'de str>()? {
                    r.n += 1;
                    match k {
                        "country" => r.country = Some(m.next_value()?),
                        "registered_country" => r.registered_country = Some(m.next_value()?),
                        "continent" => r.continent = Some(m.next_value()?),
                        "subdivisions" => r.subdivisions = Some(m.next_value()?),
                        "city" => r.city = Some(m.next_value()?),
                        "postal" => r.postal = Some(m.next_value()?),
                        "location" => r.location = Some(m.next_value()?),
                        _ => {
                            if k == "country_code" || k == "latitude" {
                                r.flat = true;
                            }
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if r.flat {
                    return Err(de::Error::custom("flat layout"));
                }
                Ok(r)
            }
        }
        d.deserialize_map(V)
    }
}

fn truthy<'r, 'a>(o: &'r Option<Obj<'a>>) -> Option<&'r Obj<'a>> {
    o.as_ref().filter(|o| o.n > 0)
}

#[derive(Default)]
struct Out<'a> {
    fields: [Option<&'a str>; 9], // _GEO_FIELDS order
    lat: Option<f64>,
    lon: Option<f64>,
    as_number: Option<u64>,
    as_org: Option<&'a str>,
}

const COUNTRY_ISO: usize = 0;
const COUNTRY_NAME: usize = 1;
const CONTINENT_CODE: usize = 2;
const CONTINENT_NAME: usize = 3;
const REGION_ISO: usize = 4;
const REGION_NAME: usize = 5;
const CITY_NAME: usize = 6;
const POSTAL_CODE: usize = 7;
const TIMEZONE: usize = 8;
const GEO_KEYS: [&str; 9] = ["country_iso_code", "country_name", "continent_code",
    "continent_name", "region_iso_code", "region_name", "city_name", "postal_code", "timezone"];

/// `_fill_location` for the GeoIP2 layout.
fn fill<'a>(out: &mut Out<'a>, rec: &Rec<'a>, locale: &str) -> Result<(), ()> {
    let f = &mut out.fields;
    if let Some(country) = truthy(&rec.country).or_else(|| truthy(&rec.registered_country)) {
        if f[COUNTRY_ISO].is_none() {
            f[COUNTRY_ISO] = country.iso_code;
        }
        if f[COUNTRY_NAME].is_none() {
            f[COUNTRY_NAME] = country.names.as_ref().and_then(|n| n.pick(locale));
        }
    }
    if let Some(c) = truthy(&rec.continent) {
        if f[CONTINENT_CODE].is_none() {
            f[CONTINENT_CODE] = c.code;
            f[CONTINENT_NAME] = c.names.as_ref().and_then(|n| n.pick(locale));
        }
    }
    if let Some(subs) = rec.subdivisions.as_ref().filter(|s| !s.is_empty()) {
        if f[REGION_NAME].is_none() {
            f[REGION_ISO] = subs[0].iso_code;
            f[REGION_NAME] = subs[0].names.as_ref().and_then(|n| n.pick(locale));
        }
    }
    if let Some(c) = truthy(&rec.city) {
        if f[CITY_NAME].is_none() {
            f[CITY_NAME] = c.names.as_ref().and_then(|n| n.pick(locale));
        }
    }
    if let Some(p) = truthy(&rec.postal) {
        if f[POSTAL_CODE].is_none() {
            f[POSTAL_CODE] = p.code;
        }
    }
    if let Some(loc) = truthy(&rec.location) {
        if f[TIMEZONE].is_none() {
            f[TIMEZONE] = loc.time_zone;
        }
        if out.lat.is_none() && loc.latitude.is_some() {
            out.lat = loc.latitude;
            out.lon = Some(loc.longitude.ok_or(())?); // Python raises: let it
        }
    }
    Ok(())
}

/// A float as orjson writes it, where Rust's `{:?}` agrees (plain decimal notation).
fn write_float(out: &mut Vec<u8>, v: f64) -> Result<(), ()> {
    if !v.is_finite() || (v != 0.0 && v.abs() < 1e-4) || v.abs() >= 1e16 {
        return Err(());
    }
    out.extend_from_slice(format!("{v:?}").as_bytes());
    Ok(())
}

fn parse_ip(ip: &str) -> Option<IpAddr> {
    if let Ok(v4) = ip.parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    ip.parse::<Ipv6Addr>().ok().map(|v6| match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

fn in_ranges(ranges: &(Vec<u128>, Vec<u128>), x: u128) -> bool {
    let i = ranges.0.partition_point(|&s| s <= x);
    i > 0 && x <= ranges.1[i - 1]
}

pub enum Answer {
    Tag(&'static str),
    Fragment(Option<Vec<u8>>),
}

impl Databases {
    fn get<'a, T: Deserialize<'a>>(db: &'a Db, ip: IpAddr) -> Result<Option<T>, ()> {
        let res = match db.reader.lookup(ip) {
            Ok(r) => r,
            // An IPv6 address against an IPv4-only database: Python's ValueError.
            Err(maxminddb::MaxMindDbError::InvalidInput { .. }) => return Ok(None),
            Err(_) => return Err(()),
        };
        res.decode::<T>().map_err(|_| ())
    }

    /// `source_fragment(GeoIP._resolve(ip))`; Err: ask Python.
    pub fn lookup(&self, ip: &str) -> Result<Answer, ()> {
        let Some(addr) = parse_ip(ip) else { return Ok(Answer::Tag("geoip_invalid_ip")) };
        let private = match addr {
            IpAddr::V4(v4) => in_ranges(&self.v4, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => in_ranges(&self.v6, u128::from(v6)),
        };
        if private {
            return Ok(Answer::Tag("geoip_private"));
        }
        let mut out = Out::default();
        let mut found = false;
        for db in [&self.city, &self.country].into_iter().flatten() {
            if let Some(rec) = Self::get::<Rec>(db, addr)? {
                if rec.n > 0 {
                    found = true;
                    fill(&mut out, &rec, &self.locale)?;
                }
            }
        }
        if let Some(db) = &self.asn {
            if let Some(rec) = Self::get::<Obj>(db, addr)? {
                if rec.n > 0 {
                    found = true;
                    out.as_number = rec.as_number;
                    out.as_org = rec.as_org;
                }
            }
        }
        if !found {
            return Ok(Answer::Tag("geoip_miss"));
        }
        Ok(Answer::Fragment(render(&out)?))
    }
}

/// `orjson.dumps(geo_fields(result))[1:-1]`: `"geo":{...},"as":{...}` or nothing.
fn render(out: &Out<'_>) -> Result<Option<Vec<u8>>, ()> {
    let mut buf = Vec::with_capacity(256);
    let has_geo = out.fields.iter().any(Option::is_some) || out.lat.is_some();
    if has_geo {
        buf.extend_from_slice(b"\"geo\":{");
        let mut first = true;
        for (k, v) in GEO_KEYS.iter().zip(out.fields) {
            if let Some(v) = v {
                if !first {
                    buf.push(b',');
                }
                first = false;
                write_str(&mut buf, k);
                buf.push(b':');
                write_str(&mut buf, v);
            }
        }
        if let (Some(lat), Some(lon)) = (out.lat, out.lon) {
            if !first {
                buf.push(b',');
            }
            buf.extend_from_slice(b"\"location\":{\"lat\":");
            write_float(&mut buf, lat)?;
            buf.extend_from_slice(b",\"lon\":");
            write_float(&mut buf, lon)?;
            buf.push(b'}');
        }
        buf.push(b'}');
    }
    if out.as_number.is_some() || out.as_org.is_some() {
        if has_geo {
            buf.push(b',');
        }
        buf.extend_from_slice(b"\"as\":{");
        if let Some(n) = out.as_number {
            buf.extend_from_slice(b"\"number\":");
            write_uint(&mut buf, n);
        }
        if let Some(org) = out.as_org {
            if out.as_number.is_some() {
                buf.push(b',');
            }
            buf.extend_from_slice(b"\"organization\":{\"name\":");
            write_str(&mut buf, org);
            buf.push(b'}');
        }
        buf.push(b'}');
    }
    Ok((!buf.is_empty()).then_some(buf))
}

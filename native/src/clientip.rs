//! The client-IP resolver of `pipeline.clientip`, step for step: the same endpoint
//! splitting, the same address normal form, the same class table (handed over from
//! Python, where it is derived from `ipaddress`), the same XFF walk and tags.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use ahash::AHashMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::scan::is_py_space;

pub struct Policy {
    pub trusted: Vec<(u8, u128, u128)>,
    pub hops: usize,
    /// `ClientIpPolicy.envoy_use_remote_address`: the rightmost XFF entry is Envoy's.
    pub use_remote_address: bool,
    pub v4: (Vec<u128>, Vec<&'static str>),
    pub v6: (Vec<u128>, Vec<&'static str>),
}

/// Addresses borrow the line when it already holds their normal form (dotted quads),
/// so resolving a typical record allocates nothing.
#[derive(Clone)]
pub struct Addr<'a> {
    pub ip: Cow<'a, str>,
    pub class: &'static str,
    pub trusted: bool,
}

pub struct ClientIp<'a> {
    pub ip: Option<Cow<'a, str>>,
    pub port: Option<i64>,
    pub source: &'static str,
    pub class: Option<&'static str>,
    pub related: Vec<Cow<'a, str>>,
    pub tags: Vec<&'static str>,
    /// How many of `related`, from the front, are the client side's (`client_related`).
    pub client_related: usize,
}

pub fn class_name(name: &str) -> &'static str {
    match name {
        "public" => "public",
        "private" => "private",
        "loopback" => "loopback",
        "cgnat" => "cgnat",
        "link_local" => "link_local",
        "multicast" => "multicast",
        _ => "reserved",
    }
}

fn py_strip(s: &str) -> &str {
    let b = s.as_bytes();
    let start = b.iter().position(|&c| !is_py_space(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|&c| !is_py_space(c)).map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

fn port_of(digits: &str) -> Result<Option<i64>, ()> {
    // `isdigit()` then `int()`; a port too large for JSON's int64 goes to Python.
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Ok(None);
    }
    digits.parse::<i64>().map(Some).map_err(|_| ())
}

/// `split_host_port`: Ok(None) when malformed, Err when only Python can say.
pub fn split_host_port(text: &str) -> Result<Option<(&str, Option<i64>)>, ()> {
    let s = py_strip(text);
    if s.is_empty() {
        return Ok(None);
    }
    if let Some(inner) = s.strip_prefix('[') {
        let Some(end) = inner.find(']') else { return Ok(None) };
        let (host, rest) = (&inner[..end], &inner[end + 1..]);
        if rest.is_empty() {
            return Ok(Some((host, None)));
        }
        if !rest.starts_with(':') {
            return Ok(None);
        }
        return Ok(port_of(&rest[1..])?.map(|p| (host, Some(p))));
    }
    match s.find(':') {
        None => Ok(Some((s, None))),
        Some(i) => {
            let (host, port) = (&s[..i], &s[i + 1..]);
            if port.contains(':') {
                return Ok(Some((s, None)));
            }
            Ok(port_of(port)?.map(|p| (host, Some(p))))
        }
    }
}

fn parse_v4(s: &str) -> Option<u32> {
    // inet_pton(AF_INET): exactly four decimal octets, no leading zeros.
    let mut value = 0u32;
    let mut parts = 0;
    for part in s.split('.') {
        let b = part.as_bytes();
        if b.is_empty() || b.len() > 3 || !b.iter().all(u8::is_ascii_digit)
            || (b.len() > 1 && b[0] == b'0')
        {
            return None;
        }
        let octet: u32 = part.parse().ok()?;
        if octet > 255 {
            return None;
        }
        value = value << 8 | octet;
        parts += 1;
    }
    (parts == 4).then_some(value)
}

/// IPv6 text as Python 3.11's `str(IPv6Address)` writes it (RFC 5952 hextets, no
/// embedded IPv4 form).
fn format_v6(v: u128) -> String {
    let h: Vec<u16> = (0..8).map(|i| (v >> (112 - 16 * i)) as u16).collect();
    let (mut best, mut best_len, mut i) = (0usize, 0usize, 0usize);
    while i < 8 {
        if h[i] == 0 {
            let start = i;
            while i < 8 && h[i] == 0 {
                i += 1;
            }
            if i - start > best_len {
                best = start;
                best_len = i - start;
            }
        } else {
            i += 1;
        }
    }
    let hex = |xs: &[u16]| xs.iter().map(|x| format!("{x:x}")).collect::<Vec<_>>().join(":");
    if best_len > 1 {
        format!("{}::{}", hex(&h[..best]), hex(&h[best + best_len..]))
    } else {
        hex(&h)
    }
}

impl Policy {
    fn classify(&self, version: u8, value: u128) -> &'static str {
        let (starts, classes) = if version == 4 { &self.v4 } else { &self.v6 };
        let i = starts.partition_point(|&s| s <= value);
        classes[i - 1]
    }

    fn make<'a>(&self, ip: Cow<'a, str>, version: u8, value: u128) -> Addr<'a> {
        let trusted = self.trusted.iter().any(|&(v, lo, hi)| v == version && lo <= value && value <= hi);
        Addr { ip, class: self.classify(version, value), trusted }
    }

    /// `ClientIpResolver._parse`: Ok(None) when not an IP address.
    pub fn address<'a>(&self, host: &'a str) -> Result<Option<Addr<'a>>, ()> {
        if host.contains('%') {
            return Err(()); // scoped IPv6: rare, Python strips the zone
        }
        if host.contains('.') && !host.contains(':') {
            return Ok(parse_v4(host).map(|v| self.make(Cow::Borrowed(host), 4, u128::from(v))));
        }
        let Ok(v6) = host.parse::<Ipv6Addr>() else {
            // `ipaddress.ip_address`: dotless, colonless text is never an address.
            return Ok(None);
        };
        if let Some(v4) = v6.to_ipv4_mapped() {
            let v = u32::from(v4);
            return Ok(Some(self.make(Cow::Owned(v4.to_string()), 4, u128::from(v))));
        }
        let v = u128::from(v6);
        Ok(Some(self.make(Cow::Owned(format_v6(v)), 6, v)))
    }

    /// `_endpoint`: (address, port, malformed).
    #[allow(clippy::type_complexity)]
    pub fn endpoint<'a>(&self, text: Option<&'a str>) -> Result<(Option<Addr<'a>>, Option<i64>, bool), ()> {
        let Some(text) = text else { return Ok((None, None, false)) };
        if text == "-" {
            return Ok((None, None, false));
        }
        match split_host_port(text)? {
            None => Ok((None, None, true)),
            Some((host, port)) => {
                let addr = self.address(host)?;
                let bad = addr.is_none();
                Ok((addr, port, bad))
            }
        }
    }

    /// `ClientIpResolver.resolve`; Err when the record must take the Python path.
    pub fn resolve<'a>(
        &self,
        remote_text: Option<&'a str>,
        direct_text: Option<&'a str>,
        xff: Option<&'a str>,
        upstream_host: Option<&'a str>,
        upstream_local: Option<&'a str>,
    ) -> Result<ClientIp<'a>, ()> {
        let mut related: Vec<Cow<'a, str>> = Vec::with_capacity(4);
        let mut tags: Vec<&'static str> = Vec::new();
        let (remote, port, bad) = self.endpoint(remote_text)?;
        if bad {
            tags.push("clientip_invalid_remote");
        }
        let (direct, _, bad_direct) = self.endpoint(direct_text)?;
        if bad_direct {
            tags.push("clientip_invalid_direct_remote");
        }
        let add = |related: &mut Vec<Cow<'a, str>>, ip: &Cow<'a, str>| {
            if !related.iter().any(|r| r == ip) {
                related.push(ip.clone());
            }
        };
        if let Some(r) = &remote {
            add(&mut related, &r.ip);
        }
        if let Some(d) = &direct {
            add(&mut related, &d.ip);
        }
        let mut entries: Vec<Option<Addr<'a>>> = Vec::new();
        if let Some(x) = xff.filter(|x| !x.is_empty()) {
            for part in x.split(',') {
                let a = self.endpoint(Some(part))?.0;
                match &a {
                    None => {
                        if !tags.contains(&"clientip_invalid_xff") {
                            tags.push("clientip_invalid_xff");
                        }
                    }
                    Some(a) => add(&mut related, &a.ip),
                }
                entries.push(a);
            }
        }
        // With use_remote_address Envoy appended the address it saw: Envoy's own record.
        let envoy_saw = if self.use_remote_address { entries.pop().flatten() } else { None };
        let client_related = related.len();
        for up in [upstream_host, upstream_local] {
            let up = up.filter(|u| !u.is_empty()).map(|u| u.strip_prefix("tcp://").unwrap_or(u));
            if let (Some(ua), _, _) = self.endpoint(up)? {
                add(&mut related, &ua.ip);
            }
        }
        let (remote, port) = match (remote, &direct, envoy_saw) {
            (Some(r), _, _) => (r, port),
            (None, Some(d), _) => (d.clone(), port),
            (None, None, Some(e)) => (e, None),
            (None, None, None) => {
                if remote_text.is_none() {
                    tags.push("clientip_no_remote_address");
                }
                return Ok(ClientIp { ip: None, port: None, source: "none", class: None, related, tags,
                                     client_related });
            }
        };
        let mut source = match &direct {
            Some(d) if d.ip != remote.ip => "proxy_protocol",
            _ => "peer",
        };
        let (mut client, mut client_port) = (remote.clone(), port);
        if remote.trusted {
            let chosen = if entries.is_empty() { None } else { self.walk_xff(&entries, &mut tags) };
            match chosen {
                Some(c) => {
                    client = c;
                    client_port = None;
                    source = "x_forwarded_for";
                }
                None => tags.push("clientip_trusted_proxy"),
            }
        }
        Ok(ClientIp {
            ip: Some(client.ip),
            port: client_port,
            source,
            class: Some(client.class),
            related,
            tags,
            client_related,
        })
    }

    fn walk_xff<'a>(&self, entries: &[Option<Addr<'a>>], tags: &mut Vec<&'static str>)
                    -> Option<Addr<'a>> {
        if self.hops == 0 {
            return None;
        }
        let start = entries.len().saturating_sub(self.hops);
        let mut last: Option<&Addr<'a>> = None;
        for a in entries[start..].iter().rev() {
            match a {
                None => return None,
                Some(a) if !a.trusted => return Some(a.clone()),
                Some(a) => last = Some(a),
            }
        }
        if last.is_some() {
            tags.push("clientip_xff_all_trusted");
        }
        last.cloned()
    }
}

/// `pipeline.clientip.HASH_HEX_CHARS`: hex characters of the HMAC kept.
const HASH_BYTES: usize = 16;

/// `pipeline.clientip.AddressMask`: client addresses as the document shows them under
/// `privacy.client_ip` truncate or hash. Masked forms are cached per address (a few
/// thousand distinct ones repeat), so an HMAC or a truncation runs once per address.
pub struct Mask {
    pub hashed: bool,
    v4_mask: u32,
    v6_mask: u128,
    /// The keyed state (inner and outer pads hashed once); each address clones it.
    hmac: Option<Hmac<Sha256>>,
    cache: AHashMap<Box<str>, Box<str>>,
    cache_size: usize,
    pub extra_fields: Vec<String>,
}

impl Mask {
    pub fn new(mode: &str, v4_prefix: u32, v6_prefix: u32, key: Option<&[u8]>,
               extra_fields: Vec<String>) -> Result<Mask, String> {
        if v4_prefix > 32 || v6_prefix > 128 {
            return Err("prefix out of range".into());
        }
        let hmac = match (mode, key) {
            ("truncate", _) => None,
            ("hash", Some(k)) => Some(Hmac::<Sha256>::new_from_slice(k).map_err(|e| e.to_string())?),
            _ => return Err(format!("no mask for client_ip {mode} (key given: {})", key.is_some())),
        };
        Ok(Mask {
            hashed: hmac.is_some(),
            v4_mask: u32::MAX.checked_shl(32 - v4_prefix).unwrap_or(0),
            v6_mask: u128::MAX.checked_shl(128 - v6_prefix).unwrap_or(0),
            hmac,
            cache: AHashMap::new(),
            cache_size: 65536,
            extra_fields,
        })
    }

    /// `AddressMask.ip`: a normalised address as the document shows it.
    pub fn ip(&mut self, ip: &str) -> &str {
        if !self.cache.contains_key(ip) {
            let out = self.compute(ip);
            if self.cache.len() >= self.cache_size {
                self.cache.clear(); // bounded like the Python cache
            }
            self.cache.insert(ip.into(), out.into_boxed_str());
        }
        &self.cache[ip]
    }

    fn compute(&self, ip: &str) -> String {
        if let Some(h) = &self.hmac {
            let mut h = h.clone();
            h.update(ip.as_bytes());
            let digest = h.finalize().into_bytes();
            let mut out = String::with_capacity(2 * HASH_BYTES);
            for b in &digest[..HASH_BYTES] {
                out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
                out.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
            }
            return out;
        }
        // `ip` is a normal form the resolver wrote: a dotted quad or RFC 5952 IPv6.
        if let Some(v) = parse_v4(ip) {
            return Ipv4Addr::from(v & self.v4_mask).to_string();
        }
        match ip.parse::<Ipv6Addr>() {
            Ok(v6) => format_v6(u128::from(v6) & self.v6_mask),
            Err(_) => ip.to_owned(), // unreachable: the resolver parsed it
        }
    }

    /// `AddressMask.field`: an Envoy address field's masked address (port dropped);
    /// None when it holds no address. Err: only Python can say.
    pub fn field(&mut self, policy: &Policy, text: Option<&str>) -> Result<Option<String>, ()> {
        Ok(match policy.endpoint(text)?.0 {
            Some(a) => Some(self.ip(&a.ip).to_owned()),
            None => None,
        })
    }

    /// `AddressMask.entries`: each comma-separated entry masked, `-` for non-addresses.
    pub fn entries(&mut self, policy: &Policy, text: &str) -> Result<String, ()> {
        if text.is_empty() {
            return Ok(String::new());
        }
        let mut out = String::with_capacity(text.len());
        for (i, part) in text.split(',').enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            match policy.endpoint(Some(part))?.0 {
                Some(a) => out.push_str(self.ip(&a.ip)),
                None => out.push('-'),
            }
        }
        Ok(out)
    }

    /// `AddressMask.related`.
    pub fn related(&mut self, related: &[Cow<'_, str>], client_related: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(related.len());
        if !self.hashed {
            for a in &related[..client_related] {
                let m = self.ip(a);
                if !out.iter().any(|o| o == m) {
                    out.push(m.to_owned());
                }
            }
        }
        for a in &related[client_related..] {
            if !out.iter().any(|o| o == a) {
                out.push(a.to_string());
            }
        }
        out
    }
}

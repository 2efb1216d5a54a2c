//! The ECS document of `pipeline.document.build_document` plus the fields
//! `Enricher._enrich` adds, written straight to bytes in the same key order.
//!
//! Rates and alert tags are only known once the whole batch is counted, so a document
//! is written in two parts: `head` (everything up to the last `envoygeo` key) now, and
//! the tail (`envoygeo.rate`, `related`, `tags`, `kubernetes`, `ecs`) at `finish`.

use crate::clientip::{split_host_port, ClientIp, Mask, Policy};
use crate::envelope::Env;
use crate::json::{key_escaped, key_quoted, write_int, write_str};
use crate::key;
use crate::scan::{Format, Parsed, Val};
use crate::timefmt::IsoClock;

pub struct Doc {
    /// Where the document's first part lies in the batch's arena (see `build`).
    pub head: std::ops::Range<usize>,
    pub ip: Option<std::sync::Arc<str>>,
    pub ts: Option<f64>,
    /// `,"related":{"ip":[...]}` already rendered, in the arena (empty when none).
    pub related: std::ops::Range<usize>,
    pub tags: Vec<String>,
    pub early_tags: bool,
    pub kubernetes: Option<std::sync::Arc<Vec<u8>>>,
    /// What the core counts (and takes back off its counters on `hand_back`).
    pub line_cut: bool,
    pub fields_cut: bool,
    pub no_remote: bool,
}

pub const LINE_TRUNCATED_TAG: &str = "envoygeo_line_truncated";
pub const FIELD_TRUNCATED_TAG: &str = "envoygeo_field_truncated";
const NO_REMOTE_TAG: &str = "clientip_no_remote_address";

/// The largest `i <= limit` at a character boundary of `s` (`cut_utf8`'s cut).
pub fn floor_boundary(s: &str, limit: usize) -> usize {
    let mut i = limit.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `pipeline.process.cut_fields` on parsed spans: every text value longer than
/// `limit` bytes is cut; returns the names of those fields, slots first, in order.
pub fn cut_fields(line: &str, parsed: &mut Parsed, fmt: &Format, limit: usize,
                  slot_names: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for (slot, v) in parsed.slots.iter_mut().enumerate() {
        if let Val::Str(a, b) = *v {
            if b - a > limit {
                *v = Val::Str(a, a + floor_boundary(&line[a..b], limit));
                names.push(slot_names[slot].clone());
            }
        }
    }
    for (fi, v) in parsed.extras.iter_mut() {
        if let Val::Str(a, b) = *v {
            if b - a > limit {
                *v = Val::Str(a, a + floor_boundary(&line[a..b], limit));
                names.push(fmt.field(*fi).extra_key.clone());
            }
        }
    }
    names
}

/// `document._endpoint`: (host, port), IPv4-mapped hosts in their IPv4 form.
fn endpoint(text: &str) -> Result<Option<(&str, Option<i64>)>, ()> {
    if text.is_empty() {
        return Ok(None);
    }
    Ok(split_host_port(text)?.map(|(h, p)| {
        if h.len() >= 7 && h[..7].eq_ignore_ascii_case("::ffff:") && h.contains('.') {
            (&h[7..], p)
        } else {
            (h, p)
        }
    }))
}

/// `document.renders_endpoint`: `text` is exactly `host[:port]` (`[host]:port` for IPv6).
fn renders_endpoint(text: &str, host: &str, port: Option<i64>) -> bool {
    let Some(port) = port else {
        return text == host;
    };
    let rest = if host.contains(':') {
        text.strip_prefix('[')
            .and_then(|t| t.strip_prefix(host))
            .and_then(|t| t.strip_prefix("]:"))
    } else {
        text.strip_prefix(host).and_then(|t| t.strip_prefix(':'))
    };
    // Python compares with str(port): digits only, no sign, no leading zero.
    match rest {
        Some(r) if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit())
            && (r.len() == 1 || !r.starts_with('0')) => r.parse::<i64>() == Ok(port),
        _ => false,
    }
}

/// Starts `"key":{`; `close_object` ends it, or takes it back when nothing was
/// written inside (documents carry no empty objects).
fn open_object(out: &mut Vec<u8>, quoted_key: &[u8]) -> (usize, usize) {
    let mark = out.len();
    key_quoted(out, quoted_key);
    out.push(b'{');
    (mark, out.len())
}

fn close_object(out: &mut Vec<u8>, (mark, inner): (usize, usize)) {
    if out.len() == inner {
        out.truncate(mark);
    } else {
        out.push(b'}');
    }
}

pub struct Fields<'a> {
    line: &'a str,
    parsed: &'a Parsed,
}

impl<'a> Fields<'a> {
    pub fn new(line: &'a str, parsed: &'a Parsed) -> Self {
        Fields { line, parsed }
    }
    pub fn s(&self, slot: usize) -> Option<&'a str> {
        match self.parsed.slots[slot] {
            Val::Str(a, b) => Some(&self.line[a..b]),
            _ => None,
        }
    }
    fn i(&self, slot: usize) -> Option<i64> {
        match self.parsed.slots[slot] {
            Val::Int(v) => Some(v),
            _ => None,
        }
    }
    fn t(&self, slot: usize) -> Option<f64> {
        match self.parsed.slots[slot] {
            Val::Time(v) => Some(v),
            _ => None,
        }
    }
}

// AccessLog slots (constructor order).
pub const START_TIME: usize = 0;
const METHOD: usize = 1;
const PATH: usize = 2;
const PROTOCOL: usize = 3;
const RESPONSE_CODE: usize = 4;
const RESPONSE_FLAGS: usize = 5;
const RESPONSE_CODE_DETAILS: usize = 6;
const CONNECTION_TERMINATION_DETAILS: usize = 7;
const UPSTREAM_TRANSPORT_FAILURE_REASON: usize = 8;
const BYTES_RECEIVED: usize = 9;
const BYTES_SENT: usize = 10;
const DURATION_MS: usize = 11;
const UPSTREAM_SERVICE_TIME: usize = 12;
pub const X_FORWARDED_FOR: usize = 13;
pub const USER_AGENT: usize = 14;
const REQUEST_ID: usize = 15;
const AUTHORITY: usize = 16;
pub const UPSTREAM_HOST: usize = 17;
const UPSTREAM_CLUSTER: usize = 18;
pub const UPSTREAM_LOCAL_ADDRESS: usize = 19;
const DOWNSTREAM_LOCAL_ADDRESS: usize = 20;
pub const DOWNSTREAM_REMOTE_ADDRESS: usize = 21;
pub const DOWNSTREAM_DIRECT_REMOTE_ADDRESS: usize = 22;
const REQUESTED_SERVER_NAME: usize = 23;
const ROUTE_NAME: usize = 24;

#[inline(always)]
fn opt_str(out: &mut Vec<u8>, quoted_key: &[u8], v: Option<&str>) {
    if let Some(v) = v {
        key_quoted(out, quoted_key);
        write_str(out, v);
    }
}

#[inline(always)]
fn opt_int(out: &mut Vec<u8>, quoted_key: &[u8], v: Option<i64>) {
    if let Some(v) = v {
        key_quoted(out, quoted_key);
        write_int(out, v);
    }
}

macro_rules! q {
    ($name:literal) => {
        concat!("\"", $name, "\":").as_bytes()
    };
}

pub struct Geo {
    pub tag: Option<String>,
    pub fragment: Option<Vec<u8>>,
}

/// Err(()) sends the record to the Python path (a value only Python can render); the
/// caller then truncates `out` back to where it was.
///
/// Written at the end of `out`, the batch's one buffer (arena), instead of a buffer per
/// document: a 2 KB allocation and free per record was a visible share of the worker's
/// time (glibc's slower path above its per-thread cache size).
#[allow(clippy::too_many_arguments)]
pub fn build(
    out: &mut Vec<u8>,
    env: &Env,
    kubernetes: Option<std::sync::Arc<Vec<u8>>>,
    fmt: &Format,
    f: &Fields,
    cip: ClientIp<'_>,
    geo: Option<&Geo>,
    ingested: &str,
    clock: &mut IsoClock,
    kafka_ts: Option<f64>,
    truncated: &[String],
    line_cut: bool,
    mut mask: Option<(&mut Mask, &Policy)>,
) -> Result<Doc, ()> {
    let start = out.len();
    out.push(b'{');
    // `document.timestamp_of`: the event time (also the rate stage's), else when the
    // record travelled.
    let log_ts = f.t(START_TIME);
    let ts = log_ts.or(env.ts);
    let stamp_source = if log_ts.is_some() {
        "log"
    } else if env.ts.is_some() {
        "envelope"
    } else if kafka_ts.is_some() {
        "kafka"
    } else {
        "ingest"
    };
    key!(out, "@timestamp");
    match ts.or(kafka_ts) {
        Some(t) => {
            out.push(b'"');
            if !clock.write(out, t) {
                return Err(());
            }
            out.push(b'"');
        }
        None => write_str(out, ingested),
    }
    let mut tags: Vec<String> = cip.tags.iter().map(|t| (*t).to_owned()).collect();
    let no_remote = cip.tags.contains(&NO_REMOTE_TAG);
    if line_cut {
        tags.push(LINE_TRUNCATED_TAG.to_owned());
    }
    if !truncated.is_empty() {
        tags.push(FIELD_TRUNCATED_TAG.to_owned());
    }
    let early_tags = !tags.is_empty();
    if let Some(ip) = &cip.ip {
        let source = open_object(out, q!("source"));
        match &mut mask {
            None => {
                key!(out, "ip");
                write_str(out, ip);
                opt_int(out, q!("port"), cip.port);
            }
            Some((m, _)) if m.hashed => {} // source.geo / source.as only
            Some((m, _)) => {
                let shown = m.ip(ip);
                key!(out, "ip");
                write_str(out, shown);
            }
        }
        if let Some(g) = geo {
            if let Some(tag) = &g.tag {
                if !tags.iter().any(|t| t == tag) {
                    tags.push(tag.clone());
                }
            } else if let Some(frag) = &g.fragment {
                if out.last() != Some(&b'{') {
                    out.push(b','); // hashed: `source` holds only this fragment
                }
                out.extend_from_slice(frag);
            }
        }
        close_object(out, source); // hashed without GeoIP: no `"source":{}`
    }
    let local = f.s(DOWNSTREAM_LOCAL_ADDRESS);
    let dest = match local {
        Some(t) => endpoint(t)?,
        None => None,
    };
    if let Some((host, port)) = dest {
        key!(out, "destination");
        out.push(b'{');
        key!(out, "ip");
        write_str(out, host);
        opt_int(out, q!("port"), port);
        out.push(b'}');
    }

    // No empty objects: a TCP proxy line has no request or response (issue 15).
    let http = open_object(out, q!("http"));
    let request = open_object(out, q!("request"));
    opt_str(out, q!("method"), f.s(METHOD));
    opt_str(out, q!("id"), f.s(REQUEST_ID));
    opt_int(out, q!("bytes"), f.i(BYTES_RECEIVED));
    close_object(out, request);
    let response = open_object(out, q!("response"));
    let status = f.i(RESPONSE_CODE).filter(|&s| s != 0);
    opt_int(out, q!("status_code"), status);
    opt_int(out, q!("bytes"), f.i(BYTES_SENT));
    close_object(out, response);
    let mut protocol = f.s(PROTOCOL);
    if let Some(v) = protocol.and_then(|p| p.strip_prefix("HTTP/")) {
        key!(out, "version");
        write_str(out, v);
        protocol = None; // http.version says it: envoy.protocol only for other values
    }
    close_object(out, http);

    let original = f.s(PATH);
    let authority = f.s(AUTHORITY);
    if original.is_some() || authority.is_some() {
        key!(out, "url");
        out.push(b'{');
        if let Some(o) = original {
            key!(out, "original");
            write_str(out, o);
            let (path, query) = match o.find('?') {
                Some(i) => (&o[..i], Some(&o[i + 1..])),
                None => (o, None),
            };
            key!(out, "path");
            write_str(out, path);
            opt_str(out, q!("query"), query);
        }
        if let Some(a) = authority {
            key!(out, "domain");
            write_str(out, endpoint(a)?.map_or(a, |(h, _)| h));
        }
        out.push(b'}');
    }
    if let Some(ua) = f.s(USER_AGENT) {
        key!(out, "user_agent");
        out.push(b'{');
        key!(out, "original");
        write_str(out, ua);
        out.push(b'}');
    }

    key!(out, "event");
    out.extend_from_slice(b"{\"kind\":\"event\",\"category\":[\"web\"]");
    if let Some(d) = f.i(DURATION_MS) {
        key!(out, "duration");
        write_int(out, d.checked_mul(1_000_000).ok_or(())?);
    }
    if let Some(s) = status {
        key!(out, "outcome");
        write_str(out, if s >= 500 { "failure" } else { "success" });
    }
    key!(out, "ingested");
    write_str(out, ingested);
    out.extend_from_slice(
        b",\"module\":\"envoygeo\",\"type\":[\"access\"],\"dataset\":\"envoygeo.access\"}",
    );
    if let Some(sni) = f.s(REQUESTED_SERVER_NAME) {
        key!(out, "tls");
        out.extend_from_slice(b"{\"client\":{");
        key!(out, "server_name");
        write_str(out, sni);
        out.extend_from_slice(b"}}");
    }

    key!(out, "envoy");
    out.push(b'{');
    key!(out, "log_format");
    write_str(out, &fmt.name);
    opt_str(out, q!("response_flags"), f.s(RESPONSE_FLAGS));
    opt_str(out, q!("response_code_details"), f.s(RESPONSE_CODE_DETAILS));
    opt_str(out, q!("connection_termination_details"), f.s(CONNECTION_TERMINATION_DETAILS));
    opt_str(out, q!("upstream_transport_failure_reason"), f.s(UPSTREAM_TRANSPORT_FAILURE_REASON));
    opt_str(out, q!("route_name"), f.s(ROUTE_NAME));
    // The addresses "as logged" only where they say more than source/destination do
    // (`document.renders_endpoint`).
    let remote = f.s(DOWNSTREAM_REMOTE_ADDRESS).filter(|r| match &cip.ip {
        Some(ip) => !renders_endpoint(r, ip, cip.port),
        None => true,
    });
    match &mut mask {
        None => {
            opt_str(out, q!("x_forwarded_for"), f.s(X_FORWARDED_FOR));
            opt_str(out, q!("downstream_remote_address"), remote);
            opt_str(out, q!("downstream_direct_remote_address"),
                    f.s(DOWNSTREAM_DIRECT_REMOTE_ADDRESS));
        }
        Some((m, policy)) => {
            if let Some(x) = f.s(X_FORWARDED_FOR) {
                key!(out, "x_forwarded_for");
                write_str(out, &m.entries(policy, x)?);
            }
            let remote = m.field(policy, remote)?;
            opt_str(out, q!("downstream_remote_address"), remote.as_deref());
            let direct = m.field(policy, f.s(DOWNSTREAM_DIRECT_REMOTE_ADDRESS))?;
            opt_str(out, q!("downstream_direct_remote_address"), direct.as_deref());
        }
    }
    opt_str(out, q!("downstream_local_address"), local.filter(|t| match dest {
        Some((host, port)) => !renders_endpoint(t, host, port),
        None => true,
    }));
    opt_str(out, q!("protocol"), protocol);
    let (uh, uc, ul, ust) = (
        f.s(UPSTREAM_HOST),
        f.s(UPSTREAM_CLUSTER),
        f.s(UPSTREAM_LOCAL_ADDRESS),
        f.i(UPSTREAM_SERVICE_TIME),
    );
    if uh.is_some() || uc.is_some() || ul.is_some() || ust.is_some() {
        key!(out, "upstream");
        out.push(b'{');
        opt_str(out, q!("host"), uh);
        opt_str(out, q!("cluster"), uc);
        opt_str(out, q!("local_address"), ul);
        opt_int(out, q!("service_time_ms"), ust);
        out.push(b'}');
    }
    if !f.parsed.extras.is_empty() {
        key!(out, "extra");
        out.push(b'{');
        for &(fi, val) in &f.parsed.extras {
            let extra_key = &fmt.field(fi).extra_key;
            key_escaped(out, extra_key);
            match val {
                Val::Str(a, b) => match &mut mask {
                    Some((m, policy)) if m.extra_fields.iter().any(|k| k.eq_ignore_ascii_case(extra_key)) => {
                        write_str(out, &m.entries(policy, &f.line[a..b])?);
                    }
                    _ => write_str(out, &f.line[a..b]),
                },
                Val::Int(v) => write_int(out, v),
                _ => return Err(()),
            }
        }
        out.push(b'}');
    }
    out.push(b'}');

    key!(out, "envoygeo");
    out.push(b'{');
    key!(out, "ip_source");
    write_str(out, cip.source);
    key!(out, "envelope");
    write_str(out, env.kind);
    key!(out, "timestamp_source");
    write_str(out, stamp_source);
    opt_str(out, q!("ip_class"), cip.class);
    if let (Some(ip), Some((m, _))) = (&cip.ip, &mut mask) {
        if m.hashed {
            key!(out, "client_id");
            write_str(out, m.ip(ip));
        }
    }
    opt_str(out, q!("stream"), env.stream.as_deref());
    if !truncated.is_empty() {
        key!(out, "truncated");
        str_array(out, truncated);
    }

    let head_end = out.len();
    match &mut mask {
        None => write_related(out, &cip.related),
        Some((m, _)) => write_related(out, &m.related(&cip.related, cip.client_related)),
    }
    Ok(Doc {
        head: start..head_end,
        related: head_end..out.len(),
        ip: cip.ip.as_deref().map(std::sync::Arc::from),
        ts,
        tags,
        early_tags,
        kubernetes,
        line_cut,
        fields_cut: !truncated.is_empty(),
        no_remote,
    })
}

/// `,"related":{"ip":[...]}`, nothing when there is no address.
fn write_related<S: AsRef<str>>(out: &mut Vec<u8>, related: &[S]) {
    if related.is_empty() {
        return;
    }
    out.extend_from_slice(b",\"related\":{\"ip\":[");
    for (i, ip) in related.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, ip.as_ref());
    }
    out.extend_from_slice(b"]}");
}

pub const RATE_LATE_TAG: &str = "_envoygeo_rate_late";

/// `["a","b"]`: a JSON array of strings.
fn str_array(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, t) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, t);
    }
    out.push(b']');
}

/// The rest of the document once rates are known, written to `out` (cleared first):
/// the document is the arena's `doc.head` followed by `out`.
pub fn finish(out: &mut Vec<u8>, arena: &[u8], doc: &mut Doc, rate_keys: &[Vec<u8>],
              counts: Option<&[u64]>, late: bool, ecs: &str) {
    out.clear();
    if let Some(c) = counts {
        // `key!` decides on the comma from what precedes it, which is in the arena.
        if arena[doc.head.end - 1] != b'{' {
            out.push(b',');
        }
        out.extend_from_slice(q!("rate"));
        out.push(b'{');
        for (k, v) in rate_keys.iter().zip(c) {
            key_quoted(out, k);
            crate::json::write_uint(out, *v);
        }
        out.push(b'}');
    }
    out.push(b'}');
    out.extend_from_slice(&arena[doc.related.clone()]);
    if late {
        doc.tags.push(RATE_LATE_TAG.to_owned());
    }
    let write_tags = |out: &mut Vec<u8>, tags: &[String]| {
        key!(out, "tags");
        str_array(out, tags);
    };
    if doc.early_tags {
        write_tags(out, &doc.tags);
    }
    if let Some(k) = &doc.kubernetes {
        key!(out, "kubernetes");
        out.extend_from_slice(k);
    }
    key!(out, "ecs");
    out.extend_from_slice(b"{\"version\":");
    write_str(out, ecs);
    out.push(b'}');
    if !doc.early_tags && !doc.tags.is_empty() {
        write_tags(out, &doc.tags);
    }
    out.push(b'}');
}

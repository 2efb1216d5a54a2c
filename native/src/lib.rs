//! envoygeo's compiled fast path (`pipeline._native`).
//!
//! Python stays the reference implementation of every stage; this crate runs the
//! common case of each one (Fluent Bit/Fluentd/bare envelopes, text formats whose
//! strict pattern scans left to right, the client-IP policy, the ECS document, the
//! memory rate counters) and hands every other record back to Python by index. The
//! differential tests hold the two paths to byte-identical documents.

mod clientip;
mod document;
mod envelope;
mod forward;
mod geo;
mod json;
mod msgpack;
mod omit;
mod rates;
mod scan;
mod timefmt;

use std::sync::Arc;

use ahash::AHashMap;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use clientip::{class_name, Mask, Policy};
use document::{Doc, Geo};
use envelope::Decoded;
use scan::{Conv, Field, Format, Kind, Outcome, Seg};

type Plan = Vec<(String, Option<String>, Option<usize>, Option<String>, Option<String>)>;
/// `pipeline.native._privacy`: (mode, IPv4 prefix, IPv6 prefix, HMAC key, extra fields).
type Privacy = (String, u32, u32, Option<Vec<u8>>, Vec<String>);

fn build_format(name: String, plan: Plan) -> PyResult<Format> {
    // plan items: (kind, text/delimiter, slot, extra key, converter)
    let mut segs = Vec::new();
    for (kind, text, slot, extra_key, conv) in plan {
        if kind == "lit" {
            let t = text.ok_or_else(|| PyValueError::new_err("literal without text"))?;
            if t.is_empty() {
                return Err(PyValueError::new_err("empty literal"));
            }
            segs.push(Seg::Lit(t.into_bytes()));
            continue;
        }
        let delim = || -> PyResult<u8> {
            match text.as_deref().map(str::as_bytes) {
                Some([c]) => Ok(*c),
                _ => Err(PyValueError::new_err(format!("{kind} needs a one-byte delimiter"))),
            }
        };
        let kind = match kind.as_str() {
            "time" => Kind::Time,
            "num" => Kind::Num,
            "token_excl" => Kind::TokenExcl(delim()?),
            "token_ws" => Kind::TokenWs,
            "text_excl" => Kind::TextExcl(delim()?),
            "text_end" => Kind::TextEnd,
            other => return Err(PyValueError::new_err(format!("unknown field kind {other}"))),
        };
        let conv = match conv.as_deref() {
            None | Some("str") => Conv::Str,
            Some("int") => Conv::Int,
            Some("to_int") => Conv::ToInt,
            Some("time") => Conv::Time,
            Some(other) => return Err(PyValueError::new_err(format!("unknown converter {other}"))),
        };
        segs.push(Seg::Field(Field { kind, next: None, conv, slot,
                                    extra_key: extra_key.unwrap_or_default() }));
    }
    Ok(Format::new(name, segs))
}

fn table(starts: Vec<u128>, classes: Vec<String>) -> (Vec<u128>, Vec<&'static str>) {
    (starts, classes.iter().map(|c| class_name(c)).collect())
}

/// One configured fast path: parser formats, client-IP policy, GeoIP cache.
#[pyclass(unsendable)]
struct Core {
    formats: Vec<Format>,
    last: usize,
    policy: Policy,
    /// `privacy.client_ip` truncate or hash; None: keep.
    mask: Option<Mask>,
    geo_lookup: Option<PyObject>,
    geo_cache: AHashMap<Box<str>, Arc<Geo>>,
    geo_cache_size: usize,
    geo_generation: i64,
    geo_dbs: Option<geo::Databases>,
    #[pyo3(get)]
    geo_hits: u64,
    /// Misses answered here (the rest went to Python's lookup).
    #[pyo3(get)]
    geo_native_lookups: u64,
    #[pyo3(get)]
    geo_misses: u64,
    #[pyo3(get)]
    parsed: u64,
    #[pyo3(get)]
    handed_back: u64,
    /// Records written here whose line / some field was cut (`limits`), and those
    /// with no address Envoy saw (`clientip_no_remote_address`).
    #[pyo3(get)]
    lines_truncated: u64,
    #[pyo3(get)]
    fields_truncated: u64,
    #[pyo3(get)]
    no_remote_address: u64,
    max_line_bytes: usize,
    max_field_bytes: usize,
    /// AccessLog's field names by slot (`_CANONICAL_ORDER`), for `envoygeo.truncated`.
    slot_names: Vec<String>,
    rate_keys: Vec<Vec<u8>>,
    ecs_version: String,
    spans: Vec<(usize, usize)>,
    kube_cache: envelope::KubeCache,
    clock: timefmt::IsoClock,
    /// Enrichment plugins want each record's User-Agent (`set_plugin_inputs`); `ua`
    /// carries it from `record` to `run`.
    want_ua: bool,
    ua: Option<Box<str>>,
    /// `document.omit` (`set_omit`): what every batch's documents leave out.
    omit: Option<Arc<omit::Node>>,
}

enum Rec {
    Native(Doc),
    Python,
}

/// The records of one `enrich_batch` call between `Core.begin` and `Batch.finish`.
#[pyclass(unsendable)]
struct Batch {
    recs: Vec<Rec>,
    /// Event (ip, ts) of each record that has one, in record order; Python records
    /// set theirs with `set_event`.
    events: Vec<Option<(Arc<str>, f64)>>,
    /// One count per window per record, flat (stride = windows); `counted` says which.
    counts: Vec<u64>,
    counted: Vec<bool>,
    late: Vec<bool>,
    #[pyo3(get)]
    fallback: Vec<usize>,
    rate_keys: Vec<Vec<u8>>,
    ecs_version: String,
    /// The documents' first parts, one after another (`Doc.head`, `Doc.related`).
    arena: Vec<u8>,
    /// Plugin inputs (User-Agent, when asked for) and outputs: `"k":v,...` fragments
    /// spliced before each document's closing brace (`set_plugin_fields`).
    uas: Vec<Option<Box<str>>>,
    extras: Vec<Option<Vec<u8>>>,
    omit: Option<Arc<omit::Node>>,
}

/// A native record's document as two slices written one after the other: the arena's
/// head and the finished tail, or, with `document.omit`, the filtered whole. Plugin
/// fields go in after the filter, as on the Python path (`splice`).
fn document_parts<'a>(head: &'a [u8], tail: &'a mut Vec<u8>, extra: Option<&Vec<u8>>,
                      omit: Option<&omit::Node>, scratch: &mut Vec<u8>,
                      lean: &'a mut Vec<u8>) -> (&'a [u8], &'a [u8]) {
    match omit {
        Some(node) => {
            omit::filter_document(&[head, tail], node, scratch, lean);
            splice(lean, extra);
            (&[], lean)
        }
        None => {
            splice(tail, extra);
            (head, tail)
        }
    }
}

/// A plugin's fields go in before the document's closing brace: `tail` ends with `}`
/// and is never just `}` (the head holds the fields), so a comma always separates.
#[inline]
fn splice(tail: &mut Vec<u8>, extra: Option<&Vec<u8>>) {
    if let Some(f) = extra {
        tail.pop();
        tail.push(b',');
        tail.extend_from_slice(f);
        tail.push(b'}');
    }
}

#[pymethods]
impl Core {
    #[new]
    #[pyo3(signature = (formats, trusted, hops, v4_table, v6_table, geo_lookup, geo_cache_size, rate_keys, ecs_version, use_remote_address, max_line_bytes, max_field_bytes, slot_names, privacy=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        formats: Vec<(String, Plan)>,
        trusted: Vec<(u8, u128, u128)>,
        hops: usize,
        v4_table: (Vec<u128>, Vec<String>),
        v6_table: (Vec<u128>, Vec<String>),
        geo_lookup: Option<PyObject>,
        geo_cache_size: usize,
        rate_keys: Vec<String>,
        ecs_version: String,
        use_remote_address: bool,
        max_line_bytes: usize,
        max_field_bytes: usize,
        slot_names: Vec<String>,
        privacy: Option<Privacy>,
    ) -> PyResult<Self> {
        if formats.is_empty() {
            return Err(PyValueError::new_err("no formats"));
        }
        if slot_names.len() != scan::SLOTS || max_field_bytes == 0 || max_line_bytes < max_field_bytes {
            return Err(PyValueError::new_err("slot names or limits out of range"));
        }
        // Rendered once as `"10s":`: they are keys of every document's `envoygeo.rate`.
        let rate_keys = rate_keys
            .iter()
            .map(|k| {
                let mut q = Vec::new();
                json::write_str(&mut q, k);
                q.push(b':');
                q
            })
            .collect();
        let formats = formats.into_iter().map(|(n, p)| build_format(n, p)).collect::<PyResult<Vec<_>>>()?;
        let mask = match privacy {
            None => None,
            Some((mode, v4, v6, key, extra)) => Some(
                Mask::new(&mode, v4, v6, key.as_deref(), extra).map_err(PyValueError::new_err)?,
            ),
        };
        Ok(Core {
            formats,
            last: 0,
            policy: Policy {
                trusted,
                hops,
                use_remote_address,
                v4: table(v4_table.0, v4_table.1),
                v6: table(v6_table.0, v6_table.1),
            },
            mask,
            geo_lookup,
            geo_cache: AHashMap::new(),
            geo_cache_size: geo_cache_size.max(1),
            geo_generation: 0,
            geo_dbs: None,
            geo_hits: 0,
            geo_native_lookups: 0,
            geo_misses: 0,
            parsed: 0,
            handed_back: 0,
            lines_truncated: 0,
            fields_truncated: 0,
            no_remote_address: 0,
            max_line_bytes,
            max_field_bytes,
            slot_names,
            rate_keys,
            ecs_version,
            spans: Vec::new(),
            kube_cache: envelope::KubeCache::default(),
            clock: timefmt::IsoClock::default(),
            want_ua: false,
            ua: None,
            omit: None,
        })
    }

    /// Decode, parse, resolve and look up every record it can; the rest are listed in
    /// `Batch.fallback` for the Python path, which also takes back (`hand_back`) the
    /// records its partial-line joiner must see (while a split line is open).
    ///
    /// The work runs without the GIL (the inputs are copied out first), so the
    /// worker's bulk threads keep Elasticsearch fed while a batch is enriched; only a
    /// GeoIP lookup that Python must answer takes it back.
    ///
    /// `kafka_ts`: each record's Kafka timestamp (epoch seconds, None when the broker
    /// has none), the `@timestamp` of a record whose line and envelope carry no time.
    #[pyo3(signature = (values, ingested, geo_generation, kafka_ts=None))]
    fn begin(&mut self, py: Python<'_>, values: &Bound<'_, PyList>, ingested: &str,
             geo_generation: i64, kafka_ts: Option<Vec<Option<f64>>>) -> PyResult<Batch> {
        if geo_generation != self.geo_generation {
            self.geo_cache.clear(); // the database was replaced: forget old answers
            self.geo_generation = geo_generation;
        }
        let mut data: Vec<u8> = Vec::with_capacity(values.len() * 1024);
        let mut spans: Vec<Option<(usize, usize)>> = Vec::with_capacity(values.len());
        for item in values.iter() {
            spans.push(match item.downcast::<PyBytes>() {
                Ok(b) => {
                    let start = data.len();
                    data.extend_from_slice(b.as_bytes());
                    Some((start, data.len()))
                }
                Err(_) => None, // str and others: the Python path
            });
        }
        if kafka_ts.as_ref().is_some_and(|t| t.len() != spans.len()) {
            return Err(PyValueError::new_err("one Kafka timestamp (or None) per record"));
        }
        let ingested = ingested.to_owned();
        py.allow_threads(|| self.run(&data, &spans, &ingested, kafka_ts.as_deref()))
    }

    /// Record `index`, written here, goes to the Python path after all: the Python
    /// joiner holds part of a split line that this record may continue (only it knows
    /// which records belong to which stream), so the record must pass through it.
    /// Its event is Python's to set again; its bytes stay unused in the arena.
    fn hand_back(&mut self, mut batch: PyRefMut<'_, Batch>, index: usize) -> PyResult<()> {
        match batch.recs.get_mut(index) {
            Some(rec @ Rec::Native(_)) => {
                if let Rec::Native(doc) = &*rec {
                    self.lines_truncated -= u64::from(doc.line_cut);
                    self.fields_truncated -= u64::from(doc.fields_cut);
                    self.no_remote_address -= u64::from(doc.no_remote);
                }
                *rec = Rec::Python;
            }
            _ => return Err(PyValueError::new_err(format!("record {index} is not a native one"))),
        }
        batch.events[index] = None;
        let at = batch.fallback.partition_point(|&i| i < index);
        batch.fallback.insert(at, index); // stays in record order
        self.parsed -= 1;
        self.handed_back += 1;
        Ok(())
    }


    /// Read the GeoIP databases here too: [(role, path, (inode, mtime_ns, size))] as
    /// Python validated them. Returns None, or why the Python lookup stays in use.
    fn open_geo(&mut self, dbs: Vec<(String, String, (u64, i64, u64))>, locale: String,
                v4: (Vec<u128>, Vec<u128>), v6: (Vec<u128>, Vec<u128>)) -> Option<String> {
        self.geo_dbs = None;
        self.geo_cache.clear();
        let mut out = geo::Databases { city: None, country: None, asn: None, locale, v4, v6 };
        for (role, path, sig) in dbs {
            let db = match geo::Db::open(&path, sig) {
                Ok(db) => db,
                Err(why) => return Some(why),
            };
            match role.as_str() {
                "city" => out.city = Some(db),
                "country" => out.country = Some(db),
                "asn" => out.asn = Some(db),
                other => return Some(format!("unknown database role {other}")),
            }
        }
        self.geo_dbs = Some(out);
        None
    }

    /// `parse.envelope: raw` (see `envelope::KubeCache::raw_envelope`).
    fn set_raw_envelope(&mut self, raw: bool) {
        self.kube_cache.raw_envelope = raw;
    }

    /// Keep each record's User-Agent for enrichment plugins (`Batch.plugin_inputs`).
    fn set_plugin_inputs(&mut self, user_agent: bool) {
        self.want_ua = user_agent;
    }

    /// `document.omit`'s fields (dotted paths), left out of every document written.
    fn set_omit(&mut self, paths: Vec<String>) {
        self.omit = (!paths.is_empty()).then(|| Arc::new(omit::Node::from_paths(&paths)));
    }
}

impl Core {
    fn run(&mut self, data: &[u8], spans: &[Option<(usize, usize)>], ingested: &str,
           kafka_ts: Option<&[Option<f64>]>) -> PyResult<Batch> {
        let n = spans.len();
        let mut batch = Batch {
            recs: Vec::with_capacity(n),
            events: Vec::with_capacity(n),
            counts: vec![0; n * self.rate_keys.len()],
            counted: vec![false; n],
            late: vec![false; n],
            fallback: Vec::new(),
            rate_keys: self.rate_keys.clone(),
            ecs_version: self.ecs_version.clone(),
            arena: Vec::with_capacity(data.len() * 3),
            uas: Vec::with_capacity(if self.want_ua { n } else { 0 }),
            extras: Vec::new(),
            omit: self.omit.clone(),
        };
        for (i, span) in spans.iter().enumerate() {
            let rec = match span {
                Some((a, b)) => self.record(&mut batch.arena, &data[*a..*b], ingested,
                                            kafka_ts.and_then(|t| t[i]))?,
                None => None,
            };
            match rec {
                Some(doc) => {
                    // rates.countable(): the range the memory counters can represent
                    let ev = match (&doc.ip, doc.ts) {
                        (Some(ip), Some(ts)) if (0.0..rates::MAX_EVENT_TS).contains(&ts) => {
                            Some((ip.clone(), ts))
                        }
                        _ => None,
                    };
                    batch.events.push(ev);
                    self.lines_truncated += u64::from(doc.line_cut);
                    self.fields_truncated += u64::from(doc.fields_cut);
                    self.no_remote_address += u64::from(doc.no_remote);
                    batch.recs.push(Rec::Native(doc));
                    if self.want_ua {
                        batch.uas.push(self.ua.take());
                    }
                    self.parsed += 1;
                }
                None => {
                    batch.events.push(None);
                    batch.recs.push(Rec::Python);
                    if self.want_ua {
                        batch.uas.push(None);
                    }
                    batch.fallback.push(i);
                }
            }
        }
        self.handed_back += batch.fallback.len() as u64;
        Ok(batch)
    }

    /// None: this record to Python; Some(doc): done here.
    fn record(&mut self, arena: &mut Vec<u8>, data: &[u8], ingested: &str,
              kafka_ts: Option<f64>) -> PyResult<Option<Doc>> {
        let mut env = match envelope::decode(data, &mut self.kube_cache) {
            Decoded::Ok(env) => env,
            Decoded::Fallback => return Ok(None),
        };
        let kubernetes = env.kubernetes.take();
        let mut line = env.payload.as_str();
        // `limits.max_line_bytes`, as `RecordProcessor.record` cuts it.
        let line_cut = line.len() > self.max_line_bytes;
        if line_cut {
            line = &line[..document::floor_boundary(line, self.max_line_bytes)];
        }
        if !line.is_ascii() || line.trim_start_matches(|c: char| scan::is_py_space(c as u8)).starts_with('{') {
            return Ok(None); // non-ASCII (Unicode \s, \d) or an Envoy JSON line
        }
        let mut spans = std::mem::take(&mut self.spans);
        let mut found = None;
        let order = std::iter::once(self.last).chain((0..self.formats.len()).filter(|&k| k != self.last));
        for k in order {
            match self.formats[k].parse(line, &mut spans) {
                Outcome::NoMatch => continue,
                Outcome::Fallback => break,
                Outcome::Ok(p) => {
                    found = Some((k, p));
                    break;
                }
            }
        }
        self.spans = spans;
        let Some((k, mut parsed)) = found else { return Ok(None) };
        self.last = k;
        // A line no longer than the field limit has no field to cut (the common case).
        let truncated = if line.len() > self.max_field_bytes {
            document::cut_fields(line, &mut parsed, &self.formats[k], self.max_field_bytes,
                                 &self.slot_names)
        } else {
            Vec::new()
        };
        let fields = Fields::new(line, &parsed);
        use document::*;
        if self.want_ua {
            self.ua = fields.s(USER_AGENT).map(Box::from);
        }
        let Ok(cip) = self.policy.resolve(
            fields.s(DOWNSTREAM_REMOTE_ADDRESS),
            fields.s(DOWNSTREAM_DIRECT_REMOTE_ADDRESS),
            fields.s(X_FORWARDED_FOR),
            fields.s(UPSTREAM_HOST),
            fields.s(UPSTREAM_LOCAL_ADDRESS),
        ) else {
            return Ok(None);
        };
        let geo = match (&cip.ip, self.geo_lookup.is_some()) {
            (Some(ip), true) => Some(self.geo(ip)?),
            _ => None,
        };
        let start = arena.len();
        let mask = self.mask.as_mut().map(|m| (m, &self.policy));
        let doc = build(arena, &env, kubernetes, &self.formats[k], &fields, cip, geo.as_deref(),
                        ingested, &mut self.clock, kafka_ts, &truncated, line_cut, mask);
        if doc.is_err() {
            arena.truncate(start); // the Python path writes this one
        }
        Ok(doc.ok())
    }

    fn geo(&mut self, ip: &str) -> PyResult<Arc<Geo>> {
        if let Some(g) = self.geo_cache.get(ip) {
            self.geo_hits += 1;
            return Ok(g.clone());
        }
        self.geo_misses += 1;
        let native = self.geo_dbs.as_ref().map(|dbs| dbs.lookup(ip));
        if native.as_ref().is_some_and(|r| r.is_ok()) {
            self.geo_native_lookups += 1;
        }
        let g = Arc::new(match native {
            Some(Ok(geo::Answer::Tag(t))) => Geo { tag: Some(t.to_owned()), fragment: None },
            Some(Ok(geo::Answer::Fragment(fragment))) => Geo { tag: None, fragment },
            _ => {
                let lookup = self.geo_lookup.as_ref().expect("checked by the caller");
                let (tag, fragment): (Option<String>, Option<Vec<u8>>) =
                    Python::with_gil(|py| lookup.call1(py, (ip,))?.extract(py))?;
                Geo { tag, fragment }
            }
        });
        if self.geo_cache.len() >= self.geo_cache_size {
            self.geo_cache.clear(); // bounded; the hot IPs come back within a batch
        }
        self.geo_cache.insert(ip.into(), g.clone());
        Ok(g)
    }
}

impl Batch {
    fn counts_of(&self, i: usize) -> Option<&[u64]> {
        let w = self.rate_keys.len();
        self.counted[i].then(|| &self.counts[i * w..(i + 1) * w])
    }
}

fn counts_tuple<'py>(py: Python<'py>, c: &[u64]) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(py, c)
}

#[pymethods]
impl Batch {
    /// The client IP and event time of a record the Python path processed.
    fn set_event(&mut self, index: usize, ip: &str, ts: f64) {
        self.events[index] = Some((Arc::from(ip), ts));
    }

    /// Enrichment plugins' inputs, one per record (None for the Python path's, whose
    /// documents Python reads): (client IP as the rate stage counts it, User-Agent;
    /// an empty list unless `Core.set_plugin_inputs(True)`).
    fn plugin_inputs<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let (ips, uas) = (PyList::empty(py), PyList::empty(py));
        for rec in &self.recs {
            match rec {
                Rec::Native(doc) => ips.append(doc.ip.as_deref())?,
                Rec::Python => ips.append(py.None())?,
            }
        }
        for ua in &self.uas {
            uas.append(ua.as_deref())?;
        }
        Ok((ips, uas))
    }

    /// Plugin fields per record, as `"k":v,...` (no braces), None for none: written
    /// into the native documents by `finish` / `finish_bulk`.
    fn set_plugin_fields(&mut self, fields: Vec<Option<Vec<u8>>>) -> PyResult<()> {
        if fields.len() != self.recs.len() {
            return Err(PyValueError::new_err("one plugin fragment (or None) per record"));
        }
        self.extras = fields;
        Ok(())
    }

    /// Tag native documents (a plugin that failed on the batch).
    fn add_tag(&mut self, indexes: Vec<usize>, tag: &str) {
        for i in indexes {
            if let Some(Rec::Native(doc)) = self.recs.get_mut(i) {
                doc.tags.push(tag.to_owned());
            }
        }
    }

    /// Every (ip, ts) event in record order, for a rate backend outside this crate.
    fn events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (ip, ts) in self.events.iter().flatten() {
            out.append((ip.as_ref(), *ts))?;
        }
        Ok(out)
    }

    /// Counts from an outside backend, one per event of `events()`.
    fn set_counts(&mut self, counts: Vec<Vec<u64>>, late: Vec<usize>) -> PyResult<()> {
        let idx: Vec<usize> = (0..self.events.len()).filter(|&i| self.events[i].is_some()).collect();
        if counts.len() != idx.len() {
            return Err(PyValueError::new_err("one count per event expected"));
        }
        let w = self.rate_keys.len();
        for (&i, c) in idx.iter().zip(counts) {
            if c.len() != w {
                return Err(PyValueError::new_err("one count per window expected"));
            }
            self.counts[i * w..(i + 1) * w].copy_from_slice(&c);
            self.counted[i] = true;
        }
        for l in late {
            let i = *idx.get(l).ok_or_else(|| PyValueError::new_err("late index out of range"))?;
            self.late[i] = true;
        }
        Ok(())
    }

    /// Count every event with the native memory backend.
    fn count(&mut self, py: Python<'_>, rates: &mut NativeRates) -> PyResult<()> {
        if rates.inner.windows.len() != self.rate_keys.len() {
            return Err(PyValueError::new_err("the rate backend's windows differ from the core's"));
        }
        let Batch { events, counts, counted, late: late_of, .. } = self;
        let inner = &mut rates.inner;
        py.allow_threads(|| { // as in finish_bulk: the bulk threads need the GIL meanwhile
            let mut buf = Vec::new();
            let (mut n, mut late) = (0, 0);
            for (i, ev) in events.iter().enumerate() {
                if let Some((ip, ts)) = ev {
                    let is_late = inner.count(ip, *ts, &mut buf);
                    let w = buf.len();
                    counts[i * w..(i + 1) * w].copy_from_slice(&buf);
                    counted[i] = true;
                    late_of[i] = is_late;
                    n += 1;
                    late += usize::from(is_late);
                }
            }
            inner.end_batch(n, late);
        });
        Ok(())
    }

    /// (index, counts, late) of the Python-path records that have counts.
    fn python_counts<'py>(&self, py: Python<'py>) -> PyResult<Vec<(usize, Bound<'py, PyTuple>, bool)>> {
        let mut out = Vec::new();
        for &i in &self.fallback {
            if let Some(c) = self.counts_of(i) {
                out.push((i, counts_tuple(py, c)?, self.late[i]));
            }
        }
        Ok(out)
    }

    /// Events and counts of the records where some (window index, threshold) rule is
    /// reached: all `AlertEngine.evaluate` needs to see, in record order.
    fn alert_candidates<'py>(&self, py: Python<'py>, rules: Vec<(usize, u64)>)
                             -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let (events, counts) = (PyList::empty(py), PyList::empty(py));
        for (i, ev) in self.events.iter().enumerate() {
            if let (Some((ip, ts)), Some(c)) = (ev, self.counts_of(i)) {
                if rules.iter().any(|&(wi, thr)| c.get(wi).is_some_and(|&n| n >= thr)) {
                    events.append((ip.as_ref(), *ts))?;
                    counts.append(counts_tuple(py, c)?)?;
                }
            }
        }
        Ok((events, counts))
    }

    /// The batch as one `_bulk` body, for the worker: (body, ends, kept).
    ///
    /// Record i's action line is `head` + `"<topics[i]>-<partitions[i]>-<offsets[i]>"}}`
    /// (the worker's document id), then its document. Records of the Python path take
    /// `python_docs[i]` (bytes), or are left out when it is None; `kept` lists the
    /// records in the body, in order, and `ends[j]` is where the j-th one ends. Same
    /// bytes as `encode_items` over `finish()`'s documents; no Python object per record.
    fn finish_bulk<'py>(&mut self, py: Python<'py>, head: &[u8], topics: Vec<String>,
                        partitions: Vec<i64>, offsets: Vec<i64>,
                        python_docs: std::collections::HashMap<usize, Option<Bound<'py, PyBytes>>>)
                        -> PyResult<(Bound<'py, PyBytes>, Vec<usize>, Vec<usize>)> {
        let n = self.recs.len();
        if topics.len() != n || partitions.len() != n || offsets.len() != n {
            return Err(PyValueError::new_err("one topic, partition and offset per record"));
        }
        // The Python path's documents are copied out first, so that the loop can run
        // without the GIL: the bulk threads need it to hand Elasticsearch its next
        // request, and a few milliseconds held here were milliseconds it sat idle.
        let python_docs: AHashMap<usize, Vec<u8>> = python_docs.into_iter()
            .filter_map(|(i, d)| d.map(|d| (i, d.as_bytes().to_vec())))
            .collect();
        let Batch { recs, arena, counts, counted, late, rate_keys, ecs_version, extras, omit, .. } = self;
        let (body, ends, kept) = py.allow_threads(|| {
            let w = rate_keys.len();
            let mut body = Vec::with_capacity(arena.len() + n * (head.len() + 600));
            let (mut ends, mut kept) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let mut tail = Vec::with_capacity(512);
            let (mut scratch, mut lean) = (Vec::new(), Vec::new());
            for (i, rec) in recs.iter_mut().enumerate() {
                let python_doc = match rec {
                    Rec::Native(_) => None,
                    Rec::Python => match python_docs.get(&i) {
                        Some(d) => Some(d.as_slice()),
                        None => continue, // no document: merged into a later line, or dead-lettered
                    },
                };
                body.extend_from_slice(head);
                // Kafka topic names need no escaping ([a-zA-Z0-9._-]); escaped anyway.
                json::write_str(&mut body, &topics[i]);
                body.pop(); // reopen the quoted id
                body.push(b'-');
                json::write_int(&mut body, partitions[i]);
                body.push(b'-');
                json::write_int(&mut body, offsets[i]);
                body.extend_from_slice(b"\"}}\n");
                match (rec, python_doc) {
                    (Rec::Native(doc), _) => {
                        let c = counted[i].then(|| &counts[i * w..(i + 1) * w]);
                        document::finish(&mut tail, arena, doc, rate_keys, c, late[i], ecs_version);
                        let (first, rest) = document_parts(
                            &arena[doc.head.clone()], &mut tail,
                            extras.get(i).and_then(Option::as_ref), omit.as_deref(),
                            &mut scratch, &mut lean);
                        body.extend_from_slice(first);
                        body.extend_from_slice(rest);
                    }
                    (Rec::Python, Some(d)) => body.extend_from_slice(d),
                    (Rec::Python, None) => unreachable!("skipped above"),
                }
                body.push(b'\n');
                ends.push(body.len());
                kept.push(i);
            }
            (body, ends, kept)
        });
        Ok((PyBytes::new(py, &body), ends, kept))
    }

    /// Serialised documents in record order; None where the Python path owns the record.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let w = self.rate_keys.len();
        let mut tail = Vec::with_capacity(512);
        let (mut scratch, mut lean) = (Vec::new(), Vec::new());
        for (i, rec) in self.recs.iter_mut().enumerate() {
            match rec {
                Rec::Native(doc) => {
                    let counts = self.counted[i].then(|| &self.counts[i * w..(i + 1) * w]);
                    document::finish(&mut tail, &self.arena, doc, &self.rate_keys, counts,
                                     self.late[i], &self.ecs_version);
                    let (head, rest) = document_parts(
                        &self.arena[doc.head.clone()], &mut tail,
                        self.extras.get(i).and_then(Option::as_ref), self.omit.as_deref(),
                        &mut scratch, &mut lean);
                    // Both parts straight into the Python bytes: one copy.
                    out.append(PyBytes::new_with(py, head.len() + rest.len(), |b| {
                        b[..head.len()].copy_from_slice(head);
                        b[head.len()..].copy_from_slice(rest);
                        Ok(())
                    })?)?;
                }
                Rec::Python => out.append(py.None())?,
            }
        }
        Ok(out)
    }
}

/// The memory rate counters (see rates.rs), usable alone or through `Batch.count`.
#[pyclass(unsendable)]
struct NativeRates {
    inner: rates::Rates,
}

#[pymethods]
impl NativeRates {
    #[new]
    #[pyo3(signature = (windows, lateness_s, max_ips, evict_idle=true))]
    fn new(windows: Vec<i64>, lateness_s: i64, max_ips: usize, evict_idle: bool) -> Self {
        NativeRates { inner: rates::Rates::new(&windows, lateness_s, max_ips, evict_idle) }
    }

    fn count_batch_detailed<'py>(&mut self, py: Python<'py>, events: Vec<(String, f64)>)
                                 -> PyResult<(Bound<'py, PyList>, Vec<usize>)> {
        let out = PyList::empty(py);
        let mut late = Vec::new();
        let mut buf = Vec::new();
        for (i, (ip, ts)) in events.iter().enumerate() {
            if self.inner.count(ip, *ts, &mut buf) {
                late.push(i);
            }
            out.append(counts_tuple(py, &buf)?)?;
        }
        self.inner.end_batch(events.len(), late.len());
        Ok((out, late))
    }

    #[getter]
    fn windows(&self) -> Vec<i64> {
        self.inner.windows.clone()
    }
    #[getter]
    fn retention_s(&self) -> i64 {
        self.inner.retention
    }
    #[getter]
    fn events(&self) -> u64 {
        self.inner.events
    }
    #[getter]
    fn late_events(&self) -> u64 {
        self.inner.late_events
    }
    #[getter]
    fn evicted_idle(&self) -> u64 {
        self.inner.evicted_idle
    }
    #[getter]
    fn evicted_capacity(&self) -> u64 {
        self.inner.evicted_capacity
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    fn clear(&mut self) {
        self.inner.clear();
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Core>()?;
    m.add_class::<Batch>()?;
    m.add_class::<NativeRates>()?;
    m.add_function(wrap_pyfunction!(forward::forward_relay_values, m)?)?;
    m.add_function(wrap_pyfunction!(forward::forward_frame_scan, m)?)?;
    m.add("EPOCH_BASE", rates::EPOCH_BASE)?;
    m.add("MAX_EVENT_TS", rates::MAX_EVENT_TS)?;
    Ok(())
}

//! The memory rate backend of `pipeline.enrich.rates.memory`, same semantics (windows,
//! lateness, retention, idle and capacity eviction in recency order, the same eviction
//! schedule), so counts are identical whichever implementation runs.
//!
//! Per IP: buckets sorted by second, each holding the IP's running total up to and
//! including it; index 0 is a sentinel holding the total before the first kept bucket.
//! A window count is a subtraction of two running totals. Recency order is an
//! intrusive doubly linked list over a slab, so touching an IP is O(1).

use ahash::AHashMap;

pub const EPOCH_BASE: i64 = 1_700_000_000;
/// `pipeline.enrich.rates.MAX_EVENT_TS` (a test holds the two equal).
pub const MAX_EVENT_TS: f64 = (EPOCH_BASE + (1 << 31) - 2) as f64;
const NIL: u32 = u32::MAX;

struct Entry {
    ip: Box<str>,
    buckets: Vec<(i64, u64)>,
    prev: u32,
    next: u32,
}

pub struct Rates {
    pub windows: Vec<i64>,
    pub lateness: i64,
    pub retention: i64,
    pub max_ips: usize,
    pub evict_idle: bool,
    index: AHashMap<Box<str>, u32>,
    slab: Vec<Entry>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    newest: i64,
    pub events: u64,
    pub late_events: u64,
    pub evicted_idle: u64,
    pub evicted_capacity: u64,
    since_evict: usize,
    evict_every: usize,
}

impl Rates {
    pub fn new(windows: &[i64], lateness: i64, max_ips: usize, evict_idle: bool) -> Self {
        let mut w: Vec<i64> = windows.to_vec();
        w.sort_unstable();
        w.dedup();
        let retention = w.last().copied().unwrap_or(0) + lateness;
        Rates {
            windows: w,
            lateness,
            retention,
            max_ips,
            evict_idle,
            index: AHashMap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            newest: -(1 << 62),
            events: 0,
            late_events: 0,
            evicted_idle: 0,
            evicted_capacity: 0,
            since_evict: 0,
            evict_every: 64,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn clear(&mut self) {
        self.index.clear();
        self.slab.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
    }

    fn unlink(&mut self, i: u32) {
        let (p, n) = (self.slab[i as usize].prev, self.slab[i as usize].next);
        if p == NIL { self.head = n } else { self.slab[p as usize].next = n }
        if n == NIL { self.tail = p } else { self.slab[n as usize].prev = p }
    }

    fn push_back(&mut self, i: u32) {
        self.slab[i as usize].prev = self.tail;
        self.slab[i as usize].next = NIL;
        if self.tail == NIL { self.head = i } else { self.slab[self.tail as usize].next = i }
        self.tail = i;
    }

    /// Count one event; writes one count per window into `out`. Returns whether the
    /// event is later than the allowed lateness.
    pub fn count(&mut self, ip: &str, ts: f64, out: &mut Vec<u64>) -> bool {
        let t = ts.floor() as i64 - EPOCH_BASE;
        out.clear();
        let Some(&i) = self.index.get(ip) else {
            let entry = Entry { ip: ip.into(), buckets: vec![(t - 1, 0), (t, 1)], prev: NIL, next: NIL };
            let slot = match self.free.pop() {
                Some(s) => { self.slab[s as usize] = entry; s }
                None => { self.slab.push(entry); (self.slab.len() - 1) as u32 }
            };
            self.index.insert(ip.into(), slot);
            self.push_back(slot);
            if t > self.newest {
                self.newest = t;
            }
            out.resize(self.windows.len(), 1);
            return false;
        };
        self.unlink(i);
        self.push_back(i);
        let (retention, lateness) = (self.retention, self.lateness);
        let arr = &mut self.slab[i as usize].buckets;
        let (newest, last_total) = *arr.last().expect("sentinel and one bucket");
        let mut late = false;
        let hi;
        if t >= newest {
            if t == newest {
                arr.last_mut().unwrap().1 += 1;
            } else {
                arr.push((t, last_total + 1));
                let cut = t - retention + 1;
                if arr[1].0 < cut {
                    let j = 1 + arr[1..].partition_point(|b| b.0 < cut);
                    arr.drain(..j - 1);
                }
                if t > self.newest {
                    self.newest = t;
                }
            }
            hi = arr.len();
        } else {
            if t < newest - lateness {
                late = true;
            }
            if t <= newest - retention {
                out.resize(self.windows.len(), 1);
                return late;
            }
            let j = 1 + arr[1..].partition_point(|b| b.0 < t);
            if arr[j].0 == t {
                for b in &mut arr[j..] {
                    b.1 += 1;
                }
            } else {
                let total = arr[j - 1].1 + 1;
                arr.insert(j, (t, total));
                for b in &mut arr[j + 1..] {
                    b.1 += 1;
                }
            }
            hi = j + 1;
        }
        let top = arr[hi - 1].1;
        for &w in &self.windows {
            let start = t - w + 1;
            let k = 1 + arr[1..hi].partition_point(|b| b.0 < start);
            out.push(top - arr[k - 1].1);
        }
        late
    }

    /// After a batch of `n` events: bookkeeping and eviction, as `MemoryRates._evict`.
    pub fn end_batch(&mut self, n: usize, late: usize) {
        self.events += n as u64;
        self.late_events += late as u64;
        let len = self.index.len();
        let mut excess = len as i64 - self.max_ips as i64;
        self.since_evict += n;
        if excess <= 0 && self.since_evict < self.evict_every {
            return;
        }
        self.since_evict = 0;
        self.evict_every = 64.max(len >> 6);
        let mut doomed: Vec<u32> = Vec::new();
        let mut cur = self.head;
        if self.evict_idle {
            let horizon = self.newest - self.retention + 1;
            while cur != NIL {
                let e = &self.slab[cur as usize];
                if e.buckets.last().unwrap().0 >= horizon {
                    break;
                }
                doomed.push(cur);
                cur = e.next;
            }
        }
        self.evicted_idle += doomed.len() as u64;
        excess -= doomed.len() as i64;
        if excess > 0 {
            for _ in 0..excess {
                if cur == NIL {
                    break;
                }
                doomed.push(cur);
                cur = self.slab[cur as usize].next;
            }
            self.evicted_capacity += excess as u64;
        }
        for i in doomed {
            self.unlink(i);
            let e = &mut self.slab[i as usize];
            self.index.remove(&e.ip);
            e.buckets = Vec::new();
            e.ip = "".into();
            self.free.push(i);
        }
    }
}

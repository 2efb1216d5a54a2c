"""Enrichment plugins (pipeline/plugins) on both paths, failure isolation, config.

Every both-paths test asserts how many records the compiled core wrote (so the native
splice is what is compared, not the Python path with itself) and byte-identical
documents from the two paths.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

import pipeline.enricher as enricher_mod
from pipeline import native
from pipeline.clientip import ClientIpPolicy, ClientIpResolver
from pipeline.config import ConfigError, Settings, load_settings
from pipeline.decode.parser import make_parser
from pipeline.enricher import Enricher
from pipeline.fields import Field
from pipeline.plugins import EnricherPlugin, PluginBatch, installed
from pipeline.plugins.ip_lists import IpListsConfig, IpListsPlugin
from pipeline.plugins.runner import FAILED_TAG, PluginRunner, plugin_dead_letters
from pipeline.plugins.user_agent import UserAgentConfig, UserAgentPlugin
from pipeline.process import RecordProcessor
from pipeline.schema import FIELDS, field_map

pytestmark = pytest.mark.unit

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1")


@pytest.fixture(autouse=True)
def _need_native(monkeypatch: pytest.MonkeyPatch) -> None:
    if not native.available():
        if os.environ.get("ENVOYGEO_REQUIRE_NATIVE") == "1":
            pytest.fail("the native core is required here but was not built")
        pytest.skip("native core not built (no Rust toolchain at install)")
    monkeypatch.setattr(enricher_mod, "_ingested_now", lambda: "2026-11-29T05:00:00.000Z")


def line(ip: str, ua: str) -> bytes:
    """A bare Istio-format line from `ip` (peer) with this User-Agent."""
    return (f'[2026-11-29T04:59:00.000Z] "GET /a HTTP/1.1" 200 - via_upstream - "-" 0 5 1 1 '
            f'"-" "{ua}" "rid" "example.com" "10.0.7.2:8080" '
            f'outbound|8080||x.default.svc.cluster.local 10.0.7.1:5000 10.0.0.5:8080 '
            f'{ip}:4444 - default').encode()


def records() -> list[bytes]:
    """Native-path records plus two the core hands to Python (non-ASCII lines)."""
    out = [line("203.0.113.7", CHROME), line("198.51.100.20", IPHONE),
           line("192.0.2.1", "curl/8.5.0"), line("203.0.113.7", "-")]
    out.append(line("198.51.100.9", "Mozill\u00e4/5.0 (X11; Linux x86_64) Firefox/121.0"))
    out.append(line("203.0.113.8", CHROME).replace(b"/a", "/\u00e9".encode()))
    return out * 3


PYTHON_RECORDS = 6  # the non-ASCII ones


def make(use_native: bool, plugins: Sequence[EnricherPlugin]) -> Enricher:
    proc = RecordProcessor(make_parser("auto"), ClientIpResolver(ClientIpPolicy()))
    e = Enricher.build(proc, None, None, native=use_native, plugins=PluginRunner(plugins))
    assert (e._fast is not None) == use_native
    return e


def both(recs: list[bytes], plugins_for: Any, batch: int = 5,
         python_records: int = PYTHON_RECORDS) -> list[dict[str, Any]]:
    """Documents from both paths (asserted identical, bytes), parsed."""
    outs = []
    for use_native in (True, False):
        e = make(use_native, plugins_for())
        docs: list[bytes] = []
        for i in range(0, len(recs), batch):
            got, _ = e.enrich_batch(recs[i:i + batch])
            docs += [d.document for d in got]  # type: ignore[misc]
        outs.append(docs)
        if use_native:
            assert (e.records_native, e.records_python) == (
                len(recs) - python_records, python_records)
            bulk_e = make(True, plugins_for())
            ready = bulk_e.enrich_bulk(recs, ["t"] * len(recs), [0] * len(recs),
                                       list(range(len(recs))), b'{"index":{"_id":', False)
            assert ready is not None
            bulk_docs = ready.body.split(b"\n")[1::2]
            assert bulk_docs == docs  # finish_bulk splices as finish does
    assert outs[0] == outs[1]
    return [orjson.loads(d) for d in outs[0]]


def write_lists(tmp_path: Path) -> dict[str, list[Path]]:
    (tmp_path / "deny.txt").write_text("203.0.113.0/24  # bad range\n")
    (tmp_path / "scanners.txt").write_text("203.0.113.7\n192.0.2.0/24\n")
    (tmp_path / "customers.txt").write_text("198.51.100.0/24\n")
    return {n: [tmp_path / f"{n}.txt"] for n in ("deny", "scanners", "customers")}


def test_ip_lists_both_paths(tmp_path: Path) -> None:
    lists = write_lists(tmp_path)
    docs = both(records(), lambda: [IpListsPlugin(IpListsConfig(lists=lists))])
    by_ip = {d["source"]["ip"]: d["envoygeo"].get("ip_lists") for d in docs}
    assert docs[0]["envoygeo.ip_lists"] == ["deny", "scanners"]  # dotted, as spliced
    got = {d["source"]["ip"]: d.get("envoygeo.ip_lists") for d in docs}
    assert got == {"203.0.113.7": ["deny", "scanners"], "198.51.100.20": ["customers"],
                   "192.0.2.1": ["scanners"], "198.51.100.9": ["customers"],
                   "203.0.113.8": ["deny"]}
    assert all(v is None for v in by_ip.values())  # never also nested


def test_user_agent_both_paths() -> None:
    docs = both(records(), lambda: [UserAgentPlugin(UserAgentConfig())])
    first = docs[0]
    assert first["user_agent"] == {"original": CHROME}
    assert (first["user_agent.name"], first["user_agent.version"],
            first["user_agent.os.name"], first["user_agent.os.version"]) == (
        "Chrome", "120.0.0", "Windows", "10")
    assert docs[1]["user_agent.device.name"] == "iPhone"
    assert docs[2]["user_agent.name"] == "curl"
    assert "user_agent.name" not in docs[3]  # "-": no header, nothing added
    assert docs[4]["user_agent.os.name"] == "Linux"  # a Python-path record


def test_two_plugins_and_cache(tmp_path: Path) -> None:
    ua = UserAgentPlugin(UserAgentConfig(cache_size=2))
    lists = write_lists(tmp_path)
    docs = both(records(), lambda: [IpListsPlugin(IpListsConfig(lists=lists)),
                                    UserAgentPlugin(UserAgentConfig())])
    assert docs[0]["envoygeo.ip_lists"] == ["deny", "scanners"]
    assert docs[0]["user_agent.name"] == "Chrome"
    batch = PluginBatch([None] * 4, [CHROME, CHROME, IPHONE, "curl/8"])
    out = ua.enrich(batch)
    assert out[0] is out[1] and (ua.hits, ua.misses, len(ua._cache)) == (1, 3, 2)


class Boom(EnricherPlugin):
    name = "boom"
    fields = ()

    def enrich(self, batch: PluginBatch) -> list[dict[str, Any] | None]:
        raise RuntimeError("lookup service down")


class Undeclared(EnricherPlugin):
    name = "undeclared"

    def enrich(self, batch: PluginBatch) -> list[dict[str, Any] | None]:
        return [{"envoygeo.secret": 1} for _ in batch.client_ip]


@pytest.mark.parametrize("bad", [Boom, Undeclared])
def test_failing_plugin_is_isolated(bad: type[EnricherPlugin], tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    lists = write_lists(tmp_path)
    caplog.set_level(logging.ERROR, "pipeline.plugins")
    docs = both(records(), lambda: [bad(bad.Config()),
                                    IpListsPlugin(IpListsConfig(lists=lists))])
    assert len(docs) == len(records())  # every record still indexed
    assert all(FAILED_TAG in d["tags"] for d in docs)
    assert docs[0]["envoygeo.ip_lists"] == ["deny", "scanners"]  # the other plugin ran
    assert not any("envoygeo.secret" in d for d in docs)
    lines = [r.getMessage() for r in caplog.records]
    # one line per plugin per minute: the first batch of each of the 3 enrichers
    assert len(lines) == 3 and all(f"enrichment plugin {bad.name} failed" in m for m in lines)
    runner = PluginRunner([bad(bad.Config())])
    runner.fragments(PluginBatch(["1.2.3.4"], [None]))
    runner.fragments(PluginBatch(["1.2.3.4"], [None]))
    assert runner.errors == {bad.name: 2}


class Flaky(EnricherPlugin):
    """Adds a field, but fails any batch that holds the poison client."""

    name = "flaky"
    fields = (Field("labels.flaky", "keyword", "Set by the test plugin."),)
    POISON = "192.0.2.66"

    def enrich(self, batch: PluginBatch) -> list[dict[str, Any] | None]:
        if self.POISON in batch.client_ip:
            raise RuntimeError("poison client in the batch")
        return [{"labels.flaky": "ok"} for _ in batch.client_ip]


FLAKY_WHY = "enrichment plugin flaky failed: RuntimeError: poison client in the batch"


def bulk_of(e: Enricher, values: list[bytes]) -> Any:
    n = len(values)
    return e.enrich_bulk(values, ["t"] * n, [0] * n, list(range(n)), b'{"index":{"_id":',
                         False)


def test_every_entry_point_reports_the_batch_a_plugin_failed_on() -> None:
    """`Enricher.plugin_failure` (what the worker dead-letters on) is the latest batch's:
    set when a plugin fails, None again on the next clean batch, on each path and entry
    point, also when the poison record is one the compiled core hands to Python."""
    clean = [line("203.0.113.7", "x")]
    poisons = [line(Flaky.POISON, "x"), line(Flaky.POISON, "Mozill\u00e4/5.0")]
    for use_native in (True, False):
        e = make(use_native, [Flaky(Flaky.Config())])
        calls: list[Any] = [e.enrich_batch, e.enrich_records]
        if use_native:
            calls.append(functools.partial(bulk_of, e))
        for call in calls:
            for poison in poisons:
                call(clean + [poison])
                assert e.plugin_failure == FLAKY_WHY
                call(clean)
                assert e.plugin_failure is None
        if use_native:  # the core wrote the ASCII records of enrich_batch/enrich_bulk;
            # Python the rest: its non-ASCII poison there, and all 6 of enrich_records
            assert (e.records_native, e.records_python) == (2 * 5, 2 + 6)


def test_dead_letter_choice_logs_what_happens_and_counts_every_failing_plugin(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "pipeline.plugins")
    runner = PluginRunner([Flaky(Flaky.Config()), Boom(Boom.Config())], "dead_letter")
    frags, why = runner.fragments(PluginBatch([Flaky.POISON, "1.2.3.4"], [None, None]))
    assert why == FLAKY_WHY and frags == [None, None]  # the first failure is the reason
    assert runner.errors == {"flaky": 1, "boom": 1}  # the second is counted as well
    assert [r.getMessage().split("; ")[1] for r in caplog.records] == [
        "the batch goes to the dead letters, stage plugin (plugins.on_error: dead_letter)"
    ] * 2
    failed = SimpleNamespace(plugin_failure=FLAKY_WHY)
    both_out = Settings.model_validate({"plugins": {"on_error": "dead_letter"},
                                        "parse": {"unparsed": "dead_letter"}})
    unparsed = [(1, "x"), (3, "y")]
    assert plugin_dead_letters(failed, both_out, 5, unparsed) == (FLAKY_WHY, [0, 2, 4])
    assert plugin_dead_letters(failed, both_out, 3, []) == (FLAKY_WHY, [0, 1, 2])
    # unparsed lines that are indexed (parse.unparsed: index) go with the batch
    plugin_only = Settings.model_validate({"plugins": {"on_error": "dead_letter"}})
    assert plugin_dead_letters(failed, plugin_only, 5, unparsed) == (FLAKY_WHY, [0, 1, 2, 3, 4])
    assert plugin_dead_letters(failed, Settings(), 5, unparsed) is None  # on_error: index
    assert plugin_dead_letters(SimpleNamespace(plugin_failure=None), both_out, 5, []) is None


class Msg:
    """What the worker reads of a consumed Kafka record."""

    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def value(self) -> bytes:
        return self._value

    def key(self) -> None:
        return None

    def topic(self) -> str:
        return "logs"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1795914780000)


@pytest.mark.parametrize("on_error", ["index", "dead_letter"])
@pytest.mark.parametrize("use_native", [True, False])
def test_worker_indexes_or_dead_letters_the_batch_a_plugin_failed_on(
        on_error: str, use_native: bool) -> None:
    """The worker's batch step: the clean batch is indexed with the plugin's field; the
    batch the plugin failed on is indexed tagged (index) or dead-lettered whole with
    stage plugin, its unparsed line staying a parse dead letter (dead_letter)."""
    from types import SimpleNamespace

    from pipeline.sinks.elasticsearch import EncodedBulk, action_head, encode_items
    from pipeline.worker import Worker

    settings = Settings.model_validate({"plugins": {"on_error": on_error},
                                        "parse": {"unparsed": "dead_letter"}})
    e = make(use_native, [Flaky(Flaky.Config())])
    worker = Worker(settings, enricher=e, sink=SimpleNamespace(  # type: ignore[arg-type]
        action_head=lambda index: action_head(b"index", index)), side=object())  # type: ignore[arg-type]

    def docs(items: Any) -> list[dict[str, Any]]:
        enc = items if isinstance(items, EncodedBulk) else encode_items(items)
        return [orjson.loads(x) for x in enc.body.splitlines()[1::2]]

    clean = [Msg(i, line("203.0.113.7", "x")) for i in range(3)]
    batch = worker._prepare(clean)
    assert [d["labels.flaky"] for d in docs(batch.items)] == ["ok"] * 3
    assert batch.dead_letters == []
    bad = [Msg(3, line("203.0.113.7", "x")), Msg(4, line(Flaky.POISON, "x")),
           Msg(5, b"not an access log"), Msg(6, line("198.51.100.1", "x"))]
    batch = worker._prepare(bad)
    stages = [(dict(d.headers)["envoygeo.source"], dict(d.headers)["envoygeo.stage"])
              for d in batch.dead_letters]
    if on_error == "index":
        got = docs(batch.items)
        assert len(got) == 3 and all(FAILED_TAG in d["tags"] for d in got)
        assert not any("labels.flaky" in d for d in got)
        assert stages == [(b"logs/0/5", b"parse")]
    else:
        assert docs(batch.items) == []
        assert sorted(stages) == [(b"logs/0/3", b"plugin"), (b"logs/0/4", b"plugin"),
                                  (b"logs/0/5", b"parse"), (b"logs/0/6", b"plugin")]
        errors = {dict(d.headers)["envoygeo.error"] for d in batch.dead_letters}
        assert FLAKY_WHY.encode() in errors
        assert [d.value for d in batch.dead_letters
                if dict(d.headers)["envoygeo.stage"] == b"plugin"] == [
            bad[0].value(), bad[1].value(), bad[3].value()]  # the records as they came
    assert (e.records_native > 0) == use_native


def test_ip_lists_hot_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lists = write_lists(tmp_path)
    plugin = IpListsPlugin(IpListsConfig(lists=lists, check_interval_s=0))
    e = make(True, [plugin])
    ip_doc = [line("192.0.2.1", "x")]
    first = orjson.loads(e.enrich_batch(ip_doc)[0][0].document or b"")
    assert first["envoygeo.ip_lists"] == ["scanners"]
    new = tmp_path / "deny.new"
    new.write_text("192.0.2.0/25\n")
    new.replace(tmp_path / "deny.txt")  # atomic, as an operator's tooling would
    second = orjson.loads(e.enrich_batch(ip_doc)[0][0].document or b"")
    assert second["envoygeo.ip_lists"] == ["deny", "scanners"]
    bad = tmp_path / "deny.bad"
    bad.write_text("192.0.2.0/25\nnot-an-ip\n")
    bad.replace(tmp_path / "deny.txt")
    caplog.set_level(logging.ERROR)
    third = orjson.loads(e.enrich_batch(ip_doc)[0][0].document or b"")
    assert third["envoygeo.ip_lists"] == ["deny", "scanners"]  # the old list kept
    assert plugin.reload_failures == 1 and plugin.reloads == 1
    assert any("deny.txt:2: 'not-an-ip'" in r.getMessage() for r in caplog.records)


def test_enrich_records_merges_into_dicts(tmp_path: Path) -> None:
    lists = write_lists(tmp_path)
    e = make(False, [IpListsPlugin(IpListsConfig(lists=lists)),
                     UserAgentPlugin(UserAgentConfig())])
    out, _ = e.enrich_records([line("203.0.113.7", CHROME)])
    doc = out[0].doc  # type: ignore[union-attr]
    assert doc["envoygeo"]["ip_lists"] == ["deny", "scanners"]
    assert doc["user_agent"]["name"] == "Chrome" and doc["user_agent"]["original"] == CHROME
    assert doc["user_agent"]["os"]["name"] == "Windows"


def test_bundled_plugins_installed_and_fields_in_table() -> None:
    assert {"ip_lists", "user_agent"} <= set(installed())
    fm = field_map(FIELDS)
    assert fm["envoygeo.ip_lists"].array and fm["user_agent.os.name"].es_type == "keyword"


def config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_config_validates_plugin_sections(tmp_path: Path) -> None:
    write_lists(tmp_path)
    s = load_settings(config(tmp_path, f"""
plugins:
  enabled: [ip_lists, user_agent]
  ip_lists:
    lists: {{deny: [{tmp_path}/deny.txt]}}
"""), environ={})
    assert s.plugins.enabled == ["ip_lists", "user_agent"]
    e = Enricher.from_settings(s)
    assert [p.name for p in e.plugins.plugins] == ["ip_lists", "user_agent"]  # type: ignore[union-attr]
    (tmp_path / "bad.txt").write_text("10.1.2.3/8\n")
    cases = {
        "plugins:\n  enabled: [geo_magic]\n": "plugins.enabled: 'geo_magic' is not an installed",
        "plugins:\n  enabled: [ip_lists]\n": "plugins.ip_lists: section missing: lists",
        f"plugins:\n  ip_lists:\n    lists: {{deny: [{tmp_path}/bad.txt]}}\n":
            "bad.txt:1: '10.1.2.3/8' has host bits set",
        "plugins:\n  user_agent:\n    cache_sise: 5\n": "plugins.user_agent.cache_sise",
        "plugins:\n  ua:\n    cache_size: 5\n": "plugins.ua: no installed enrichment plugin",
        "plugins:\n  on_error: drop\n": "plugins.on_error",
    }
    for text, why in cases.items():
        with pytest.raises(ConfigError) as err:
            load_settings(config(tmp_path, text), environ={})
        assert why in str(err.value), str(err.value)


def test_the_bench_trivial_plugin_writes_its_field_on_both_paths() -> None:
    """`bench core --plugin` times TrivialPlugin: it must really add its field, on the
    compiled path (every record native) as on the Python one."""
    from pipeline.bench.core import TrivialPlugin

    recs = [r for r in records() if r.isascii()]
    docs = both(recs, lambda: [TrivialPlugin(TrivialPlugin.Config())], python_records=0)
    assert [d["labels.bench"] for d in docs] == ["x"] * len(recs)  # dotted, as spliced


def test_bench_core_plugin_prints_the_plugins_cost() -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["bench", "core", "--plugin", "--events", "2000",
                                    "--runs", "1"])
    assert res.exit_code == 0, res.output
    rows = [r for r in res.output.splitlines() if "CPU µs/event" in r]
    assert len(rows) == 4  # each path without and with the plugin
    assert sum("µs for the plugin" in r for r in rows) == 2

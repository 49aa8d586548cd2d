"""Two machines sharing builds through a remote cache, on one machine: the synthetic monorepo of
bench_monorepo.py built cold in workspace A with uploads on, then in workspace B (a fresh clone:
empty build/ and empty local cache) against the same nginx (tests/nginx_server.py: Debian's
nginx-light with WebDAV on 127.0.0.1).

    python benchmarks/bench_remote.py [--manifests 20] [--hidden 64] [--jobs 2] [--repeat 3] [--keep DIR]

Times (wall clock of a fresh `python -m doit build` process, interpreter start included):

  local only    a cold build with no remote cache (the baseline: what A would cost without uploads)
  A upload      a cold build with KILN_REMOTE_CACHE_UPLOAD=1 (every step runs, then HEAD/PUT)
  B restore     B's cold build, read-only: every step restored from the remote cache

and the traffic nginx logged for the first round (request and response bytes, headers included;
GET/HEAD/PUT counts). Medians over --repeat rounds, each with fresh workspaces and its own empty
instance prefix on the server, local/A/B interleaved so machine load hits all three alike. B's wall
as a ratio of A's is the figure the issue asks for; B is checked to have restored every step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]

from bench_monorepo import doit, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of each MLP: 64 gives 13 KB models, 8192 about 1.1 MB")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (fresh workspaces and an empty remote each); medians are printed")
    parser.add_argument("--keep", type=Path, help="build the workspaces here and keep them")
    args = parser.parse_args()
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise SystemExit("bench_remote: nginx is not installed (apt-get install -y nginx-light)")
    from nginx_server import start_nginx

    top = args.keep or Path(tempfile.mkdtemp(prefix="kiln-remote-"))
    token = "bench-token"
    server = start_nginx(top / "nginx", token, log_requests=True)
    try:
        rounds = [_round(top / f"round{i}", args, f"{server.url}/round{i}", token, server) for i in range(args.repeat)]
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    local, a, b = (sorted(r[i] for r in rounds)[len(rounds) // 2] for i in range(3))
    up, down = rounds[0][3], rounds[0][4]
    steps = 10 * args.manifests
    print(f"{args.manifests} manifests, {steps} steps, --hidden {args.hidden}, -n {args.jobs}; nginx on 127.0.0.1 (this machine); "
          f"medians of {args.repeat} rounds, each a fresh `python -m doit build` in a fresh workspace, the rounds interleaved")
    print("\n| build | wall s | steps | requests (GET/HEAD/PUT) | bytes to server | bytes from server |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| local only (no remote) | {local:.1f} | {steps} ran | - | - | - |")
    print(f"| A: cold, uploading | {a:.1f} | {steps} ran | {_requests(up)} | {up['bytes_in'] / 1e6:.2f} MB | {up['bytes_out'] / 1e6:.2f} MB |")
    print(f"| B: empty clone, restoring | {b:.1f} | {steps} restored | {_requests(down)} | {down['bytes_in'] / 1e6:.2f} MB | {down['bytes_out'] / 1e6:.2f} MB |")
    print(f"\nB / A = {b / a:.2f}; A / local only = {a / local:.2f} (what uploading costs); per-round (local, A, B) s: "
          + ", ".join(f"({r[0]:.1f}, {r[1]:.1f}, {r[2]:.1f})" for r in rounds))


def _round(top: Path, args, url: str, token: str, server) -> tuple[float, float, float, dict[str, int], dict[str, int]]:
    """One round: local-only, A (uploading to an empty instance), B (restoring). Walls and traffic."""
    generate(top / "local", args.manifests, args.hidden)
    local = doit(top / "local", "dodo.py", args.jobs, {"KILN_REMOTE_CACHE": "off"})[0]
    env = {"KILN_REMOTE_CACHE": url, "KILN_REMOTE_CACHE_TOKEN": token, "KILN_REMOTE_CACHE_REQUIRED": "1"}
    before = server.traffic()
    generate(top / "a", args.manifests, args.hidden)
    a = doit(top / "a", "dodo.py", args.jobs, env | {"KILN_REMOTE_CACHE_UPLOAD": "1"})[0]
    middle = server.traffic()
    generate(top / "b", args.manifests, args.hidden)
    b = doit(top / "b", "dodo.py", args.jobs, env | {"KILN_REMOTE_CACHE_UPLOAD": "0"})[0]
    after = server.traffic()
    whys = [s.get("why") or "" for report in (top / "b" / "build").glob("*/report.json") for s in json.loads(report.read_text())["steps"] if s["status"] == "ran"]
    if len(whys) != 10 * args.manifests or not all(why.endswith("restored from the remote cache") for why in whys):
        raise SystemExit(f"bench_remote: B ran steps it should have restored: {[w for w in whys if 'remote' not in w][:5]}")
    for name in ("local", "a", "b"):
        if not args.keep:
            shutil.rmtree(top / name)
    return local, a, b, _minus(middle, before), _minus(after, middle)


def _minus(later: dict[str, int], earlier: dict[str, int]) -> dict[str, int]:
    return {k: later[k] - earlier[k] for k in later}


def _requests(traffic: dict[str, int]) -> str:
    return f"{traffic['requests']} ({traffic['GET']}/{traffic['HEAD']}/{traffic['PUT']})"


if __name__ == "__main__":
    main()

